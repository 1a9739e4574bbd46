"""Attention recall and activation ratios (docs/phsa.md)."""

from __future__ import annotations

import math
import time

import pytest
import torch

from phsa_train.attention import (
    PHSAParams,
    activation_ratio,
    attention_recall,
    causal_activation_ratio,
    measured_activation,
    select_blocks,
)
from phsa_train.attention.phsa import attended_mask

from tests.helpers import DT, assert_close, make_inputs


def test_recall_is_one_when_topk_covers_everything():
    cu = torch.tensor([0, 30, 71], dtype=torch.int64)
    q, k, v, pm = make_inputs(1, 71, 4, 2)
    knobs = dict(block_size=4, n_init=3, local_window=5, query_block=2)
    for cu_seqlens in (None, cu):
        idx = select_blocks(q, k, pm, topk=100, cu_seqlens=cu_seqlens, **knobs)
        r = attention_recall(q, k, v, idx, cu_seqlens=cu_seqlens, **knobs)
        assert_close("recall", torch.ones_like(r), r, 1e-14)


def test_recall_handmade():
    """d = 1, q = 1, k[j] = log(j + 1), scale 1: dense weights of query 5 are (1, 2, ..., 6) / 21.
    m = 2, n_init = 0, w = 2: S(5) = {4, 5} plus the chosen block."""
    L = 6
    q = torch.ones(1, L, 1, 1, dtype=DT)
    k = torch.log(torch.arange(1, L + 1, dtype=DT)).view(1, L, 1, 1)
    idx = torch.full((1, L, 1, 1), -1, dtype=torch.long)
    knobs = dict(block_size=2, n_init=0, local_window=2, softmax_scale=1.0)
    r = attention_recall(q, k, None, idx, **knobs)
    assert r[0, 5, 0].item() == pytest.approx((5 + 6) / 21, rel=1e-14)
    assert r[0, 1, 0].item() == pytest.approx(1.0, rel=1e-14)  # LOCAL covers the whole causal row
    assert r[0, 2, 0].item() == pytest.approx((2 + 3) / 6, rel=1e-14)  # {1, 2} of {0, 1, 2}
    idx[0, 5, 0, 0] = 0  # block 0 = tokens {0, 1}
    r = attention_recall(q, k, None, idx, **knobs)
    assert r[0, 5, 0].item() == pytest.approx((1 + 2 + 5 + 6) / 21, rel=1e-14)


def test_recall_chunking_and_mask_agree():
    q, k, v, pm = make_inputs(2, 90, 4, 2)
    knobs = dict(block_size=8, n_init=4, local_window=8, query_block=3)
    idx = select_blocks(q, k, pm, topk=2, **knobs)
    r = attention_recall(q, k, v, idx, chunk=7, **knobs)
    assert_close("chunked", attention_recall(q, k, v, idx, **knobs), r, 1e-14)
    # Against the full support mask and a dense causal softmax.
    p = torch.softmax(
        (torch.einsum("bihd,bjhd->bhij", q, k.repeat_interleave(2, 2)) / math.sqrt(8)).masked_fill(
            ~torch.ones(90, 90, dtype=torch.bool).tril(), float("-inf")
        ),
        dim=-1,
    )
    mask = attended_mask(idx, PHSAParams(topk=2, **knobs)).repeat_interleave(2, 1)
    assert_close("mask", (p * mask).sum(-1).transpose(1, 2), r, 1e-14)
    assert (r > 0).all() and (r <= 1 + 1e-12).all() and (r < 1 - 1e-6).any()


def test_recall_long_sequence_fits_in_chunks():
    g = torch.Generator().manual_seed(0)
    L = 8192
    q, k = torch.randn(1, L, 1, 16, generator=g), torch.randn(1, L, 1, 16, generator=g)
    knobs = dict(block_size=16, n_init=128, local_window=512)
    idx = select_blocks(q, k, None, topk=4, **knobs)
    r = attention_recall(q, k, None, idx, **knobs)
    assert r.shape == (1, L, 1) and r.dtype == torch.float32 and torch.isfinite(r).all()


def test_activation_ratio_budget():
    assert activation_ratio(32768, 128, 512, 16, 16) == 896 / 32768 == 0.02734375
    assert 1 - activation_ratio(32768, 128, 512, 2, 16) == pytest.approx(0.9795, abs=1e-4)
    assert activation_ratio(512, 128, 512, 16, 16) == 1.0


@pytest.mark.parametrize("score", ["softmax_group_sum", "dot_group_sum"])
@pytest.mark.parametrize("query_block", [1, 3])
@pytest.mark.parametrize("n_init", [0, 6])
def test_causal_ratio_matches_most_recent_selection(query_block, n_init, score):
    """Zero queries make every logit exactly 0 on any CPU, so every eligible block ties and the selection is the
    most recent eligible blocks: the structural causal ratio, the measured one and the support mask agree.
    (Identical keys with random queries do not tie exactly: q·M is rounded differently per block column by
    some GEMM kernels, e.g. AVX2.)"""
    L, m, w, topk = 77, 4, 6, 3
    _, k, _, _ = make_inputs(1, L, 4, 2)
    q = torch.zeros(1, L, 4, 8, dtype=DT)
    knobs = dict(block_size=m, n_init=n_init, local_window=w, query_block=query_block, score=score)
    idx = select_blocks(q, k, None, topk=topk, **knobs)
    del knobs["score"]
    measured = measured_activation(idx, **knobs)
    mask = attended_mask(idx, PHSAParams(topk=topk, **knobs))
    from_mask = (mask.sum(-1).double() / torch.arange(1, L + 1, dtype=DT)).mean().item()
    assert measured == pytest.approx(from_mask, rel=1e-12)
    assert causal_activation_ratio(L, n_init, w, topk, m, query_block) == pytest.approx(measured, rel=1e-12)


def test_measured_activation_random_selection_and_packed():
    cu = torch.tensor([0, 40, 90], dtype=torch.int32)
    q, k, _, pm = make_inputs(1, 90, 4, 2)
    knobs = dict(block_size=4, n_init=5, local_window=7, query_block=2)
    idx = select_blocks(q, k, pm, topk=3, cu_seqlens=cu, **knobs)
    mask = attended_mask(idx, PHSAParams(topk=3, **knobs), cu_seqlens=cu)
    pos = torch.cat([torch.arange(1, 41), torch.arange(1, 51)]).double()
    assert measured_activation(idx, cu_seqlens=cu, **knobs) == pytest.approx(
        (mask.sum(-1).double() / pos).mean().item(), rel=1e-12
    )


def test_causal_ratio_is_fast_and_dense_when_budget_covers():
    t = time.perf_counter()
    a = causal_activation_ratio(131072, 128, 512, 16, 16)
    assert time.perf_counter() - t < 1.0
    assert activation_ratio(131072, 128, 512, 16, 16) < a < 1
    assert causal_activation_ratio(1000, 0, 16, 1000, 16) == pytest.approx(1.0)
