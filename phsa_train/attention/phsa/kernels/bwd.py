"""Sparse attention backward: dq, dk, dv over INIT ∪ LOCAL ∪ TOPK, GQA-aware.

Layouts: as ``fwd.py``; O, DO [b, L, hq, dv] (delta = rowsum(o * do) is computed in the kernel); LSE fp32 [b, L, hq] (base 2);
DQ [b, L, hq, d] in q's dtype; DK32 / DV32 fp32 [b, L, hk, d | dv] accumulators (zero-initialised), cast by the
caller.

Algorithm: query-major, the same tiles and the same three key ranges as the forward (so the support is the
forward's support by construction). Per key tile: p = exp2(s - lse), dp = do v^T, ds = p (dp - delta);
dq += ds k stays in registers (written once, no atomics); dk += ds^T q and dv += p^T do are added to fp32
buffers with atomics, because a key is reached by every query group that selected its block, by ~(w + B) / B
groups through LOCAL, and by every group through INIT. A key-major pass would need an inverted index of the
selection (a counting sort) and re-loads of the queries of each selecting group; the atomic scheme was chosen
first for simplicity; see docs/kernels.md for its measured cost.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _bwd_tile(dq, q, do, lse2, delta, kbase, vbase, dkbase, dvbase, kj, kvalid, mask2d, sk_l, sv_l, sdk_l,
              sdv_l, cols, colsv, scale2, scale, PREC: tl.constexpr):
    koff = kj.to(tl.int64)[:, None]
    k = tl.load(kbase + koff * sk_l + cols[None, :], mask=kvalid[:, None], other=0.0)
    v = tl.load(vbase + koff * sv_l + colsv[None, :], mask=kvalid[:, None], other=0.0)
    s = tl.dot(q, tl.trans(k), input_precision=PREC) * scale2
    p = tl.where(mask2d, tl.exp2(s - lse2[:, None]), 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=PREC)
    ds = p * (dp - delta[:, None])
    dq += tl.dot(ds.to(k.dtype), k, input_precision=PREC)
    dv_t = tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PREC)
    dk_t = tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PREC) * scale
    tl.atomic_add(dvbase + koff * sdv_l + colsv[None, :], dv_t, mask=kvalid[:, None], sem="relaxed")
    tl.atomic_add(dkbase + koff * sdk_l + cols[None, :], dk_t, mask=kvalid[:, None], sem="relaxed")
    return dq


@triton.jit(do_not_specialize=["TOPK"])  # top-k changes every step of a curriculum ramp: not a JIT key
def _bwd_kernel(
    Q, K, V, O, DO, LSE, DQ, DK, DV, SEL, SEQ,
    sq_b, sq_l, sq_h, sk_b, sk_l, sk_h, sv_b, sv_l, sv_h, so_b, so_l, so_h, sdo_b, sdo_l, sdo_h,
    sdq_b, sdq_l, sdq_h,
    sdk_b, sdk_l, sdk_h, sdv_b, sdv_l, sdv_h, ss_b, ss_l, ss_h, L, hq,
    scale2, scale, n_init, W, TOPK, QOFF,
    G: tl.constexpr, QB: tl.constexpr, QT: tl.constexpr, NSUB: tl.constexpr, BM: tl.constexpr,
    BN: tl.constexpr, BS: tl.constexpr, D: tl.constexpr, DV_: tl.constexpr, PREC: tl.constexpr,
):
    tile = tl.program_id(0)
    si = tl.program_id(1)
    g = tl.program_id(2)
    batch = tl.load(SEQ + si * 4 + 0)
    start = tl.load(SEQ + si * 4 + 1)
    n = tl.load(SEQ + si * 4 + 2)
    grp = tile // NSUB + QOFF // QB  # QOFF: q, o, do, dq hold the query rows [QOFF, n) only
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
    colsv = tl.arange(0, DV_)
    rowq = (start + qi - QOFF).to(tl.int64)[:, None]
    q = tl.load(Q + b64 * sq_b + rowq * sq_l + (g * G + hh)[:, None] * sq_h + cols[None, :],
                mask=rvalid[:, None], other=0.0)
    do = tl.load(DO + b64 * sdo_b + rowq * sdo_l + (g * G + hh)[:, None] * sdo_h + colsv[None, :],
                 mask=rvalid[:, None], other=0.0)
    loff = (b64 * L + start + qi - QOFF) * hq + g * G + hh
    lse2 = tl.load(LSE + loff, mask=rvalid, other=float("inf"))
    o = tl.load(O + b64 * so_b + rowq * so_l + (g * G + hh)[:, None] * so_h + colsv[None, :],
                mask=rvalid[:, None], other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    s0 = start.to(tl.int64)
    kbase = K + b64 * sk_b + s0 * sk_l + g * sk_h
    vbase = V + b64 * sv_b + s0 * sv_l + g * sv_h
    dkbase = DK + b64 * sdk_b + s0 * sdk_l + g * sdk_h
    dvbase = DV + b64 * sdv_b + s0 * sdv_l + g * sdv_h
    dq = tl.zeros([BM, D], tl.float32)
    ls = tl.maximum(i0 - W + 1, 0)
    q_last = q_end - 1
    cn = tl.arange(0, BN)
    init_end = tl.minimum(n_init, ls)
    for j0 in range(0, init_end, BN):
        kj = j0 + cn
        kvalid = kj < init_end
        dq = _bwd_tile(dq, q, do, lse2, delta, kbase, vbase, dkbase, dvbase, kj, kvalid, kvalid[None, :],
                       sk_l, sv_l, sdk_l, sdv_l, cols, colsv, scale2, scale, PREC)
    for j0 in range(ls, q_last + 1, BN):
        kj = j0 + cn
        kvalid = kj <= q_last
        mask2d = kvalid[None, :] & (kj[None, :] <= qi[:, None])
        dq = _bwd_tile(dq, q, do, lse2, delta, kbase, vbase, dkbase, dvbase, kj, kvalid, mask2d,
                       sk_l, sv_l, sdk_l, sdv_l, cols, colsv, scale2, scale, PREC)
    sbase = SEL + b64 * ss_b + (start + i0 - QOFF).to(tl.int64) * ss_l + g * ss_h
    for t0 in range(0, TOPK * BS, BN):
        kk = t0 + cn
        slot = kk // BS
        blk = tl.load(sbase + slot, mask=slot < TOPK, other=-1)
        kj = blk * BS + kk % BS
        kvalid = (blk >= 0) & (kj >= n_init) & (kj < ls)
        dq = _bwd_tile(dq, q, do, lse2, delta, kbase, vbase, dkbase, dvbase, kj, kvalid, kvalid[None, :],
                       sk_l, sv_l, sdk_l, sdv_l, cols, colsv, scale2, scale, PREC)
    dq = dq * scale
    tl.store(DQ + b64 * sdq_b + rowq * sdq_l + (g * G + hh)[:, None] * sdq_h + cols[None, :],
             dq.to(DQ.dtype.element_ty), mask=rvalid[:, None])


def bwd_launch(q, k, v, o, do, lse, sel, seq, max_n, params, topk, n_init, W, *, qoff=0, dkv_acc=None, dq_out=None,
               block_n=64, num_warps=None, num_stages=2):
    """dq, dk, dv in the inputs' dtypes. Tuning: ``block_n`` keys per tile, ``num_warps`` (None: 8 for 128-row
    tiles, else 4), ``num_stages``; defaults from the H100 sweep of ``bench/tune.py`` (docs/kernels.md).
    ``dkv_acc``: fp32 (dk, dv) buffers [b, k.shape[1], hk, d] (views of larger ones allowed) that several calls over
    one key sequence accumulate into (the context-parallel chunks); then dk and dv are returned as those
    buffers, unconverted, and the caller zeroes and converts them once. ``dq_out``: dq's storage, any view with last
    stride 1 (a context-parallel chunk's rows of the whole dq: no copy afterwards)."""
    import torch

    from .fwd import tile_shape

    b, L, hq, d = q.shape
    hk, dv = k.shape[2], v.shape[3]
    G, B = hq // hk, params.query_block
    QT, NSUB, BM = tile_shape(B, G)
    # dense even when q is a strided view
    dq = torch.empty(q.shape, device=q.device, dtype=q.dtype) if dq_out is None else dq_out
    Lk = k.shape[1]
    if dkv_acc is None:
        dk32 = torch.zeros((b, Lk, hk, d), device=q.device, dtype=torch.float32)
        dv32 = torch.zeros((b, Lk, hk, dv), device=q.device, dtype=torch.float32)
    else:
        dk32, dv32 = dkv_acc
    grid = (triton.cdiv(max_n - qoff, B) * NSUB, seq.shape[0], hk)
    scale = params.scale(d)
    _bwd_kernel[grid](
        q, k, v, o, do, lse, dq, dk32, dv32, sel, seq,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), o.stride(0), o.stride(1), o.stride(2),
        do.stride(0), do.stride(1), do.stride(2), dq.stride(0), dq.stride(1), dq.stride(2),
        dk32.stride(0), dk32.stride(1), dk32.stride(2), dv32.stride(0), dv32.stride(1), dv32.stride(2),
        sel.stride(0), sel.stride(1), sel.stride(2), L, hq,
        scale * 1.4426950408889634, scale, n_init, W, topk, qoff,
        G=G, QB=B, QT=QT, NSUB=NSUB, BM=BM, BN=block_n, BS=params.block_size, D=d, DV_=dv,
        PREC="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=num_warps or (8 if BM >= 128 else 4), num_stages=num_stages,
    )
    if dkv_acc is not None:
        return dq, dk32, dv32
    return dq, dk32.to(k.dtype), dv32.to(v.dtype)
