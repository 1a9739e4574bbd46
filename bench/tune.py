"""Variant sweep on the GPU (one call): selection tile width, backward tile width / warps, atomics cost.
Prints JSON lines and the best choices; used to pick the kernels' defaults (docs/kernels.md)."""
import json
import os
import sys

import torch
import triton

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from bench.attention import CONFIGS  # noqa: E402
from phsa_train.attention.phsa import triton as T  # noqa: E402
from phsa_train.attention.phsa.kernels.bwd import bwd_launch  # noqa: E402
from phsa_train.attention.phsa.kernels.fwd import fwd_launch  # noqa: E402
from phsa_train.attention.phsa.kernels.reps import block_reps  # noqa: E402
from phsa_train.attention.phsa.kernels.select import select_launch  # noqa: E402

best = {}
for name, L in (("a", 32768), ("a", 65536), ("b", 65536)):
    cfg = CONFIGS[name]
    p = cfg["params"]
    torch.manual_seed(0)
    q = torch.randn(1, L, cfg["hq"], cfg["d"], device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, L, cfg["hk"], cfg["d"], device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    do = torch.randn_like(q)
    pm = torch.rand(1, L, device="cuda") < 0.1
    plan = T._Plan(q, p, None)
    rep = block_reps(k, pm.to(torch.uint8), plan.seq, plan.n_rep, L // p.block_size, p.block_size, p.lam)
    lb = torch.empty(1, L, cfg["hq"], device="cuda")
    ref_sel = None
    for BN in (32, 64, 128):
        sel = torch.empty(1, L, cfg["hk"], plan.kk, dtype=torch.int32, device="cuda")
        try:
            ms = triton.testing.do_bench(lambda: select_launch(q, rep, plan.seq, L, p, plan.kk, sel, lb, BN=BN),
                                         return_mode="median")
        except Exception as e:  # noqa: BLE001
            print(json.dumps(dict(cfg=name, L=L, stage="select", BN=BN, error=repr(e)[:200])))
            continue
        rows = torch.arange(0, L, p.query_block, device="cuda")
        same = None if ref_sel is None else (sel[0, rows] == ref_sel[0, rows]).float().mean().item()
        ref_sel = sel.clone() if ref_sel is None else ref_sel
        print(json.dumps(dict(cfg=name, L=L, stage="select", BN=BN, ms=ms, agree=same)), flush=True)
        best.setdefault(("select", name), []).append((ms, BN))
    o, lse = fwd_launch(q, k, v, ref_sel, plan.seq, L, p, plan.k_attn, plan.n_init, plan.W)
    for BN, nw, at in ((32, 8, True), (64, 8, True), (32, 4, True), (32, 8, False), (64, 8, False)):
        try:
            ms = triton.testing.do_bench(lambda: bwd_launch(q, k, v, o, do, lse, ref_sel, plan.seq, L, p, plan.k_attn,
                                                            plan.n_init, plan.W, BN=BN, num_warps=nw, atomics=at),
                                         return_mode="median")
        except Exception as e:  # noqa: BLE001
            print(json.dumps(dict(cfg=name, L=L, stage="bwd", BN=BN, nw=nw, error=repr(e)[:200])))
            continue
        print(json.dumps(dict(cfg=name, L=L, stage="bwd", BN=BN, num_warps=nw, atomics=at, ms=ms)), flush=True)
        if at:
            best.setdefault(("bwd", name), []).append((ms, BN, nw))
    del q, k, v, do, o, lse
    torch.cuda.empty_cache()
choice = {f"{k[0]}_{k[1]}": min(v) for k, v in best.items()}
print("BEST", json.dumps(choice))
