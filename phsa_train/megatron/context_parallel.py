"""Context parallelism for PHSA (and the dense baseline) inside Megatron-Core.

Megatron's own CP lives only in Transformer Engine's attention, so PHSA brings its own. Each CP rank
holds Megatron's load-balanced ("zigzag") slice of every sequence: chunks ``r`` and ``2*cp-1-r`` of
``2*cp`` equal chunks (``get_batch_on_this_cp_rank``; RoPE is sliced the same way).

``allgather`` (default)
    Keep the local queries; gather the K and V each local chunk's causal prefix reads; run the PHSA operator for
    each local chunk against its prefix; in backward, send each chunk's dK/dV home. Selection sees exactly the keys
    and punctuation of the CP=1 run, so the selected blocks are identical.
    With the Triton kernels and unpacked sequences (:class:`_OverlappedPHSA`) only what causality reads moves:
    rank r's chunk r reads chunks 0..r, its chunk 2cp-1-r chunks 0..2cp-1-r, so a peer gets a rank's first chunk
    always and its second chunk only if the peer's rank is lower; dK/dV go point to point, each peer getting only
    the chunks this rank's queries reached, as soon as they are final. Each rank computes the representatives of its
    own key blocks (chunks are block-aligned), those are all-gathered (1/block_size of K), and both chunks select from
    them while K and V are in flight, straight into position order (no reordering copy). Bytes received per layer
    and rank: 3(cp-1) chunks of K+V (a chunk is L/(2cp) tokens), forward and backward together, against 4(cp-1) for
    an all-gather and a reduce-scatter. Otherwise (the reference backend, packed documents) K/V are all-gathered,
    token_info is gathered once per batch, each chunk runs the whole operator after the gather and dK/dV are
    reduce-scattered (all-reduce + slice on gloo, which has no reduce-scatter) (:func:`_attend_chunks`).
``ulysses``
    Head-parallel all-to-all through DeepSpeed's ``DistributedAttention``: every rank gets the full
    sequence for ``hk/cp`` KV heads (and their ``hq/cp`` query heads), runs the unchanged single-GPU
    operator, and the output goes back by the inverse all-to-all. Needs ``hk % cp == 0``.

A chunk's queries at global positions ``[c*C, (c+1)*C)`` need keys ``[0, (c+1)*C)`` only (causal). The
operator takes them as suffix queries (``q_offset = c*C``): the Triton kernels index those rows natively and
compute nothing for the prefix; the reference backend pads them with zero rows. This is exact: a query's
selection and softmax depend only on its query group's rows, the keys and the punctuation flags, and chunk
boundaries are multiples of ``attention.query_block`` (validated), so query groups never straddle them.
With packed documents (``data.reset_attention_mask``) groups are document-local and may straddle a chunk
or end: the chunk then runs padded to its prefix, with the query_block - 1 real query rows of the neighbouring
chunks on either side (one small all-gather), so a straddling group's selection sums over all its rows as at
CP=1.

Communication per layer and rank (allgather, CP=2, 0.6B shape hk=8, d=128, bf16): a chunk of K+V is
2 * (L/4) * 8 * 128 * 2 B = 1 MiB per 1k tokens of L (64 MiB at 64k, 128 MiB at 128k). Rank 0 receives chunks 1
and 2 forward and chunk 0's dK/dV backward; rank 1 receives chunk 0 forward and chunks 1 and 2's dK/dV backward.
"""
from __future__ import annotations

import contextlib
from typing import Callable, NamedTuple, Optional

import torch
import torch.distributed as dist

from phsa_train.attention.api import resolve_backend
from phsa_train.attention.params import PHSAParams
from phsa_train.megatron.local_attention import PerBatch, dense_causal_attention, phsa_local
from phsa_train.megatron.token_info import DOC_START_BIT, punct_mask


def _is_nccl(group) -> bool:
    return dist.get_backend(group) == "nccl"


def _all_gather_ranks(x: torch.Tensor, group, async_op: bool = False):
    """x [...] -> ([cp, ...] with rank r's x at index r, work handle or None). One collective, no copy-out."""
    cp = dist.get_world_size(group)
    out = torch.empty((cp, *x.shape), dtype=x.dtype, device=x.device)
    if _is_nccl(group):
        work = dist.all_gather_into_tensor(out, x.contiguous(), group=group, async_op=async_op)
    else:  # gloo: list form (its all_gather_into_tensor is not implemented on every torch build)
        work = dist.all_gather(list(out.unbind(0)), x.contiguous(), group=group, async_op=async_op)
    return out, work


def _reduce_scatter_home(per_rank: torch.Tensor, group) -> torch.Tensor:
    """per_rank [cp, ...] (contiguous; index r = this rank's contribution to rank r's slice) -> the sum over ranks of
    index ``rank``. One reduce-scatter on NCCL (all-reduce, then this rank's index, on gloo, which has none)."""
    if _is_nccl(group):
        out = per_rank.new_empty(per_rank.shape[1:])
        dist.reduce_scatter_tensor(out, per_rank, group=group)
        return out
    dist.all_reduce(per_rank, group=group)
    return per_rank[dist.get_rank(group)].clone()


def zigzag_to_natural(parts: torch.Tensor, cp: int) -> torch.Tensor:
    """parts [cp, b, s_local, ...] (rank r holds chunks r, 2cp-1-r) -> [b, s, ...] in position order (one copy).

    Without autograd the copy goes chunk by chunk and row by row, each between contiguous ranges, so each runs
    as a vectorised copy; a ``cat`` of the strided chunks ran at a third of the bandwidth (2 x H100 profile)."""
    b, s_local = parts.shape[1], parts.shape[2]
    c = s_local // 2
    if parts.requires_grad or not parts.is_contiguous():
        halves = parts.reshape(cp, b, 2, c, *parts.shape[3:])
        chunks = [None] * (2 * cp)
        for r in range(cp):
            chunks[r], chunks[2 * cp - 1 - r] = halves[r, :, 0], halves[r, :, 1]
        return torch.cat(chunks, dim=1)
    out = parts.new_empty((b, cp * s_local, *parts.shape[3:]))
    for r in range(cp):
        for half, chunk in ((0, r), (1, 2 * cp - 1 - r)):
            for i in range(b):
                out[i, chunk * c:(chunk + 1) * c].copy_(parts[r, i, half * c:(half + 1) * c])
    return out


def natural_to_zigzag(x: torch.Tensor, cp: int) -> torch.Tensor:
    """[b, s, ...] -> [cp, b, s_local, ...] (contiguous, one copy), the inverse of :func:`zigzag_to_natural`."""
    chunks = x.chunk(2 * cp, dim=1)
    c = chunks[0].shape[1]
    out = x.new_empty((cp, x.shape[0], 2 * c, *x.shape[2:]))
    for r in range(cp):
        out[:, :, :c][r].copy_(chunks[r])
        out[:, :, c:][r].copy_(chunks[2 * cp - 1 - r])
    return out


class _GatherPrefixes(torch.autograd.Function):
    """This rank's zigzag K and V slices -> the causal key prefix of each of its two query chunks.

    Forward: one all-gather of K and V together (stacked when they have the same shape), one copy into
    position order; the outputs are views ``k[:, :end_i]``, ``v[:, :end_i]`` of that buffer (no per-chunk
    copies). Backward: the chunks' prefix gradients are summed straight into the [cp, ...] reduce-scatter buffer
    (each position written once, zeros only where no local query reaches), then one reduce-scatter sends every
    slice home. Gradients travel in the keys' dtype (bf16 in training): the same bytes as forward.
    """

    @staticmethod
    def forward(ctx, k: torch.Tensor, v: torch.Tensor, group, ends: tuple):
        cp = dist.get_world_size(group)
        ctx.group, ctx.ends, ctx.shapes = group, ends, (k.shape, v.shape)
        stacked = k.shape == v.shape and k.dtype == v.dtype
        ctx.stacked = stacked
        if stacked:
            parts, _ = _all_gather_ranks(torch.stack((k, v), dim=1), group)  # [cp, b, 2, s_local, h, d]
            full = zigzag_to_natural(parts.flatten(1, 2), cp)  # [b*2, s, h, d]
            full = full.unflatten(0, (k.shape[0], 2))
            k_full, v_full = full[:, 0], full[:, 1]
        else:
            k_full = zigzag_to_natural(_all_gather_ranks(k, group)[0], cp)
            v_full = zigzag_to_natural(_all_gather_ranks(v, group)[0], cp)
        return (*(k_full[:, :e] for e in ends), *(v_full[:, :e] for e in ends))

    @staticmethod
    def backward(ctx, *grads):
        group, ends = ctx.group, ctx.ends
        cp, n = dist.get_world_size(group), len(ends)
        (b, s_local, *rest_k), (_, _, *rest_v) = ctx.shapes
        c = s_local // 2
        dk_parts, dv_parts = grads[:n], grads[n:]

        def fill(dst: torch.Tensor, chunk: int, parts) -> None:
            """dst [b, c, ...] = sum of the prefix gradients over natural chunk ``chunk`` (zero when none)."""
            lo, hi, first = chunk * c, (chunk + 1) * c, True
            for g, e in zip(parts, ends):
                if g is None or e < hi:
                    continue
                if first:
                    dst.copy_(g[:, lo:hi])
                    first = False
                else:
                    dst.add_(g[:, lo:hi])
            if first:
                dst.zero_()

        if ctx.stacked:
            g0 = next(g for g in grads if g is not None)
            dtype, device = g0.dtype, g0.device
            buf = torch.empty((cp, b, 2, s_local, *rest_k), dtype=dtype, device=device)
            for r in range(cp):
                for half, chunk in ((0, r), (1, 2 * cp - 1 - r)):
                    fill(buf[r, :, 0, half * c:(half + 1) * c], chunk, dk_parts)
                    fill(buf[r, :, 1, half * c:(half + 1) * c], chunk, dv_parts)
            home = _reduce_scatter_home(buf, group)  # [b, 2, s_local, h, d]
            return home[:, 0], home[:, 1], None, None
        out = []
        for parts, rest in ((dk_parts, rest_k), (dv_parts, rest_v)):
            g0 = next(g for g in parts if g is not None)
            buf = torch.empty((cp, b, s_local, *rest), dtype=g0.dtype, device=g0.device)
            for r in range(cp):
                fill(buf[r, :, :c], r, parts)
                fill(buf[r, :, c:], 2 * cp - 1 - r, parts)
            out.append(_reduce_scatter_home(buf, group))
        return out[0], out[1], None, None


def local_chunk_positions(s_local: int, cp: int, rank: int) -> list[tuple[int, int]]:
    """Global [start, end) of the two chunks this rank holds."""
    c = s_local // 2
    return [(rank * c, (rank + 1) * c), ((2 * cp - 1 - rank) * c, (2 * cp - rank) * c)]


def _neighbour_rows(q_local: torch.Tensor, n: int, group) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """For each local chunk, the ``n`` query rows just before its start and just after its end ([b, n, ...] each,
    detached; empty at the sequence's ends). One small all-gather of every rank's first and last ``n`` rows of
    both halves."""
    cp, rank = dist.get_world_size(group), dist.get_rank(group)
    c = q_local.shape[1] // 2
    halves = (q_local[:, :c], q_local[:, c:])
    edges = torch.stack([torch.stack((h[:, :n], h[:, c - n:]), dim=1) for h in halves], dim=1).detach()
    parts, _ = _all_gather_ranks(edges, group)  # [cp, b, half, (head, tail), n, ...]

    def edge(j: int, which: int) -> torch.Tensor:  # head (0) or tail (1) rows of natural chunk j
        return parts[j, :, 0, which] if j < cp else parts[2 * cp - 1 - j, :, 1, which]

    empty = q_local[:, :0].detach()
    return [(edge(j - 1, 1) if j > 0 else empty, edge(j + 1, 0) if j < 2 * cp - 1 else empty)
            for j in (rank, 2 * cp - 1 - rank)]


class _ChunkPlan(NamedTuple):
    """What every layer of one batch needs besides q/k/v (computed once per batch, see :class:`PerBatch`)."""
    info_full: Optional[torch.Tensor]  # [b, L] token_info in position order, or None
    context: int  # real query rows run on either side of a chunk (packed documents), else 0
    ends: tuple  # per local chunk: end of its queries (global position)
    key_ends: tuple  # per local chunk: end of the keys gathered for it (ends + context, within L)
    infos: tuple  # per local chunk: token_info of the rows it runs (a fixed object: the layers' caches hit)
    around: tuple  # per local chunk: whether it runs with its neighbours' rows


def _plan_chunks(token_info, group, s_local: int, query_context: int, documents: bool) -> _ChunkPlan:
    cp, rank = dist.get_world_size(group), dist.get_rank(group)
    c, L = s_local // 2, cp * s_local
    spans = local_chunk_positions(s_local, cp, rank)
    info_full = None
    if token_info is not None:  # the punctuation (and document) flags: [b, L] int32, small
        info_full = zigzag_to_natural(_all_gather_ranks(token_info, group)[0], cp)
    n = 0
    # the host reads below happen once per batch, and only with packed documents (the same decision on every
    # rank: info_full is the same everywhere)
    if documents and query_context > 0 and info_full is not None and bool((info_full & DOC_START_BIT).any()):
        n = min(query_context, c)
    key_ends = tuple(min(end + n, L) for _, end in spans)
    # a prefix with no document start after position 0 is one document: its groups are aligned to the chunk
    around = tuple(bool(n) and bool((info_full[:, 1:end] & DOC_START_BIT).any()) for _, end in spans)
    infos = tuple(None if info_full is None else info_full[:, :(ke if ar else end)]
                  for (_, end), ke, ar in zip(spans, key_ends, around))
    return _ChunkPlan(info_full, n, tuple(end for _, end in spans), key_ends, infos, around)


_chunk_plan = PerBatch(_plan_chunks)
_gathered_info = PerBatch(lambda info, group: zigzag_to_natural(_all_gather_ranks(info, group)[0],
                                                                dist.get_world_size(group)))


def _attend_chunks(q_local, k_local, v_local, token_info, group, chunk_fn: Callable,
                   query_context: int = 0, documents: bool = False) -> torch.Tensor:
    """Run ``chunk_fn(q_chunk [b, C, ...], k [b, end, ...], v, info [b, end] | None) -> [b, C, ...]`` for both local
    chunks against their causal prefix [0, end) (the chunk's queries aligned to the end of the prefix).

    ``query_context`` = n > 0 with packed documents (``documents``): each chunk runs with the n real query rows on
    either side of it (detached; their outputs are dropped, so they get no gradient) and the prefix reaches n keys
    further. PHSA needs them when a document-local query group straddles a chunk boundary: the group's selection
    sums over all its rows, up to query_block - 1 of which lie in the neighbouring chunk; keys past a row never
    reach its output (causal). Without documents, chunk boundaries are group boundaries.
    The gathered token_info and these decisions are made once per batch (the first layer), not per layer.
    """
    c = q_local.shape[1] // 2
    plan = (_chunk_plan(token_info, group, q_local.shape[1], query_context, documents) if token_info is not None
            else _plan_chunks(None, group, q_local.shape[1], 0, False))
    prefixes = _GatherPrefixes.apply(k_local, v_local, group, plan.key_ends)
    around = _neighbour_rows(q_local, plan.context, group) if any(plan.around) else None
    outs = []
    for i, info in enumerate(plan.infos):
        q_chunk = q_local[:, i * c:(i + 1) * c]
        k_pre, v_pre = prefixes[i], prefixes[len(plan.infos) + i]
        if plan.around[i]:
            before, after = around[i]
            o = chunk_fn(torch.cat((before, q_chunk, after), dim=1), k_pre, v_pre, info)
            outs.append(o[:, before.shape[1]:before.shape[1] + c])
        else:
            end = plan.ends[i]
            outs.append(chunk_fn(q_chunk, k_pre[:, :end], v_pre[:, :end], info))
    return torch.cat(outs, dim=1)


def overlap_kernels(q, k, v, token_info, group, phsa_kwargs: dict, documents: bool):
    """(the Triton module, PHSAParams) when :class:`_OverlappedPHSA` computes exactly what the chunk path does,
    else None: unpacked sequences, the Triton kernels, block- and group-aligned chunks, no dense fallback."""
    if documents or token_info is None or k.shape != v.shape or k.dtype != v.dtype:
        return None
    params = PHSAParams(**{n: x for n, x in phsa_kwargs.items() if n != "backend"})
    tri = resolve_backend(phsa_kwargs.get("backend", "auto"), q, params)
    if tri == "reference":
        return None
    c = q.shape[1] // 2
    # Every rank must decide alike: the two paths run different collectives, so a rank on the chunk path beside
    # ranks on this one waits forever. Hence the shortest prefix of any rank's chunk (rank 0's first: c keys) decides
    # the dense fallback for all, not this rank's own.
    if (c % params.block_size or c % params.query_block or params.topk > tri.SELECT_MAX_TOPK
            or (phsa_kwargs.get("backend", "auto") == "auto" and c <= tri.DENSE_FALLBACK_MAX_SEQLEN)):
        return None
    return tri, params


def start_gathered_reps(k_local, token_info, group, tri, params) -> Callable[[], torch.Tensor]:
    """k_local [b, s_local, hk, d] (zigzag slice), token_info [b, s_local] -> a function that waits and returns the
    whole sequence's block representatives [b, L / block_size, hk, d] in position order: each rank computes its own
    blocks, one all-gather, launched here (block-aligned chunks: every block lies in one rank's chunk)."""
    rep = tri.block_reps_of(k_local, _punct_bytes(token_info), params)  # [b, s_local / m, hk, d]
    parts, work = _all_gather_ranks(rep, group, async_op=True)

    def finish() -> torch.Tensor:
        work.wait()
        return zigzag_to_natural(parts, dist.get_world_size(group))
    return finish


# the punctuation flags as the representatives' kernel reads them (0/1 bytes): the same for every layer of a batch,
# so the three elementwise ops that make them run once per batch, not ahead of every layer's first kernel
_punct_bytes = PerBatch(lambda info: punct_mask(info).to(torch.uint8))


def gathered_reps(k_local, token_info, group, tri, params) -> torch.Tensor:
    """:func:`start_gathered_reps`, waited for."""
    return start_gathered_reps(k_local, token_info, group, tri, params)()


def _chunk_of(rank: int, half: int, cp: int) -> int:
    """The natural chunk that ``rank`` holds as its ``half`` (0: chunk rank, 1: chunk 2cp-1-rank)."""
    return rank if half == 0 else 2 * cp - 1 - rank


# The last dK/dV message of a backward (a rank's sums for the lower ranks' first chunks, final only after both its
# chunks) is the one no compute hides: it goes in this many pieces, so that rounding the next piece, sending one and
# adding the one before into the owner's sums overlap (at 128k, CP=2: 128 MiB whose cast and add take ~0.3 ms).
TAIL_PIECES = 4


def _key_end(rank: int, cp: int, c: int) -> int:
    """The last key position (exclusive) any query of ``rank`` reads: the end of its second chunk."""
    return (2 * cp - rank) * c


def _start_p2p(ops: list, group) -> list:
    """[(isend | irecv, tensor, group rank)] -> the works of one batched point-to-point call ([] when none). Ops
    between two ranks are listed in the same order on both sides, so they match in order (NCCL and gloo)."""
    ops = [dist.P2POp(fn, t, dist.get_global_rank(group, peer), group) for fn, t, peer in ops]
    return dist.batch_isend_irecv(ops) if ops else []


def _wait(works: list) -> None:
    """Wait for ``works`` and empty the list: a gloo work waited for a second time never returns."""
    for w in works:
        w.wait()
    works.clear()


def kv_plan(rank: int, cp: int) -> tuple[list, list]:
    """The forward K/V exchange of rank ``rank`` in two steps, each [(dist.isend | dist.irecv, natural chunk, peer)]:

    1. every rank's first chunk (natural chunk s of rank s) to every other rank: each rank's second chunk reads
       all of them, and rank r's first chunk reads those of ranks s < r;
    2. the second chunk of rank s (natural chunk 2cp-1-s) to the ranks r < s only: their second chunk's prefix
       (0 .. 2cp-1-r) contains it; for r > s it lies past every query of r (causal), so it is never sent.
    A rank's first chunk waits for step 1 (rank 0's for nothing), its second for both. Both steps run in both
    directions at once, one chunk per link each way in step 1. Ops between two ranks are listed in the same order
    on both sides (they match in order)."""
    first, second = [], []
    for s in range(cp):
        if s != rank:
            first += [(dist.isend, rank, s), (dist.irecv, s, s)]
            second.append((dist.isend, _chunk_of(rank, 1, cp), s) if s < rank else
                          (dist.irecv, _chunk_of(s, 1, cp), s))
    return first, second


def dkv_plan(rank: int, cp: int) -> tuple[list, list]:
    """The backward dK/dV messages of rank ``rank`` = s, [(dist.isend | dist.irecv, natural chunk, peer)]: (after
    the second chunk's backward, after the first's). s's second chunk (2cp-1-s) reads keys of chunks 0..2cp-1-s, its
    first chunk of chunks 0..s. So after the second chunk's backward s's sums for both chunks of every rank t > s
    are final (t's first chunk is above s, t's second within 0..2cp-1-s); its sums for the first chunk of each rank
    t < s are final only after the first chunk's backward; a rank t < s gets nothing for its second chunk, which
    no query of s reaches. Received in rank order, so the owner sums them in rank order."""
    early = ([(dist.isend, _chunk_of(t, h, cp), t) for t in range(rank + 1, cp) for h in range(2)]
             + [(dist.irecv, _chunk_of(rank, h, cp), t) for t in range(rank) for h in range(2)])
    last = [(dist.isend, t, t) for t in range(rank)] + [(dist.irecv, rank, t) for t in range(rank + 1, cp)]
    return early, last


_SIDE_STREAMS: dict = {}  # device index -> the stream :func:`_issued_after` issues on


def _mark_issued(device: torch.device) -> Optional[torch.cuda.Event]:
    """An event recorded on the current stream now (None on CPU): what :func:`_issued_after` waits for."""
    if device.type != "cuda":
        return None
    event = torch.cuda.Event()
    event.record()
    return event


def _side_stream(device: torch.device) -> torch.cuda.Stream:
    side = _SIDE_STREAMS.get(device.index)
    if side is None:
        side = _SIDE_STREAMS[device.index] = torch.cuda.Stream(device)
    return side


def _join_side(device: torch.device) -> None:
    """The current stream waits for the work issued on the side stream so far (nothing on CPU)."""
    if device.type == "cuda":
        torch.cuda.current_stream(device).wait_stream(_side_stream(device))


@contextlib.contextmanager
def _issued_after(ready: Optional[torch.cuda.Event], device: torch.device, join: bool = True):
    """Issue the block's work on a side stream that waits only for ``ready``, so kernels issued on the current stream
    after ``ready`` but before this block run beside it. NCCL's stream waits for the stream a call is issued on: a
    point-to-point call issued here starts once ``ready`` has, not after the selection the host issued just before
    it. After the block the current stream waits for the side stream: for the block's kernels (copies), not for its
    NCCL work, which runs on NCCL's own streams (the caller waits for the works); with ``join=False`` it does not,
    and the caller calls :func:`_join_side` before it reads what the block wrote. Buffers are allocated on the
    current stream before the block. On CPU (gloo, no streams) the block runs as is."""
    if ready is None:
        yield
        return
    side = _side_stream(device)
    side.wait_event(ready)
    with torch.cuda.stream(side):
        yield
    if join:
        torch.cuda.current_stream(device).wait_stream(side)


# Programs of the backward's early dK/dV casts and of this rank's second-chunk sum when they run on the side stream
# beside the first chunk's backward kernel (each looping, so that the attention kernel keeps most SMs), or None: on
# the compute stream, the first chunk's backward after the casts and the sum after it (the shipped schedule; a
# sum issued first would take every SM as PyTorch's fill does). An experiment knob (``bench/context_parallel.py
# --cp-sums-beside N``), to be decided by measurement; the same sums either way.
SUMS_BESIDE_PROGRAMS: Optional[int] = None

# Programs of the dK/dV accumulator's zero fill (``tri.zero_fill``), or None for PyTorch's fill, which takes every
# SM until done and so delays the kernel issued after it on the compute stream by most of its 0.24 ms (1 GiB at 128k,
# CP=2, rank 0; 2 x H200 profile). A few programs fill more slowly beside the attention kernels instead. An
# experiment knob (``bench/context_parallel.py --cp-fill-programs``), to be decided by measurement.
ZERO_FILL_PROGRAMS: Optional[int] = None


@contextlib.contextmanager
def _zeros_filled_early(shape: tuple, dtype: torch.dtype, device: torch.device, tri=None):
    """Yields ``torch.zeros(shape)`` whose fill runs beside the work already issued on the current stream, not after
    it: the fill and the buffer are issued on / drawn from the side stream (:func:`_side_stream`), which waits for
    nothing; the current stream waits for the fill. Every use of the buffer must be issued inside the block: on
    leaving it the side stream waits for the current stream, so the buffer's memory, back in the side stream's pool
    once the caller drops it, is reused (by the next layer's fill) only after those uses, and no more of it is held
    than one buffer (``record_stream`` would instead keep one per layer the host runs ahead). On CPU: a plain fill.
    The fp32 dK/dV accumulator of a 128k CP=2 backward is 1 GiB, a 0.33 ms fill on H100 (2 x H100 profile) that
    otherwise starts the backward: issued here it overlaps the output projection's backward in training. ``tri``: the
    kernels' module, for the fill of :data:`ZERO_FILL_PROGRAMS` programs when that is set."""
    if device.type != "cuda":
        yield torch.zeros(shape, dtype=dtype, device=device)
        return
    side, current = _side_stream(device), torch.cuda.current_stream(device)
    with torch.cuda.stream(side):
        if ZERO_FILL_PROGRAMS and tri is not None:
            buf = torch.empty(shape, dtype=dtype, device=device)
            tri.zero_fill(buf, ZERO_FILL_PROGRAMS)
        else:
            buf = torch.zeros(shape, dtype=dtype, device=device)
    current.wait_stream(side)
    try:
        yield buf
    finally:
        side.wait_stream(current)


class _OverlappedPHSA(torch.autograd.Function):
    """The all-gather path with the K/V exchange hidden behind selection and the first chunk's attention (see
    :func:`overlap_kernels`). K/V live in one [E, k | v, b, hk, d] buffer in position order (E: the end of this
    rank's second chunk, past which none of its queries reads; a chunk's K and V one contiguous range, so one
    message); the kernels read it through strided [b, E, hk, d] views, so no full-length copy is made anywhere.
    Chunk j = natural positions [j*C, (j+1)*C); rank r holds chunks r and 2cp-1-r.

    Forward:
    1. the representatives of the local blocks (the chunks are block-aligned, so these are the rows the whole
       sequence gives those blocks), all-gathered while the copies of 3. run: L / block_size rows, 1/16 of K;
    2. both chunks' selections from the gathered representatives (they need no keys), one launch, issued first:
       the host takes ~0.5-1 ms to issue the point-to-point calls of 3. (2 x H100 profile);
    3. on a side stream that waits only for the inputs (:func:`_issued_after`), so 2. runs beside it: the local K/V
       chunks copied into their places (one ``tri.place_kv_rows``), then the two point-to-point steps of
       :func:`kv_plan` launched without waiting: only the chunks a peer reads, the ones its first chunk reads first;
    4. the first chunk (keys [0, (r+1)C)) attends once step 1 of :func:`kv_plan` is in (rank 0's at once), the
       second once step 2 is; outputs are written in place.
    Backward (:meth:`backward`): both chunks accumulate dK/dV into one fp32 buffer over [0, E) (one zero fill, issued
    to run beside the work before the backward: :func:`_zeros_filled_early`), dq in place; each peer gets only its
    nonzero chunks, in the keys' dtype, as soon as they are final, point to point;
    the received contributions are added to this rank's fp32 sums and rounded once into the returned gradients.
    Selections, outputs and dq are those of the chunk path (and of CP=1): the same kernels on the same inputs.
    """

    @staticmethod
    def forward(ctx, q_local, k_local, v_local, token_info, group, tri, params):
        cp, rank = dist.get_world_size(group), dist.get_rank(group)
        b, s_local = q_local.shape[:2]
        c = s_local // 2
        spans = local_chunk_positions(s_local, cp, rank)
        inputs_ready = _mark_issued(q_local.device)
        reps = start_gathered_reps(k_local, token_info, group, tri, params)
        kv = k_local.new_empty((_key_end(rank, cp, c), 2, b, *k_local.shape[2:]))  # [E, k | v, b, hk, d]
        rows = [slice(i * c, (i + 1) * c) for i in range(2)]
        sel = tri.select_from_reps(q_local, reps(), params, q_offset=tuple(start for start, _ in spans))
        with _issued_after(inputs_ready, q_local.device):  # (the current stream then waits for these copies: rank
            # 0's first chunk waits for no step)
            # both chunks' K and V rows, each written as whole contiguous rows of kv whatever the strides of K and
            # V (in training V is a view of Megatron's fused QKV output): one launch
            tri.place_kv_rows(k_local, v_local, kv, [(half * c, start, c) for half, (start, _) in enumerate(spans)])
            steps = [_start_p2p([(fn, kv[j * c:(j + 1) * c], peer) for fn, j, peer in plan], group)
                     for plan in kv_plan(rank, cp)]  # (a chunk's K and V: one contiguous range, one message)
        sels = [sel[:, r] for r in rows] if sel.shape[1] == s_local else [sel, sel]  # (dense shortcut: [1, 1, 1, 1])
        k_all, v_all = kv[:, 0].transpose(0, 1), kv[:, 1].transpose(0, 1)  # [b, E, hk, d] views
        o = q_local.new_empty((b, s_local, q_local.shape[2], v_local.shape[3]))
        lses = []
        # the steps each chunk waits for: rank 0's first chunk (natural chunk 0) reads only its own keys; the last
        # rank's step 2 only sends, which none of its own chunks waits for
        needs = ((0,) if rank > 0 else (), (0, 1) if rank < cp - 1 else (0,))
        for (start, end), r, sel, need in zip(spans, rows, sels, needs):
            for i in need:
                _wait(steps[i])
            lses.append(tri.attend_forward(q_local[:, r], k_all[:, :end], v_all[:, :end], params, sel,
                                           q_offset=start, out=o[:, r])[1])
        _wait(steps[1])  # (the last rank's sends: done long before, its peers' second chunks wait for them)
        ctx.save_for_backward(q_local, kv, o, *lses, *sels)  # (the attention stays one launch per chunk: the first
        # chunk starts before step 2 arrives, and in backward the second chunk's contributions travel while the first
        # chunk computes)
        ctx.group, ctx.tri, ctx.params, ctx.spans = group, tri, params, spans
        return o

    @staticmethod
    def backward(ctx, do):
        """Each rank runs its second chunk first, then sends what :func:`dkv_plan` says is final (while the first
        chunk computes), then the rest, last (in TAIL_PIECES pieces).
        Own gradients = own fp32 sums + the peers' contributions (keys' dtype), added in fp32 and rounded once:
        one rounding fewer than a reduce-scatter of the rounded partial sums."""
        kv = ctx.saved_tensors[1]  # [E, k | v, b, hk, d]
        # acc [dk | dv, E, b, hk, d]: only keys read here (dk and dv apart: their casts and sums then run on
        # contiguous ranges)
        with _zeros_filled_early((2, kv.shape[0], *kv.shape[2:]), torch.float32, kv.device, ctx.tri) as acc:
            return _OverlappedPHSA.backward_into(ctx, do, acc)

    @staticmethod
    def backward_into(ctx, do, acc):
        """:meth:`backward` with the zeroed fp32 dK/dV accumulator ``acc`` [2, E, b, hk, d] given."""
        q_local, kv, o, lse0, lse1, sel0, sel1 = ctx.saved_tensors
        group, tri, params, spans = ctx.group, ctx.tri, ctx.params, ctx.spans
        cp, rank = dist.get_world_size(group), dist.get_rank(group)
        c = q_local.shape[1] // 2
        rows = lambda j: slice(j * c, (j + 1) * c)  # noqa: E731
        dq = torch.empty_like(q_local)
        k_all, v_all = kv[:, 0].transpose(0, 1), kv[:, 1].transpose(0, 1)
        dk_all, dv_all = acc[0].transpose(0, 1), acc[1].transpose(0, 1)
        chunk_shape = (2, c, *kv.shape[2:])  # [dk | dv, C, b, hk, d]: one message per chunk

        def chunk_backward(i: int, lse, sel) -> None:
            (start, end), r = spans[i], slice(i * c, (i + 1) * c)
            tri.attend_backward(q_local[:, r], k_all[:, :end], v_all[:, :end], o[:, r], do[:, r], lse, params, sel,
                                start, (dk_all[:, :end], dv_all[:, :end]), dq_out=dq[:, r])

        def outgoing(j: int, lo: int = 0, hi: int = c, programs: Optional[int] = None) -> torch.Tensor:
            """This rank's final sums over rows [lo, hi) of chunk j in the keys' dtype: [dk | dv, hi - lo, b, hk, d]."""
            return _rounded_rows(tri, acc, j * c + lo, j * c + hi, kv.dtype, programs)

        # the last messages go in pieces (see TAIL_PIECES)
        early, last = dkv_plan(rank, cp)
        pieces = [(c * i // TAIL_PIECES, c * (i + 1) // TAIL_PIECES) for i in range(min(TAIL_PIECES, c))]
        inbox = {(t, j): kv.new_empty(chunk_shape) for fn, j, t in early if fn is dist.irecv}
        inbox_last = {(t, p): kv.new_empty((2, hi - lo, *kv.shape[2:]))
                      for fn, _, t in last if fn is dist.irecv for p, (lo, hi) in enumerate(pieces)}
        home = kv.new_empty((2, 2, c, *kv.shape[2:]))  # [dk | dv, half, C, b, hk, d]: this rank's gradients
        own = _chunk_of(rank, 1, cp)

        def second_half_home() -> None:  # this rank's second chunk: own sums + the early contributions
            _wait(step1)
            _sum_into(tri, home[:, 1], acc[:, rows(own)], [buf for (_, j), buf in inbox.items() if j == own],
                      programs=beside)

        chunk_backward(1, lse1, sel1)
        # With SUMS_BESIDE_PROGRAMS the early messages' casts and this rank's second chunk's sum go to the side stream,
        # beside the first chunk's backward: it writes only rows [0, end of the first chunk), and they read later ones
        beside = SUMS_BESIDE_PROGRAMS
        early_block = (_issued_after(_mark_issued(q_local.device), q_local.device, join=False) if beside
                       else contextlib.nullcontext())
        with early_block:
            step1 = _start_p2p([(fn, outgoing(j, programs=beside) if fn is dist.isend else inbox[t, j], t)
                                for fn, j, t in early], group)
            if beside:
                second_half_home()
        chunk_backward(0, lse0, sel0)
        tail = [_start_p2p([(fn, outgoing(j, lo, hi) if fn is dist.isend else inbox_last[t, p], t)
                            for fn, j, t in last], group) for p, (lo, hi) in enumerate(pieces)]
        if beside:
            _join_side(q_local.device)  # (the early contributions, read below, and home[:, 1])
        else:
            second_half_home()
        for p, (lo, hi) in enumerate(pieces):
            _wait(tail[p])
            _sum_into(tri, home[:, 0, lo:hi], acc[:, rank * c + lo:rank * c + hi],
                      [buf[:, lo:hi] for (_, j), buf in inbox.items() if j == rank]
                      + [buf for (_, q), buf in inbox_last.items() if q == p])
        dk, dv = (home[g].view(2 * c, *kv.shape[2:]).transpose(0, 1) for g in range(2))  # [b, s_local, hk, d]
        return dq, dk, dv, None, None, None, None


# The dK/dV buffers are [dk | dv, rows, b, hk, d]; a row range of both is two contiguous ranges with a gap. The
# helpers below cast and sum both in one launch of ``tri.sum_rounded`` (wide loads and stores on each range;
# PyTorch's fp32 + bf16 add runs its unvectorised mixed-dtype loop). The arithmetic is that of
# ``torch.add(own, part, out=...)``: the same fp32 sums, in the same order, rounded once.


def _rounded_rows(tri, acc: torch.Tensor, lo: int, hi: int, dtype: torch.dtype,
                  programs: Optional[int] = None) -> torch.Tensor:
    """acc [2, E, ...] (fp32) -> its rows [lo, hi) in ``dtype``: [2, hi - lo, ...], one contiguous tensor (one
    message). ``programs``: see ``tri.sum_rounded``."""
    out = acc.new_empty((acc.shape[0], hi - lo, *acc.shape[2:]), dtype=dtype)
    tri.sum_rounded(out, acc[:, lo:hi], None, programs)
    return out


def _sum_into(tri, out: torch.Tensor, own: torch.Tensor, received: list, programs: Optional[int] = None) -> None:
    """out [2, n, ...] (keys' dtype) = own [2, n, ...] (fp32, consumed) + the received contributions ([2, n, ...],
    keys' dtype), summed in fp32 in rank order and rounded once. Each of out[g], own[g] and part[g] must be
    contiguous (the callers' slices are). ``programs``: see ``tri.sum_rounded``."""
    for part in received[:-1]:
        tri.sum_rounded(own, own, part, programs)  # (fp32 += bf16 in one pass, 10 B an element)
    tri.sum_rounded(out, own, received[-1] if received else None, programs)


def cp_phsa_attention(q, k, v, token_info, group, mode: str, phsa_kwargs: dict, *,
                      documents: bool = False, overlap: bool = True) -> torch.Tensor:
    """PHSA with context parallelism. q [b, s_local, hq, d], k/v [b, s_local, hk, d] (zigzag slices),
    token_info [b, s_local] -> [b, s_local, hq, d]. ``documents``: token_info carries document starts
    (``data.reset_attention_mask``), from the configuration. ``overlap=False`` keeps allgather on the chunk
    path even where selection could overlap the K/V all-gather (the same result; for benchmarks)."""
    def local(q_, k_, v_, info_):
        return phsa_local(q_, k_, v_, info_, phsa_kwargs, documents=documents)

    if mode == "ulysses":
        return ulysses_attention(q, k, v, token_info, group, local)
    kernels = overlap_kernels(q, k, v, token_info, group, phsa_kwargs, documents) if overlap else None
    if kernels is not None:
        return _OverlappedPHSA.apply(q, k, v, token_info, group, *kernels)
    return _attend_chunks(q, k, v, token_info, group, local, query_context=phsa_kwargs.get("query_block", 1) - 1,
                          documents=documents)


def cp_attention(q, k, v, token_info, group, softmax_scale=None, *, documents: bool = False) -> torch.Tensor:
    """Dense causal attention with all-gather CP (the baseline's CP path, no Transformer Engine).

    Each local chunk attends its causal prefix with a bottom-right-aligned causal mask, so SDPA can use its
    fused kernels and no [s, s] mask is materialised (document masking, when on, does build one).
    """
    def local(q_, k_, v_, info_):
        return dense_causal_attention(q_, k_, v_, info_, softmax_scale, documents=documents)

    return _attend_chunks(q, k, v, token_info, group, local, documents=documents)


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
    info_full = _gathered_info(token_info, group)

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
