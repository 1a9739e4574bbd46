"""Selection for ``score=dot_group_sum`` (the shipped score): one streaming pass, no softmax.

The group score ``sum_r scale * q_r . M_t`` is linear in q, so it equals ``scale * (sum_r q_r) . M_t``: the B*G
(query, head) rows of a query group are summed once in fp32 and the representatives are streamed once with one
row per group (``groups`` query groups per program, tiles of ``block_n`` blocks), straight into the running top-k
of ``topk.py``. Layouts (Q, REP, SEQ, SEL) and eligibility are those of ``select.py``'s module docstring.
Precision: M is exact in the input dtype (the score's definition); the fp32 group mean is split into two 16-bit
halves, so the product runs as two tensor-core dots (relative error of the mean ~2^-16, fp16 kept in range);
``tensor_cores=False`` runs an fp32 FMA dot instead (same selections, 2.4-2.7x slower, docs/kernels.md).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .topk import _store_selection, _topk_buffer, _topk_insert


NO_SECOND_PIECE = 1 << 30  # QROW2 when q's rows are one piece (past any row)


@triton.jit
def _program_groups(pid, n_groups, QOFF, QROW2, QOFF2, QB: tl.constexpr, NG: tl.constexpr):
    """(first group, end group, shift) of the selection program ``pid``: groups are indexed by position // QB, and
    a query at position p sits in Q's row p - shift. Q's rows [0, QROW2) are the positions QOFF + row; rows from
    QROW2 on (a second piece: a context-parallel rank's later chunk, selected in the same launch) the positions
    QOFF2 + row - QROW2. The first piece's programs have the lower pids; no program spans both pieces."""
    p0 = (QROW2 // QB + NG - 1) // NG
    in2 = pid >= p0
    j_first = tl.where(in2, (pid - p0) * NG + QOFF2 // QB, pid * NG + QOFF // QB)
    j_end = tl.where(in2, n_groups, tl.minimum(n_groups, (QOFF + QROW2 + QB - 1) // QB))
    return j_first, j_end, tl.where(in2, QOFF2 - QROW2, QOFF)


def program_count(n_groups_max: int, rows: int, B: int, NG: int, pieces) -> int:
    """Programs per (sequence, KV head) of a selection launch: ``n_groups_max`` groups, or with ``pieces`` =
    (QROW2, QOFF2) each piece's groups of the ``rows`` rows of Q (see ``_program_groups``)."""
    if pieces is None:
        return triton.cdiv(n_groups_max, NG)
    return triton.cdiv(pieces[0] // B, NG) + triton.cdiv(triton.cdiv(rows - pieces[0], B), NG)


@triton.jit(do_not_specialize=["TOPK"])  # top-k changes every step of a curriculum ramp: not a JIT key
def _select_dot_kernel(
    Q, REP, SEQ, SEL,
    sq_b, sq_l, sq_h, ss_b, ss_l, ss_h, hk,
    scale, n_init, W, TOPK, QOFF, QROW2, QOFF2,
    TC: tl.constexpr, G: tl.constexpr, QB: tl.constexpr, NG: tl.constexpr,
    BR: tl.constexpr, BN: tl.constexpr, KB: tl.constexpr, BS: tl.constexpr, D: tl.constexpr,
):
    """``dot_group_sum`` fast path: the group score is linear in q, sum_r scale*q_r.M_t = scale*(sum_r q_r).M_t,
    so a group's B*G rows collapse into one fp32 row before any block is touched: one streaming pass over the
    representatives with an fp32 [NG, D] x [D, BN] product, ~B*G times fewer FLOPs than the softmax score and no
    LSE pass. One program = NG query groups of one KV head of one sequence."""
    pid = tl.num_programs(0) - 1 - tl.program_id(0)  # longest first, as in _select_kernel
    si = tl.program_id(1)
    g = tl.program_id(2)
    batch = tl.load(SEQ + si * 4 + 0)
    start = tl.load(SEQ + si * 4 + 1)
    n = tl.load(SEQ + si * 4 + 2)
    roff = tl.load(SEQ + si * 4 + 3)
    # Q and SEL hold the query rows of one piece [QOFF, n) or two (see _program_groups)
    j_first, j_end, shift = _program_groups(pid, (n + QB - 1) // QB, QOFF, QROW2, QOFF2, QB, NG)
    if j_first >= j_end:
        return
    j_last = tl.minimum(j_first + NG - 1, j_end - 1)
    t_lo = n_init // BS
    t_max = (tl.maximum(j_last * QB - W, -BS) + BS) // BS - 1  # -1 when no block is eligible
    cols = tl.arange(0, D)
    b64 = batch.to(tl.int64)
    gidx = tl.arange(0, NG)
    gvalid = (j_first + gidx) < j_end
    i0g = (j_first + gidx) * QB

    # the group's query sum, fp32, over its valid (query, head) rows
    qs = tl.zeros([NG, D], tl.float32)
    for r0 in range(0, QB * G, BR):
        rr = r0 + tl.arange(0, BR)
        ql = rr // G
        hh = rr % G
        qi = i0g[:, None] + ql[None, :]
        valid = gvalid[:, None] & (ql < QB)[None, :] & (qi < n)
        qptr = (Q + b64 * sq_b + (start + qi - shift).to(tl.int64)[:, :, None] * sq_l
                + (g * G + hh)[None, :, None] * sq_h + cols[None, None, :])
        qs += tl.sum(tl.load(qptr, mask=valid[:, :, None], other=0.0).to(tl.float32), axis=1)

    if TC:  # the group mean (not sum) keeps fp16 in range; the ranking is the same
        qm = qs * (1.0 / (QB * G))
        qm_hi = qm.to(REP.dtype.element_ty)
        qm_lo = (qm - qm_hi.to(tl.float32)).to(REP.dtype.element_ty)
        scale_tc = scale * (QB * G)
    t_hi_g = tl.where((i0g >= W) & gvalid, (i0g - W) // BS, -1)
    buf, thr, slot, MIN64 = _topk_buffer(NG, KB, BN, TOPK)
    for t0 in range(t_lo, t_max + 1, BN):
        tt = t0 + tl.arange(0, BN)
        tmask = tt <= t_max
        moff = ((roff + tt).to(tl.int64) * hk)[:, None] * D + cols[None, :]
        m = tl.load(REP + g * D + moff, mask=tmask[:, None], other=0.0)
        if TC:  # M is exact in 16 bits, the fp32 mean is split in two 16-bit halves: two tensor-core dots
            acc = (tl.dot(qm_hi, tl.trans(m)) + tl.dot(qm_lo, tl.trans(m))) * scale_tc
        else:  # fp32 FMA dot
            acc = tl.dot(qs, tl.trans(m.to(tl.float32)), input_precision="ieee") * scale
        gel = (tt[None, :] <= t_hi_g[:, None]) & tmask[None, :]
        buf, thr = _topk_insert(acc, tt, gel, buf, thr, MIN64)
    _store_selection(buf, slot, TOPK, SEL, b64 * ss_b, (start + i0g - shift).to(tl.int64) * ss_l + g * ss_h, gvalid)


def dot_select_launch(q, rep, seq, max_n, params, topk, sel, *, qoff=0, pieces=None, groups=16, block_n=128,
                      tensor_cores=True):
    """Fill ``sel`` (int32 [b, L, hk, topk], group-start rows) with the dot score's selection (``select_launch``
    dispatches here; ``qoff`` / ``pieces`` as there). ``groups`` query groups per program (``tl.dot`` needs >= 16
    rows), ``block_n`` blocks per tile; defaults from the H100 sweep of ``bench/tune_select_dot.py``."""
    import torch

    d = q.shape[3]
    hk = rep.shape[1]
    G = q.shape[2] // hk
    B = params.query_block
    n_groups_max = -(-(max_n - qoff) // B)
    half = q.dtype in (torch.bfloat16, torch.float16)
    br = max(1, min(triton.next_power_of_2(B * G), 8192 // (groups * d)))  # [groups, br, d] loads: 64 regs/thread
    kb = triton.next_power_of_2(max(topk, 1))
    qrow2, qoff2 = pieces or (NO_SECOND_PIECE, 0)
    _select_dot_kernel[(program_count(n_groups_max, q.shape[1], B, groups, pieces), seq.shape[0], hk)](
        q, rep, seq, sel,
        q.stride(0), q.stride(1), q.stride(2), sel.stride(0), sel.stride(1), sel.stride(2), hk,
        params.scale(d), params.n_init, params.local_window, topk, qoff, qrow2, qoff2,
        TC=half and tensor_cores, G=G, QB=B, NG=groups, BR=br, BN=block_n,
        KB=kb, BS=params.block_size, D=d, num_warps=4 if kb <= 128 else 8,  # [groups, KB] int64 buffer in registers
    )
