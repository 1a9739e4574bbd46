"""Compile the softmax selection kernel for a GPU without one: registers, stack and programs per SM of every
``bench/tune.py`` SELECT_VARIANTS entry at config a_softmax (G = 2, query_block 64, d = 128, top-k 16, bf16).

    PYTHONPATH=. python bench/select_registers.py [--arch 90]

Uses Triton's own compiler and ptxas (no driver needed); one JSON line per variant. Programs per SM are the
register and shared-memory limits of one SM (64K registers, 228 KB); a variant that fails to compile prints
its error. This is what docs/kernels.md's register counts come from.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from bench.tune import SELECT_VARIANTS  # noqa: E402
from phsa_train.attention.phsa.kernels.select import _select_kernel, softmax_select_meta  # noqa: E402

# runtime arguments of _select_kernel, in order (pointers at config (a)'s dtypes)
SIGNATURE = dict(Q="*bf16", REP="*bf16", SEQ="*i32", LSEBUF="*fp32", SEL="*i32", sq_b="i32", sq_l="i32", sq_h="i32",
                 ss_b="i32", ss_l="i32", ss_h="i32", L="i32", hq="i32", hk="i32", scale2="fp32", n_init="i32",
                 W="i32", TOPK="i32", QOFF="i32", QROW2="i32", QOFF2="i32")


def resource_usage(kernel) -> tuple[int, int]:
    """(registers per thread, stack bytes) of a compiled kernel, from cuobjdump on its cubin."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True, check=True)
    regs, stack = re.search(r"REG:(\d+) STACK:(\d+)", out.stdout).groups()
    return int(regs), int(stack)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", type=int, default=90)
    args = ap.parse_args()
    for kw in SELECT_VARIANTS:
        meta, options = softmax_select_meta(2, 64, 128, 16, 16, True, True, **kw)
        sig = dict(SIGNATURE, **{k: "constexpr" for k in meta})
        names = list(sig)
        try:
            src = ASTSource(_select_kernel, sig, constexprs={(names.index(n),): v for n, v in meta.items()})
            k = triton.compile(src, target=GPUTarget("cuda", args.arch, 32), options=options)
        except Exception as e:  # noqa: BLE001
            print(json.dumps(dict(variant=kw, error=repr(e)[:300])), flush=True)
            continue
        regs, stack = resource_usage(k)
        per_sm = min(65536 // ((regs + 7) // 8 * 8 * 32 * options["num_warps"]),
                     228 * 1024 // (k.metadata.shared + 1024))  # + the 1 KB per block the runtime reserves
        print(json.dumps(dict(arch=args.arch, variant=kw, registers=regs, stack_bytes=stack,
                              shared_bytes=k.metadata.shared, programs_per_sm=per_sm)), flush=True)


if __name__ == "__main__":
    main()
