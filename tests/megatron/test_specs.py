"""PHSA as a Megatron-Core spec swap: structure, dense equivalence, and a few training steps on CPU."""
import pytest
import torch

from phsa_train.attention import PHSAParams
from phsa_train.megatron import PHSACoreAttention, PHSASettings, get_dense_layer_spec, get_phsa_layer_spec
from phsa_train.megatron.core_attention import DenseCoreAttention, set_sparsity
from phsa_train.megatron.token_info import make_token_info
from phsa_train.megatron.model import build_model
from tests.helpers import compose

VOCAB, SEQ = 256, 64


def test_phsa_spec_swaps_only_core_attention():
    dense, phsa = get_dense_layer_spec(), get_phsa_layer_spec(PHSASettings(PHSAParams(block_size=16)))
    d_attn, p_attn = dense.submodules.self_attention, phsa.submodules.self_attention
    assert p_attn.submodules.core_attention.module is PHSACoreAttention
    assert d_attn.submodules.core_attention.module is DenseCoreAttention
    for name in ("linear_qkv", "linear_proj", "q_layernorm", "k_layernorm"):
        assert getattr(p_attn.submodules, name) == getattr(d_attn.submodules, name)
    assert phsa.submodules.mlp == dense.submodules.mlp


def _model(overrides):
    cfg = compose(["model=tiny", f"data.seq_len={SEQ}", *overrides])
    torch.manual_seed(0)
    return build_model(cfg, VOCAB, torch.float32)


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (2, SEQ + 1), generator=g)
    lut = torch.zeros(VOCAB, dtype=torch.bool)
    lut[::5] = True
    x = tokens[:, :-1]
    return x, tokens[:, 1:], torch.arange(SEQ).expand(2, SEQ), make_token_info(x, lut, None)


def test_full_topk_phsa_model_equals_dense_model(single_process):
    dense = _model(["attention=dense"])
    phsa = _model(["attention=phsa", "attention.n_init=8", "attention.local_window=16", "attention.train_topk=4",
                   "attention.query_block=1", "attention.backend=reference"])
    phsa.load_state_dict(dense.state_dict())
    x, y, pos, info = _batch()
    set_sparsity(phsa, train_topk=SEQ // 16, eval_topk=SEQ // 16)
    ref = dense(x, pos, None, extra_block_kwargs={"attention_bias": info})
    out = phsa(x, pos, None, extra_block_kwargs={"attention_bias": info})
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    set_sparsity(phsa, train_topk=1)
    assert not torch.allclose(phsa(x, pos, None, extra_block_kwargs={"attention_bias": info}), ref, atol=1e-3)


def test_tiny_phsa_gpt_trains_on_cpu(single_process):
    model = _model(["attention=phsa", "attention.n_init=8", "attention.local_window=16", "attention.train_topk=2",
                    "attention.first_dense_layers=1"])
    assert [m.dense for m in model.modules() if isinstance(m, PHSACoreAttention)] == [True, False]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    x, y, pos, info = _batch()
    losses = []
    for _ in range(8):
        opt.zero_grad()
        loss = model(x, pos, None, labels=y, extra_block_kwargs={"attention_bias": info}).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5, losses


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for CPU runs")
def test_full_recompute_on_cpu_is_refused_in_one_line(single_process):
    from phsa_train.config import ConfigError

    cfg = compose(["model=tiny", "data.seq_len=64", "train.recompute=full"])
    with pytest.raises(ConfigError, match=r"train.recompute=full needs a GPU.*none \| selective"):
        build_model(cfg, VOCAB, torch.float32)
