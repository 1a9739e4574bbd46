"""The running top-k of the selection kernels (``select.py``, ``select_dot.py``), kept in registers.

Every (score, block) pair is one int64 key, ``(order-preserving fp32 score bits << 32) | block``: keys order as
(score, block index), so ties go to the later block (the tie rule of docs/phsa.md) and all keys are distinct. A
tile's scores enter while the tile's largest key beats the buffer's smallest. At the end the buffer, sorted by
block index, is the selection.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _topk_buffer(NG: tl.constexpr, KB: tl.constexpr, BN: tl.constexpr, TOPK):
    """An empty running top-k: buf [NG, KB] int64 keys, its minimum thr [NG], slot = arange(KB), and MIN64, the
    [NG, BN] "no block" key that ``_topk_insert`` gives ineligible blocks."""
    MIN64 = tl.full([NG, BN], -2147483648, tl.int32).to(tl.int64) << 32
    slot = tl.arange(0, KB)
    bmin = tl.full([NG, KB], -2147483648, tl.int32).to(tl.int64) << 32
    # live slots start at distinct sentinels (score bits INT32_MIN: "no block"), dead slots at INT64_MAX
    buf = tl.where(slot[None, :] < TOPK, bmin + slot[None, :], ~bmin)
    return buf, tl.min(buf, axis=1), slot, MIN64


@triton.jit
def _topk_insert(acc, tt, gel, buf, thr, MIN64):
    """Insert the [NG, BN] fp32 scores ``acc`` of blocks ``tt`` (where ``gel``) into the running top-k ``buf``."""
    acc = acc + 0.0  # -0.0 -> +0.0 so that equal scores compare equal
    bits = acc.to(tl.int32, bitcast=True)
    key32 = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    key = (key32.to(tl.int64) << 32) | tt.to(tl.int64)[None, :]
    key = tl.where(gel, key, MIN64)
    mx = tl.max(key, axis=1)
    while tl.max((mx > thr).to(tl.int32), axis=0) > 0:
        ins = mx > thr
        buf = tl.where((buf == thr[:, None]) & ins[:, None], mx[:, None], buf)
        key = tl.where((key == mx[:, None]) & ins[:, None], MIN64, key)
        thr = tl.min(buf, axis=1)
        mx = tl.max(key, axis=1)
    return buf, thr


@triton.jit
def _topk_insert_prefiltered(acc, tt, gel, buf, thr, MIN64):
    """``_topk_insert`` behind a cheaper test: the tile's largest fp32 score against the score half of the buffer's
    threshold key; no int64 keys unless some block of the tile can enter (>= keeps score ties, whose order is
    then settled by the block index in ``_topk_insert``)."""
    top = tl.max(tl.where(gel, acc + 0.0, float("-inf")), axis=1)
    bits = top.to(tl.int32, bitcast=True)
    top32 = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    if tl.max((top32 >= (thr >> 32).to(tl.int32)).to(tl.int32), axis=0) > 0:
        buf, thr = _topk_insert(acc, tt, gel, buf, thr, MIN64)
    return buf, thr


@triton.jit
def _topk_step(acc, tt, t_hi_g, tmask, buf, thr, MIN64, PREFILTER: tl.constexpr):
    """Merge one tile's [NG, BN] group scores into the running top-k (blocks past a group's t_hi are not eligible)."""
    gel = (tt[None, :] <= t_hi_g[:, None]) & tmask[None, :]
    if PREFILTER:
        buf, thr = _topk_insert_prefiltered(acc, tt, gel, buf, thr, MIN64)
    else:
        buf, thr = _topk_insert(acc, tt, gel, buf, thr, MIN64)
    return buf, thr


@triton.jit
def _store_selection(buf, slot, TOPK, SEL, base, row_off, gmask):
    """Unpack the running buffer [NG, KB] into ascending block indices (-1 padded) at SEL + base + row_off."""
    hi32 = (buf >> 32).to(tl.int32)
    blk = (buf & 0xFFFFFFFF).to(tl.int32)
    BIG: tl.constexpr = 2147483647
    idx = tl.where((slot[None, :] < TOPK) & (hi32 != -2147483648), blk, BIG)
    idx = tl.sort(idx, dim=1)
    idx = tl.where(idx == BIG, -1, idx)
    sptr = SEL + base + row_off[:, None] + slot[None, :]
    tl.store(sptr, idx, mask=(slot[None, :] < TOPK) & gmask[:, None])
