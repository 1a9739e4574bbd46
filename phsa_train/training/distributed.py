"""torch.distributed + Megatron parallel_state from the launcher's environment (torchrun or Slurm srun)."""
from __future__ import annotations

import datetime
import os
import socket
import subprocess
from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core import parallel_state


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_rank_info() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun's variables, else Slurm's (srun without torchrun)."""
    if "RANK" in os.environ:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0))
    if "SLURM_PROCID" in os.environ and "SLURM_NTASKS" in os.environ:
        return int(os.environ["SLURM_PROCID"]), int(os.environ["SLURM_NTASKS"]), int(os.environ.get("SLURM_LOCALID", 0))
    return 0, 1, 0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _slurm_first_host() -> str:
    """First host of the job's allocation: the rendezvous host every task agrees on."""
    nodelist = os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST")
    if nodelist:
        try:
            out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                                 timeout=30, check=True).stdout.split()
            if out:
                return out[0]
        except (OSError, subprocess.SubprocessError):
            pass
    return os.environ.get("SLURMD_NODENAME", "127.0.0.1")


def init_distributed(timeout_minutes: int = 30) -> DistEnv:
    """Start the default process group: NCCL with one GPU per rank, gloo on CPU."""
    rank, world, local_rank = env_rank_info()
    if "RANK" not in os.environ and "SLURM_PROCID" in os.environ:  # one srun task per rank (e.g. submitit)
        # Derived from the job, never inherited: sbatch exports the submitting shell's MASTER_* variables.
        os.environ["MASTER_ADDR"] = _slurm_first_host()
        os.environ["MASTER_PORT"] = os.environ.get(
            "PHSA_MASTER_PORT", str(20000 + int(os.environ.get("SLURM_JOB_ID", 0)) % 20000))
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:  # single process without a launcher: any free port
        os.environ["MASTER_PORT"] = str(_free_port()) if world == 1 else "29500"
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device, backend = torch.device("cuda", local_rank), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend, rank=rank, world_size=world,
                                timeout=datetime.timedelta(minutes=timeout_minutes))
    return DistEnv(rank, world, local_rank, device)


def prepare_device(env: DistEnv, seed: int) -> bool:
    """Apply the library work-arounds (:mod:`phsa_train.compat`) and seed every RNG a run uses (Megatron's
    CUDA RNG tracker on GPU). Call after :func:`init_model_parallel`. Returns True on GPU.
    """
    from phsa_train import compat

    on_gpu = env.device.type == "cuda"
    compat.apply(on_gpu)
    torch.manual_seed(seed)
    if on_gpu:
        from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

        model_parallel_cuda_manual_seed(seed)
    return on_gpu


# Megatron-Core's name for the context-parallel group in its NCCL communicator settings (parallel_state)
MEGATRON_CP_GROUP = "cp"


def init_model_parallel(tp: int, pp: int, cp: int, cp_high_priority_stream: bool | None = None) -> None:
    """Megatron's parallel groups. ``cp_high_priority_stream`` (None: the ``parallel.cp_high_priority_stream``
    default) puts the CP group's NCCL work on high-priority CUDA streams, so its kernels get SMs as soon as a wave of
    the attention kernels they overlap frees some, rather than after that kernel's last wave. NCCL only (gloo has no
    streams) and CP > 1 only."""
    if cp_high_priority_stream is None:
        from phsa_train.config.schema import ParallelConfig

        cp_high_priority_stream = ParallelConfig.cp_high_priority_stream
    on_nccl = dist.is_initialized() and dist.get_backend() == "nccl"
    high = [MEGATRON_CP_GROUP] if cp_high_priority_stream and cp > 1 and on_nccl else None
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                             context_parallel_size=cp, high_priority_stream_groups=high)


def new_group_like(group, high_priority_stream: bool, max_ctas: int | None = None):
    """A second process group over ``group``'s ranks whose NCCL streams have the given priority (gloo: the same
    ranks, no option): lets one process compare both kinds on the same ranks. ``group`` must span the whole world:
    every rank of the world calls ``new_group`` with the same ranks. ``max_ctas``: at most that many CTAs (so SMs)
    for each of the group's NCCL kernels (NCCL's per-communicator ``maxCTAs``, NCCL >= 2.17, through
    ``ProcessGroupNCCL.Options.config``), so that its transfers leave the kernels they overlap their SMs."""
    ranks = dist.get_process_group_ranks(group)
    if len(ranks) != dist.get_world_size():
        raise ValueError(f"new_group_like needs a group over all {dist.get_world_size()} ranks, got {len(ranks)}")
    if dist.get_backend(group) != "nccl":
        if max_ctas is not None:
            raise ValueError(f"max_ctas={max_ctas} needs the NCCL backend; this group runs {dist.get_backend(group)}")
        return dist.new_group(ranks)
    options = dist.ProcessGroupNCCL.Options(is_high_priority_stream=high_priority_stream)
    if max_ctas is not None:
        config = getattr(options, "config", None)
        if not hasattr(config, "max_ctas"):
            raise ValueError(f"max_ctas={max_ctas} needs ProcessGroupNCCL.Options.config.max_ctas, which torch "
                             f"{torch.__version__} does not have")
        if max_ctas < 1:
            raise ValueError(f"max_ctas={max_ctas}: allowed 1 or more")
        config.max_ctas = max_ctas
    return dist.new_group(ranks, pg_options=options)


def nccl_max_ctas(group) -> int | None:
    """The ``maxCTAs`` ``group``'s NCCL communicators were built with (None: NCCL's default, gloo, or this torch
    build does not say: read through a private accessor)."""
    if dist.get_backend(group) != "nccl":
        return None
    try:
        value = group._get_backend(torch.device("cuda")).options.config.max_ctas
    except (AttributeError, RuntimeError):
        return None
    return value if value > 0 else None  # (unset: NCCL_CONFIG_UNDEF_INT, a large negative number)


def is_high_priority_stream(group) -> bool | None:
    """Whether ``group``'s NCCL streams are high-priority (False on gloo; None where this torch build does not say:
    the NCCL backend's options are read through a private accessor)."""
    if dist.get_backend(group) != "nccl":
        return False
    try:
        return bool(group._get_backend(torch.device("cuda")).options.is_high_priority_stream)
    except (AttributeError, RuntimeError):
        return None


def shutdown() -> None:
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
