"""Fused RMSNorm and RoPE for GPU runs without Transformer Engine (``train.fused_kernels``, on by default).

Megatron-Core's local spec normalises with ``torch.nn.RMSNorm``, which runs as a chain of elementwise kernels
(upcast, square, mean, rsqrt, two products, downcast), and fuses RoPE only through Transformer Engine; the
unfused RoPE broadcasts cos / sin tensors over the heads and copies its result twice (``torch.cat``). On the
0.6B model at 32k tokens (one H100) such elementwise kernels took ~600 ms of a 977 ms PHSA training step, GEMMs
185 ms (``bench/train_step.py --profile``, docs/kernels.md): they, not attention, bound PHSA's step speed-up.
``torch.compile`` turns each function below into one forward and one backward kernel, as Megatron does for its
own fused SwiGLU. On CPU the same functions run eagerly (tests compare them with Megatron's).
"""
from __future__ import annotations

import torch


def fused_kernels_enabled(cfg) -> bool:
    """Whether this process builds the fused modules: ``train.fused_kernels`` and a GPU."""
    return bool(cfg.train.fused_kernels) and torch.cuda.is_available()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [..., h] * rsqrt(mean(x², -1) + eps) * weight [h], computed in fp32, returned in x's dtype (the
    arithmetic of ``torch.nn.RMSNorm``)."""
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (y * weight.float()).to(x.dtype)


def rope_bshd(t: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """t [s, b, h, d] rotated by freqs [s, 1, 1, r] (r <= d, fp32 angles; the last d - r channels pass through):
    Megatron's non-interleaved ``_apply_rotary_pos_emb_bshd`` (cos and sin rounded to t's dtype first)."""
    r = freqs.shape[-1]
    x, rest = t[..., :r], t[..., r:]
    cos, sin = freqs.cos().to(t.dtype), freqs.sin().to(t.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    out = x * cos + torch.cat((-x2, x1), dim=-1) * sin
    return torch.cat((out, rest), dim=-1) if rest.shape[-1] else out


# Dynamo keeps one compiled entry per kind of call it sees: tensor rank, strides (the q and k norms read differently
# strided views of the fused QKV projection), grad mode (full recompute runs every layer once without grad first),
# static then dynamic shapes. A training step with full recompute makes 8 kinds of rms_norm call, exactly torch's
# default limit: one more (a new sequence length, as a benchmark that shrank its batch showed) and the rest would run
# eagerly without a word beyond one log line.
RECOMPILE_LIMIT = 32


def compile_fused(fn, backend: str = "inductor"):
    """``torch.compile(fn)`` with room for every kind of call one model makes (``RECOMPILE_LIMIT``)."""
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    return torch.compile(fn, backend=backend)


_compiled: dict = {}


def compiled(fn, x: torch.Tensor):
    """``torch.compile(fn)`` (built once per function) for CUDA tensors ``x``; ``fn`` itself for CPU ones (a model
    built on a GPU machine may still run on the CPU, e.g. in the checkpoint converter)."""
    if not x.is_cuda:
        return fn
    if fn not in _compiled:
        _compiled[fn] = compile_fused(fn)
    return _compiled[fn]


class FusedRMSNorm(torch.nn.RMSNorm):
    """``torch.nn.RMSNorm`` (same parameter, same state-dict key) whose forward is one compiled kernel. Built by
    Megatron's ``build_module`` from a layer spec's norm slot, hence its constructor signature."""

    def __init__(self, config=None, hidden_size: int = 0, eps: float = 1e-5, **_megatron_norm_kwargs):
        super().__init__(hidden_size, eps=eps)  # fp32 weight, cast with the model as WrappedTorchNorm's is

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return compiled(rms_norm, x)(x, self.weight, self.eps)


def fused_rope(t: torch.Tensor, freqs: torch.Tensor, interleaved: bool = False) -> torch.Tensor:
    """The signature Megatron calls for ``config.apply_rope_fusion`` (Transformer Engine's, bshd layout)."""
    if interleaved:  # Megatron's rotary_interleaved: no model config of this repository sets it
        raise NotImplementedError("fused_rope: interleaved RoPE is not implemented")
    return compiled(rope_bshd, t)(t, freqs)
