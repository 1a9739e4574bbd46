"""Sweep of the dot_group_sum selection kernel on the GPU, config (a): blocks per tile BN, query groups per
program NG, fp32 FMA dot vs two bf16 tensor-core dots (TC); prints JSON lines, the rows whose selection differs
from the first variant, and the fastest variant."""
import dataclasses
import json
import os
import sys

import torch
import triton

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from bench.attention import CONFIGS  # noqa: E402
from phsa_train.attention.phsa import triton as T  # noqa: E402
from phsa_train.attention.phsa.kernels.reps import block_reps  # noqa: E402
from phsa_train.attention.phsa.kernels.select import select_launch  # noqa: E402

cfg = CONFIGS["a_dot"]
p = cfg["params"]
totals = {}
for L in (32768, 65536):
    torch.manual_seed(0)
    q = torch.randn(1, L, cfg["hq"], cfg["d"], device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, L, cfg["hk"], cfg["d"], device="cuda", dtype=torch.bfloat16)
    pm = torch.rand(1, L, device="cuda") < 0.1
    plan = T._Plan(q, p, None)
    rep = block_reps(k, pm.to(torch.uint8), plan.seq, plan.n_rep, L // p.block_size, p.block_size, p.lam)
    lb = torch.empty(1, device="cuda")
    ref = None
    rows = torch.arange(0, L, p.query_block, device="cuda")
    for ng, bn, tc in [(16, 64, False), (16, 128, False), (16, 64, True), (16, 128, True), (32, 64, True),
                       (32, 128, True), (16, 256, True)]:
        sel = torch.empty(1, L, cfg["hk"], plan.kk, dtype=torch.int32, device="cuda")
        try:
            fn = lambda: select_launch(q, rep, plan.seq, L, p, plan.kk, sel, lb, dot_block_n=bn, dot_groups=ng,  # noqa
                                       dot_tensor_cores=tc)
            ms = triton.testing.do_bench(fn, return_mode="median")
        except Exception as e:  # noqa: BLE001
            print(json.dumps(dict(L=L, NG=ng, BN=bn, TC=tc, error=repr(e)[:200])), flush=True)
            continue
        s = sel[0, rows]
        same = True if ref is None else bool(torch.equal(s, ref))
        ref = s if ref is None else ref
        totals[(ng, bn, tc)] = totals.get((ng, bn, tc), 0.0) + ms
        print(json.dumps(dict(L=L, NG=ng, BN=bn, TC=tc, ms=ms, same_selection=same,
                         rows_differing=int((s != ref).any(-1).sum()))), flush=True)
best = min(totals, key=totals.get)
print(json.dumps(dict(best_dot_groups=best[0], best_dot_block_n=best[1], best_dot_tensor_cores=best[2])))
