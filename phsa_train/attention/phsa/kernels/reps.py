"""Dual-branch block representatives (PHSA_SPEC §3) as a Triton kernel.

Layouts
    K      [b, L, hk, d] (any strides, last one 1), bf16/fp16/fp32
    PUNCT  [b, L] uint8 (1 = punctuation token), or absent (HAS_P=False: M = M_o)
    SEQ    int32 [n_seq, 4] rows (batch, start, length, rep_offset): every sequence (a batch row, or one packed
           document of cu_seqlens) is independent; its block t covers tokens start + [t*m, (t+1)*m)
    REP_HI, REP_LO  [n_rep, hk, d], row rep_offset + t holds M(t) of that sequence (complete blocks only),
           split for the selection's tensor-core dots: M_hi = M rounded to the keys' 16-bit type,
           M_lo = M - M_hi in that type (M_hi + M_lo = M to ~2^-16 relative); fp32 keys: M_hi = M fp32, no M_lo

Algorithm (one program = one block of one sequence and one KV head):
    M_o = mean_l K[l]; n_p = sum_l p[l]; M_p = sum_l p[l] K[l] / n_p (M_o when n_p == 0);
    M = lam * M_o + (1 - lam) * M_p, accumulated in fp32 exactly as the reference writes it.
No gradient flows through M (selection only).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _reps_kernel(
    K, PUNCT, SEQ, REP_HI, REP_LO,
    sk_b, sk_l, sk_h, sp_b, sp_l,
    hk, lam,
    HAS_P: tl.constexpr, SPLIT: tl.constexpr, BS: tl.constexpr, D: tl.constexpr, BD: tl.constexpr,
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
    if True:
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
        hi = m.to(REP_HI.dtype.element_ty)
        tl.store(REP_HI + roff_h, hi, mask=cmask)
        if SPLIT:
            tl.store(REP_LO + roff_h, (m - hi.to(tl.float32)).to(REP_LO.dtype.element_ty), mask=cmask)


def block_reps(k, punct_u8, seq, n_rep, max_nb, block_size, lam):
    """Launch the representative kernel; returns (REP_HI, REP_LO) [n_rep, hk, d] (see module docstring;
    REP_LO is REP_HI itself for fp32 keys)."""
    import torch

    b, L, hk, d = k.shape
    split = k.dtype in (torch.bfloat16, torch.float16)
    rdt = k.dtype if split else torch.float32
    hi = torch.empty((max(n_rep, 1), hk, d), device=k.device, dtype=rdt)
    lo = torch.empty_like(hi) if split else hi
    if n_rep == 0 or max_nb == 0:
        return hi, lo
    has_p = punct_u8 is not None
    pu = punct_u8 if has_p else k  # dummy pointer when absent
    sp_b, sp_l = (punct_u8.stride(0), punct_u8.stride(1)) if has_p else (0, 0)
    grid = (max_nb, seq.shape[0], hk)
    _reps_kernel[grid](
        k, pu, seq, hi, lo,
        k.stride(0), k.stride(1), k.stride(2), sp_b, sp_l,
        hk, float(lam),
        HAS_P=has_p, SPLIT=split, BS=block_size, D=d, BD=triton.next_power_of_2(d),
        num_warps=4,
    )
    return hi, lo
