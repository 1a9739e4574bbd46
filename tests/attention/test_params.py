"""Bad configurations fail at the boundary with a message naming the knob."""

from __future__ import annotations

import pytest
import torch

from phsa_train.attention import PHSAParams, phsa_attention, select_blocks

KNOBS = dict(block_size=4, n_init=4, local_window=8, topk=2)


def inputs(b=1, L=16, hq=4, hk=2):
    return torch.randn(b, L, hq, 8), torch.randn(b, L, hk, 8), torch.randn(b, L, hk, 8), torch.zeros(b, L, dtype=bool)


@pytest.mark.parametrize(
    "override, match",
    [
        ({"local_window": 2}, r"attention\.local_window=2 must be >= attention\.block_size=4"),
        ({"topk": -1}, r"attention\.topk=-1"),
        ({"score": "max"}, r"attention\.score='max'.*softmax_group_sum \| dot_group_sum"),
        ({"lam": 1.5}, r"attention\.lam=1\.5"),
        ({"n_init": -3}, r"attention\.n_init=-3"),
        ({"block_size": 0}, r"attention\.block_size=0.*16\|32\|64"),
        ({"query_block": 0}, r"attention\.query_block=0"),
        ({"softmax_scale": -1.0}, r"attention\.softmax_scale=-1\.0"),
    ],
)
def test_bad_params(override, match):
    with pytest.raises(ValueError, match=match):
        PHSAParams(**{**KNOBS, **override}).validate()
    q, k, v, pm = inputs()
    with pytest.raises(ValueError, match=match):
        phsa_attention(q, k, v, pm, **{**KNOBS, **override})


def test_bad_shapes_and_backend():
    q, k, v, pm = inputs(hq=3, hk=2)
    with pytest.raises(ValueError, match=r"hq=3 must be a multiple of .*hk=2"):
        phsa_attention(q, k, v, pm, **KNOBS)
    q, k, v, pm = inputs()
    with pytest.raises(ValueError, match=r"attention\.backend='cuda' must be one of auto \| reference \| triton"):
        phsa_attention(q, k, v, pm, **KNOBS, backend="cuda")
    with pytest.raises(ValueError, match=r"attention\.backend"):
        select_blocks(q, k, pm, **KNOBS, backend="flash")
    with pytest.raises(ValueError, match=r"punct_mask must be a bool tensor"):
        phsa_attention(q, k, v, pm.float(), **KNOBS)
    with pytest.raises(ValueError, match=r"share one floating dtype"):
        phsa_attention(q, k.double(), v, pm, **KNOBS)


def test_bad_cu_seqlens():
    q, k, v, pm = inputs(b=2)
    with pytest.raises(ValueError, match=r"cu_seqlens .*requires batch size 1; got q\.shape\[0\]=2"):
        phsa_attention(q, k, v, pm, **KNOBS, cu_seqlens=torch.tensor([0, 16], dtype=torch.int32))
    q, k, v, pm = inputs()
    for cu in ([0, 10, 12], [1, 10, 16], [0, 10, 5, 16]):
        with pytest.raises(ValueError, match=r"cu_seqlens must be non-decreasing from 0 to L=16"):
            phsa_attention(q, k, v, pm, **KNOBS, cu_seqlens=torch.tensor(cu))
    with pytest.raises(ValueError, match=r"int32/int64"):
        phsa_attention(q, k, v, pm, **KNOBS, cu_seqlens=torch.tensor([0.0, 16.0]))
