"""Triton backend of PHSA: ``phsa_triton`` (autograd-capable) and ``select_blocks_triton``.

Layouts (as the reference): q [b, L, hq, d], k [b, L, hk, d], v [b, L, hk, dv], punct_mask bool [b, L] or
None, cu_seqlens int [n_docs + 1] (b == 1, every document an independent sequence), output [b, L, hq, dv];
selected blocks LongTensor [b, L, hk, topk], ascending, -1 padded, document-local.

Pipeline (kernels in ``kernels/``, docs in docs/kernels.md):
    reps.py    block representatives M (fp32 maths, stored in the input dtype)
    select.py  block scores + running top-k per query group, no [L, nb] matrix
    fwd.py     attention over INIT ∪ LOCAL ∪ TOPK, online softmax, saves LSE
    bwd.py     dq (registers), dk / dv (fp32 atomics)
    rows.py    context parallelism's row copies, rounded dK/dV sums and zero fill (``place_kv_rows``,
               ``sum_rounded``, ``zero_fill``)
Selection runs under no_grad; gradients flow to q, k, v through the attention only.

Exact shortcuts (same function, faster): when topk covers every eligible block of every query group, PHSA is
dense causal attention, and the attention kernels run with INIT = 0 and an unbounded LOCAL window.

Dense fallback (NOT the same function): with ``dense_fallback=True`` (what backend="auto" is meant to use) a
sequence no longer than ``DENSE_FALLBACK_MAX_SEQLEN`` runs dense causal cuDNN SDPA instead, as InfLLM-v2 does
below 8k. The threshold is a measurement, see the constant.
"""

from __future__ import annotations

import functools

import torch

from ..params import PHSAParams, check_shapes, pad_queries_front
from .kernels.bwd import bwd_launch
from .kernels.fwd import fwd_launch
from .kernels.reps import block_reps
from .kernels.rows import place_kv_rows, sum_rounded, zero_fill  # noqa: F401 - for the context-parallel path
from .kernels.select import select_launch

# Longest sequence (L, or the longest document with cu_seqlens) at which dense cuDNN SDPA forward+backward was
# measured faster than this operator: config (a) of bench/attention.py (hq=16, hk=8, d=128, bf16, block 16,
# n_init 128, window 512, k 16, query_block 64), one H100 80GB HBM3, 2026-11-23,
# bench/results/NVIDIA_H100_80GB_HBM3-2026-11-23-config-a.json. The crossing lies between 4k and 8k (6k was
# not measured). See docs/kernels.md ("Dense fallback threshold").
DENSE_FALLBACK_MAX_SEQLEN = 4096  # measured: PHSA/cuDNN fwd+bwd = 0.29x @1k, 0.20x @2k, 0.46x @4k, 1.17x @8k
# topk above this is not run by the selection kernel (its running buffer lives in registers); 256 covers the
# curriculum's hold at 128k tokens (97 % sparsity: k = 184)
SELECT_MAX_TOPK = 256
# above it, the fp32 logits of one chunk of query groups in the wide selection (peak ~3x this)
WIDE_SELECT_BYTES = 256 << 20


@functools.lru_cache(maxsize=64)
def _batch_seq_table(b: int, L: int, block_size: int, device: torch.device, rep_stride: int | None = None
                     ) -> torch.Tensor:
    """The SEQ table of b unpacked sequences of length L, built once per shape: a host-to-device copy from
    pageable memory waits for the GPU, so building it on every call would stall the launch queue each time.
    ``rep_stride``: representative rows per batch row (default L // block_size; more when the representatives
    cover a longer sequence than this call's keys, see :func:`select_from_reps`)."""
    stride = L // block_size if rep_stride is None else rep_stride
    return torch.tensor([(bi, 0, L, bi * stride) for bi in range(b)], dtype=torch.int32, device=device)


@functools.lru_cache(maxsize=64)
def _document_seq_table(docs: tuple, block_size: int, device: torch.device) -> tuple:
    """(SEQ table, representative rows) of packed documents [(batch, start, length)], built once per layout: every
    layer of a step has the same documents, and each host-to-device copy would stall the launch queue."""
    rows, off = [], 0
    for bi, s, n in docs:
        rows.append((bi, s, n, off))
        off += n // block_size
    return torch.tensor(rows if rows else [(0, 0, 0, 0)], dtype=torch.int32, device=device), off


def _seq_table(b: int, L: int, cu_seqlens, block_size: int, device, rep_stride: int | None = None):
    if cu_seqlens is None and L > 0:
        docs = [(bi, 0, L) for bi in range(b)]
        return docs, _batch_seq_table(b, L, block_size, torch.device(device), rep_stride), b * (L // block_size), L
    if cu_seqlens is None:
        docs = []
    else:  # a host read: free when cu_seqlens lives on the CPU (phsa_train.megatron passes it so)
        cs = [int(x) for x in cu_seqlens.tolist()]
        docs = [(0, s, e - s) for s, e in zip(cs, cs[1:]) if e > s]
    seq, off = _document_seq_table(tuple(docs), block_size, torch.device(device))
    max_n = max((n for _, _, n in docs), default=0)
    return docs, seq, off, max_n


def _max_eligible(n: int, p: PHSAParams) -> int:
    """Most eligible blocks of any query group of a sequence of length n (the last group has the most)."""
    if n == 0:
        return 0
    i0 = ((n - 1) // p.query_block) * p.query_block
    if i0 < p.local_window:
        return 0
    t_hi = (i0 - p.local_window) // p.block_size
    return max(0, t_hi - p.n_init // p.block_size + 1)


def _check(q, params):
    params.validate()
    m = params.block_size
    if m & (m - 1):
        raise ValueError(f"attention.block_size={m} must be a power of two for backend='triton'")
    d = q.shape[-1]
    if d & (d - 1) or d < 16:
        raise ValueError(f"head dim {d} must be a power of two >= 16 for backend='triton'")
    if q.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"dtype {q.dtype} not supported by backend='triton' (bf16 | fp16 | fp32)")


def _query_pieces(rows: int, q_offset) -> tuple:
    """(qoff, pieces, L) of ``q_offset``: an int (q's ``rows`` rows are the positions [q_offset, L), pieces None)
    or two offsets (q's rows are two equal pieces, at positions [o0, o0 + rows/2) and [o1, o1 + rows/2), o0 < o1;
    pieces = (rows/2, o1), the kernels' second piece). L: the key positions, up to the last query."""
    if isinstance(q_offset, int):
        return q_offset, None, rows + q_offset
    o0, o1 = q_offset
    half = rows // 2
    if rows % 2 or o1 < o0 + half:
        raise ValueError(f"q_offset={q_offset}: two offsets need two equal pieces of q's {rows} rows, in order")
    return o0, (half, o1), o1 + half


class _Plan:
    """Host-side description of one call: sequences, selection width, dense shortcut."""

    def __init__(self, q, params: PHSAParams, cu_seqlens, qoff=0, rep_stride: int | None = None):
        # L: key positions; q holds the query rows [qoff, L) (or two pieces, see _query_pieces)
        self.qoff, self.pieces, L = _query_pieces(q.shape[1], qoff)
        b = q.shape[0]
        self.cu_seqlens = cu_seqlens
        self.docs, self.seq, self.n_rep, self.max_n = _seq_table(b, L, cu_seqlens, params.block_size, q.device,
                                                                 rep_stride)
        max_elig = max((_max_eligible(n, params) for _, _, n in self.docs), default=0)
        self.kk = min(params.topk, max_elig)  # selection width that can hold a real block
        self.dense = params.topk >= max_elig  # every eligible block taken: exactly dense causal
        if self.dense:
            self.n_init, self.W, self.k_attn = 0, max(self.max_n, 1) + 1, 0
        else:
            self.n_init, self.W, self.k_attn = params.n_init, params.local_window, self.kk


def _contig(x):
    return x if x.stride(-1) == 1 else x.contiguous()


def _select_internal(q, k, punct_mask, params: PHSAParams, plan: _Plan, rep=None) -> torch.Tensor:
    """int32 [b, L, hk, kk]: selection written at the first row of every query group (other rows undefined).
    ``rep`` [n_rep, hk, d]: the block representatives, already computed (then k and punct_mask are unused)."""
    b, L, hq, d = q.shape
    hk = (k if rep is None else rep).shape[-2]
    kk = max(plan.kk, 1)
    sel = torch.full((b, L, hk, kk), -1, dtype=torch.int32, device=q.device) if plan.kk == 0 else \
        torch.empty((b, L, hk, kk), dtype=torch.int32, device=q.device)
    if plan.kk == 0 or not plan.docs:
        return sel
    if plan.kk > SELECT_MAX_TOPK:  # a selection too wide for the register top-k (curriculum ramps at long L)
        from .reference import select_blocks_reference  # noqa: PLC0415

        # the reference's function, scored a few query groups at a time: bounded memory at any length
        qf = pad_queries_front(q, plan.qoff)
        return select_blocks_reference(qf, k, punct_mask, params, plan.cu_seqlens, max_score_bytes=WIDE_SELECT_BYTES,
                                       q_offset=plan.qoff)[:, plan.qoff:, :, : plan.kk].to(torch.int32)
    if rep is None:
        pu8 = None if punct_mask is None else punct_mask.to(torch.uint8)
        max_nb = plan.max_n // params.block_size
        rep = block_reps(k, pu8, plan.seq, plan.n_rep, max_nb, params.block_size, params.lam)
    # per-row LSE scratch of the softmax score's pass 1, only for query groups of more than 128 (query, head) rows
    # (smaller groups keep it in registers; the dot score needs none)
    big = params.score == "softmax_group_sum" and params.query_block * (hq // hk) > 128
    lsebuf = torch.empty((b, L, hq) if big else (1,), dtype=torch.float32, device=q.device)
    select_launch(q, rep, plan.seq, plan.max_n, params, plan.kk, sel, lsebuf, qoff=plan.qoff, pieces=plan.pieces)
    return sel


def _group_rows(L: int, plan: _Plan, B: int, device) -> torch.Tensor:
    """LongTensor [L]: the first row of the query group of every position (document-local groups)."""
    if plan.cu_seqlens is None:
        return (torch.arange(L, device=device) // B) * B
    rows = torch.arange(L, device=device)
    for _, s, n in plan.docs:
        rows[s : s + n] = s + (torch.arange(n, device=device) // B) * B
    return rows


def _no_selection(device) -> torch.Tensor:
    """The selection argument of the attention kernels when every eligible block is taken (dense shortcut)."""
    return torch.full((1, 1, 1, 1), -1, dtype=torch.int32, device=device)


def attend_forward(q, k, v, params: PHSAParams, selection, q_offset: int = 0, out=None):
    """The attention step alone, no autograd, unpacked sequences: (o [b, Lq, hq, dv], lse) from the
    :func:`select_from_reps` ``selection`` of the query rows [q_offset, q_offset + Lq) against k, v [b, L, hk, d]
    (L = Lq + q_offset; any strides with the last one 1). ``out``: o's storage (a view, last stride 1), else new.
    For callers that own the autograd (the context-parallel path)."""
    q, k, v = _contig(q), _contig(k), _contig(v)
    plan = _Plan(q, params, None, q_offset)
    return fwd_launch(q, k, v, selection, plan.seq, plan.max_n, params, plan.k_attn, plan.n_init, plan.W,
                      qoff=plan.qoff, out=out)


def attend_backward(q, k, v, o, do, lse, params: PHSAParams, selection, q_offset: int, dkv_acc,
                    dq_out=None) -> torch.Tensor:
    """Backward of :func:`attend_forward`: returns dq (written into ``dq_out`` when given, a view with last stride
    1); dk and dv are added into ``dkv_acc`` (fp32 buffers [b, L, hk, d], any strides with the last one 1, shared
    by calls over one key sequence, zeroed by the caller)."""
    q, k, v = _contig(q), _contig(k), _contig(v)
    plan = _Plan(q, params, None, q_offset)
    return bwd_launch(q, k, v, o, _contig(do), lse, selection, plan.seq, plan.max_n, params, plan.k_attn,
                      plan.n_init, plan.W, qoff=plan.qoff, dkv_acc=dkv_acc, dq_out=dq_out)[0]


class _PHSAFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, punct_mask, params, cu_seqlens, q_offset):
        q, k, v = _contig(q), _contig(k), _contig(v)
        plan = _Plan(q, params, cu_seqlens, q_offset)
        with torch.no_grad():
            sel = _select_internal(q, k, punct_mask, params, plan) if not plan.dense else _no_selection(q.device)
            o, lse = fwd_launch(q, k, v, sel, plan.seq, plan.max_n, params, plan.k_attn, plan.n_init, plan.W,
                                qoff=plan.qoff)
        ctx.save_for_backward(q, k, v, o, lse, sel)
        ctx.plan, ctx.params = plan, params
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, sel = ctx.saved_tensors
        plan, params = ctx.plan, ctx.params
        dq, dk, dv = bwd_launch(q, k, v, o, _contig(do), lse, sel, plan.seq, plan.max_n, params, plan.k_attn,
                                plan.n_init, plan.W, qoff=plan.qoff)
        return dq, dk, dv, None, None, None, None


def dense_sdpa(q, k, v, cu_seqlens=None):
    """Dense causal attention through torch SDPA (cuDNN backend when available), GQA by repeating KV heads.
    Packed documents run one document at a time."""
    from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: PLC0415

    G = q.shape[2] // k.shape[2]

    def one(qs, ks, vs):
        qt, kt, vt = qs.transpose(1, 2), ks.transpose(1, 2), vs.transpose(1, 2)
        if G > 1:
            kt, vt = kt.repeat_interleave(G, dim=1), vt.repeat_interleave(G, dim=1)
        backends = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                    SDPBackend.MATH] if qs.is_cuda else [SDPBackend.MATH]
        with sdpa_kernel(backends):
            return torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=True).transpose(1, 2)

    if cu_seqlens is None:
        return one(q, k, v)
    cs = [int(x) for x in cu_seqlens.tolist()]
    return torch.cat([one(q[:, s:e], k[:, s:e], v[:, s:e]) for s, e in zip(cs, cs[1:]) if e > s], dim=1)


def use_dense_fallback(q, params: PHSAParams, cu_seqlens=None) -> bool:
    """True when the dense fallback applies: the longest sequence is at most DENSE_FALLBACK_MAX_SEQLEN."""
    if cu_seqlens is None:
        longest = q.shape[1]
    else:
        cs = cu_seqlens.tolist()
        longest = max((e - s for s, e in zip(cs, cs[1:])), default=0)
    return longest <= DENSE_FALLBACK_MAX_SEQLEN and params.softmax_scale in (None, q.shape[-1] ** -0.5)


def phsa_triton(q, k, v, punct_mask, params: PHSAParams, cu_seqlens=None, *, dense_fallback: bool = False,
                q_offset: int = 0):
    """PHSA forward (autograd-capable): q [b, L, hq, d], k [b, L, hk, d], v [b, L, hk, dv] -> [b, L, hq, dv].

    ``q_offset > 0``: q holds only the query rows [q_offset, L) of the L key positions ([b, L - q_offset, hq, d]
    -> [b, L - q_offset, hq, dv]); the kernels index those rows natively (no padded rows are computed). This is
    the context-parallel chunk case; q_offset must be a multiple of query_block, without cu_seqlens.

    Exact against ``phsa_reference`` at the same ``params`` (selection equal up to float near-ties).
    ``dense_fallback=True`` swaps in dense causal SDPA for sequences up to DENSE_FALLBACK_MAX_SEQLEN tokens
    (faster there, but a different function: every query sees every earlier token)."""
    _check(q, params)
    check_shapes(q, k, v, punct_mask, cu_seqlens, q_offset=q_offset, query_block=params.query_block)
    if dense_fallback and use_dense_fallback(k, params, cu_seqlens):
        return dense_sdpa(pad_queries_front(q, q_offset), k, v, cu_seqlens)[:, q_offset:]
    return _PHSAFunction.apply(q, k, v, punct_mask, params, cu_seqlens, q_offset)


def block_reps_of(k, punct_mask, params: PHSAParams) -> torch.Tensor:
    """Block representatives of unpacked sequences: k [b, L, hk, d], punct_mask bool (or 0/1 uint8) [b, L] or
    None -> [b, L // block_size, hk, d] (complete blocks). A block's representative depends on its own keys and flags
    only, so the blocks of any block-aligned piece of a sequence (a context-parallel chunk) have the rows the
    whole sequence would give them."""
    b, L, hk, d = k.shape
    m, nb = params.block_size, L // params.block_size
    pu8 = None if punct_mask is None else punct_mask.to(torch.uint8)
    with torch.no_grad():
        rep = block_reps(_contig(k), pu8, _batch_seq_table(b, L, m, k.device), b * nb, nb, m, params.lam)
    return rep[: b * nb].view(b, nb, hk, d)


def select_from_reps(q, rep, params: PHSAParams, q_offset: int | tuple = 0) -> torch.Tensor:
    """The selection :func:`phsa_triton` would make for q [b, Lq, hq, d] (query rows [q_offset, q_offset + Lq) of
    a sequence; unpacked), from that sequence's representatives rep [b, nb, hk, d] (:func:`block_reps_of`; nb may
    cover more than the Lq + q_offset keys: later blocks are never eligible), for :func:`attend_forward`. Needs
    no keys, so it can run while they are still in flight. ``q_offset`` = (o0, o1): q's two halves are the query
    rows from o0 and from o1 (a context-parallel rank's two chunks, one launch); the selection's rows [0, Lq/2)
    and [Lq/2, Lq) are then each half's (or both the dense shortcut's ``[1, 1, 1, 1]`` when neither has a choice)."""
    _check(q, params)
    b, nb, hk, d = rep.shape
    q = _contig(q)
    plan = _Plan(q, params, None, q_offset, rep_stride=nb)
    if plan.dense:
        return _no_selection(q.device)
    if plan.kk > SELECT_MAX_TOPK:
        raise ValueError(f"attention.topk={params.topk} above {SELECT_MAX_TOPK} has no selection from representatives")
    with torch.no_grad():
        return _select_internal(q, None, None, params, plan, rep=rep.reshape(b * nb, hk, d))


def select_blocks_triton(q, k, punct_mask, params: PHSAParams, cu_seqlens=None) -> torch.Tensor:
    """Selected blocks: q [b, L, hq, d], k [b, L, hk, d] -> LongTensor [b, L, hk, topk] (ascending, -1 padded,
    document-local), equal to ``select_blocks_reference`` up to float near-ties."""
    _check(q, params)
    check_shapes(q, k, None, punct_mask, cu_seqlens)
    b, L, _, _ = q.shape
    hk = k.shape[2]
    out = torch.full((b, L, hk, params.topk), -1, dtype=torch.long, device=q.device)
    q, k = _contig(q), _contig(k)
    plan = _Plan(q, params, cu_seqlens)
    if plan.kk == 0 or L == 0:
        return out
    with torch.no_grad():
        sel = _select_internal(q, k, punct_mask, params, plan)
        rows = _group_rows(L, plan, params.query_block, q.device)
        out[..., : plan.kk] = sel[:, rows].long()
    return out
