"""CPU tests of the row kernels of the context-parallel path: under the Triton interpreter, bit for bit against
the torch expressions they replace: ``place_kv_rows`` (K and V rows into the interleaved [E, k | v, b, hk, d] buffer,
V as a view of Megatron's fused QKV output), ``sum_rounded`` (fp32 + bf16 rounded once to bf16, as
``torch.add(own, part, out=bf16)``; fp32 += bf16 in place; the cast alone) and ``zero_fill``; and compiled for sm_90,
that their global accesses are 16 bytes wide."""
from __future__ import annotations

from tests.triton_interpreter import enable

enable()  # before triton is imported: triton.jit picks the interpreter at decoration time

import torch  # noqa: E402

from phsa_train.attention.phsa.triton import place_kv_rows, sum_rounded, zero_fill  # noqa: E402


def test_place_kv_rows_from_fused_qkv_views():
    s, b, hq, hk, d = 12, 2, 4, 2, 16
    mixed_qkv = torch.randn(s, b, hk, (hq // hk + 2) * d).bfloat16()  # Megatron's [sq, b, ng, (np/ng + 2) * hn]
    _, key, value = torch.split(mixed_qkv, [hq // hk * d, d, d], dim=3)  # as get_query_key_value_tensors hands it
    k_local = key.permute(1, 0, 2, 3).contiguous()  # K contiguous [b, s, hk, d]
    v_local = value.permute(1, 0, 2, 3)  # V strided: core attention's [b, s, hk, d] view of the fused output
    kv = torch.zeros(24, 2, b, hk, d, dtype=torch.bfloat16)
    place_kv_rows(k_local, v_local, kv, [(0, 0, 6), (6, 18, 6)])  # a rank's chunks 0 and 3 of C = 6
    expected = torch.zeros_like(kv)
    for src, dst in ((0, 0), (6, 18)):
        expected[dst:dst + 6, 0] = k_local[:, src:src + 6].transpose(0, 1)
        expected[dst:dst + 6, 1] = v_local[:, src:src + 6].transpose(0, 1)
    assert torch.equal(kv.view(torch.int16), expected.view(torch.int16))

    k3, v3 = (torch.randn(b, 5, hk, 24).bfloat16()[..., :d] for _ in range(2))
    kv1 = torch.zeros(9, 2, b, hk, d, dtype=torch.bfloat16)
    place_kv_rows(k3, v3, kv1, [(1, 3, 4)])  # one piece, rows 24 elements apart
    assert torch.equal(kv1[3:7, 0], k3[:, 1:5].transpose(0, 1)) and torch.equal(kv1[3:7, 1], v3[:, 1:5].transpose(0, 1))
    assert not kv1[:3].any() and not kv1[7:].any()


def _bits(x):
    return x.view(torch.int16) if x.element_size() == 2 else x.view(torch.int32)


def test_sum_rounded_is_torch_add_bit_for_bit():
    torch.manual_seed(0)
    G, n = 2, 3000  # [dk | dv, rows]: not a multiple of the kernel's block
    buf = torch.randn(G, 2 * n) * 100
    own = buf[:, :n]  # each [g] contiguous, a gap between them
    own[0, :8] = torch.tensor([1.0 + 2 ** -8, 1.0 + 3 * 2 ** -8, -(1.0 + 2 ** -8), 2 ** -130, 0.0, -0.0, 65504.0,
                               3.3895e38])  # ties to even, a denormal, signed zero, near the bf16 maximum
    parts = [torch.randn(G, n).bfloat16() for _ in range(2)]
    parts[1][0, :8] = 0

    out = torch.empty(G, n, dtype=torch.bfloat16)
    sum_rounded(out, own.clone(), parts[1])
    assert torch.equal(_bits(out), _bits(torch.add(own, parts[1], out=torch.empty_like(out))))

    acc = own.clone()  # fp32 += bf16 in place, then the rounded sum: the rank-order sum of three contributions
    sum_rounded(acc, acc, parts[0])
    expected_acc = own.clone()
    expected_acc.add_(parts[0])
    assert torch.equal(_bits(acc), _bits(expected_acc))

    cast = torch.empty(G, n, dtype=torch.bfloat16)
    sum_rounded(cast, own)
    assert torch.equal(_bits(cast), _bits(own.bfloat16()))

    capped = torch.empty(G, n, dtype=torch.bfloat16)  # 1 program per g looping over all blocks
    sum_rounded(capped, own.clone(), parts[1], programs=1)
    assert torch.equal(_bits(capped), _bits(out))


def test_zero_fill_with_few_programs():
    for n, programs in ((3 * 4096 + 5, 2), (100, 16)):  # programs looping over blocks; more programs than blocks
        x = torch.randn(n)
        zero_fill(x, programs)
        assert torch.equal(x.view(torch.int32), torch.zeros(n).view(torch.int32))


# Compiled in a fresh process without the interpreter: this module runs the kernels under TRITON_INTERPRET, and
# once interpreted kernels have run in a process, compiling real Triton code there fails inside the code generator
# (``tl.arange`` gets an ``ir.value`` without a dtype), so it depends on which tests ran before.
_PTX_SM90 = r"""
import json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from phsa_train.attention.phsa.kernels import rows

def ptx(kernel, signature, constexprs):
    # every pointer and integer argument 16-divisible, as Triton specialises them at the shipped shapes
    attrs = {(i,): [["tt.divisibility", 16]] for i, t in enumerate(signature.values()) if t != "constexpr"}
    src = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4}).asm["ptx"]

place = ptx(rows._place_kv_kernel, {
    **dict.fromkeys(("K", "V", "KV"), "*bf16"),
    **dict.fromkeys(("n_lines", "src0", "src1", "dst0", "dst1"), "i32"),
    **dict.fromkeys(("sk_b", "sk_s", "sk_h", "sv_b", "sv_s", "sv_h"), "i64"),
    **dict.fromkeys(("B", "H", "D", "BD", "LINES"), "constexpr")},
    {"B": 1, "H": 8, "D": 128, "BD": 128, "LINES": 32})
summed = ptx(rows._sum_rounded_kernel, {
    "OWN": "*fp32", "PART": "*bf16", "OUT": "*bf16", "n": "i32",
    **dict.fromkeys(("s_own", "s_part", "s_out"), "i64"), "HAS_PART": "constexpr", "BLOCK": "constexpr"},
    {"HAS_PART": True, "BLOCK": 4096})
zero = ptx(rows._zero_kernel, {"X": "*fp32", "n": "i32", "BLOCK": "constexpr"}, {"BLOCK": 4096})
json.dump({"place": place, "summed": summed, "zero": zero}, sys.stdout)
"""


def test_row_kernels_move_16_byte_vectors_on_sm90():
    """Wide loads and stores are the point of these kernels: every global access of the compiled code is 16 bytes
    wide, and the bf16 rounding is to nearest even (cvt.rn). Compiled for sm_90 without a GPU (Triton's bundled
    ptxas)."""
    import json
    import os
    import re
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
    run = subprocess.run([sys.executable, "-c", _PTX_SM90], cwd=root, env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    ptxs = json.loads(run.stdout)
    place, summed, zero = ptxs["place"], ptxs["summed"], ptxs["zero"]
    for ptx in (place, summed, zero):
        accesses = re.findall(r"\b(ld|st)\.global(\.[a-z0-9.]+)", ptx)
        assert accesses and all(".v4." in width + "." for _, width in accesses), accesses
    assert "cvt.rn.bf16x2.f32" in summed and "ftz" not in summed
