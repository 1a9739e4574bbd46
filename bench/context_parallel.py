"""PHSA layer throughput under context parallelism (run with torchrun, one process per GPU).

    torchrun --nproc-per-node=2 bench/context_parallel.py --seq-lens 65536 131072 --modes allgather
    torchrun --nproc-per-node=1 bench/context_parallel.py ...          # the CP=1 reference numbers

Times forward+backward of one PHSA attention layer (Qwen3-0.6B shape: hq=16, hk=8, d=128, block 16,
n_init 128, window 512, k=16) on this rank's zigzag slice, with the dense cuDNN layer (all-gather CP) as the
baseline in the same run. Reports per-GPU tokens/s, and the bytes each rank moves per layer
(forward + backward) for each mode. With --check, also verifies outputs and gradients of the CP run
against a CP=1 computation on rank 0's GPU. Writes JSON to bench/results/.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
from pathlib import Path

import torch
import torch.distributed as dist


def bytes_per_layer(mode: str, L: int, cp: int, hq: int, hk: int, d: int, elem: int = 2) -> int:
    """Bytes one rank receives per layer, forward + backward."""
    if cp == 1:
        return 0
    if mode == "allgather":  # K and V gathered (fwd); dK and dV reduce-scattered (bwd)
        return 2 * (2 * L * hk * d * elem * (cp - 1) // cp)
    # ulysses: q, k, v in and o out forward; the same four backward
    return 2 * ((2 * hq + 2 * hk) * d * (L // cp) * elem * (cp - 1) // cp)


def timed(fn, reps: int) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        dist.barrier()
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    return times[len(times) // 2]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seq-lens", type=int, nargs="+", default=[65536, 131072])
    ap.add_argument("--modes", nargs="+", default=["allgather"])
    ap.add_argument("--query-block", type=int, default=1)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--check", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    from megatron.core import parallel_state

    from phsa_train.training.distributed import init_distributed, init_model_parallel
    from phsa_train.megatron.context_parallel import cp_attention, cp_phsa_attention, natural_to_zigzag
    from phsa_train.megatron.local_attention import phsa_local
    from phsa_train.megatron.token_info import PUNCT_BIT

    env = init_distributed()
    init_model_parallel(1, 1, env.world_size)
    group = parallel_state.get_context_parallel_group()
    cp, rank = env.world_size, env.rank
    hq, hk, d = 16, 8, 128
    kw = dict(block_size=16, n_init=128, local_window=512, topk=16, lam=0.5, score="softmax_group_sum",
              query_block=args.query_block, backend="auto")
    rows = []
    for L in args.seq_lens:
        g = torch.Generator(device="cuda").manual_seed(L)
        q, k, v = (torch.randn(1, L, h, d, device="cuda", dtype=torch.bfloat16, generator=g) for h in (hq, hk, hk))
        info = ((torch.rand(1, L, device="cuda", generator=g) < 0.1).to(torch.int32) * PUNCT_BIT)
        do = torch.randn(1, L, hq, d, device="cuda", dtype=torch.bfloat16, generator=g)
        mine = (lambda x: natural_to_zigzag(x, cp)[rank]) if cp > 1 else (lambda x: x)
        ql, kl, vl = (mine(x).clone().requires_grad_() for x in (q, k, v))
        il, dol = mine(info), mine(do)
        for mode in args.modes:
            if cp > 1:
                attn = lambda: cp_phsa_attention(ql, kl, vl, il, group, mode, kw)  # noqa: E731
            else:
                attn = lambda: phsa_local(ql, kl, vl, il, kw)  # noqa: E731
            fwd_bwd = lambda: attn().backward(dol)  # noqa: E731
            for _ in range(2):
                fwd_bwd()
            ms = timed(fwd_bwd, args.reps)
            ms_fwd = timed(lambda: attn(), args.reps)
            row = {"L": L, "cp": cp, "mode": mode, "variant": "phsa", "fwd_bwd_ms": ms, "fwd_ms": ms_fwd,
                   "tokens_per_s_per_gpu": (L / cp) / (ms / 1e3),
                   "bytes_per_layer_per_rank": bytes_per_layer(mode, L, cp, hq, hk, d)}
            if args.check and cp > 1:
                ql.grad = kl.grad = vl.grad = None
                o = attn()
                o.backward(dol)
                qr, kr, vr = (x.clone().requires_grad_() for x in (q, k, v))
                o_ref = phsa_local(qr, kr, vr, info, kw)
                o_ref.backward(do)
                err = lambda a, b: ((a.float() - b.float()).norm() / b.float().norm()).item()  # noqa: E731
                row["check_rel_err"] = {"o": err(o, mine(o_ref)), "dq": err(ql.grad, mine(qr.grad)),
                                        "dk": err(kl.grad, mine(kr.grad)), "dv": err(vl.grad, mine(vr.grad))}
            rows.append(row)
            if rank == 0:
                print(json.dumps(row), flush=True)
        # Dense cuDNN layer with all-gather CP: the baseline in the same run.
        if cp > 1:
            dense = lambda: cp_attention(ql, kl, vl, None, group)  # noqa: E731
        else:
            from phsa_train.megatron.local_attention import dense_causal_attention

            dense = lambda: dense_causal_attention(ql, kl, vl, None)  # noqa: E731
        try:
            ms = timed(lambda: dense().backward(dol), max(3, args.reps // 3))
            rows.append({"L": L, "cp": cp, "mode": "allgather", "variant": "dense", "fwd_bwd_ms": ms,
                         "tokens_per_s_per_gpu": (L / cp) / (ms / 1e3)})
            if rank == 0:
                print(json.dumps(rows[-1]), flush=True)
        except torch.OutOfMemoryError:
            if rank == 0:
                print(json.dumps({"L": L, "cp": cp, "variant": "dense", "error": "OOM"}), flush=True)
        del q, k, v, ql, kl, vl, do, dol
        torch.cuda.empty_cache()
    if rank == 0:
        out = Path(args.out or f"bench/results/context_parallel-cp{cp}-{torch.cuda.get_device_name().replace(' ', '_')}"
                               f"-{datetime.date.today().isoformat()}.json")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"device": torch.cuda.get_device_name(), "world": cp, "rows": rows}, indent=1))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
