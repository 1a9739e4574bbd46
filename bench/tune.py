"""Tile sweep of the PHSA kernels on one GPU (config (a) of bench/attention.py), plus two precision checks.

    PYTHONPATH=. python bench/tune.py [--T 32768,65536] [--config a_softmax] [--stages select,fwd,bwd,precision]
        [--out f]    (stages: select, select_variants, fwd, bwd, precision; comma-separated)

Prints (and writes) one JSON line per measurement:
    stage=select   softmax selection (representatives excluded): block_n, num_warps, num_stages; ms and whether
                   the selection equals the first variant's
    stage=select_variants  the opt-in softmax-selection variants (SELECT_VARIANTS: select_launch keywords) against
                   the default, timed in the same run (the default again at the end: drift); ms, same_selection
                   groups_differing (query groups x KV heads whose selection differs from the default's) and
                   max_rel_score_gap (``selection_gap``: near-ties or not)
    stage=fwd/bwd  sparse attention: block_n, num_warps, num_stages; ms
    stage=reps_bits  kernel M (reps.py) against the reference's score_representatives, bit for bit
    stage=lse_precision  how many group selections change when every row's normaliser (pass 1) carries a relative
                   error eps in its sum (lse + log(1 + eps * N(0, 1))): the precision pass 1 needs
Used to pick the launchers' defaults (docs/kernels.md).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import triton

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from bench.attention import CONFIGS  # noqa: E402
from phsa_train.attention.phsa import reference as R  # noqa: E402
from phsa_train.attention.phsa import triton as T  # noqa: E402
from phsa_train.attention.phsa.kernels.bwd import bwd_launch  # noqa: E402
from phsa_train.attention.phsa.kernels.fwd import fwd_launch  # noqa: E402
from phsa_train.attention.phsa.kernels.reps import block_reps  # noqa: E402
from phsa_train.attention.phsa.kernels.select import select_launch  # noqa: E402

# (block_n, num_warps, num_stages[, ftz_exp2]); the first of each list is the launcher's default
SELECT = [(64, 4, 3, False), (64, 4, 3, True), (64, 4, 2, False), (128, 4, 3, False)]  # + ftz_exp2
# select_launch keywords of the softmax selection's variants (kernels/select.py); {} is the default, which since
# the 2026-11-27 sweep (docs/kernels.md) is _T64; _UNT is the earlier default every other variant builds on
_T64 = dict(transposed=True, block_n=64, lse_block_n=32)  # pass 2 transposed, pass 1's tiles unchanged
_UNT = dict(transposed=False, block_n=32, lse_block_n=None)
SELECT_VARIANTS = [
    {},
    _UNT,
    dict(_UNT, topk_prefilter=True),
    dict(_UNT, lse_mode="offset"),
    dict(_UNT, lse_mode="offset", lse_block_n=64),
    dict(_UNT, lse_mode="offset", lse_block_n=64, max_registers=168),
    dict(_UNT, lse_mode="offset_t", lse_block_n=64),
    _T64,
    dict(_T64, block_n=128),
    dict(_T64, lse_mode="offset", topk_prefilter=True),
    dict(_UNT, pipelined=True),
    dict(_UNT, pipelined=True, topk_prefilter=True),
    dict(_UNT, pipelined=True, lse_mode="offset"),
    dict(_UNT, pipelined=True, lse_mode="offset", topk_prefilter=True),
    dict(_UNT, pipelined=True, max_registers=168),  # 3 programs per SM instead of 2
    dict(_UNT, pipelined=True, lse_mode="offset", topk_prefilter=True, max_registers=168),
    dict(_UNT, pipelined=True, lse_mode="offset", topk_prefilter=True, num_warps=8, max_registers=128),
    dict(_UNT, pipelined=True, lse_mode="offset", topk_prefilter=True, num_stages=2),
    dict(_UNT, pipelined=True, lse_mode="offset", topk_prefilter=True, num_stages=4),
    dict(_UNT, pipelined=True, lse_mode="offset", topk_prefilter=True, ftz_exp2=True),
    dict(_T64, pipelined=True),
    dict(_T64, pipelined=True, lse_mode="offset", topk_prefilter=True),
    dict(_T64, pipelined=True, lse_mode="offset", topk_prefilter=True, num_warps=8, max_registers=128),
    # two query groups per program: the representatives streamed once for both (half the L2 traffic)
    dict(_UNT, max_rows=256, num_warps=8),
    dict(_UNT, max_rows=256, num_warps=8, pipelined=True),
    dict(_UNT, max_rows=256, num_warps=8, pipelined=True, lse_mode="offset", topk_prefilter=True),
    dict(_UNT, max_rows=256, num_warps=8, pipelined=True, max_registers=128),
    dict(_UNT, max_rows=256, num_warps=4),
]
FWD = [(64, 8, 3), (64, 8, 2)]
BWD = [(64, 8, 2), (64, 8, 1)]


def bench(fn):
    return triton.testing.do_bench(fn, warmup=10, rep=100, return_mode="median")


def select_variants(q, rep, plan, p, L, cfg, lb, rows, emit):
    """Time every SELECT_VARIANTS entry (the default first and again last) and compare its selection with the
    default's at every query group's first row."""
    ref_sel = None
    for i, kw in enumerate(SELECT_VARIANTS + [{}]):
        sel = torch.empty(1, L, cfg["hk"], plan.kk, dtype=torch.int32, device=q.device)
        fn = lambda: select_launch(q, rep, plan.seq, L, p, plan.kk, sel, lb, **kw)  # noqa: E731, B023
        knob = dict(variant=kw, repeat=i == len(SELECT_VARIANTS))
        try:
            ms = bench(fn)
        except Exception as e:  # noqa: BLE001
            emit(stage="select_variants", T=L, **knob, error=repr(e)[:300])
            continue
        s = sel[0, rows].clone()
        ref_sel = s if ref_sel is None else ref_sel
        differ = (s != ref_sel).any(-1)
        emit(stage="select_variants", T=L, **knob, ms=ms, same_selection=not bool(differ.any()),
             groups_differing=int(differ.sum()), groups=differ.numel(),
             max_rel_score_gap=selection_gap(q, rep, plan, p, s, ref_sel, differ))


def selection_gap(q, rep, plan, p, sel_a, sel_b, differ, max_groups=256):
    """Largest relative difference between the total scores (torch, fp32, the kernel's M) of two selections
    [groups, hk, k], over (query group, KV head) pairs where they differ (at most max_groups of them): ~1e-6
    means fp32 near-ties (summation order), larger means a real difference. 0.0 when none differ."""
    L, d = q.shape[1], q.shape[3]
    G, B = q.shape[2] // rep.shape[1], p.query_block
    elig = R.eligible_blocks(L, p).to(q.device)
    roff = int(plan.seq[0, 3])
    worst = 0.0
    for j, g in differ.nonzero().tolist()[:max_groups]:
        rows = q[0, j * B:(j + 1) * B, g * G:(g + 1) * G].float().reshape(-1, d)
        logits = (rows @ rep[roff:roff + elig.shape[1], g].float().T) * p.scale(d)
        score = torch.softmax(logits.masked_fill(~elig[j], float("-inf")), -1).sum(0)
        a, b = (score[x[x >= 0].long()].sum().item() for x in (sel_a[j, g], sel_b[j, g]))
        worst = max(worst, abs(a - b) / max(a, b))
    return worst


def lse_precision(q, k, pm, p, out, n_rows=4096):
    """Selections of the last n_rows queries with exact vs perturbed per-row normalisers (torch, fp32)."""
    L, hq, d = q.shape[1], q.shape[2], q.shape[3]
    hk = k.shape[2]
    G, B = hq // hk, p.query_block
    M = R.score_representatives(k, pm, p.block_size, p.lam)[0]  # [nb, hk, d]
    r0 = L - n_rows
    elig = R.eligible_blocks(L, p).to(q.device)[r0 // B:]  # [groups, nb]
    logits = torch.einsum("ihd,thd->iht", q[0, r0:].float(), M.repeat_interleave(G, 1)) * p.scale(d)
    mask = elig.repeat_interleave(B, 0)[:, None, :]
    logits = logits.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(logits, -1, keepdim=True)  # [rows, hq, 1]
    g = torch.Generator(device=q.device).manual_seed(0)

    def select(lse_):
        pr = torch.exp(logits - lse_)
        s = pr.view(n_rows, hk, G, -1).sum(2).view(-1, B, hk, M.shape[0]).sum(1)
        return R.topk_blocks(s.masked_fill(~elig[:, None, :], float("-inf")), p.topk)

    ref = select(lse)
    for eps in (1e-7, 1e-6, 1e-5, 1e-4, 1e-3, 4e-3):
        noise = torch.log1p(eps * torch.randn(lse.shape, device=q.device, generator=g))
        changed = (select(lse + noise) != ref).any(-1).float().mean().item()
        rec = dict(stage="lse_precision", T=L, rows=n_rows, eps=eps, groups_changed=changed)
        print(json.dumps(rec), flush=True)
        out.append(rec)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--T", default="32768,65536")
    ap.add_argument("--config", default="a_softmax")  # the sweeps tune the softmax-score kernel
    ap.add_argument("--stages", default="select,fwd,bwd,precision")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    stages = set(args.stages.split(","))
    unknown = stages - {"select", "select_variants", "fwd", "bwd", "precision"}
    if unknown:
        ap.error(f"--stages: unknown {sorted(unknown)}; allowed: select, select_variants, fwd, bwd, precision")
    cfg = CONFIGS[args.config]
    p = cfg["params"]
    if stages & {"select", "select_variants"} and p.score != "softmax_group_sum":
        ap.error(f"--stages select / select_variants time the softmax score's kernel; --config {args.config} has "
                 f"score={p.score}: use a_softmax or b_softmax")
    out = []

    def emit(**rec):
        rec = dict(config=args.config, device=torch.cuda.get_device_name(), **rec)
        print(json.dumps(rec), flush=True)
        out.append(rec)

    for L in [int(x) for x in args.T.split(",")]:
        torch.manual_seed(0)
        q = torch.randn(1, L, cfg["hq"], cfg["d"], device="cuda", dtype=torch.bfloat16)
        k = torch.randn(1, L, cfg["hk"], cfg["d"], device="cuda", dtype=torch.bfloat16)
        v = torch.randn_like(k)
        do = torch.randn_like(q)
        pm = torch.rand(1, L, device="cuda") < 0.1
        plan = T._Plan(q, p, None)
        rep = block_reps(k, pm.to(torch.uint8), plan.seq, plan.n_rep, L // p.block_size, p.block_size, p.lam)
        ref_m = R.score_representatives(k, pm, p.block_size, p.lam)[0].to(k.dtype)
        emit(stage="reps_bits", T=L, elements=ref_m.numel(),
             differing=int((rep.view(torch.int16) != ref_m.view(torch.int16)).sum()))
        lb = torch.empty(1, L, cfg["hq"], device="cuda")
        rows = torch.arange(0, L, p.query_block, device="cuda")
        ref_sel = None
        for bn, nw, ns, ftz in SELECT if "select" in stages else []:
            sel = torch.empty(1, L, cfg["hk"], plan.kk, dtype=torch.int32, device="cuda")
            fn = lambda: select_launch(q, rep, plan.seq, L, p, plan.kk, sel, lb, block_n=bn, num_warps=nw,  # noqa
                                       num_stages=ns, ftz_exp2=ftz)
            knob = dict(block_n=bn, num_warps=nw, num_stages=ns, ftz_exp2=ftz)
            try:
                ms = bench(fn)
            except Exception as e:  # noqa: BLE001
                emit(stage="select", T=L, **knob, error=repr(e)[:200])
                continue
            s = sel[0, rows].clone()
            same = True if ref_sel is None else bool(torch.equal(s, ref_sel))
            ref_sel = s if ref_sel is None else ref_sel
            emit(stage="select", T=L, **knob, ms=ms, same_selection=same)
        if "select_variants" in stages:
            select_variants(q, rep, plan, p, L, cfg, lb, rows, emit)
        sel_full = torch.empty(1, L, cfg["hk"], plan.kk, dtype=torch.int32, device="cuda")
        select_launch(q, rep, plan.seq, L, p, plan.kk, sel_full, lb)
        o, lse = fwd_launch(q, k, v, sel_full, plan.seq, L, p, plan.k_attn, plan.n_init, plan.W)
        for bn, nw, ns in FWD if "fwd" in stages else []:
            try:
                ms = bench(lambda: fwd_launch(q, k, v, sel_full, plan.seq, L, p, plan.k_attn, plan.n_init, plan.W,
                                              block_n=bn, num_warps=nw, num_stages=ns))
                emit(stage="fwd", T=L, block_n=bn, num_warps=nw, num_stages=ns, ms=ms)
            except Exception as e:  # noqa: BLE001
                emit(stage="fwd", T=L, block_n=bn, num_warps=nw, num_stages=ns, error=repr(e)[:200])
        for bn, nw, ns in BWD if "bwd" in stages else []:
            try:
                ms = bench(lambda: bwd_launch(q, k, v, o, do, lse, sel_full, plan.seq, L, p, plan.k_attn, plan.n_init,
                                              plan.W, block_n=bn, num_warps=nw, num_stages=ns))
                emit(stage="bwd", T=L, block_n=bn, num_warps=nw, num_stages=ns, ms=ms)
            except Exception as e:  # noqa: BLE001
                emit(stage="bwd", T=L, block_n=bn, num_warps=nw, num_stages=ns, error=repr(e)[:200])
        if "bwd" in stages:  # probe: INIT keys are atomically updated by every query group (contention?)
            emit(stage="fwd_no_init", T=L, ms=bench(lambda: fwd_launch(q, k, v, sel_full, plan.seq, L, p, plan.k_attn,
                                                                       0, plan.W)))
            emit(stage="bwd_no_init", T=L, ms=bench(lambda: bwd_launch(q, k, v, o, do, lse, sel_full, plan.seq, L, p,
                                                                       plan.k_attn, 0, plan.W)))
        if L == int(args.T.split(",")[0]) and "precision" in stages:
            lse_precision(q, k, pm, p, out)
        del q, k, v, do, o, lse
        torch.cuda.empty_cache()
    if args.out:
        with open(args.out, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in out)


if __name__ == "__main__":
    main()
