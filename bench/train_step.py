"""One-GPU end-to-end training-step benchmark: PHSA vs dense, same model, same run.

    python bench/train_step.py --model qwen3_0.6b --seq-len 32768 [--phsa attention.query_block=64 ...]

Builds the real training stack for each variant (Megatron GPTModel in bf16, Megatron DDP + distributed
optimizer, Megatron's schedule, our core attention), runs warm-up steps and then times full training
steps (forward, backward, grad reduce, optimizer) on synthetic token batches whose punctuation rate is
~10%. Prints one JSON line per variant plus the ratio and writes bench/results/train_step-<device>-<date>.json.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import time
from pathlib import Path

import torch


def run_variant(name: str, overrides: list[str], args) -> dict:
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from phsa_train.config import compose
    from phsa_train.megatron.token_info import make_token_info
    from phsa_train.training.metrics import flops_per_token
    from phsa_train.megatron.model import build_model, padded_vocab_size
    from phsa_train.training.optimizer import build_optimizer
    from phsa_train.training.step import forward_step

    cfg = compose([f"model={args.model}", f"data.seq_len={args.seq_len}", "train.micro_batch_size=1",
                   "train.global_batch_size=1", f"train.recompute={args.recompute}", *overrides])
    torch.manual_seed(0)
    model_parallel_cuda_manual_seed(0)
    vocab = padded_vocab_size(args.vocab, 128, 1)
    model = build_model(cfg, vocab, torch.bfloat16)
    optimizer = build_optimizer(cfg, model, on_gpu=True)  # Megatron DDP + distributed optimizer
    if name != "dense":
        from phsa_train.megatron import set_sparsity

        set_sparsity(model, train_topk=cfg.attention.train_topk, dense=False)
    fb = get_forward_backward_func()
    g = torch.Generator(device="cuda").manual_seed(0)
    tokens = torch.randint(0, args.vocab, (1, args.seq_len + 1), device="cuda", generator=g)
    lut = torch.rand(vocab, device="cuda", generator=g) < 0.1
    batch = {"tokens": tokens[:, :-1], "labels": tokens[:, 1:],
             "loss_mask": torch.ones(1, args.seq_len, device="cuda"),
             "position_ids": torch.arange(args.seq_len, device="cuda")[None],
             "token_info": make_token_info(tokens[:, :-1], lut, None)}

    def step():
        optimizer.zero_grad()
        fb(forward_step_func=forward_step, data_iterator=iter([batch]), model=[optimizer.model], num_microbatches=1,
           seq_length=args.seq_len, micro_batch_size=1, forward_only=False)
        optimizer.step()

    torch.cuda.reset_peak_memory_stats()
    for _ in range(args.warmup):
        step()
    torch.cuda.synchronize()
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    times.sort()
    median = times[len(times) // 2]
    result = {"variant": name, "overrides": overrides, "seq_len": args.seq_len, "model": args.model,
              "step_ms": median * 1e3, "tokens_per_s": args.seq_len / median,
              "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30,
              "dense_flops_per_token": flops_per_token(cfg, args.seq_len, vocab)}
    del model, optimizer
    gc.collect()
    torch.cuda.empty_cache()
    return result


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen3_0.6b")
    ap.add_argument("--seq-len", type=int, default=32768)
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--recompute", default="full", help="none | selective | full (0.6B at 32k needs full on 80 GB)")
    ap.add_argument("--phsa", nargs="*", default=[], help="extra Hydra overrides for the PHSA variant")
    ap.add_argument("--variants", default="dense,phsa",
                    help="comma list of dense, phsa, phsa_dot (phsa with attention.score=dot_group_sum)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    from phsa_train.training.distributed import init_distributed, init_model_parallel

    os.environ.setdefault("MASTER_PORT", "29533")
    init_distributed()
    init_model_parallel(1, 1, 1)
    variants = {"dense": ["attention=dense"], "phsa": ["attention=phsa", *args.phsa],
                "phsa_dot": ["attention=phsa", *args.phsa, "attention.score=dot_group_sum"]}
    results = {}
    for name in args.variants.split(","):
        results[name] = run_variant(name, variants[name], args)
        print(json.dumps(results[name]), flush=True)
    summary = {"device": torch.cuda.get_device_name(), "date": datetime.date.today().isoformat(),
               "results": list(results.values())}
    for name in ("phsa", "phsa_dot"):
        if "dense" in results and name in results:
            summary[f"{name}_over_dense_tokens_per_s"] = (results[name]["tokens_per_s"]
                                                          / results["dense"]["tokens_per_s"])
    print(json.dumps({k: v for k, v in summary.items() if k != "results"}), flush=True)
    out = Path(args.out or f"bench/results/train_step-{summary['device'].replace(' ', '_')}-{summary['date']}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
