"""The fused RMSNorm / RoPE of phsa_train.megatron.fused against the modules Megatron-Core uses without them.

On CPU the functions run eagerly and must equal Megatron's arithmetic exactly (same ops, same rounding); the
compiled GPU kernels are compared in tests/gpu/test_fused_gpu.py.
"""
import torch
from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd

from phsa_train.config import compose
from phsa_train.megatron.fused import FusedRMSNorm, fused_kernels_enabled, rms_norm, rope_bshd
from phsa_train.megatron.specs import layer_spec_from_config


def test_rms_norm_is_torch_rms_norm():
    torch.manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(64, 2, 4, 32, dtype=dtype)
        ref = torch.nn.RMSNorm(32, eps=1e-6).to(dtype)
        torch.nn.init.normal_(ref.weight)
        fused = FusedRMSNorm(None, 32, eps=1e-6).to(dtype)
        fused.load_state_dict(ref.state_dict())
        assert torch.equal(fused(x), ref(x))
        assert torch.equal(rms_norm(x, ref.weight, 1e-6), ref(x))


def test_rope_is_megatrons_unfused_rope():
    torch.manual_seed(0)
    for dtype, r in ((torch.float32, 32), (torch.bfloat16, 32), (torch.float32, 16)):
        t = torch.randn(48, 1, 4, 32, dtype=dtype, requires_grad=True)
        freqs = torch.randn(48, 1, 1, r) * 3
        a, b = rope_bshd(t, freqs), _apply_rotary_pos_emb_bshd(t, freqs)
        assert torch.equal(a, b)
        g = torch.randn_like(a)
        (ga,) = torch.autograd.grad(a, t, g)
        (gb,) = torch.autograd.grad(b, t, g)
        assert torch.equal(ga, gb)


def test_fused_norms_only_on_a_gpu_and_when_asked():
    cfg = compose(["model=tiny"])
    assert fused_kernels_enabled(cfg) == torch.cuda.is_available()
    assert not fused_kernels_enabled(compose(["model=tiny", "train.fused_kernels=false"]))
    spec = layer_spec_from_config(cfg)
    attn = spec.submodules.self_attention.submodules
    norms = {spec.submodules.input_layernorm, spec.submodules.pre_mlp_layernorm, attn.q_layernorm, attn.k_layernorm}
    assert (norms == {FusedRMSNorm}) == torch.cuda.is_available()


def test_gpt_with_fused_norms_and_rope_equals_megatrons_local_gpt(single_process):
    """The whole model, built as a GPU run builds it (fused norm slots, RoPE through apply_rope_fusion), runs the
    functions eagerly here and must give Megatron's local-spec logits and gradients."""
    import dataclasses

    from megatron.core.models.gpt import GPTModel

    from phsa_train.compat import megatron_core_0_16_1
    from phsa_train.megatron.fused import fused_rope
    from phsa_train.megatron.model import build_model, transformer_config
    from phsa_train.megatron.specs import get_dense_layer_spec

    cfg = compose(["model=tiny", "data.seq_len=64", "attention=dense"])
    torch.manual_seed(0)
    ref = build_model(cfg, 256, torch.float32)
    megatron_core_0_16_1.provide_fused_rope(fused_rope)
    config = dataclasses.replace(transformer_config(cfg, torch.float32), apply_rope_fusion=True)
    m = cfg.model
    fused = GPTModel(config=config, transformer_layer_spec=get_dense_layer_spec(fused_norms=True), vocab_size=256,
                     max_sequence_length=m.max_position_embeddings, share_embeddings_and_output_weights=m.tie_embeddings,
                     position_embedding_type="rope", rotary_base=int(m.rotary_base))
    assert sum(isinstance(x, FusedRMSNorm) for x in fused.modules()) == 4 * m.num_layers
    fused.load_state_dict(ref.state_dict())
    tokens = torch.randint(0, 256, (2, 64), generator=torch.Generator().manual_seed(1))
    pos = torch.arange(64).expand(2, 64)
    out_ref, out = ref(tokens, pos, None), fused(tokens, pos, None)
    assert torch.equal(out, out_ref)
    out.square().mean().backward()
    out_ref.square().mean().backward()
    for (name, p), q in zip(fused.named_parameters(), ref.parameters()):  # reduction order differs: fp32 close
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7, msg=name)


def test_full_recompute_calls_stay_compiled(single_process, monkeypatch):
    """Every kind of rms_norm / RoPE call a training step with full recompute makes (no-grad forward, recomputed
    forward, backward; hidden, q and k norms) gets its own Dynamo entry within the limit, so none runs eagerly.
    Dynamo's guards are real; only the backend is the eager one (no C++ toolchain needed)."""
    from megatron.core.models.gpt import GPTModel

    from phsa_train.megatron import fused
    from phsa_train.megatron.model import transformer_config
    from phsa_train.megatron.specs import get_dense_layer_spec

    torch._dynamo.reset()
    cache = {}
    monkeypatch.setattr(fused, "compiled", lambda fn, x: cache.setdefault(fn, fused.compile_fused(fn, "eager")))
    cfg = compose(["model=tiny", "data.seq_len=64", "attention=dense"])
    m = cfg.model
    model = GPTModel(config=transformer_config(cfg, torch.float32), transformer_layer_spec=get_dense_layer_spec(
        fused_norms=True), vocab_size=256, max_sequence_length=m.max_position_embeddings,
        share_embeddings_and_output_weights=m.tie_embeddings, position_embedding_type="rope",
        rotary_base=int(m.rotary_base))
    tokens = torch.randint(0, 256, (1, 64), generator=torch.Generator().manual_seed(1))
    pos = torch.arange(64)[None]
    try:
        for _ in range(2):
            with torch.no_grad():  # full recompute's first forward
                model(tokens, pos, None)
            model(tokens, pos, None).square().mean().backward()
        entries = torch._dynamo.eval_frame._debug_get_cache_entry_list(fused.rms_norm)
        # at the limit, any further kind of call would have run eagerly
        assert 0 < len(entries) < torch._dynamo.config.recompile_limit, len(entries)
    finally:
        torch._dynamo.reset()
