"""Layer specs: Megatron-Core's GPT layer spec with only the ``core_attention`` slot swapped.

PHSA is one spec swap, not a fork: everything else (QKV/proj linears, QK-norm, RMSNorm, SwiGLU MLP,
RoPE, TP sharding, checkpoint key maps) is Megatron-Core's own local (or Transformer Engine) spec. With
``fused_norms`` (``train.fused_kernels`` on a GPU) the local spec's RMSNorm slots hold
:class:`~phsa_train.megatron.fused.FusedRMSNorm`, the same parameter computed by one compiled kernel.
"""
from __future__ import annotations

import copy

from megatron.core.transformer.spec_utils import ModuleSpec

from phsa_train.config.schema import phsa_params_from_config
from phsa_train.megatron.core_attention import DenseCoreAttention, PHSACoreAttention, PHSASettings
from phsa_train.megatron.fused import FusedRMSNorm, fused_kernels_enabled


def _base_layer_spec(transformer_impl: str, qk_layernorm: bool, normalization: str) -> ModuleSpec:
    if transformer_impl == "transformer_engine":
        try:
            import transformer_engine  # noqa: F401
        except ImportError as e:
            from phsa_train.config import ConfigError

            raise ConfigError("model.transformer_impl=transformer_engine requires the transformer_engine package "
                              "(pip install 'phsa_train[te]'); allowed without it: local") from e
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

        return get_gpt_layer_with_transformer_engine_spec(qk_layernorm=qk_layernorm)
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    return get_gpt_layer_local_spec(qk_layernorm=qk_layernorm, normalization=normalization)


def _with_core_attention(spec: ModuleSpec, core) -> ModuleSpec:
    spec = copy.deepcopy(spec)
    spec.submodules.self_attention.submodules.core_attention = core
    return spec


def _with_fused_norms(spec: ModuleSpec) -> ModuleSpec:
    """The local RMSNorm spec with its four norms (input, pre-MLP, q and k) as :class:`FusedRMSNorm`."""
    spec = copy.deepcopy(spec)
    spec.submodules.input_layernorm = spec.submodules.pre_mlp_layernorm = FusedRMSNorm
    attn = spec.submodules.self_attention.submodules
    if attn.q_layernorm is not None:
        attn.q_layernorm = attn.k_layernorm = FusedRMSNorm
    return spec


def _layer_spec(transformer_impl: str, qk_layernorm: bool, normalization: str, fused_norms: bool) -> ModuleSpec:
    spec = _base_layer_spec(transformer_impl, qk_layernorm, normalization)
    if fused_norms and transformer_impl == "local" and normalization == "RMSNorm":
        spec = _with_fused_norms(spec)
    return spec


def get_dense_layer_spec(transformer_impl: str = "local", qk_layernorm: bool = True,
                         normalization: str = "RMSNorm", documents: bool = False,
                         fused_norms: bool = False) -> ModuleSpec:
    """Megatron's GPT layer with dense SDPA core attention (runs on CPU and GPU, supports our CP).
    ``documents``: data.reset_attention_mask (token_info's document starts mask attention)."""
    return _with_core_attention(_layer_spec(transformer_impl, qk_layernorm, normalization, fused_norms),
                                ModuleSpec(module=DenseCoreAttention, params={"documents": documents}))


def get_phsa_layer_spec(settings: PHSASettings, transformer_impl: str = "local", qk_layernorm: bool = True,
                        normalization: str = "RMSNorm", fused_norms: bool = False) -> ModuleSpec:
    """Megatron's GPT layer with PHSA core attention configured by ``settings``."""
    return _with_core_attention(_layer_spec(transformer_impl, qk_layernorm, normalization, fused_norms),
                                ModuleSpec(module=PHSACoreAttention, params={"settings": settings}))


def layer_spec_from_config(cfg) -> ModuleSpec:
    """Build the layer spec named by ``cfg.attention`` (dense | phsa | meanpool)."""
    m, a = cfg.model, cfg.attention
    common = dict(transformer_impl=m.transformer_impl, qk_layernorm=m.qk_layernorm, normalization=m.normalization,
                  fused_norms=fused_kernels_enabled(cfg))
    if a.name == "dense":
        return get_dense_layer_spec(**common, documents=cfg.data.reset_attention_mask)
    dense_layers = tuple(sorted(set(a.dense_layers) | set(range(1, a.first_dense_layers + 1))))
    settings = PHSASettings(phsa_params_from_config(a), train_topk=a.train_topk, eval_topk=a.eval_topk,
                            backend=a.backend, dense_layers=dense_layers, cp_mode=cfg.parallel.cp_mode,
                            documents=cfg.data.reset_attention_mask)
    return get_phsa_layer_spec(settings, **common)
