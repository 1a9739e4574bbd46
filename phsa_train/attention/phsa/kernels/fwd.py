"""Sparse attention forward over INIT ∪ LOCAL ∪ TOPK with online softmax, GQA-aware.

Layouts
    Q [b, L, hq, d], K [b, L, hk, d], V [b, L, hk, dv], O [b, L, hq, dv] (last strides 1), bf16/fp16/fp32
    LSE  fp32 [b, L, hq]: log2-sum-exp of the scaled logits (base 2), saved for the backward
    SEL  int32 [b, L, hk, topk]: selected blocks of every query group, read at the group's first row i0
    SEQ  int32 [n_seq, 4]: (batch, start, length, rep_offset); all positions are relative to ``start``

Algorithm: one program = QT consecutive queries of one query group (query_block B; QT = B when B*G <= 128,
else the group is split in NSUB sub-tiles that share its selection) times the G query heads of KV head g, i.e.
a [QT*G, d] tile of rows (padded to 16). The keys are walked in three disjoint ranges, each as [BN, d] tiles:
    INIT   j in [0, min(n_init, ls)),             ls = max(i0 - w + 1, 0)  (j < ls <= i: causal for free)
    LOCAL  j in [ls, last query of the tile],      causal mask j <= i per row
    TOPK   the tokens of the selected blocks, gathered BN // m blocks per tile, minus those already in INIT
           (j < n_init) or LOCAL (j >= ls); eligible blocks end before i0, so they are causal for free.
Their union is exactly S(i) = INIT ∪ LOCAL(i) ∪ TOPK(i) of the spec (local window from the group's i0).
Online softmax in base 2 with fp32 accumulators (the running max is guarded so fully masked tiles are safe);
o = acc / l, LSE = m + log2(l).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _fwd_tile(acc, m_i, l_i, q, kbase, vbase, kj, kvalid, mask2d, sk_l, sv_l, cols, colsv, scale2,
              PREC: tl.constexpr):
    k = tl.load(kbase + kj.to(tl.int64)[:, None] * sk_l + cols[None, :], mask=kvalid[:, None], other=0.0)
    s = tl.dot(q, tl.trans(k), input_precision=PREC) * scale2
    s = tl.where(mask2d, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    v = tl.load(vbase + kj.to(tl.int64)[:, None] * sv_l + colsv[None, :], mask=kvalid[:, None], other=0.0)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
    return acc, m_new, l_i


@triton.jit(do_not_specialize=["TOPK"])  # top-k changes every step of a curriculum ramp: not a JIT key
def _fwd_kernel(
    Q, K, V, O, LSE, SEL, SEQ,
    sq_b, sq_l, sq_h, sk_b, sk_l, sk_h, sv_b, sv_l, sv_h, so_b, so_l, so_h, ss_b, ss_l, ss_h, L, hq,
    scale2, n_init, W, TOPK, QOFF,
    G: tl.constexpr, QB: tl.constexpr, QT: tl.constexpr, NSUB: tl.constexpr, BM: tl.constexpr,
    BN: tl.constexpr, BS: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, PREC: tl.constexpr,
):
    tile = tl.program_id(0)
    si = tl.program_id(1)
    g = tl.program_id(2)
    batch = tl.load(SEQ + si * 4 + 0)
    start = tl.load(SEQ + si * 4 + 1)
    n = tl.load(SEQ + si * 4 + 2)
    grp = tile // NSUB + QOFF // QB  # QOFF: q holds the query rows [QOFF, n) only (suffix queries)
    sub = tile % NSUB
    i0 = grp * QB
    q_first = i0 + sub * QT
    q_end = tl.minimum(tl.minimum(q_first + QT, i0 + QB), n)
    if q_first >= q_end:
        return
    b64 = batch.to(tl.int64)
    r = tl.arange(0, BM)
    ql = r // G
    hh = r % G
    qi = q_first + ql
    rvalid = (ql < QT) & (qi < q_end)
    cols = tl.arange(0, D)
    colsv = tl.arange(0, DV)
    qptr = Q + b64 * sq_b + (start + qi - QOFF).to(tl.int64)[:, None] * sq_l + (g * G + hh)[:, None] * sq_h + cols[None, :]
    q = tl.load(qptr, mask=rvalid[:, None], other=0.0)
    kbase = K + b64 * sk_b + start.to(tl.int64) * sk_l + g * sk_h
    vbase = V + b64 * sv_b + start.to(tl.int64) * sv_l + g * sv_h
    m_i = tl.full([BM], float("-inf"), tl.float32)
    l_i = tl.zeros([BM], tl.float32)
    acc = tl.zeros([BM, DV], tl.float32)
    ls = tl.maximum(i0 - W + 1, 0)
    q_last = q_end - 1
    cn = tl.arange(0, BN)
    # INIT
    init_end = tl.minimum(n_init, ls)
    for j0 in range(0, init_end, BN):
        kj = j0 + cn
        kvalid = kj < init_end
        acc, m_i, l_i = _fwd_tile(acc, m_i, l_i, q, kbase, vbase, kj, kvalid, kvalid[None, :], sk_l, sv_l,
                                  cols, colsv, scale2, PREC)
    # LOCAL
    for j0 in range(ls, q_last + 1, BN):
        kj = j0 + cn
        kvalid = kj <= q_last
        mask2d = kvalid[None, :] & (kj[None, :] <= qi[:, None])
        acc, m_i, l_i = _fwd_tile(acc, m_i, l_i, q, kbase, vbase, kj, kvalid, mask2d, sk_l, sv_l,
                                  cols, colsv, scale2, PREC)
    # TOPK
    sbase = SEL + b64 * ss_b + (start + i0 - QOFF).to(tl.int64) * ss_l + g * ss_h
    for t0 in range(0, TOPK * BS, BN):
        kk = t0 + cn
        slot = kk // BS
        blk = tl.load(sbase + slot, mask=slot < TOPK, other=-1)
        kj = blk * BS + kk % BS
        kvalid = (blk >= 0) & (kj >= n_init) & (kj < ls)
        acc, m_i, l_i = _fwd_tile(acc, m_i, l_i, q, kbase, vbase, kj, kvalid, kvalid[None, :], sk_l, sv_l,
                                  cols, colsv, scale2, PREC)
    o = acc / l_i[:, None]
    optr = O + b64 * so_b + (start + qi - QOFF).to(tl.int64)[:, None] * so_l + (g * G + hh)[:, None] * so_h + colsv[None, :]
    tl.store(optr, o.to(O.dtype.element_ty), mask=rvalid[:, None])
    lptr = LSE + (b64 * L + start + qi - QOFF) * hq + g * G + hh
    tl.store(lptr, m_i + tl.log2(l_i), mask=rvalid)


def tile_shape(B, G):
    """(QT, NSUB, BM): queries per tile, sub-tiles per query group, rows per tile (>= 16 for tl.dot)."""
    QT = min(triton.next_power_of_2(B), max(1, 128 // G))
    NSUB = triton.cdiv(B, QT)
    BM = max(16, QT * G)
    return QT, NSUB, BM


def fwd_launch(q, k, v, sel, seq, max_n, params, topk, n_init, W, *, qoff=0, out=None, block_n=None, num_warps=None,
               num_stages=3):
    """o [b, L, hq, dv] in q's dtype and LSE fp32 [b, L, hq] (base 2). ``out``: o's storage, any view with last
    stride 1 (a context-parallel chunk's rows of the layer output: no copy afterwards). Tuning: ``block_n`` keys per
    tile (None: 64 for d <= 128, else 32), ``num_warps`` (None: 8 for 128-row tiles, else 4), ``num_stages``."""
    import torch

    b, L, hq, d = q.shape
    hk, dv = k.shape[2], v.shape[3]
    G, B = hq // hk, params.query_block
    QT, NSUB, BM = tile_shape(B, G)
    o = torch.empty((b, L, hq, dv), device=q.device, dtype=q.dtype) if out is None else out
    lse = torch.empty((b, L, hq), device=q.device, dtype=torch.float32)
    BN = block_n or (64 if d <= 128 else 32)
    grid = (triton.cdiv(max_n - qoff, B) * NSUB, seq.shape[0], hk)
    _fwd_kernel[grid](
        q, k, v, o, lse, sel, seq,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), o.stride(0), o.stride(1), o.stride(2),
        sel.stride(0), sel.stride(1), sel.stride(2), L, hq,
        params.scale(d) * 1.4426950408889634, n_init, W, topk, qoff,
        G=G, QB=B, QT=QT, NSUB=NSUB, BM=BM, BN=BN, BS=params.block_size, D=d, DV=dv,
        PREC="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=num_warps or (8 if BM >= 128 else 4), num_stages=num_stages,
    )
    return o, lse
