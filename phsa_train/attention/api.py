"""Public entry points: ``phsa_attention`` and ``select_blocks``, with backend dispatch.

backend="reference" always works (CPU too); "triton" needs CUDA tensors and
``phsa_train.attention.phsa.triton``; "auto" picks triton for CUDA inputs when that module imports and the
block size is one the kernels support (16 | 32 | 64), else the reference. Parameters and shapes are validated before any backend runs.
"""

from __future__ import annotations

import torch

from .params import BACKENDS, KERNEL_BLOCK_SIZES, PHSAParams, check_shapes, pad_queries_front
from .phsa.reference import phsa_reference, select_blocks_reference


def _triton_module():
    """The Triton backend module, or the ImportError explaining why it is unavailable."""
    try:
        from .phsa import triton as phsa_triton_mod  # noqa: PLC0415 - lazy: needs triton and a GPU build
    except ImportError as e:  # the module may not exist yet, or triton may be missing
        return e
    return phsa_triton_mod


def resolve_backend(backend: str, q: torch.Tensor, params: PHSAParams):
    """'reference' or the triton module; raise ValueError/ImportError naming attention.backend."""
    if backend not in BACKENDS:
        raise ValueError(f"attention.backend={backend!r} must be one of {' | '.join(BACKENDS)}")
    if backend == "reference" or (backend == "auto" and not q.is_cuda):
        return "reference"
    mod = _triton_module()
    if isinstance(mod, ImportError):
        if backend == "auto":
            return "reference"
        raise ImportError(f"attention.backend='triton' is unavailable: {mod}") from mod
    if params.block_size not in KERNEL_BLOCK_SIZES:
        if backend == "auto":
            return "reference"
        raise ValueError(
            f"attention.block_size={params.block_size} is not supported by attention.backend='triton' "
            f"(supported: {'|'.join(map(str, KERNEL_BLOCK_SIZES))}); use backend='reference'"
        )
    return mod


def _params(block_size, n_init, local_window, topk, lam, score, query_block, softmax_scale) -> PHSAParams:
    return PHSAParams(
        block_size=block_size,
        n_init=n_init,
        local_window=local_window,
        topk=topk,
        lam=lam,
        score=score,
        query_block=query_block,
        softmax_scale=softmax_scale,
    ).validate()


def phsa_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    punct_mask: torch.Tensor | None,
    *,
    block_size: int,
    n_init: int,
    local_window: int,
    topk: int,
    lam: float = PHSAParams.lam,
    score: str = PHSAParams.score,
    query_block: int = PHSAParams.query_block,
    cu_seqlens: torch.Tensor | None = None,
    backend: str = "auto",
    softmax_scale: float | None = PHSAParams.softmax_scale,
    q_offset: int = 0,
) -> torch.Tensor:
    """Punctuation-aware hybrid sparse attention (docs/phsa.md), causal.

    Args:
        q: [b, L, hq, d] queries. k: [b, L, hk, d] keys, used as given (pass post-RoPE keys for the default
            ``rep_keys=post_rope``). v: [b, L, hk, dv]. hq must be a multiple of hk (GQA, G = hq // hk).
        punct_mask: bool [b, L], True at punctuation tokens; None = no punctuation (plain mean pooling).
        block_size, n_init, local_window, topk, lam, score, query_block, softmax_scale: see ``PHSAParams``.
            topk may exceed the number of blocks: every eligible block is then taken (topk >= L // block_size
            is exactly dense causal attention).
        cu_seqlens: int32/int64 [n_docs + 1] for packed documents (b must be 1); every document is an
            independent sequence.
        backend: "auto" | "reference" | "triton".
        q_offset: q holds only the query rows [q_offset, L) of the L key positions: q [b, L - q_offset, hq, d]
            -> o [b, L - q_offset, hq, dv], equal to those rows of the full call (a context-parallel chunk
            against its causal prefix). A multiple of query_block; not with cu_seqlens. The Triton kernels
            compute only those rows; the reference pads.

    Returns:
        o: [b, L, hq, dv] in q's dtype.

    Raises:
        ValueError naming the knob (``attention.<name>``) for bad parameters, shapes or backend;
        ImportError for backend="triton" when the kernels cannot be imported.
    """
    params = _params(block_size, n_init, local_window, topk, lam, score, query_block, softmax_scale)
    check_shapes(q, k, v, punct_mask, cu_seqlens, q_offset=q_offset, query_block=query_block)
    impl = resolve_backend(backend, q, params)
    if impl == "reference":
        # the oracle stays simple: suffix queries get zero query rows in front, dropped after
        q_full = pad_queries_front(q, q_offset)
        return phsa_reference(q_full, k, v, punct_mask, params, cu_seqlens)[:, q_offset:]
    # "auto" also takes the measured dense fallback: at <= DENSE_FALLBACK_MAX_SEQLEN tokens cuDNN dense is
    # faster than the sparse kernels (InfLLM-v2 does the same below 8k); "triton" always runs PHSA.
    return impl.phsa_triton(q, k, v, punct_mask, params, cu_seqlens, dense_fallback=backend == "auto",
                            q_offset=q_offset)


def select_blocks(
    q: torch.Tensor,
    k: torch.Tensor,
    punct_mask: torch.Tensor | None,
    *,
    block_size: int,
    n_init: int,
    local_window: int,
    topk: int,
    lam: float = PHSAParams.lam,
    score: str = PHSAParams.score,
    query_block: int = PHSAParams.query_block,
    cu_seqlens: torch.Tensor | None = None,
    backend: str = "auto",
    softmax_scale: float | None = PHSAParams.softmax_scale,
) -> torch.Tensor:
    """The blocks PHSA attends to, beyond INIT and LOCAL.

    q: [b, L, hq, d], k: [b, L, hk, d], punct_mask: bool [b, L] or None
    -> LongTensor [b, L, hk, topk]: per query and KV head, the chosen block indices sorted ascending, padded
    with -1 when fewer than topk blocks are eligible. Block t covers tokens [t*block_size, (t+1)*block_size);
    with cu_seqlens the indices are relative to the start of the query's document. Raises as ``phsa_attention``.
    """
    params = _params(block_size, n_init, local_window, topk, lam, score, query_block, softmax_scale)
    check_shapes(q, k, None, punct_mask, cu_seqlens)
    impl = resolve_backend(backend, q, params)
    if impl == "reference":
        return select_blocks_reference(q, k, punct_mask, params, cu_seqlens)
    return impl.select_blocks_triton(q, k, punct_mask, params, cu_seqlens)
