"""End-to-end training-step benchmark: PHSA vs dense, same model, same run, any TP x CP x DP layout.

    python bench/train_step.py --model qwen3_0.6b --seq-len 32768 [--phsa attention.query_block=64 ...]
    torchrun --nproc-per-node=2 bench/train_step.py --cp 2 --seq-len 131072          # CP=2 (DP = world / TP / CP)
    torchrun --nproc-per-node=4 bench/train_step.py --cp 2 --seq-len 131072          # CP=2 x DP=2
    torchrun --nproc-per-node=2 bench/train_step.py --cp 2 --cpu --model tiny --seq-len 512   # logic, gloo

Builds the real training stack for each variant (Megatron GPTModel in bf16, Megatron DDP + distributed
optimizer, Megatron's schedule, our core attention and CP path), runs warm-up steps and then times full
training steps (forward, backward, grad reduce, optimizer) on synthetic token batches whose punctuation rate is
~10%, one sequence per DP rank. Reports per-GPU tokens/s, MFU (dense-equivalent model FLOPs, and the FLOPs the
sparse attention computes), peak memory (max over ranks) and the exact Hydra overrides of every variant. Prints
one JSON line per variant plus the ratios; writes bench/results/train_step-<device>-<date>.json (``--out``).
A variant that runs out of memory is reported as ``"error": "OOM"`` (every rank agrees before going on).
"""
from __future__ import annotations

import argparse
import datetime
import faulthandler
import gc
import json
import os
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist


def run_variant(name: str, overrides: list[str], args) -> dict:
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from phsa_train.config import compose
    from phsa_train.megatron.token_info import make_token_info
    from phsa_train.megatron.model import build_model, padded_vocab_size
    from phsa_train.training.metrics import PEAK_FLOPS, flops_per_token
    from phsa_train.training.optimizer import build_optimizer
    from phsa_train.training.step import forward_step, get_forward_backward

    dp = parallel_state.get_data_parallel_world_size()
    cuda = torch.cuda.is_available() and not args.cpu
    dev = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    cfg = compose([f"model={args.model}", f"data.seq_len={args.seq_len}", "train.micro_batch_size=1",
                   f"train.global_batch_size={dp}", f"train.recompute={args.recompute}",
                   f"parallel.tensor_model_parallel_size={args.tp}", f"parallel.context_parallel_size={args.cp}",
                   *overrides])
    torch.manual_seed(0)
    if cuda:
        model_parallel_cuda_manual_seed(0)
    vocab = padded_vocab_size(args.vocab, 128, args.tp)
    model = build_model(cfg, vocab, torch.bfloat16 if cuda else torch.float32)
    optimizer = build_optimizer(cfg, model, on_gpu=cuda)  # GPU: Megatron DDP + distributed optimizer
    if args.dump_stacks_after > 0:  # which layer each rank is in, for the hang dump
        from phsa_train.megatron.core_attention import DenseCoreAttention

        for m in model.modules():
            if isinstance(m, DenseCoreAttention):
                m.register_forward_pre_hook(_note_attention_call)
    if name != "dense":
        from phsa_train.megatron import set_sparsity

        set_sparsity(model, train_topk=cfg.attention.train_topk, dense=False)
    fb = get_forward_backward(on_gpu=cuda)
    # one sequence per DP rank (the same on the ranks of one CP/TP group: forward_step slices it for CP)
    g = torch.Generator(device=dev).manual_seed(1000 + parallel_state.get_data_parallel_rank())
    tokens = torch.randint(0, args.vocab, (1, args.seq_len + 1), device=dev, generator=g)
    lut = torch.rand(vocab, device=dev, generator=g) < 0.1
    batch = {"tokens": tokens[:, :-1], "labels": tokens[:, 1:],
             "loss_mask": torch.ones(1, args.seq_len, device=dev),
             "position_ids": torch.arange(args.seq_len, device=dev)[None],
             "token_info": make_token_info(tokens[:, :-1], lut, None)}

    def step():
        optimizer.zero_grad()
        fb(forward_step_func=forward_step, data_iterator=iter([batch]), model=[optimizer.model], num_microbatches=1,
           seq_length=args.seq_len, micro_batch_size=1, forward_only=False)
        optimizer.step()

    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    for _ in range(args.warmup):
        step()
    sync()
    times = []
    for _ in range(args.steps):
        dist.barrier()
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    times.sort()
    median = times[len(times) // 2]
    profile = None
    if args.profile:  # one more step, kernel by kernel: where a step's time goes outside attention
        from bench.context_parallel import profile_stages

        profile = profile_stages(step, cuda, top=25)
        if cuda:
            profile["top_ops"] = top_ops(step)
    world = dist.get_world_size()
    peak = torch.tensor([torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0], device=dev)
    dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    per_gpu = args.seq_len * dp / median / world
    a = cfg.attention
    attended = None
    if a.name == "phsa":  # keys a query attends at the hold: INIT + LOCAL + top-k blocks (at most the causal mean)
        attended = min(args.seq_len / 2, a.n_init + a.local_window + a.train_topk * a.block_size)
    peak_flops = next((v for k_, v in PEAK_FLOPS.items() if cuda and k_ in torch.cuda.get_device_name()), None)
    f_dense, f_done = flops_per_token(cfg, args.seq_len, vocab), flops_per_token(cfg, args.seq_len, vocab, attended)
    result = {"variant": name, "overrides": cfg_overrides(cfg, overrides, args), "seq_len": args.seq_len,
              "model": args.model, "layout": {"tp": args.tp, "cp": args.cp, "dp": dp, "world": world},
              "recompute": args.recompute, "step_ms": median * 1e3, "tokens_per_s": args.seq_len * dp / median,
              "tokens_per_s_per_gpu": per_gpu, "peak_mem_gib_max_rank": peak.item(),
              "dense_flops_per_token": f_dense, "computed_flops_per_token": f_done,
              "mfu_dense_equivalent": per_gpu * f_dense / peak_flops if peak_flops else None,
              "mfu_computed": per_gpu * f_done / peak_flops if peak_flops else None}
    if profile:
        result["profile"] = profile
    del model, optimizer
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return result


def top_ops(step, n: int = 25) -> list:
    """One more profiled step: the ``n`` aten ops (with their input shapes) whose own kernels took the most device
    time, [op, shapes, ms, calls]: which module an elementwise kernel of the stage profile belongs to."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True) as prof:
        step()
        torch.cuda.synchronize()
    ops = sorted(prof.key_averages(group_by_input_shape=True), key=lambda e: -e.self_device_time_total)[:n]
    return [[e.key, str(e.input_shapes)[:160], round(e.self_device_time_total / 1e3, 2), e.count] for e in ops]


def dump_flight_recorder(path: str) -> None:
    """Write this rank's NCCL flight recorder (every collective and point-to-point call with its sequence number and
    state: scheduled, started, completed) as JSON: where the ranks' call sequences part when a run hangs. Needs
    ``TORCH_NCCL_TRACE_BUFFER_SIZE`` > 0 (otherwise the record is empty); best effort, never raises."""
    import torch._C._distributed_c10d as c10d

    dump = getattr(c10d, "_dump_nccl_trace_json", None) or getattr(c10d, "_dump_fr_trace_json", None)
    try:
        record = json.loads(dump()) if dump else "no flight recorder in this torch"
    except Exception as e:  # noqa: BLE001 (a diagnostic: never take the run down)
        record = repr(e)
    Path(path).write_text(json.dumps({"attention_calls": PROGRESS, "flight_recorder": record}, indent=1, default=str))


PROGRESS = {"calls": 0, "last_layer": None, "grad_enabled": None}  # the last attention layer this rank entered


def _note_attention_call(module, _args) -> None:
    PROGRESS.update(calls=PROGRESS["calls"] + 1, last_layer=module.layer_number, grad_enabled=torch.is_grad_enabled())


def cfg_overrides(cfg, overrides, args) -> list[str]:
    """The exact Hydra overrides that reproduce this variant through launch/pretrain.sh."""
    shown = [f"model={args.model}", f"data.seq_len={args.seq_len}", f"train.recompute={args.recompute}",
             f"parallel.tensor_model_parallel_size={args.tp}", f"parallel.context_parallel_size={args.cp}", *overrides]
    if args.cp_high_priority_stream is not None:
        shown.append(f"parallel.cp_high_priority_stream={str(args.cp_high_priority_stream).lower()}")
    # the knob the speed depends on most, shown even when left at its default
    if cfg.attention.name == "phsa" and not any(o.startswith("attention.query_block=") for o in overrides):
        shown.append(f"attention.query_block={cfg.attention.query_block}")
    return shown


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen3_0.6b")
    ap.add_argument("--seq-len", type=int, default=32768)
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--recompute", default=None,
                    help="none | selective | full (default: full on GPU, as 0.6B at 32k needs on 80 GB; none with --cpu)")
    ap.add_argument("--phsa", nargs="*", default=[], help="extra Hydra overrides for the PHSA variant")
    ap.add_argument("--variants", default="dense,phsa",
                    help="comma list of dense, phsa, phsa_softmax (phsa with attention.score=softmax_group_sum), "
                         "phsa_qb64 (phsa with attention.query_block=64), dense_unfused / phsa_unfused "
                         "(train.fused_kernels=false: SwiGLU, RMSNorm and RoPE unfused), dense_unchunked / "
                         "phsa_unchunked (train.loss_chunk_tokens=0: Megatron's output layer + loss on the whole logits)")
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--cp", type=int, default=1)
    ap.add_argument("--cp-high-priority-stream", choices=("true", "false"), default=None,
                    help="the CP group's NCCL streams high-priority or not (default: the shipped "
                         "parallel.cp_high_priority_stream); one setting for every variant, the groups are built once")
    ap.add_argument("--no-overlap", action="store_true",
                    help="CP allgather on the chunk path (K/V all-gathered, dK/dV reduce-scattered) instead of the "
                         "overlapped point-to-point schedule: the same result; an A/B of the schedule")
    ap.add_argument("--profile", action="store_true",
                    help="profile one extra step per variant: device ms by stage (gemm, sdpa, PHSA kernels, "
                         "copy_fill, ...) and the 25 costliest kernels outside attention")
    ap.add_argument("--cpu", action="store_true", help="gloo on CPU (fp32, AdamW): a logic check of the layouts")
    ap.add_argument("--out", default=None)
    ap.add_argument("--dump-stacks-after", type=float, default=0, metavar="S",
                    help="if the run is still going after S seconds, every rank writes its Python stacks to "
                         "<out or train_step>.stacks.rank<R>.txt (one file per rank: what each waits in when a run hangs) "
                         "and its NCCL flight recorder to <out>.nccl.rank<R>.json (set TORCH_NCCL_TRACE_BUFFER_SIZE)")
    args = ap.parse_args()
    if args.cp_high_priority_stream is not None:
        args.cp_high_priority_stream = args.cp_high_priority_stream == "true"

    from megatron.core import parallel_state

    from phsa_train.training.distributed import (init_distributed, init_model_parallel, is_high_priority_stream,
                                                 prepare_device)

    os.environ.setdefault("MASTER_PORT", "29533")
    env = init_distributed()
    if args.dump_stacks_after > 0:
        stem = f"{Path(args.out or 'train_step').with_suffix('')}"
        stacks = open(f"{stem}.stacks.rank{env.rank}.txt", "w")  # noqa: SIM115
        faulthandler.dump_traceback_later(args.dump_stacks_after, exit=False, file=stacks)
        flight = threading.Timer(args.dump_stacks_after, dump_flight_recorder, (f"{stem}.nccl.rank{env.rank}.json",))
        flight.daemon = True
        flight.start()
    init_model_parallel(args.tp, 1, args.cp, args.cp_high_priority_stream)
    if args.cpu or env.device.type != "cuda":
        args.cpu = True
        prepare_device(env, 0)  # Megatron's CPU shims
    if args.no_overlap:
        from phsa_train.megatron import context_parallel

        context_parallel.overlap_kernels = lambda *_a, **_k: None
    if args.recompute is None:
        args.recompute = "none" if args.cpu else "full"
    variants = {"dense": ["attention=dense"], "phsa": ["attention=phsa", *args.phsa],
                "phsa_softmax": ["attention=phsa", *args.phsa, "attention.score=softmax_group_sum"],
                "phsa_qb64": ["attention=phsa", *args.phsa, "attention.query_block=64"],
                "dense_unfused": ["attention=dense", "train.fused_kernels=false"],
                "phsa_unfused": ["attention=phsa", *args.phsa, "train.fused_kernels=false"],
                "dense_unchunked": ["attention=dense", "train.loss_chunk_tokens=0"],
                "phsa_unchunked": ["attention=phsa", *args.phsa, "train.loss_chunk_tokens=0"]}
    results = {}
    for name in args.variants.split(","):
        try:
            results[name] = run_variant(name, variants[name], args)
            failed = 0
        except torch.OutOfMemoryError:
            results[name] = {"variant": name, "overrides": variants[name], "seq_len": args.seq_len, "error": "OOM"}
            gc.collect()
            torch.cuda.empty_cache()
            failed = 1
        # all ranks agree before the next variant (a rank that ran out of memory may have left its peers waiting
        # in a collective: they time out and the run fails, which the caller reports as not fitting)
        flag = torch.tensor([failed], device=env.device if not args.cpu else "cpu")
        dist.all_reduce(flag)
        if env.rank == 0:
            print(json.dumps(results[name]), flush=True)
    device = "cpu" if args.cpu else torch.cuda.get_device_name()
    summary = {"device": device, "date": datetime.date.today().isoformat(), "results": list(results.values())}
    if args.cp > 1:  # as built, not as asked: what the CP group's NCCL streams really are
        summary["cp_high_priority_stream"] = is_high_priority_stream(parallel_state.get_context_parallel_group())
        summary["cp_allgather_schedule"] = "chunk path (--no-overlap)" if args.no_overlap else "overlapped (shipped)"
    for name in results:  # each PHSA variant against the dense variant built the same way (fused, chunked or not)
        suffix = next((x for x in ("_unfused", "_unchunked") if name.endswith(x)), "")
        base = "dense" + suffix
        if name.startswith("phsa") and "tokens_per_s" in results.get(base, {}) and "tokens_per_s" in results[name]:
            summary[f"{name}_over_{base}_tokens_per_s"] = results[name]["tokens_per_s"] / results[base]["tokens_per_s"]
    if env.rank == 0:
        print(json.dumps({k: v for k, v in summary.items() if k != "results"}), flush=True)
        out = Path(args.out or f"bench/results/train_step-{device.replace(' ', '_')}-{summary['date']}.json")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(summary, indent=1))
    dist.barrier()
    faulthandler.cancel_dump_traceback_later()  # finished: no stacks
    if args.dump_stacks_after > 0:
        flight.cancel()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
