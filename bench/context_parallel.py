"""PHSA layer throughput under context parallelism (run with torchrun, one process per GPU).

    torchrun --nproc-per-node=2 bench/context_parallel.py --seq-lens 65536 131072 --modes allgather allgather_chunks ulysses
    torchrun --nproc-per-node=2 bench/context_parallel.py --modes allgather_nohp allgather_hp   # stream priority
    torchrun --nproc-per-node=2 bench/context_parallel.py --cpu --seq-lens 512     # logic check on CPU (gloo)

Times forward+backward of one PHSA attention layer (Qwen3-0.6B shape: hq=16, hk=8, d=128, the shipped
``conf/attention/phsa.yaml`` settings unless overridden) on this rank's zigzag slice, and in the same run:
  * CP=1: the same layer on the whole sequence, on every rank's own GPU at once (no communication), so the
    scaling efficiency ``cp1_ms / (cp * cpN_ms)`` compares numbers from one process on one card;
  * on a GPU, each of those times twice: as launched (``fwd_bwd_ms``: the layer alone, every gap in which the GPU
    waits for the host counts) and with the host ahead (``fwd_bwd_ms_host_ahead``: the stream held by a spin
    kernel while the layer is launched behind it, as in a training step where the surrounding layers keep the GPU
    busy), with ``scaling_efficiency_host_ahead`` from the second;
  * the dense layer: cuDNN SDPA at CP=1, and the all-gather CP path at CP=N (its chunks need a bottom-right
    causal mask, which torch's SDPA runs through Flash, not cuDNN: the row says which).
Modes: ``allgather`` (what training runs: selection, one launch for both local chunks, overlaps the point-to-point
K/V exchange of only the chunks each rank reads, which lands in position order with no copy, and sends dK/dV home
point to point as they become final), ``allgather_chunks`` (the chunk path, the same results: all-gather and
reorder first, then each chunk its own operator, dK/dV reduce-scattered; to see what the overlapped path buys),
``ulysses``. A mode's suffix ``_hp`` / ``_nohp`` runs it on a CP group whose NCCL streams are high-priority / not
(``parallel.cp_high_priority_stream``); without one, the shipped setting (the row's ``cp_high_priority_stream`` says
which): one run compares both on the same ranks. Per (L, mode) a profile of one forward+backward splits the GPU
time by stage
(selection, representatives, attention forward / backward, NCCL, copies and fills, the rest; rank 0's), and per
rank (``per_rank``) how much of the wall time no kernel covered (host gaps), how much NCCL time ran with no other
kernel beside it (``nccl_exposed_ms``) and a timeline of the first device events with their streams (what waits
on what).
Inputs are contiguous; ``--v-as-in-training`` lays V out as Megatron hands it to the core attention, a view of the
fused QKV projection output (rows say ``v_layout``). Bytes each rank receives per layer are computed, not measured.
``--nccl-env NCCL_X=V`` sets NCCL knobs for the run (recorded in every row); ``--cp-nccl-max-ctas N`` limits only
the PHSA modes' CP group to N CTAs per NCCL kernel (rows say ``cp_nccl_max_ctas``); ``--cp-fill-programs N`` fills
the overlapped path's dK/dV accumulator with N programs (rows say ``cp_fill_programs``); ``--cp-sums-beside N``
runs its early dK/dV casts and sums beside the first chunk's backward in N programs (``cp_sums_beside``). Writes
JSON (``--out``).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import time
from collections import defaultdict
from pathlib import Path

import torch
import torch.distributed as dist

# (stage, kernel-name prefixes / substrings): the Triton kernels by their function names (prefix match), the rest
# by substring; anything unmatched is "other"
STAGES = (("select", ("^_select",)), ("reps", ("^_reps",)), ("attn_fwd", ("^_fwd_kernel",)),
          ("attn_bwd", ("^_bwd_kernel",)), ("nccl", ("nccl",)), ("sdpa", ("flash", "cudnn", "fmha", "attention")),
          ("gemm", ("gemm", "nvjet", "xmma", "cutlass")),
          ("copy_fill", ("copy", "fill", "cat", "elementwise", "zero", "index", "reduce_kernel", "^_place_kv",
                         "^_sum_rounded")))


def stage_of(kernel: str) -> str:
    name = kernel.lower()
    for stage, keys in STAGES:
        if any(name.startswith(k[1:]) if k.startswith("^") else k in name for k in keys):
            return stage
    return "other"


def bytes_per_layer(mode: str, L: int, cp: int, hq: int, hk: int, d: int, elem: int = 2, block: int = 16) -> int:
    """Bytes one rank receives per layer, forward + backward."""
    if cp == 1:
        return 0
    mode = split_mode(mode)[0]
    kv_chunk = 2 * (L // (2 * cp)) * hk * d * elem  # K+V (or dK+dV) of one of the 2cp chunks
    if mode == "allgather":  # only what causality reads: 3(cp-1) chunks (context_parallel's module docstring), and
        # the block representatives of the other ranks (L / block rows of K's width)
        return 3 * (cp - 1) * kv_chunk + L // block * hk * d * elem * (cp - 1) // cp
    if mode == "allgather_chunks":  # K and V all-gathered (fwd), dK and dV reduce-scattered (bwd)
        return 4 * (cp - 1) * kv_chunk
    # ulysses: q, k, v in and o out forward; the same four backward
    return 2 * ((2 * hq + 2 * hk) * d * (L // cp) * elem * (cp - 1) // cp)


PRIORITY_SUFFIXES = {"_hp": True, "_nohp": False}


def split_mode(mode: str) -> tuple[str, bool | None]:
    """'allgather_chunks_hp' -> ('allgather_chunks', True): the mode and the CP group's stream priority (None: no
    suffix, the shipped setting)."""
    for suffix, high in PRIORITY_SUFFIXES.items():
        if mode.endswith(suffix):
            return mode.removesuffix(suffix), high
    return mode, None


def fwd_bwd_of(o: torch.Tensor, inputs: tuple, do: torch.Tensor) -> tuple:
    """The gradients of ``inputs`` for the output gradient ``do``, returned rather than added into ``.grad``: a
    layer inside a model hands them on, so the timed work has no accumulation kernel that training does not run."""
    return torch.autograd.grad(o, inputs, do)


HOLD_CYCLES = 200_000_000  # ~100 ms at an H100/H200 SM clock: far longer than any layer's host-side launch time


def _median_ms(fn, reps: int, cuda: bool, hold_cycles: int = 0) -> tuple[float, bool]:
    """(median ms of ``fn`` over ``reps`` runs started together on all ranks, whether the host stayed ahead).
    ``hold_cycles`` > 0 (GPU): a spin kernel holds the stream while ``fn`` is launched behind it, and the events
    bracket only ``fn``'s device work; the flag is False if launching took longer than the hold."""
    times, ahead = [], True
    for _ in range(reps):
        dist.barrier()
        if not cuda:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
            continue
        held, start, end = (torch.cuda.Event(enable_timing=True) for _ in range(3))
        held.record()
        if hold_cycles:
            torch.cuda._sleep(hold_cycles)
        start.record()
        t0 = time.perf_counter()
        fn()
        launch_ms = (time.perf_counter() - t0) * 1e3
        end.record()
        torch.cuda.synchronize()
        ahead &= not hold_cycles or launch_ms < held.elapsed_time(start)
        times.append(start.elapsed_time(end))
    times.sort()
    return times[len(times) // 2], ahead


def timed(fn, reps: int, cuda: bool) -> float:
    """Median milliseconds of ``fn`` over ``reps`` runs, every run started together on all ranks."""
    return _median_ms(fn, reps, cuda)[0]


def timed_host_ahead(fn, reps: int) -> tuple[float, bool]:
    """Median device milliseconds of ``fn`` with the host ahead of the GPU, and whether it really was ahead.

    ``timed`` measures one layer alone, so every gap in which the GPU waits for Python to launch the next kernel
    counts. Inside a training step the host runs ahead (the GEMMs and MLPs of the layers around keep the GPU
    busy while it launches), so those gaps vanish; here a spin kernel plays that part (``HOLD_CYCLES``)."""
    return _median_ms(fn, reps, True, HOLD_CYCLES)


def union_ms(spans: list[tuple[float, float]]) -> float:
    """Length of the union of [start, end) intervals."""
    covered, cur_s, cur_e = 0.0, None, None
    for s, e in sorted(spans):
        if cur_e is None or s > cur_e:
            covered += 0.0 if cur_e is None else cur_e - cur_s
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    return covered + (0.0 if cur_e is None else cur_e - cur_s)


def largest_gaps(named: list[tuple[float, float, str]], n: int = 5) -> list:
    """The ``n`` longest stretches [ms] that no interval of ``named`` (start, end, name) covers, each with the name
    of the interval that ended last before it and of the one that starts it: where the device waited for the host."""
    gaps, cover_end, last = [], None, None
    for s, e, name in sorted(named):
        if cover_end is not None and s > cover_end:
            gaps.append((s - cover_end, last, name))
        if cover_end is None or e >= cover_end:
            cover_end, last = e, name
    return [[round(g, 3), a[:60], b[:60]] for g, a, b in sorted(gaps, key=lambda x: -x[0])[:n]]


def profile_stages(fn, cuda: bool = True, top: int = 10, timeline: int = 60) -> dict:
    """Device milliseconds per stage of one ``fn()`` call (kernel names matched against STAGES), the wall time,
    the part of the kernels' span that no kernel on any stream covered (host gaps, waits), and the first
    ``timeline`` device events with their streams.
    ``cuda=False`` profiles CPU ops instead (a logic check of this function on CPU)."""
    from torch.profiler import ProfilerActivity, profile

    kind = torch.autograd.DeviceType.CUDA if cuda else torch.autograd.DeviceType.CPU
    dist.barrier()
    if cuda:
        torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU] if cuda else [ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        wall = (time.perf_counter() - t0) * 1e3
    per_stage, per_kernel, spans, compute, streams = defaultdict(float), defaultdict(float), [], [], []
    for ev in prof.events():
        if ev.device_type != kind or (not cuda and ev.cpu_parent is not None):
            continue
        s, e = ev.time_range.start / 1e3, ev.time_range.end / 1e3  # us -> ms
        stage = stage_of(ev.name)
        per_stage[stage] += e - s
        per_kernel[(stage, ev.name[:90])] += e - s
        spans.append((s, e, ev.name))
        streams.append((s, e, ev.name, ev.device_resource_id))
        if stage != "nccl":
            compute.append((s, e))
    span = (max(e for _, e, _ in spans) - min(s for s, _, _ in spans)) if spans else 0.0
    t0 = min((s for s, _, _ in spans), default=0.0)
    covered = union_ms([(s, e) for s, e, _ in spans])
    return {"ms_by_stage": {k: round(v, 3) for k, v in sorted(per_stage.items())}, "wall_ms": round(wall, 3),
            "kernel_span_ms": round(span, 3), "no_kernel_running_ms": round(span - covered, 3),
            # [ms, kernel before, kernel after] of the longest of those stretches: which launch the device waited for
            "largest_gaps": largest_gaps(spans),
            # communication that no other kernel ran alongside (what overlapping it with compute can still hide)
            "nccl_exposed_ms": round(covered - union_ms(compute), 3),
            # what waits on what: the first device events in start order, [name, stream, start, end] in ms from the
            # first (one row per kernel or copy; NCCL kernels run on their own streams)
            "timeline": [[name[:48], stream, round(s - t0, 3), round(e - t0, 3)]
                         for s, e, name, stream in sorted(streams)[:timeline]],
            # the costliest kernels outside the attention stages: what a stage total like copy_fill is made of
            "top_other_kernels": [[st, name, round(ms, 3)] for (st, name), ms in sorted(
                per_kernel.items(), key=lambda kv: -kv[1]) if st not in ("attn_fwd", "attn_bwd")][:top]}


def parse_nccl_env(pairs: list[str]) -> dict:
    """["NCCL_X=V", ...] -> {"NCCL_X": "V"}; anything else is refused in one line naming the flag."""
    env = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not (sep and value and name.startswith("NCCL_") and name[5:].replace("_", "").isalnum()):
            raise SystemExit(f"--nccl-env {pair!r}: expected NCCL_<NAME>=<value>, e.g. NCCL_MIN_P2P_NCHANNELS=32")
        env[name] = value
    return env


def profile_every_rank(fn, cuda: bool) -> dict:
    """This rank's :func:`profile_stages` with every rank's timeline and exposed times beside it (``per_rank``, in
    rank order): the rank that waits is often not rank 0, whose process writes the JSON."""
    prof = profile_stages(fn, cuda)
    mine = {k: prof.pop(k) for k in ("timeline", "nccl_exposed_ms", "no_kernel_running_ms", "wall_ms")}
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, mine)
    return {**prof, "per_rank": every}


def v_as_in_training(x: torch.Tensor, hq: int, hk: int) -> torch.Tensor:
    """x [b, s, hk, d] -> the same values laid out as the core attention gets V in training: a view of Megatron's
    fused QKV projection output [s, b, hk, (hq/hk + 2) d] (V's heads (hq/hk + 2) d elements apart; Q and K arrive
    contiguous, written by QK-norm and RoPE), detached (a leaf of the timed graph)."""
    b, s, h, d = x.shape
    fused = x.new_zeros(s, b, h, (hq // hk + 2) * d)
    fused[..., -d:] = x.transpose(0, 1)
    return fused[..., -d:].permute(1, 0, 2, 3).detach()


def shipped_attention(overrides: list[str]) -> dict:
    from phsa_train.config import compose

    a = compose(["attention=phsa", *overrides]).attention
    return dict(block_size=a.block_size, n_init=a.n_init, local_window=a.local_window, topk=a.train_topk,
                lam=a.lam, score=a.score, query_block=a.query_block, backend=a.backend)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seq-lens", type=int, nargs="+", default=[65536, 131072])
    ap.add_argument("--modes", nargs="+", default=["allgather"])
    ap.add_argument("--attention", nargs="*", default=[],
                    help="Hydra overrides of the PHSA settings, e.g. attention.query_block=64 (default: shipped)")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--no-cp1", action="store_true", help="skip the CP=1 whole-sequence timing")
    ap.add_argument("--v-as-in-training", action="store_true",
                    help="V (CP=1 and CP=N) as a view of a fused QKV output, as Megatron hands it (rows say v_layout)")
    ap.add_argument("--no-dense", action="store_true")
    ap.add_argument("--no-profile", action="store_true")
    ap.add_argument("--check", action="store_true", help="also compare o/dq/dk/dv with the CP=1 run")
    ap.add_argument("--cpu", action="store_true", help="gloo on CPU, tiny head shapes, reference backend")
    ap.add_argument("--nccl-env", nargs="+", default=[], metavar="NCCL_X=V",
                    help="NCCL settings for this run, set before NCCL starts and recorded in every row, e.g. "
                         "NCCL_MIN_P2P_NCHANNELS=32 (more channels for each point-to-point peer) or "
                         "NCCL_P2P_NVL_CHUNKSIZE=1048576 (default 512 KiB)")
    ap.add_argument("--cp-nccl-max-ctas", type=int, default=None, metavar="N",
                    help="build every PHSA mode's CP group with at most N CTAs per NCCL kernel (NCCL's maxCTAs, "
                         "per communicator; rows say cp_nccl_max_ctas): whether the K/V and dK/dV transfers leave "
                         "the attention kernels they overlap their SMs. Default: NCCL's choice (the shipped setup)")
    ap.add_argument("--cp-fill-programs", type=int, default=None, metavar="N",
                    help="zero the overlapped path's fp32 dK/dV accumulator with N Triton programs (a fill that "
                         "leaves the other SMs to the attention kernels beside it; rows say cp_fill_programs). "
                         "Default: PyTorch's fill (the shipped setup)")
    ap.add_argument("--cp-sums-beside", type=int, default=None, metavar="N",
                    help="run the overlapped path's early dK/dV casts and its second chunk's sum on the side stream, "
                         "beside the first chunk's backward, in N Triton programs each (rows say cp_sums_beside). "
                         "Default: on the compute stream (the shipped schedule)")
    ap.add_argument("--dump", default=None, metavar="DIR",
                    help="save each PHSA mode's o, dq, dk, dv of one more forward+backward per rank and length "
                         "(DIR/L<L>-<mode>-r<rank>.pt): to compare trees bit for bit")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    nccl_env = parse_nccl_env(args.nccl_env)
    os.environ.update(nccl_env)

    from megatron.core import parallel_state

    from phsa_train.training.distributed import (init_distributed, init_model_parallel, is_high_priority_stream,
                                                 nccl_max_ctas, new_group_like)
    from phsa_train.megatron import context_parallel
    from phsa_train.megatron.context_parallel import cp_attention, cp_phsa_attention, natural_to_zigzag
    from phsa_train.megatron.local_attention import dense_causal_attention, phsa_local
    from phsa_train.megatron.token_info import PUNCT_BIT

    if args.cp_fill_programs is not None:
        if args.cp_fill_programs < 1:
            raise SystemExit(f"--cp-fill-programs={args.cp_fill_programs}: allowed values are integers >= 1")
        context_parallel.ZERO_FILL_PROGRAMS = args.cp_fill_programs
    if args.cp_sums_beside is not None:
        if args.cp_sums_beside < 1:
            raise SystemExit(f"--cp-sums-beside={args.cp_sums_beside}: allowed values are integers >= 1")
        context_parallel.SUMS_BESIDE_PROGRAMS = args.cp_sums_beside
    env = init_distributed()
    init_model_parallel(1, 1, env.world_size)
    group = parallel_state.get_context_parallel_group()
    # a CP group of each stream priority the modes ask for: Megatron's (the shipped setting) and, where a suffix asks
    # for the other, a second group over the same ranks (created here, in the same order on every rank)
    shipped = is_high_priority_stream(group)  # (False on gloo, which has no streams)
    groups = {None: group, shipped: group}
    for high in sorted({split_mode(m)[1] for m in args.modes} - set(groups), key=str):
        groups[high] = new_group_like(group, high)
    if args.cp_nccl_max_ctas is not None:  # the same groups again, each with the CTA limit (same order on every rank)
        if dist.get_backend(group) != "nccl" or args.cpu:
            raise SystemExit(f"--cp-nccl-max-ctas={args.cp_nccl_max_ctas} needs NCCL (GPUs, without --cpu)")
        limited = {}  # one new group per distinct group (the shipped priority's group serves two keys)
        try:
            for g in groups.values():
                if id(g) not in limited:
                    limited[id(g)] = new_group_like(group, is_high_priority_stream(g) is True, args.cp_nccl_max_ctas)
        except ValueError as e:
            raise SystemExit(f"--cp-nccl-max-ctas: {e}") from None
        groups = {key: limited[id(g)] for key, g in groups.items()}
    cp, rank = env.world_size, env.rank
    cuda = env.device.type == "cuda" and not args.cpu
    dev, dtype = (env.device, torch.bfloat16) if cuda else (torch.device("cpu"), torch.float32)
    hq, hk, d = (16, 8, 128) if cuda else (4, 2, 16)
    overrides = list(args.attention)
    if not cuda:
        overrides += ["attention.n_init=16", "attention.local_window=32", "attention.backend=reference"]
    kw = shipped_attention(overrides)
    device_name = torch.cuda.get_device_name() if cuda else "cpu"
    rows = []

    def emit(row):
        row.update(device=device_name, world=cp, **({"nccl_env": nccl_env} if nccl_env else {}),
                   **({"v_layout": "fused_qkv_view"} if args.v_as_in_training else {}))
        rows.append(row)
        if rank == 0:
            print(json.dumps(row), flush=True)

    for L in args.seq_lens:
        g = torch.Generator(device=dev).manual_seed(L)
        q, k, v = (torch.randn(1, L, h, d, device=dev, dtype=dtype, generator=g) for h in (hq, hk, hk))
        info = ((torch.rand(1, L, device=dev, generator=g) < 0.1).to(torch.int32) * PUNCT_BIT)
        do = torch.randn(1, L, hq, d, device=dev, dtype=dtype, generator=g)
        mine = (lambda x: natural_to_zigzag(x, cp)[rank]) if cp > 1 else (lambda x: x)  # noqa: E731
        # the timed layers' inputs: contiguous copies, V as a fused QKV view with --v-as-in-training
        inputs = lambda sl: (sl(q).clone(), sl(k).clone(),  # noqa: E731
                             v_as_in_training(sl(v), hq, hk) if args.v_as_in_training else sl(v).clone())
        ql, kl, vl = (x.requires_grad_() for x in inputs(mine))
        il, dol = mine(info), mine(do)
        cp1_ms = None
        if cp > 1 and not args.no_cp1:  # CP=1 on this rank's own device, same process, same card
            qf, kf, vf = (x.requires_grad_() for x in inputs(lambda x: x))
            fb1 = lambda: fwd_bwd_of(phsa_local(qf, kf, vf, info, kw), (qf, kf, vf), do)  # noqa: E731
            fb1()
            cp1_ms = timed(fb1, args.reps, cuda)
            cp1_dev = timed_host_ahead(fb1, args.reps) if cuda else None
            emit({"L": L, "cp": 1, "variant": "phsa", "fwd_bwd_ms": cp1_ms, "settings": kw,
                  "tokens_per_s_per_gpu": L / (cp1_ms / 1e3),
                  **({"fwd_bwd_ms_host_ahead": cp1_dev[0], "host_was_ahead": cp1_dev[1]} if cuda else {})})
            if not args.no_profile:
                rows[-1]["profile"] = profile_every_rank(fb1, cuda)
            del qf, kf, vf
        for mode in args.modes:
            if cp > 1:
                base, high = split_mode(mode)
                attn = lambda: cp_phsa_attention(  # noqa: E731
                    ql, kl, vl, il, groups[high], base.removesuffix("_chunks"), kw, overlap=base != "allgather_chunks")
            else:
                attn = lambda: phsa_local(ql, kl, vl, il, kw)  # noqa: E731
            try:  # a failing mode leaves a row saying why; the other modes still run
                fwd_bwd = lambda: fwd_bwd_of(attn(), (ql, kl, vl), dol)  # noqa: E731
                for _ in range(2):
                    fwd_bwd()
                ms = timed(fwd_bwd, args.reps, cuda)
                with torch.no_grad():
                    ms_fwd = timed(attn, args.reps, cuda)
                row = {"L": L, "cp": cp, "mode": mode, "variant": "phsa", "settings": kw, "fwd_bwd_ms": ms,
                       "fwd_ms": ms_fwd, "tokens_per_s_per_gpu": (L / cp) / (ms / 1e3),
                       "bytes_per_layer_per_rank": bytes_per_layer(mode, L, cp, hq, hk, d, q.element_size(),
                                                                   kw["block_size"])}
                if cp > 1:  # as built: the streams and the CTA limit this mode's NCCL work ran with
                    row["cp_high_priority_stream"] = is_high_priority_stream(groups[high])
                    row["cp_nccl_max_ctas"] = nccl_max_ctas(groups[high])
                    row["cp_fill_programs"] = context_parallel.ZERO_FILL_PROGRAMS
                    row["cp_sums_beside"] = context_parallel.SUMS_BESIDE_PROGRAMS
                if cp1_ms is not None:
                    row["scaling_efficiency"] = cp1_ms / (cp * ms)
                if cuda:  # the same, with the host's launch gaps hidden as in a training step
                    dev_ms, ahead = timed_host_ahead(fwd_bwd, args.reps)
                    row.update(fwd_bwd_ms_host_ahead=dev_ms, host_was_ahead=ahead)
                    if cp1_ms is not None:
                        row["scaling_efficiency_host_ahead"] = cp1_dev[0] / (cp * dev_ms)
                if not args.no_profile:
                    row["profile"] = profile_every_rank(fwd_bwd, cuda)
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
                if args.dump:
                    ql.grad = kl.grad = vl.grad = None
                    o = attn()
                    o.backward(dol)
                    Path(args.dump).mkdir(parents=True, exist_ok=True)
                    torch.save({n: x.detach().cpu() for n, x in (("o", o), ("dq", ql.grad), ("dk", kl.grad),
                                                                  ("dv", vl.grad))},
                               f"{args.dump}/L{L}-{mode}-r{rank}.pt")
                # every rank's time: the step is as slow as the slowest rank
                times = [None] * cp
                dist.all_gather_object(times, ms, group=group)
                row["fwd_bwd_ms_per_rank"] = times
                emit(row)
            except Exception as e:  # noqa: BLE001
                emit({"L": L, "cp": cp, "mode": mode, "variant": "phsa", "error": repr(e)[:400]})
        if not args.no_dense:
            try:
                if cp > 1:
                    dense = lambda: cp_attention(ql, kl, vl, None, group)  # noqa: E731
                    backend = "flash (bottom-right causal chunks)" if cuda else "math"
                else:
                    dense = lambda: dense_causal_attention(ql, kl, vl, None)  # noqa: E731
                    backend = "cudnn" if cuda else "math"
                fwd_bwd_of(dense(), (ql, kl, vl), dol)
                ms = timed(lambda: fwd_bwd_of(dense(), (ql, kl, vl), dol), max(3, args.reps // 3), cuda)
                emit({"L": L, "cp": cp, "mode": "allgather", "variant": "dense", "sdpa_backend": backend,
                      "fwd_bwd_ms": ms, "tokens_per_s_per_gpu": (L / cp) / (ms / 1e3)})
                if cp > 1 and not args.no_cp1:  # dense CP=1 (cuDNN) on the whole sequence, same card
                    qf, kf, vf = (x.requires_grad_() for x in inputs(lambda x: x))
                    ms1 = timed(lambda: fwd_bwd_of(dense_causal_attention(qf, kf, vf, None), (qf, kf, vf), do),
                                max(3, args.reps // 3), cuda)
                    emit({"L": L, "cp": 1, "variant": "dense", "sdpa_backend": "cudnn" if cuda else "math",
                          "fwd_bwd_ms": ms1, "tokens_per_s_per_gpu": L / (ms1 / 1e3)})
                    rows[-2]["scaling_efficiency"] = ms1 / (cp * ms)
                    del qf, kf, vf
            except torch.OutOfMemoryError:
                emit({"L": L, "cp": cp, "variant": "dense", "error": "OOM"})
        del q, k, v, ql, kl, vl, do, dol
        if cuda:
            torch.cuda.empty_cache()
    if rank == 0:
        stamp = datetime.date.today().isoformat()
        out = Path(args.out or f"bench/results/context_parallel-cp{cp}-{device_name.replace(' ', '_')}-{stamp}.json")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"device": device_name, "world": cp, "date": stamp, "rows": rows}, indent=1))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
