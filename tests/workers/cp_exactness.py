"""CP=N against CP=1 through the same backend: outputs, dq and the selected blocks themselves, dk/dv.

Run under torchrun, one process per GPU (NCCL) or per CPU slot (gloo). Every rank computes the CP=1 result
for the whole sequence itself (same device, same backend), runs its zigzag slice through the CP path of each
``--modes`` entry, and checks
  * o, dq: identical (torch.equal) -- a query's row sees the same keys, punctuation and selection;
  * selected blocks (``cp_select_blocks`` against ``select_blocks`` on the whole sequence): identical;
  * dk, dv: relative norm error <= --dkv-tol (the CP sum runs in another order, and in the keys' dtype).
Writes one JSON line per mode to ``--out.<rank>`` ({"mode", "ok", "errors"}); exits 1 on any mismatch.

    torchrun --nproc-per-node=2 tests/workers/cp_exactness.py --out /tmp/x              # GPU, bf16, triton
    torchrun --nproc-per-node=2 tests/workers/cp_exactness.py --out /tmp/x --tiny       # CPU/gloo shapes
"""
import argparse
import json
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root: `tests.` helpers under torchrun

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from phsa_train.attention import select_blocks
from phsa_train.megatron.context_parallel import cp_phsa_attention, natural_to_zigzag
from phsa_train.megatron.local_attention import phsa_local
from phsa_train.megatron.token_info import DOC_START_BIT, PUNCT_BIT, document_cu_seqlens
from phsa_train.training.distributed import init_distributed, init_model_parallel
from tests.workers.cp_selection import cp_select_blocks


def rel(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def host_syncs(fn) -> str:
    """Run ``fn`` (warmed up) with CUDA's sync debug mode warning: "none", or the synchronizing calls seen (warn, not
    error: every rank must still reach every collective)."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            fn()
    finally:
        torch.cuda.set_sync_debug_mode(0)
        torch.cuda.synchronize()
    msgs = [str(w.message).splitlines()[0][:200] for w in seen if "synchroniz" in str(w.message).lower()]
    return "none" if not msgs else f"{len(msgs)}: " + " | ".join(dict.fromkeys(msgs))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--modes", nargs="+", default=["allgather", "ulysses"])
    ap.add_argument("--seq-len", type=int, default=32768)
    ap.add_argument("--query-block", type=int, default=64)
    ap.add_argument("--score", default="softmax_group_sum")
    ap.add_argument("--dkv-tol", type=float, default=1e-2)
    ap.add_argument("--tiny", action="store_true", help="CPU-sized shapes, float64, reference backend")
    ap.add_argument("--doc-starts", type=int, nargs="*", default=[],
                    help="packed documents (data.reset_attention_mask): positions where a document starts")
    args = ap.parse_args()
    env = init_distributed()
    init_model_parallel(1, 1, env.world_size)
    group = parallel_state.get_context_parallel_group()
    cp, rank = dist.get_world_size(group), dist.get_rank(group)
    dev = env.device
    if args.tiny:
        L, hq, hk, d, dtype = 256, 4, 2, 16, torch.float64
        kw = dict(block_size=8, n_init=8, local_window=16, topk=3, lam=0.5, score=args.score,
                  query_block=min(args.query_block, 4), backend="reference")
    else:  # the 0.6B model's attention shape at the shipped kernel settings
        L, hq, hk, d, dtype = args.seq_len, 16, 8, 128, torch.bfloat16
        kw = dict(block_size=16, n_init=128, local_window=512, topk=16, lam=0.5, score=args.score,
                  query_block=args.query_block, backend="triton")
    g = torch.Generator(device=dev).manual_seed(11)
    q, k, v = (torch.randn(1, L, h, d, generator=g, device=dev, dtype=dtype) for h in (hq, hk, hk))
    punct = torch.rand(1, L, generator=g, device=dev) < 0.1
    w = torch.randn(1, L, hq, d, generator=g, device=dev, dtype=dtype)
    info_full = punct.to(torch.int32) * PUNCT_BIT
    for s in args.doc_starts:
        info_full[:, s] |= DOC_START_BIT
    cu = document_cu_seqlens(info_full)
    qr, kr, vr = (x.clone().requires_grad_() for x in (q, k, v))
    documents = bool(args.doc_starts)  # data.reset_attention_mask, as the model passes it down
    o_ref = phsa_local(qr, kr, vr, info_full, kw, documents=documents)  # the model's single-rank path
    o_ref.backward(w)
    cp1_syncs = host_syncs(lambda: phsa_local(qr, kr, vr, info_full, kw, documents=documents).backward(w)) \
        if dev.type == "cuda" and not documents else None
    sel_ref = select_blocks(q, k, punct, cu_seqlens=cu, **kw)
    mine = lambda x: natural_to_zigzag(x, cp)[rank]  # noqa: E731
    info = mine(info_full)
    sensitivity = {}
    if args.doc_starts:  # the layout must exercise straddling groups: zeroing their rows before a chunk start
        B, C = kw["query_block"], L // (2 * cp)  # (what padding the chunk would do) changes the CP=1 selection
        starts = torch.tensor([0, *args.doc_starts])
        q0 = q.clone()
        straddling = 0
        for j in range(1, 2 * cp):
            doc0 = int(starts[starts <= j * C].max())
            g0 = doc0 + ((j * C - doc0) // B) * B  # first row of the group holding row j*C
            if g0 < j * C:
                q0[:, g0:j * C] = 0
                straddling += 1
        sel_zeroed = select_blocks(q0, k, punct, cu_seqlens=cu, **kw)
        sensitivity = {"straddling_chunk_starts": straddling,
                       "rows_whose_selection_padding_would_change": int((sel_zeroed != sel_ref).any(-1).sum())}
    ok_all, lines = True, []
    for mode in args.modes:
        if mode == "ulysses":
            try:
                import deepspeed  # noqa: F401
            except ImportError:
                lines.append({"mode": mode, "ok": None, "skipped": "deepspeed not installed"})
                continue
        ql, kl, vl = (mine(x).clone().requires_grad_() for x in (q, k, v))
        o = cp_phsa_attention(ql, kl, vl, info, group, mode, kw, documents=documents)
        o.backward(mine(w))
        sel = cp_select_blocks(mine(q), mine(k), info, group, kw, mode=mode, documents=documents)
        sel_mine = mine(sel_ref)
        res = {"o_equal": torch.equal(o, mine(o_ref)), "dq_equal": torch.equal(ql.grad, mine(qr.grad)),
               "selection_equal": torch.equal(sel, sel_mine),
               "selection_rows_differing": int((sel != sel_mine).any(-1).sum()),
               "o_rel": rel(o, mine(o_ref)), "dq_rel": rel(ql.grad, mine(qr.grad)),
               "dk_rel": rel(kl.grad, mine(kr.grad)), "dv_rel": rel(vl.grad, mine(vr.grad))}
        ok = (res["o_equal"] and res["dq_equal"] and res["selection_equal"]
              and res["dk_rel"] <= args.dkv_tol and res["dv_rel"] <= args.dkv_tol)
        if args.tiny:  # float64 reference: the CP sums differ only in order
            ok = ok or (res["selection_equal"] and max(res["o_rel"], res["dq_rel"]) < 1e-12
                        and max(res["dk_rel"], res["dv_rel"]) < 1e-12)
        if dev.type == "cuda" and not documents:  # unpacked sequences: no host sync on the hot path
            res["host_syncs"] = host_syncs(lambda: cp_phsa_attention(ql, kl, vl, info, group, mode, kw).backward(
                mine(w)))
        ok_all &= ok
        if args.doc_starts:
            ok = ok and sensitivity["rows_whose_selection_padding_would_change"] > 0
        lines.append({"mode": mode, "cp": cp, "L": L, "doc_starts": args.doc_starts, **sensitivity,
                      "query_block": kw["query_block"], "score": kw["score"],
                      "dtype": str(dtype), "ok": ok, "cp1_host_syncs": cp1_syncs, **res})
    Path(f"{args.out}.{rank}").write_text("".join(json.dumps(x) + "\n" for x in lines))
    dist.barrier()
    dist.destroy_process_group()
    sys.exit(0 if ok_all else 1)


if __name__ == "__main__":
    main()
