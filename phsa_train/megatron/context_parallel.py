"""Context parallelism for PHSA (and the dense baseline) inside Megatron-Core.

Megatron's own CP lives only in Transformer Engine's attention, so PHSA brings its own. Each CP rank
holds Megatron's load-balanced ("zigzag") slice of every sequence: chunks ``r`` and ``2*cp-1-r`` of
``2*cp`` equal chunks (``get_batch_on_this_cp_rank``; RoPE is sliced the same way).

``allgather`` (default)
    Keep the local queries; all-gather K, V and ``token_info`` (punctuation flags) over the CP group and
    undo the zigzag so every rank sees the whole causal prefix; run the PHSA operator for each local
    chunk against its prefix; in backward, dK/dV are reduce-scattered back to their owners (all-reduce +
    slice on gloo, which has no reduce-scatter). Selection sees exactly the keys and punctuation of the
    CP=1 run, so the selected blocks are identical. Bytes moved per layer and rank: (cp-1)/cp of K+V
    forward, the same for dK+dV backward.
``ulysses``
    Head-parallel all-to-all through DeepSpeed's ``DistributedAttention``: every rank gets the full
    sequence for ``hk/cp`` KV heads (and their ``hq/cp`` query heads), runs the unchanged single-GPU
    operator, and the output goes back by the inverse all-to-all. Needs ``hk % cp == 0``.

A chunk's queries at global positions ``[c*C, (c+1)*C)`` need keys ``[0, (c+1)*C)`` only (causal). The
operator takes them as suffix queries (``q_offset = c*C``): the Triton kernels index those rows natively and
compute nothing for the prefix; the reference backend pads them with zero rows. This is exact: a query's
selection and softmax depend only on its own row, the keys and the punctuation flags, and chunk boundaries
are multiples of ``attention.query_block`` (validated), so query groups never straddle them. With packed
documents (doc-local query groups may straddle a chunk start) the chunk is still padded to its prefix.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist

from phsa_train.attention.params import pad_queries_front
from phsa_train.megatron.local_attention import dense_causal_attention, phsa_local


def _is_nccl(group) -> bool:
    return dist.get_backend(group) == "nccl"


class _GatherSequence(torch.autograd.Function):
    """[b, s_local, ...] zigzag slice -> [b, s, ...] in natural order; backward sends gradients home."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        cp = dist.get_world_size(group)
        parts = [torch.empty_like(x) for _ in range(cp)]
        dist.all_gather(parts, x.contiguous(), group=group)
        return zigzag_to_natural(torch.stack(parts), cp)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        group = ctx.group
        cp, rank = dist.get_world_size(group), dist.get_rank(group)
        per_rank = natural_to_zigzag(grad.contiguous(), cp)  # [cp, b, s_local, ...]
        if _is_nccl(group):
            out = torch.empty_like(per_rank[0])
            dist.reduce_scatter_tensor(out, per_rank.contiguous(), group=group)
            return out, None
        dist.all_reduce(per_rank, group=group)  # gloo has no reduce-scatter
        return per_rank[rank].clone(), None


def zigzag_to_natural(parts: torch.Tensor, cp: int) -> torch.Tensor:
    """parts [cp, b, s_local, ...] (rank r holds chunks r, 2cp-1-r) -> [b, s, ...] in position order."""
    b, s_local = parts.shape[1], parts.shape[2]
    halves = parts.reshape(cp, b, 2, s_local // 2, *parts.shape[3:])
    chunks = [None] * (2 * cp)
    for r in range(cp):
        chunks[r], chunks[2 * cp - 1 - r] = halves[r, :, 0], halves[r, :, 1]
    return torch.cat(chunks, dim=1)


def natural_to_zigzag(x: torch.Tensor, cp: int) -> torch.Tensor:
    """[b, s, ...] -> [cp, b, s_local, ...], the inverse of :func:`zigzag_to_natural`."""
    chunks = x.chunk(2 * cp, dim=1)
    return torch.stack([torch.cat([chunks[r], chunks[2 * cp - 1 - r]], dim=1) for r in range(cp)])


def gather_sequence(x: torch.Tensor, group) -> torch.Tensor:
    return _GatherSequence.apply(x, group)


def local_chunk_positions(s_local: int, cp: int, rank: int) -> list[tuple[int, int]]:
    """Global [start, end) of the two chunks this rank holds."""
    c = s_local // 2
    return [(rank * c, (rank + 1) * c), ((2 * cp - 1 - rank) * c, (2 * cp - rank) * c)]


def _attend_chunks(q_local, k_full, v_full, info_full, group, chunk_fn: Callable,
                   pad_queries: bool = True) -> torch.Tensor:
    """Run ``chunk_fn`` for both local chunks against their causal prefix [0, end).

    pad_queries=True: chunk_fn(q_padded [b, end, ...], k, v, info) -> o [b, end, ...] (rows before the chunk
    are zero queries whose output is dropped); False: chunk_fn(q_chunk [b, C, ...], k, v, info) -> [b, C, ...]
    with the chunk's queries aligned to the end of the prefix.
    """
    cp, rank = dist.get_world_size(group), dist.get_rank(group)
    c = q_local.shape[1] // 2
    outs = []
    for i, (start, end) in enumerate(local_chunk_positions(q_local.shape[1], cp, rank)):
        q_chunk = q_local[:, i * c:(i + 1) * c]
        info = None if info_full is None else info_full[:, :end]
        if pad_queries:
            q_pad = pad_queries_front(q_chunk, start)
            outs.append(chunk_fn(q_pad, k_full[:, :end], v_full[:, :end], info)[:, start:end])
        else:
            outs.append(chunk_fn(q_chunk, k_full[:, :end], v_full[:, :end], info))
    return torch.cat(outs, dim=1)


def cp_phsa_attention(q, k, v, token_info, group, mode: str, phsa_kwargs: dict) -> torch.Tensor:
    """PHSA with context parallelism. q [b, s_local, hq, d], k/v [b, s_local, hk, d] (zigzag slices),
    token_info [b, s_local] -> [b, s_local, hq, d]."""
    if mode == "ulysses":
        return ulysses_attention(q, k, v, token_info, group,
                                 lambda q_, k_, v_, info_: phsa_local(q_, k_, v_, info_, phsa_kwargs))
    k_full, v_full = gather_sequence(k, group), gather_sequence(v, group)
    with torch.no_grad():
        info_full = gather_sequence(token_info, group)
    return _attend_chunks(q, k_full, v_full, info_full, group,
                          lambda q_, k_, v_, info_: phsa_local(q_, k_, v_, info_, phsa_kwargs), pad_queries=False)


def cp_attention(q, k, v, token_info, group, softmax_scale=None) -> torch.Tensor:
    """Dense causal attention with all-gather CP (the baseline's CP path, no Transformer Engine).

    Each local chunk attends its causal prefix with a bottom-right-aligned causal mask, so SDPA can use its
    fused kernels and no [s, s] mask is materialised (document masking, when on, does build one).
    """
    k_full, v_full = gather_sequence(k, group), gather_sequence(v, group)
    info_full = None
    if token_info is not None:
        with torch.no_grad():
            info_full = gather_sequence(token_info, group)
    return _attend_chunks(q, k_full, v_full, info_full, group,
                          lambda q_, k_, v_, info_: dense_causal_attention(q_, k_, v_, info_, softmax_scale),
                          pad_queries=False)


def ulysses_attention(q, k, v, token_info, group, local_fn) -> torch.Tensor:
    """Head-parallel CP through DeepSpeed's DistributedAttention (the optional ``deepspeed`` extra)."""
    try:
        from deepspeed.sequence.layer import DistributedAttention
    except ImportError as e:
        from phsa_train.config import ConfigError

        raise ConfigError("parallel.cp_mode=ulysses requires DeepSpeed (pip install 'phsa_train[deepspeed]'); "
                          "allowed without it: allgather") from e
    _ensure_deepspeed_comm()
    cp = dist.get_world_size(group)
    hk = k.shape[2]
    if hk % cp:
        from phsa_train.config import ConfigError

        raise ConfigError(f"parallel.cp_mode=ulysses needs KV heads per TP rank ({hk}) divisible by "
                          f"parallel.context_parallel_size={cp}; use parallel.cp_mode=allgather")
    with torch.no_grad():
        info_full = gather_sequence(token_info, group)

    def natural_order_attention(q_, k_, v_, *args, **kwargs):
        # After the all-to-all the sequence dim holds the ranks' zigzag slices back to back.
        to_nat = lambda x: zigzag_to_natural(x.reshape(x.shape[0], cp, -1, *x.shape[2:]).transpose(0, 1), cp)  # noqa: E731
        o = local_fn(to_nat(q_), to_nat(k_), to_nat(v_), info_full)
        z = natural_to_zigzag(o, cp)  # [cp, b, s_local, h, d]
        return z.transpose(0, 1).reshape(o.shape[0], -1, *o.shape[2:])

    attn = DistributedAttention(natural_order_attention, group, scatter_idx=2, gather_idx=1)
    return attn(q, k, v, batch_dim_idx=0)


_ds_ready = False


def _ensure_deepspeed_comm() -> None:
    global _ds_ready
    if not _ds_ready:
        import deepspeed

        deepspeed.init_distributed(dist_backend=dist.get_backend(), auto_mpi_discovery=False)
        _ds_ready = True

