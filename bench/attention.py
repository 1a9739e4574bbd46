"""Benchmark of the PHSA Triton operator against dense and block-sparse baselines, on one GPU, in one run.

    PYTHONPATH=. python bench/attention.py [--T 8192,32768,65536,131072] [--configs a,b] [--no-flex] [--baselines cudnn]

For every config and sequence length T (batch 1, bf16, causal) it times, with triton.testing.do_bench
(median, ms):
    phsa_fwd_bwd      the whole operator, forward + backward (selection included)
    phsa_fwd          the whole operator, forward only
    stage_reps        block representatives
    stage_select      scoring + top-k (representatives included)
    stage_attn_fwd    sparse attention forward (selection precomputed)
    stage_attn_bwd    sparse attention backward (dq, dk, dv)
    cudnn_fwd_bwd / cudnn_fwd, flash_fwd_bwd / flash_fwd   dense causal SDPA (cuDNN / Flash backends)
    flex_fwd_bwd / flex_fwd   FlexAttention, 128x128 block-sparse, about the same number of tokens per query
and reports effective TFLOP/s (4 * d * attended tokens * hq for a forward, 2.5x that for a backward; dense
counts the causal L(L+1)/2 pairs), the ratio of cuDNN dense time to the PHSA time, and peak extra memory of one
forward+backward (peak allocated minus what was allocated before: inputs q, k, v, do are excluded; the output
and the gradients are included, and reported separately). Prints one JSON line per measurement and writes
bench/results/<device>-<date>.json (or --out).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import sys

import torch
import triton

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from phsa_train.attention.params import PHSAParams  # noqa: E402
from phsa_train.attention.phsa import triton as T  # noqa: E402
from phsa_train.attention.phsa.kernels.bwd import bwd_launch  # noqa: E402
from phsa_train.attention.phsa.kernels.fwd import fwd_launch  # noqa: E402
from phsa_train.attention.phsa.kernels.reps import block_reps  # noqa: E402

SHIPPED = PHSAParams()  # the knobs `attention=phsa` ships with (PHSAParams; conf/attention/phsa.yaml mirrors it)
# Config (a): the paper's 0.6B shape with the shipped knobs (896 tokens per query at 32k) and query_block 64, the
# fast path; (b): a wide-GQA shape. "_softmax" / "_dot" fix the score (softmax_group_sum is opt-in, dot_group_sum
# the shipped one). Every record names all knobs and, under "vs_shipped", those that differ from the shipped defaults.
CONFIGS = {
    "a": dict(hq=16, hk=8, d=128, params=dataclasses.replace(SHIPPED, query_block=64)),
    "b": dict(hq=64, hk=4, d=128, params=dataclasses.replace(SHIPPED, block_size=64, query_block=8)),
}
for _n in ("a", "b"):
    for _score in ("softmax_group_sum", "dot_group_sum"):
        CONFIGS[f"{_n}_{_score.split('_')[0]}"] = dict(
            CONFIGS[_n], params=dataclasses.replace(CONFIGS[_n]["params"], score=_score))


def knobs(p: PHSAParams) -> dict:
    """Every PHSA knob of a run (backend included) and the ones that differ from the shipped defaults."""
    k = dict(dataclasses.asdict(p), backend="triton", dense_fallback=False)
    k["vs_shipped"] = {f: v for f, v in dataclasses.asdict(p).items() if getattr(SHIPPED, f) != v}
    return k


def attended_tokens(L: int, p: PHSAParams) -> float:
    """Sum over queries of |S(i)| (INIT ∪ LOCAL ∪ TOPK, causal), ignoring the few tokens where a selected block
    overlaps INIT or LOCAL."""
    i = torch.arange(L, dtype=torch.float64)
    i0 = (i // p.query_block) * p.query_block
    ls = (i0 - p.local_window + 1).clamp(min=0)
    init = torch.minimum(torch.full_like(i, p.n_init), ls)
    local = i - ls + 1
    t_hi = torch.where(i0 >= p.local_window, torch.div(i0 - p.local_window, p.block_size, rounding_mode="floor"),
                       torch.full_like(i, -1))
    elig = (t_hi - p.n_init // p.block_size + 1).clamp(min=0)
    topk = torch.minimum(elig, torch.full_like(i, p.topk)) * p.block_size
    return float((init + local + topk).sum())


def bench(fn, rep=200):
    return triton.testing.do_bench(fn, warmup=25, rep=rep, return_mode="median")


def peak_extra(fn):
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def dense_sdpa_fn(q, k, v, backend):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    G = q.shape[2] // k.shape[2]
    be = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION}[backend]
    # KV heads repeated to hq outside the timed region (leaf tensors): the kernel alone is timed
    qt = q.detach().transpose(1, 2).requires_grad_()
    kt = k.detach().repeat_interleave(G, dim=2).transpose(1, 2).requires_grad_()
    vt = v.detach().repeat_interleave(G, dim=2).transpose(1, 2).requires_grad_()

    def f():
        with sdpa_kernel([be]):
            return torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=True)

    return f


def flex_fn(q, k, v, L, p: PHSAParams):
    """FlexAttention with a 128x128 block mask of about the same token budget: the first KV block (INIT), the
    diagonal and the blocks of the local window, and topk*m/128 random earlier blocks (TOPK)."""
    from torch.nn.attention.flex_attention import BlockMask, flex_attention

    BS = 128
    nqb = L // BS
    n_loc = p.local_window // BS  # full local blocks before the diagonal
    n_sel = max(1, p.topk * p.block_size // BS)
    g = torch.Generator().manual_seed(0)
    full_idx, full_num, part_idx, part_num = [], [], [], []
    width = max(nqb, 1)  # kv_indices' last dim is the number of KV blocks
    for qb in range(nqb):
        blocks = {0} if qb > 0 else set()
        blocks |= {b for b in range(max(0, qb - n_loc), qb)}
        cand = [b for b in range(1, max(1, qb - n_loc))]
        if cand:
            pick = torch.randperm(len(cand), generator=g)[:n_sel].tolist()
            blocks |= {cand[j] for j in pick}
        fl = sorted(blocks)
        full_num.append(len(fl))
        full_idx.append(fl + [0] * (width - len(fl)))
        part_num.append(1)
        part_idx.append([qb] + [0] * (width - 1))
    dev = q.device
    t = lambda x: torch.tensor(x, dtype=torch.int32, device=dev)[None, None]  # noqa: E731

    def causal(b, h, qi, kvi):
        return qi >= kvi

    bm = BlockMask.from_kv_blocks(t(part_num), t(part_idx), t(full_num), t(full_idx), BLOCK_SIZE=BS,
                                  mask_mod=causal)
    fa = torch.compile(flex_attention, dynamic=False)
    G = q.shape[2] // k.shape[2]
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    tokens = float(sum((n) * BS * BS for n in full_num) + nqb * BS * (BS + 1) / 2)
    return (lambda: fa(qt, kt, vt, block_mask=bm, enable_gqa=G > 1)), tokens


def run_config(name, cfg, L, args, out):
    torch.manual_seed(0)
    dev = "cuda"
    hq, hk, d, p = cfg["hq"], cfg["hk"], cfg["d"], cfg["params"]
    dt = torch.bfloat16
    q = torch.randn(1, L, hq, d, device=dev, dtype=dt, requires_grad=True)
    k = torch.randn(1, L, hk, d, device=dev, dtype=dt, requires_grad=True)
    v = torch.randn(1, L, hk, d, device=dev, dtype=dt, requires_grad=True)
    pm = torch.rand(1, L, device=dev) < 0.1
    do = torch.randn(1, L, hq, d, device=dev, dtype=dt)
    qkv_bytes = (q.numel() + k.numel() + v.numel()) * q.element_size()
    tok = attended_tokens(L, p)
    f_sparse = 4.0 * d * tok * hq
    f_dense = 4.0 * d * (L * (L + 1) / 2) * hq
    row = dict(config=name, T=L, hq=hq, hk=hk, d=d, **knobs(p), tokens_per_query=tok / L, qkv_bytes=qkv_bytes)

    def emit(metric, ms, flops=None, **kw):
        rec = dict(row, metric=metric, ms=ms, **kw)
        if flops is not None and ms:
            rec["tflops"] = flops / ms / 1e9
        print(json.dumps(rec), flush=True)
        out.append(rec)

    def phsa_fb():
        o = T.phsa_triton(q, k, v, pm, p)
        o.backward(do)

    def phsa_f():
        with torch.no_grad():
            return T.phsa_triton(q, k, v, pm, p)

    ms_fb = bench(phsa_fb)
    ms_f = bench(phsa_f)
    mem = peak_extra(phsa_fb)
    q.grad = k.grad = v.grad = None
    # stages
    plan = T._Plan(q, p, None)
    pu8 = pm.to(torch.uint8)
    ms_reps = bench(lambda: block_reps(k, pu8, plan.seq, plan.n_rep, L // p.block_size, p.block_size, p.lam))
    ms_sel = bench(lambda: T._select_internal(q.detach(), k.detach(), pm, p, plan))
    sel = T._select_internal(q.detach(), k.detach(), pm, p, plan)
    ms_af = bench(lambda: fwd_launch(q.detach(), k.detach(), v.detach(), sel, plan.seq, plan.max_n, p, plan.k_attn,
                                     plan.n_init, plan.W))
    o, lse = fwd_launch(q.detach(), k.detach(), v.detach(), sel, plan.seq, plan.max_n, p, plan.k_attn,
                        plan.n_init, plan.W)
    ms_ab = bench(lambda: bwd_launch(q.detach(), k.detach(), v.detach(), o, do, lse, sel, plan.seq, plan.max_n, p,
                                     plan.k_attn, plan.n_init, plan.W))
    res = {}
    for be in args.baselines.split(","):
        try:
            f = dense_sdpa_fn(q, k, v, be)
            res[be + "_fb"] = bench(lambda: f().backward(do.transpose(1, 2)), rep=100)
            with torch.no_grad():
                res[be + "_f"] = bench(f, rep=100)
            if be == "cudnn":
                res["cudnn_mem"] = peak_extra(lambda: f().backward(do.transpose(1, 2)))
            q.grad = k.grad = v.grad = None
        except Exception as e:  # noqa: BLE001
            print(json.dumps(dict(row, metric=be, error=repr(e)[:300])), flush=True)
    emit("phsa_fwd_bwd", ms_fb, 3.5 * f_sparse, vs_cudnn=res.get("cudnn_fb", float("nan")) / ms_fb,
         peak_extra_bytes=mem, peak_extra_over_qkv=mem / qkv_bytes)
    emit("phsa_fwd", ms_f, f_sparse, vs_cudnn=res.get("cudnn_f", float("nan")) / ms_f)
    emit("stage_reps", ms_reps)
    emit("stage_select", ms_sel, share_of_fwd_bwd=ms_sel / ms_fb)
    emit("stage_attn_fwd", ms_af, f_sparse)
    emit("stage_attn_bwd", ms_ab, 2.5 * f_sparse)
    for be in ("cudnn", "flash"):
        if be + "_fb" in res:
            extra = dict(peak_extra_bytes=res["cudnn_mem"]) if be == "cudnn" else {}
            emit(be + "_fwd_bwd", res[be + "_fb"], 3.5 * f_dense, **extra)
            emit(be + "_fwd", res[be + "_f"], f_dense)
    if args.flex and L >= 8192:
        try:
            ff, ftok = flex_fn(q, k, v, L, p)
            ms_flex_fb = bench(lambda: ff().backward(do.transpose(1, 2)), rep=100)
            with torch.no_grad():
                ms_flex_f = bench(ff, rep=100)
            q.grad = k.grad = v.grad = None
            emit("flex_fwd_bwd", ms_flex_fb, 3.5 * 4.0 * d * ftok * hq, tokens_per_query=ftok / L)
            emit("flex_fwd", ms_flex_f, 4.0 * d * ftok * hq, tokens_per_query=ftok / L)
        except Exception as e:  # noqa: BLE001
            print(json.dumps(dict(row, metric="flex", error=repr(e)[:300])), flush=True)
    del q, k, v, do, o, lse, sel
    torch.cuda.empty_cache()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--T", default="8192,32768,65536,131072")
    ap.add_argument("--configs", default="a,b")
    ap.add_argument("--no-flex", dest="flex", action="store_false")
    ap.add_argument("--baselines", default="cudnn,flash", help="dense SDPA backends to time: cudnn,flash")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    dev = torch.cuda.get_device_name().replace(" ", "_")
    out = []
    for name in args.configs.split(","):
        for L in [int(x) for x in args.T.split(",")]:
            try:
                run_config(name, CONFIGS[name], L, args, out)
            except torch.OutOfMemoryError as e:
                print(json.dumps(dict(config=name, T=L, error="OOM " + str(e)[:200])), flush=True)
                torch.cuda.empty_cache()
    path = args.out or os.path.join(os.path.dirname(__file__), "results",
                                    f"{dev}-{datetime.date.today().isoformat()}.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                       results=out), f, indent=1)
    print("wrote", path)
    # summary table
    print(f"{'cfg':>3} {'T':>7} {'metric':>16} {'ms':>9} {'TF/s':>7} {'x cudnn':>8}")
    for r in out:
        print(f"{r['config']:>3} {r['T']:>7} {r['metric']:>16} {r['ms']:9.3f} {r.get('tflops', 0):7.1f} "
              f"{r.get('vs_cudnn', float('nan')):8.2f}")


if __name__ == "__main__":
    main()
