"""NCCL all-gather / reduce-scatter bandwidth at the sizes context parallelism moves per layer.

    torchrun --nproc-per-node=2 bench/collectives.py [--mib 64 128 256] [--out F]

The all-gather CP path moves K+V (4 KiB per token for hk=8, d=128, bf16) once forward (all-gather) and once
backward (reduce-scatter): at CP=2 each rank receives L/2 tokens, 128 MiB at 64k and 256 MiB at 128k. This prints
the time of one collective of each size and the bus bandwidth (NCCL's convention: bytes * (n-1)/n / time), so
the CP benchmark's NCCL share can be compared with what the link gives. Also prints ``nvidia-smi topo -m``.
"""
import argparse
import json
import os
import subprocess

import torch
import torch.distributed as dist


def timed(fn, reps: int) -> float:
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        dist.barrier()
        torch.cuda.synchronize()
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mib", type=int, nargs="+", default=[64, 128, 256], help="bytes each rank receives, MiB")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    local = int(os.environ.get("LOCAL_RANK", 0))
    torch.cuda.set_device(local)
    dist.init_process_group("nccl")
    n, rank = dist.get_world_size(), dist.get_rank()
    rows = []
    for mib in args.mib:
        numel = mib * 2**20 // 2  # bf16 elements each rank receives
        shard = torch.randn(numel // (n - 1) if n > 1 else numel, device="cuda", dtype=torch.bfloat16)
        full = torch.empty(shard.numel() * n, device="cuda", dtype=torch.bfloat16)
        ag = timed(lambda: dist.all_gather_into_tensor(full, shard), args.reps)
        rs = timed(lambda: dist.reduce_scatter_tensor(shard, full), args.reps)
        nbytes = full.numel() * 2
        bus = lambda ms: nbytes * (n - 1) / n / (ms / 1e3) / 1e9  # noqa: E731
        rows.append({"world": n, "received_mib": mib, "all_gather_ms": ag, "all_gather_bus_gb_s": bus(ag),
                     "reduce_scatter_ms": rs, "reduce_scatter_bus_gb_s": bus(rs)})
    if rank == 0:
        topo = subprocess.run(["nvidia-smi", "topo", "-m"], capture_output=True, text=True).stdout
        print(topo)
        result = {"device": torch.cuda.get_device_name(), "rows": rows, "topo": topo}
        for r in rows:
            print(json.dumps(r))
        if args.out:
            with open(args.out, "w") as f:
                json.dump(result, f, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
