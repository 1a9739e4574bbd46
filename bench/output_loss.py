"""Output layer + cross-entropy alone: Megatron's path against the chunked one, time and peak memory, one GPU.

    python bench/output_loss.py [--tokens 16384,32768,65536] [--chunks 4096,8192,16384] [--hidden 1024]
        [--vocab 151936] [--out F]

For each token count (bf16 hidden states [tokens, 1, h] and output weight [vocab, h], as the 0.6B model at
micro-batch 1): forward + backward of a per-token-weighted loss through
* ``megatron``: the output GEMM, then ``vocab_parallel_cross_entropy`` (``train.loss_chunk_tokens=0``);
* ``chunked_<c>``: ``linear_cross_entropy`` with ``chunk=c`` and the compiled elementwise steps (what
  ``train.loss_chunk_tokens=c`` runs with ``train.fused_kernels`` on).
Reports the median ms (``triton.testing.do_bench``) and the peak memory above the inputs (GiB); a path that runs
out of memory is reported as ``"error": "OOM"``. Writes bench/results/output_loss-<device>-<date>.json.
``--cpu`` runs tiny shapes on the CPU, eager (a logic check).
"""
from __future__ import annotations

import argparse
import datetime
import json
from pathlib import Path

import torch
import torch.distributed as dist


def measure(fn, cuda: bool) -> dict:
    if not cuda:
        fn()
        return {"ms": None, "peak_extra_gib": None}
    from triton.testing import do_bench

    try:
        fn()  # compile / warm up
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**30
        return {"ms": do_bench(fn, warmup=3, rep=20), "peak_extra_gib": peak}
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        return {"error": "OOM"}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", default="16384,32768,65536")
    ap.add_argument("--chunks", default="4096,8192,16384")
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--cpu", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    from megatron.core import parallel_state, tensor_parallel

    from phsa_train.megatron.chunked_loss import linear_cross_entropy
    from tests.helpers import free_port

    cuda = torch.cuda.is_available() and not args.cpu
    if not cuda:
        args.tokens, args.chunks, args.hidden, args.vocab = "256,300", "64,100", 32, 512
    dev = "cuda" if cuda else "cpu"
    dtype = torch.bfloat16 if cuda else torch.float32
    store = dist.TCPStore("127.0.0.1", free_port(), 1, is_master=True)
    dist.init_process_group("nccl" if cuda else "gloo", rank=0, world_size=1, store=store)
    parallel_state.initialize_model_parallel(1, 1)

    records = []
    for n in map(int, args.tokens.split(",")):
        g = torch.Generator(dev).manual_seed(0)
        hidden = torch.randn(n, 1, args.hidden, device=dev, generator=g).to(dtype).requires_grad_()
        weight = (torch.randn(args.vocab, args.hidden, device=dev, generator=g) * 0.02).to(dtype).requires_grad_()
        labels = torch.randint(0, args.vocab, (1, n), device=dev, generator=g)
        upstream = torch.full((1, n), 1.0 / n, device=dev)

        def megatron():
            loss = tensor_parallel.vocab_parallel_cross_entropy(hidden @ weight.t(), labels.t().contiguous()).t()
            torch.autograd.grad((loss * upstream).sum(), (hidden, weight))

        paths = {"megatron": megatron}
        for c in map(int, args.chunks.split(",")):
            def chunked(c=c):
                loss = linear_cross_entropy(hidden, weight, labels, chunk=c, fused=cuda)
                torch.autograd.grad((loss * upstream).sum(), (hidden, weight))
            paths[f"chunked_{c}"] = chunked
        for name, fn in paths.items():
            rec = {"path": name, "tokens": n, "hidden": args.hidden, "vocab": args.vocab, "dtype": str(dtype),
                   **measure(fn, cuda)}
            records.append(rec)
            print(json.dumps(rec), flush=True)
        del hidden, weight
        if cuda:
            torch.cuda.empty_cache()

    device = torch.cuda.get_device_name() if cuda else "cpu"
    out = Path(args.out or f"bench/results/output_loss-{device.replace(' ', '_')}-{datetime.date.today()}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"device": device, "date": datetime.date.today().isoformat(), "results": records},
                              indent=1))
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
