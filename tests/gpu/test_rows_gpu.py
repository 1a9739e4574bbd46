"""GPU tests of the context-parallel row kernels (``phsa_train/attention/phsa/kernels/rows.py``) at the shapes of a
128k CP=2 layer of the 0.6B model (a chunk of 32k rows, hk = 8, d = 128, bf16), bit for bit against the torch
expressions they replace (skipped without CUDA)."""
from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

if torch.cuda.is_available():
    from phsa_train.attention.phsa.triton import place_kv_rows, sum_rounded, zero_fill

C, B, HQ, HK, D = 32768, 1, 16, 8, 128


def test_place_kv_rows_real_shape_fused_qkv():
    g = torch.Generator(device="cuda").manual_seed(0)
    mixed = torch.randn(2 * C, B, HK, (HQ // HK + 2) * D, device="cuda", generator=g).bfloat16()
    _, key, value = torch.split(mixed, [HQ // HK * D, D, D], dim=3)
    k_local, v_local = key.permute(1, 0, 2, 3).contiguous(), value.permute(1, 0, 2, 3)  # V: the strided view
    kv = torch.zeros(4 * C, 2, B, HK, D, device="cuda", dtype=torch.bfloat16)  # rank 0: chunks 0 and 3
    place_kv_rows(k_local, v_local, kv, [(0, 0, C), (C, 3 * C, C)])
    expected = torch.zeros_like(kv)
    for src, dst in ((0, 0), (C, 3 * C)):
        expected[dst:dst + C, 0] = k_local[:, src:src + C].transpose(0, 1)
        expected[dst:dst + C, 1] = v_local[:, src:src + C].transpose(0, 1)
    assert torch.equal(kv.view(torch.int16), expected.view(torch.int16))


def test_sum_rounded_real_shape_is_torch_add():
    g = torch.Generator(device="cuda").manual_seed(1)
    acc = torch.randn(2, 2 * C, B, HK, D, device="cuda", generator=g) * 100  # [dk | dv, rows, ...] fp32
    own = acc[:, C // 4:C // 2]  # a tail piece: each [g] contiguous, a gap between dk and dv
    part = torch.randn(own.shape, device="cuda", generator=g).bfloat16()
    out = torch.empty(own.shape, device="cuda", dtype=torch.bfloat16)
    sum_rounded(out, own, part)
    expected = torch.stack([torch.add(own[i], part[i], out=torch.empty_like(out[i])) for i in range(2)])
    assert torch.equal(out.view(torch.int16), expected.view(torch.int16))
    capped = torch.empty_like(out)  # 16 looping programs per g (the side-stream schedule's sums)
    sum_rounded(capped, own, part, programs=16)
    assert torch.equal(capped.view(torch.int16), expected.view(torch.int16))
    cast = torch.empty_like(out)
    sum_rounded(cast, own)
    assert torch.equal(cast.view(torch.int16), own.bfloat16().view(torch.int16))
    inplace, reference = own.clone(), own.clone()
    sum_rounded(inplace, inplace, part)
    reference.add_(part)
    assert torch.equal(inplace.view(torch.int32), reference.view(torch.int32))


def test_zero_fill_real_shape():
    x = torch.randn(2, 4 * C, B, HK, D, device="cuda")
    zero_fill(x, 16)
    assert not x.any()
