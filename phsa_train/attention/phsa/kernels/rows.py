"""Row copies and rounded sums for callers that own the K/V and dK/dV buffers (the context-parallel path).

PyTorch's CUDA elementwise loops run a strided operand through a per-element offset calculator
(``elementwise_kernel<128, 2>``) and a mixed-dtype add (fp32 + bf16) through the unvectorised ``unrolled`` loop:
both well below the copy bandwidth. These kernels read and write whole rows of d contiguous elements with wide
loads and stores, whatever the strides between rows.

Layouts
    K, V   [b, s, hk, d] (any strides, last one 1): rows [src_p, src_p + n) of piece p
    KV     [E, 2, b, hk, d] contiguous: piece p's rows land at [dst_p, dst_p + n), K at [:, 0], V at [:, 1]
    OWN    [G, n] fp32, PART [G, n], OUT [G, n] (each [g] contiguous, any stride between the G slices):
           OUT = round(OWN + PART) in OUT's dtype (or round(OWN) without PART); fp32 arithmetic, one rounding to
           nearest even, which is what ``torch.add(own, part, out=out)`` computes.
    X      any contiguous tensor, zeroed.
The sums and the fill take a cap on their programs, each then looping over its share: a kernel with one program
per block of elements takes every SM until it is done, so one issued beside the attention kernels would hold them
back rather than share the GPU with them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _place_kv_kernel(
    K, V, KV, n_lines, src0, src1, dst0, dst1,
    sk_b, sk_s, sk_h, sv_b, sv_s, sv_h,
    B: tl.constexpr, H: tl.constexpr, D: tl.constexpr, BD: tl.constexpr, LINES: tl.constexpr,
):
    # one program = LINES lines (row, batch, head) of d elements, of one tensor (axis 1: K or V), of one piece
    g = tl.program_id(1)
    piece = tl.program_id(2)
    line = tl.program_id(0) * LINES + tl.arange(0, LINES)
    valid = line < n_lines
    row = line // (B * H)
    bh = line % (B * H)
    bi = bh // H
    h = bh % H
    src_row = (tl.where(piece == 0, src0, src1) + row).to(tl.int64)
    dst_row = (tl.where(piece == 0, dst0, dst1) + row).to(tl.int64)
    cols = tl.arange(0, BD)
    if BD == D:  # whole rows: a mask constant along each row, so the loads and stores stay 16 bytes wide
        mask = valid[:, None]
    else:
        mask = valid[:, None] & (cols < D)[None, :]
    if g == 0:
        src = K + (bi.to(tl.int64) * sk_b + src_row * sk_s + h * sk_h)[:, None] + cols[None, :]
    else:
        src = V + (bi.to(tl.int64) * sv_b + src_row * sv_s + h * sv_h)[:, None] + cols[None, :]
    x = tl.load(src, mask=mask)
    dst = KV + (((dst_row * 2 + g) * (B * H) + bh) * D)[:, None] + cols[None, :]
    tl.store(dst, x, mask=mask)


def place_kv_rows(k, v, kv, pieces) -> None:
    """kv[dst:dst + n, 0] = k[:, src:src + n].transpose(0, 1) and the same for v into kv[..., 1], for each
    (src, dst, n) of ``pieces`` (one or two, all the same n): one launch. k, v [b, s, hk, d] (any strides, last one
    1, same dtype); kv [E, 2, b, hk, d] contiguous."""
    b, _, hk, d = k.shape
    assert kv.is_contiguous() and kv.shape[1:] == (2, b, hk, d) and k.stride(-1) == 1 and v.stride(-1) == 1
    assert v.shape == k.shape and v.dtype == k.dtype == kv.dtype and 1 <= len(pieces) <= 2
    n = pieces[0][2]
    assert all(p[2] == n for p in pieces)
    (src0, dst0, _), (src1, dst1, _) = pieces[0], pieces[-1]
    n_lines = n * b * hk
    if n_lines == 0:
        return
    BD = triton.next_power_of_2(d)
    lines = max(1, 4096 // BD)  # 8 KiB of bf16 per program
    grid = (triton.cdiv(n_lines, lines), 2, len(pieces))
    _place_kv_kernel[grid](
        k, v, kv, n_lines, src0, src1, dst0, dst1,
        k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        B=b, H=hk, D=d, BD=BD, LINES=lines, num_warps=4,
    )


@triton.jit
def _sum_rounded_kernel(OWN, PART, OUT, n, s_own, s_part, s_out, HAS_PART: tl.constexpr, BLOCK: tl.constexpr):
    # each program walks the blocks pid, pid + programs, ... (one block each unless the grid was capped)
    g = tl.program_id(1).to(tl.int64)
    for blk in range(tl.program_id(0), (n + BLOCK - 1) // BLOCK, tl.num_programs(0)):
        offs = tl.cast(blk, tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        x = tl.load(OWN + g * s_own + offs, mask=mask)
        if HAS_PART:
            x = x + tl.load(PART + g * s_part + offs, mask=mask).to(tl.float32)
        tl.store(OUT + g * s_out + offs, x.to(OUT.dtype.element_ty), mask=mask)  # round to nearest even


def sum_rounded(out, own, part=None, programs: int | None = None) -> None:
    """out[g] = own[g] + part[g] (fp32, rounded once to out's dtype) for every g, or out[g] = own[g] rounded when
    ``part`` is None: one launch. own fp32 [G, ...], part / out [G, ...] of the same shape, each [g] contiguous
    (out may be own: an in-place fp32 sum). ``programs``: at most that many programs per g, each looping (a sum
    that leaves most SMs to the kernels beside it); None: one program per block of elements."""
    G = own.shape[0]
    n = own[0].numel() if G else 0
    assert own.dtype == torch.float32 and out.shape == own.shape
    for x in (own, out) if part is None else (own, part, out):
        assert x.shape == own.shape and (G == 0 or x[0].is_contiguous()), "each [g] slice must be contiguous"
    if n == 0:
        return
    BLOCK = 4096
    has_part = part is not None
    p = part if has_part else own
    blocks = triton.cdiv(n, BLOCK)
    _sum_rounded_kernel[(blocks if programs is None else min(programs, blocks), G)](
        own, p, out, n, own.stride(0), p.stride(0), out.stride(0), HAS_PART=has_part, BLOCK=BLOCK, num_warps=4,
    )


@triton.jit
def _zero_kernel(X, n, BLOCK: tl.constexpr):
    zeros = tl.full([BLOCK], 0, dtype=X.dtype.element_ty)
    for blk in range(tl.program_id(0), (n + BLOCK - 1) // BLOCK, tl.num_programs(0)):
        offs = tl.cast(blk, tl.int64) * BLOCK + tl.arange(0, BLOCK)
        tl.store(X + offs, zeros, mask=offs < n)


def zero_fill(x, programs: int) -> None:
    """x[...] = 0 (contiguous) by ``programs`` programs, each looping over its share: a fill that occupies only that
    many SMs, leaving the rest to the kernels it runs beside (PyTorch's fill launches a program per few thousand
    elements, so it takes every SM until it is done)."""
    assert x.is_contiguous() and programs >= 1
    n = x.numel()
    if n:
        BLOCK = 4096
        _zero_kernel[(min(programs, triton.cdiv(n, BLOCK)),)](x, n, BLOCK=BLOCK, num_warps=4)
