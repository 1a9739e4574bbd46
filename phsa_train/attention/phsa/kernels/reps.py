"""Dual-branch block representatives as a Triton kernel.

Layouts
    K      [b, L, hk, d] (any strides, last one 1), bf16/fp16/fp32
    PUNCT  [b, L] uint8 (1 = punctuation token), or absent (HAS_P=False: M = M_o)
    SEQ    int32 [n_seq, 4] rows (batch, start, length, rep_offset): every sequence (a batch row, or one packed
           document of cu_seqlens) is independent; its block t covers tokens start + [t*m, (t+1)*m)
    REP    [n_rep, hk, d] in the keys' dtype: row rep_offset + t holds M(t) of that sequence (complete blocks
           only), accumulated in fp32 and rounded to nearest once at the store (bf16 / fp16 keys give bf16 /
           fp16 M, the tensor-core operand of the selection; fp32 keys keep fp32)

Algorithm (one program = one block of one sequence and one KV head):
    M_o = mean_l K[l]; n_p = sum_l p[l]; M_p = sum_l p[l] K[l] / n_p (M_o when n_p == 0);
    M = lam * M_o + (1 - lam) * M_p, in fp32 exactly as the reference writes it, then rounded to the keys' dtype
    as the reference's ``score_representatives`` does.
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
    HAS_P: tl.constexpr, BS: tl.constexpr, D: tl.constexpr, BD: tl.constexpr,
):
    t = tl.program_id(0)
    si = tl.program_id(1)
    batch = tl.load(SEQ + si * 4 + 0)
    start = tl.load(SEQ + si * 4 + 1)
    n = tl.load(SEQ + si * 4 + 2)
    roff = tl.load(SEQ + si * 4 + 3)
    if (t + 1) * BS > n:
        return
    rows = start + t * BS + tl.arange(0, BS)
    cols = tl.arange(0, BD)
    cmask = cols < D
    if HAS_P:
        p = tl.load(PUNCT + batch.to(tl.int64) * sp_b + rows * sp_l).to(tl.float32)
        n_p = tl.sum(p, axis=0)
    h = tl.program_id(2)
    ptr = K + batch.to(tl.int64) * sk_b + rows.to(tl.int64)[:, None] * sk_l + h * sk_h + cols[None, :]
    kb = tl.load(ptr, mask=cmask[None, :], other=0.0).to(tl.float32)
    m_o = tl.sum(kb, axis=0) / BS
    if HAS_P:
        s_p = tl.sum(kb * p[:, None], axis=0)
        m_p = tl.where(n_p > 0, s_p / tl.maximum(n_p, 1.0), m_o)
        m = lam * m_o + (1.0 - lam) * m_p
    else:
        m = m_o
    roff_h = ((roff + t).to(tl.int64) * hk + h) * D + cols
    tl.store(REP + roff_h, m.to(REP.dtype.element_ty), mask=cmask)


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
    grid = (max_nb, seq.shape[0], hk)
    _reps_kernel[grid](
        k, pu, seq, rep,
        k.stride(0), k.stride(1), k.stride(2), sp_b, sp_l,
        hk, float(lam),
        HAS_P=has_p, BS=block_size, D=d, BD=triton.next_power_of_2(d),
        num_warps=4,
    )
    return rep
