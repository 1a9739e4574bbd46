"""Dual-branch block representatives as a Triton kernel.

Layouts
    K      [b, L, hk, d] (any strides, last one 1), bf16/fp16/fp32
    PUNCT  [b, L] uint8 (1 = punctuation token), or absent (HAS_P=False: M = M_o)
    SEQ    int32 [n_seq, 4] rows (batch, start, length, rep_offset): every sequence (a batch row, or one packed
           document of cu_seqlens) is independent; its block t covers tokens start + [t*m, (t+1)*m)
    REP    [n_rep, hk, d] in the keys' dtype: row rep_offset + t holds M(t) of that sequence (complete blocks
           only), accumulated in fp32 and rounded to nearest once at the store (bf16 / fp16 keys give bf16 /
           fp16 M, the tensor-core operand of the selection; fp32 keys keep fp32)

Algorithm (one program = 64 // m consecutive blocks of one sequence and one KV head):
    M_o = mean_l K[l]; n_p = sum_l p[l]; M_p = sum_l p[l] K[l] / n_p (M_o when n_p == 0);
    M = lam * M_o + (1 - lam) * M_p, in fp32 with the reference's operations (IEEE division, no FMA contraction),
    so the fp32 values agree with the reference's wherever its sums are exact (16 bf16 keys almost always
    are), then rounded to the keys' dtype as the reference's ``score_representatives`` does.
No gradient flows through M (selection only).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _reps_kernel(
    K, PUNCT, SEQ, REP,
    sk_b, sk_l, sk_h, sp_b, sp_l,
    hk, lam,
    HAS_P: tl.constexpr, BS: tl.constexpr, NBP: tl.constexpr, D: tl.constexpr, BD: tl.constexpr,
):
    si = tl.program_id(1)
    h = tl.program_id(2)
    batch = tl.load(SEQ + si * 4 + 0)
    start = tl.load(SEQ + si * 4 + 1)
    n = tl.load(SEQ + si * 4 + 2)
    roff = tl.load(SEQ + si * 4 + 3)
    t = tl.program_id(0) * NBP + tl.arange(0, NBP)  # NBP blocks per program: [NBP, BS, BD] tiles
    if tl.program_id(0) * NBP * BS + BS > n:
        return
    tvalid = (t + 1) * BS <= n  # complete blocks only
    li = tl.arange(0, BS)
    cols = tl.arange(0, BD)
    rows = (start + t[:, None] * BS + li[None, :]).to(tl.int64)  # [NBP, BS]
    ptr = K + batch.to(tl.int64) * sk_b + rows[:, :, None] * sk_l + h * sk_h + cols[None, None, :]
    kmask = tvalid[:, None, None] & (cols < D)[None, None, :]
    kb = tl.load(ptr, mask=kmask, other=0.0).to(tl.float32)
    m_o = tl.sum(kb, axis=1) * (1.0 / BS)  # [NBP, BD]; BS is a power of two: exact, as the reference's mean
    if HAS_P:
        p = tl.load(PUNCT + batch.to(tl.int64) * sp_b + rows * sp_l, mask=tvalid[:, None], other=0).to(tl.float32)
        n_p = tl.sum(p, axis=1)  # [NBP]
        s_p = tl.sum(kb * p[:, :, None], axis=1)
        # IEEE division (Triton's "/" is approximate in fp32): M is rounded to 16 bits afterwards, and an
        # ulp away from the reference could round the other way
        m_p = tl.where(n_p[:, None] > 0, tl.math.div_rn(s_p, tl.zeros_like(s_p) + tl.maximum(n_p, 1.0)[:, None]),
                       m_o)
        m = lam * m_o + (1.0 - lam) * m_p
    else:
        m = m_o
    roff_h = (((roff + t).to(tl.int64) * hk + h) * D)[:, None] + cols[None, :]
    tl.store(REP + roff_h, m.to(REP.dtype.element_ty), mask=tvalid[:, None] & (cols < D)[None, :])


def block_reps(k, punct_u8, seq, n_rep, max_nb, block_size, lam):
    """Launch the representative kernel; returns REP [n_rep, hk, d] in k's dtype (see module docstring)."""
    import torch

    b, L, hk, d = k.shape
    rep = torch.empty((max(n_rep, 1), hk, d), device=k.device, dtype=k.dtype)
    if n_rep == 0 or max_nb == 0:
        return rep
    has_p = punct_u8 is not None
    pu = punct_u8 if has_p else k  # dummy pointer when absent
    sp_b, sp_l = (punct_u8.stride(0), punct_u8.stride(1)) if has_p else (0, 0)
    nbp = max(1, 64 // block_size)  # 64 keys per program: the kernel is bandwidth-bound, one block was too little
    grid = (triton.cdiv(max_nb, nbp), seq.shape[0], hk)
    _reps_kernel[grid](
        k, pu, seq, rep,
        k.stride(0), k.stride(1), k.stride(2), sp_b, sp_l,
        hk, float(lam),
        HAS_P=has_p, BS=block_size, NBP=nbp, D=d, BD=triton.next_power_of_2(d),
        num_warps=4, enable_fp_fusion=False,  # lam*M_o + (1-lam)*M_p rounded per operation, as the reference
    )
    return rep
