"""Build the Megatron-Core GPTModel from ``cfg.model`` + ``cfg.attention``."""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.transformer import TransformerConfig

from phsa_train.compat import megatron_core_0_16_1
from phsa_train.compat.megatron_core_0_16_1 import GPTModelWithOutputLoss
from phsa_train.megatron.chunked_loss import linear_cross_entropy
from phsa_train.megatron.fused import fused_kernels_enabled, fused_rope
from phsa_train.megatron.specs import layer_spec_from_config


def padded_vocab_size(vocab_size: int, divisible_by: int, tp: int) -> int:
    """Megatron pads the vocabulary so the embedding splits evenly over TP ranks."""
    multiple = divisible_by * tp
    return ((vocab_size + multiple - 1) // multiple) * multiple


def transformer_config(cfg, params_dtype: torch.dtype, init_weights: bool = True) -> TransformerConfig:
    m, p = cfg.model, cfg.parallel
    on_gpu = torch.cuda.is_available()
    if cfg.train.recompute == "full" and not on_gpu:  # Megatron's checkpoint saves and restores CUDA RNG states
        from phsa_train.config import ConfigError

        raise ConfigError("train.recompute=full needs a GPU (Megatron's layer recompute restores CUDA RNG states); "
                          "on CPU use train.recompute=none | selective")
    # Fused SwiGLU (Megatron's own), RMSNorm and RoPE (ours where Transformer Engine is absent, see
    # phsa_train/megatron/fused.py): compiled elementwise kernels that take most of the non-GEMM time out of a
    # GPU step. On CPU the compile time outweighs them. Megatron's fused cross-entropy stays off: it keeps an
    # fp32 copy of the [s, vocab] logits for backward (+18.5 GiB at 32k tokens on the 0.6B model; 128k at CP=2
    # no longer fit on 80 GB) for ~1 % of the step.
    fused = fused_kernels_enabled(cfg)
    if fused:
        megatron_core_0_16_1.provide_fused_rope(fused_rope)
    return TransformerConfig(
        num_layers=m.num_layers, hidden_size=m.hidden_size, ffn_hidden_size=m.ffn_hidden_size,
        num_attention_heads=m.num_attention_heads, num_query_groups=m.num_query_groups, kv_channels=m.kv_channels,
        normalization=m.normalization, layernorm_epsilon=m.layernorm_epsilon, qk_layernorm=m.qk_layernorm, gated_linear_unit=m.gated_linear_unit,
        activation_func=F.silu if m.gated_linear_unit else F.gelu, add_bias_linear=False,
        hidden_dropout=0.0, attention_dropout=0.0, init_method_std=m.init_method_std,
        tensor_model_parallel_size=p.tensor_model_parallel_size,
        pipeline_model_parallel_size=p.pipeline_model_parallel_size,
        context_parallel_size=p.context_parallel_size,
        params_dtype=params_dtype, bf16=params_dtype == torch.bfloat16,
        # CPU: weights are initialised identically for every TP size only with CPU init (and CUDA init
        # needs a GPU); fused kernels and sequence parallel need CUDA/TE.
        use_cpu_initialization=not on_gpu, perform_initialization=init_weights, sequence_parallel=False,
        bias_activation_fusion=fused, bias_dropout_fusion=on_gpu, masked_softmax_fusion=False,
        persist_layer_norm=False, gradient_accumulation_fusion=False, apply_rope_fusion=fused,
        recompute_granularity=None if cfg.train.recompute == "none" else cfg.train.recompute,
        recompute_method="uniform" if cfg.train.recompute == "full" else None,
        recompute_num_layers=1 if cfg.train.recompute == "full" else None,
    )


def build_model(cfg, vocab_size: int, params_dtype: torch.dtype, init_weights: bool = True) -> GPTModelWithOutputLoss:
    """Megatron's GPTModel for this pipeline stage; ``vocab_size`` is already padded.

    With ``train.loss_chunk_tokens`` > 0 a forward with labels computes the output layer and the loss in chunks
    of that many tokens (:mod:`phsa_train.megatron.chunked_loss`); forwards without labels return the logits.

    ``init_weights=False`` skips the random initialisation (the weights are loaded right after, e.g. by
    :mod:`phsa_train.convert`); the parameters then hold uninitialised memory.
    """
    m, chunk = cfg.model, cfg.train.loss_chunk_tokens
    output_loss = functools.partial(linear_cross_entropy, chunk=chunk, fused=fused_kernels_enabled(cfg))
    model = GPTModelWithOutputLoss(
        config=transformer_config(cfg, params_dtype, init_weights), transformer_layer_spec=layer_spec_from_config(cfg),
        vocab_size=vocab_size, max_sequence_length=m.max_position_embeddings,
        pre_process=parallel_state.is_pipeline_first_stage(), post_process=parallel_state.is_pipeline_last_stage(),
        share_embeddings_and_output_weights=m.tie_embeddings, position_embedding_type="rope",
        rotary_base=int(m.rotary_base),
        output_loss=output_loss if chunk > 0 else None,
    )
    if torch.cuda.is_available():
        model.cuda(torch.cuda.current_device())
    return model


def num_parameters(model: torch.nn.Module, exclude_embeddings: bool = False) -> int:
    n = 0
    for name, p in model.named_parameters():
        if exclude_embeddings and ("embedding" in name or "output_layer" in name):
            continue
        n += p.numel()
    return n
