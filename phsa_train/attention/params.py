"""PHSA knobs and input validation.

Every error names the knob it is about (``attention.<name>``) and the values that would be accepted, so a
bad Hydra config fails at the Python boundary with a message the user can act on.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SCORES = ("softmax_group_sum", "dot_group_sum")
BACKENDS = ("auto", "reference", "triton")  # see phsa_train.attention.api
# The Triton kernels tile one key block per program; these are the sizes they are built and tested for.
# The reference accepts any block size >= 1.
KERNEL_BLOCK_SIZES = (16, 32, 64)


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


@dataclass(frozen=True)
class PHSAParams:
    """The knobs of one PHSA layer: the single source of their defaults (see docs/phsa.md).

    The config schema, the Megatron layer settings and the operator signatures take their defaults from here.
    """

    block_size: int = 16  # m, tokens per key block; reference: any int >= 1, kernels: 16 | 32 | 64
    n_init: int = 128  # INIT, the first n_init tokens every query sees; >= 0
    local_window: int = 512  # w, LOCAL(i) = the last w tokens up to and including i; >= block_size
    topk: int = 16  # k, selected blocks per query (per KV head); >= 0, may exceed the number of blocks
    lam: float = 0.5  # fusion weight of the mean branch, M = lam*M_o + (1-lam)*M_p; 0 <= lam <= 1
    # block score: dot_group_sum | softmax_group_sum. dot: one streaming pass, ~10x cheaper selection on a GPU, and
    # no worse in quality than softmax at the same budget (docs/results.md, study 3)
    score: str = "dot_group_sum"
    query_block: int = 64  # B, consecutive queries sharing one selection; >= 1 (1 = per-token selection)
    softmax_scale: float | None = None  # logit scale for attention and block scores; None = 1/sqrt(d)

    def validate(self) -> "PHSAParams":
        """Raise ``ValueError`` naming the offending knob; return ``self`` so calls can be chained."""
        if not _is_int(self.block_size) or self.block_size < 1:
            raise ValueError(
                f"attention.block_size={self.block_size!r} must be an int >= 1 "
                f"(the Triton kernels support {'|'.join(map(str, KERNEL_BLOCK_SIZES))}; the reference any size)"
            )
        if not _is_int(self.n_init) or self.n_init < 0:
            raise ValueError(f"attention.n_init={self.n_init!r} must be an int >= 0")
        if not _is_int(self.local_window) or self.local_window < 1:
            raise ValueError(f"attention.local_window={self.local_window!r} must be an int >= 1")
        if self.local_window < self.block_size:
            raise ValueError(
                f"attention.local_window={self.local_window} must be >= attention.block_size={self.block_size} "
                "(an eligible block may otherwise hold future tokens)"
            )
        if not _is_int(self.topk) or self.topk < 0:
            raise ValueError(f"attention.topk={self.topk!r} must be an int >= 0 (0 = INIT and LOCAL only)")
        if isinstance(self.lam, bool) or not isinstance(self.lam, (int, float)) or not 0.0 <= self.lam <= 1.0:
            raise ValueError(f"attention.lam={self.lam!r} must be a float in [0, 1] (1 = plain mean pooling)")
        if self.score not in SCORES:
            raise ValueError(f"attention.score={self.score!r} must be one of {' | '.join(SCORES)}")
        if not _is_int(self.query_block) or self.query_block < 1:
            raise ValueError(f"attention.query_block={self.query_block!r} must be an int >= 1")
        if self.softmax_scale is not None and (
            isinstance(self.softmax_scale, bool)
            or not isinstance(self.softmax_scale, (int, float))
            or not self.softmax_scale > 0
        ):
            raise ValueError(f"attention.softmax_scale={self.softmax_scale!r} must be None or a float > 0")
        return self

    def scale(self, head_dim: int) -> float:
        return self.softmax_scale if self.softmax_scale is not None else head_dim**-0.5


def pad_queries_front(q: torch.Tensor, n: int) -> torch.Tensor:
    """Suffix queries [b, Lq, ...] -> [b, n + Lq, ...] with n zero rows in front, for code that needs queries
    and keys of one length (their outputs are dropped after)."""
    return q if n == 0 else torch.cat([q.new_zeros(q.shape[0], n, *q.shape[2:]), q], dim=1)


def check_shapes(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor | None,
    punct_mask: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None = None,
    *,
    q_offset: int = 0,
    query_block: int = 1,
) -> None:
    """Check the operator's inputs; raise ``ValueError`` with the offending shapes.

    q: [b, L, hq, d], k: [b, L, hk, d], v: [b, L, hk, dv] or None, punct_mask: bool [b, L] or None,
    cu_seqlens: int32/int64 [n_docs + 1], starting at 0 and ending at L, non-decreasing; needs b == 1.
    q_offset > 0: q is [b, L - q_offset, hq, d] (the query rows [q_offset, L)); a multiple of query_block,
    without cu_seqlens.
    """
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"q and k must be [b, L, h, d]; got q{tuple(q.shape)} k{tuple(k.shape)}")
    if q_offset:
        if q_offset < 0 or q_offset % query_block or cu_seqlens is not None:
            raise ValueError(f"q_offset={q_offset} must be a non-negative multiple of attention.query_block="
                             f"{query_block}, without cu_seqlens")
        if q.shape[1] + q_offset != k.shape[1]:
            raise ValueError(f"q{tuple(q.shape)} with q_offset={q_offset} must hold the last "
                             f"{k.shape[1] - q_offset} of the {k.shape[1]} positions of k{tuple(k.shape)}")
    b, L, hq, d = q.shape[0], q.shape[1] + q_offset, q.shape[2], q.shape[3]
    if k.shape[0] != b or k.shape[1] != L or k.shape[3] != d:
        raise ValueError(f"k{tuple(k.shape)} must be [b, L, hk, d] matching q{tuple(q.shape)}")
    hk = k.shape[2]
    if hk < 1 or hq % hk != 0:
        raise ValueError(f"query heads hq={hq} must be a multiple of key/value heads hk={hk} (GQA)")
    if not q.is_floating_point() or q.dtype != k.dtype:
        raise ValueError(f"q and k must share one floating dtype; got q {q.dtype}, k {k.dtype}")
    if k.device != q.device:
        raise ValueError(f"q and k must be on one device; got {q.device} and {k.device}")
    if v is not None:
        if v.dim() != 4 or tuple(v.shape[:3]) != (b, L, hk):
            raise ValueError(f"v{tuple(v.shape)} must be [b, L, hk, dv] matching k{tuple(k.shape)}")
        if v.dtype != q.dtype or v.device != q.device:
            raise ValueError(f"v must match q's dtype and device; got {v.dtype} on {v.device}")
    if punct_mask is not None:
        if punct_mask.dtype != torch.bool or tuple(punct_mask.shape) != (b, L):
            raise ValueError(
                f"punct_mask must be a bool tensor [b, L]=[{b}, {L}]; got {punct_mask.dtype} {tuple(punct_mask.shape)}"
            )
        if punct_mask.device != q.device:
            raise ValueError(f"punct_mask must be on {q.device}; got {punct_mask.device}")
    if cu_seqlens is not None:
        if b != 1:
            raise ValueError(f"cu_seqlens (packed documents) requires batch size 1; got q.shape[0]={b}")
        if cu_seqlens.dim() != 1 or cu_seqlens.dtype not in (torch.int32, torch.int64) or cu_seqlens.numel() < 2:
            raise ValueError(
                f"cu_seqlens must be a 1-D int32/int64 tensor [n_docs + 1]; "
                f"got {cu_seqlens.dtype} {tuple(cu_seqlens.shape)}"
            )
        cs = cu_seqlens.tolist()
        if cs[0] != 0 or cs[-1] != L or any(a > c for a, c in zip(cs, cs[1:])):
            raise ValueError(f"cu_seqlens must be non-decreasing from 0 to L={L}; got {cs}")


def doc_bounds(cu_seqlens: torch.Tensor | None, L: int) -> list[tuple[int, int]]:
    """[(start, end)] of every non-empty document; the whole sequence when ``cu_seqlens`` is None."""
    if cu_seqlens is None:
        return [(0, L)]
    cs = cu_seqlens.tolist()
    return [(s, e) for s, e in zip(cs, cs[1:]) if e > s]
