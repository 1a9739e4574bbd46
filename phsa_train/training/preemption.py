"""Graceful stop on SIGUSR1 / SIGTERM / SIGINT or a stop file (Slurm's time-limit warning, preemption, scancel).

Three ways to ask the ranks to stop:
  * a signal (SIGUSR1, SIGTERM, SIGINT) to the rank itself; torchrun forwards the ones it handles;
  * the file ``$PHSA_STOP_FILE`` appearing: ``launch/pretrain.sh`` creates it when its batch shell gets the
    warning (``#SBATCH --signal=B:USR1@120``). That keeps the signal away from the other processes of the
    job step, which Slurm would otherwise signal all at once (see
    :func:`phsa_train.compat.megatron_core_0_16_1.shield_checkpoint_writer`);
  * the wall clock passing ``$PHSA_STOP_AT`` (Unix time): ``launch/pretrain.sh`` sets it to the job's end
    time minus the warning, at every start, because Slurm (22.05) does not reliably send the ``--signal``
    warning again after a requeue (seen: the next time limit came without one).

The handler only sets a flag. Every step all ranks agree through an all-reduce (MAX), so they all stop
at the *same* step, save one consistent checkpoint and exit; rank 0 then drops a ``REQUEUE`` marker in
the run dir that ``launch/pretrain.sh`` turns into ``scontrol requeue``.
"""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import torch
import torch.distributed as dist

from phsa_train.compat.megatron_core_0_16_1 import shield_checkpoint_writer


class PreemptionWatcher:
    SIGNALS = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)  # torchrun forwards SIGINT (Ctrl-C) to the ranks
    POLL_S = 1.0  # how often the stop file is looked for (one stat per node)

    def __init__(self, stop_file: str | os.PathLike | None = None):
        self._flag = False
        self.stopped = False
        stop_file = stop_file or os.environ.get("PHSA_STOP_FILE")
        self.stop_file = Path(stop_file) if stop_file else None
        local_rank = os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", "0"))
        self._poll = self.stop_file is not None and local_rank == "0"
        self._next_poll = 0.0
        stop_at = os.environ.get("PHSA_STOP_AT")
        self.stop_at = float(stop_at) if stop_at else None
        shield_checkpoint_writer()
        for sig in self.SIGNALS:
            signal.signal(sig, self._handler)

    def _handler(self, signum, frame):
        if not self._flag:
            print(f"[phsa_train] received {signal.Signals(signum).name}: checkpoint at the end of this step, then exit",
                  flush=True)
        self._flag = True

    def should_stop(self) -> bool:
        if self.stop_at is not None and not self._flag and time.time() >= self.stop_at:
            print("[phsa_train] the job's time limit is near (PHSA_STOP_AT): checkpoint at the end of this step, "
                  "then exit", flush=True)
            self._flag = True
        if self._poll and not self._flag and time.monotonic() >= self._next_poll:
            self._next_poll = time.monotonic() + self.POLL_S
            if self.stop_file.exists():
                print(f"[phsa_train] found {self.stop_file}: checkpoint at the end of this step, then exit", flush=True)
                self._flag = True
        flag = torch.tensor([1.0 if self._flag else 0.0])
        if dist.is_initialized():
            if dist.get_backend() == "nccl":
                flag = flag.cuda()
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        self.stopped = bool(flag.item() > 0)
        return self.stopped

    @staticmethod
    def mark_requeue(run_dir: Path, step: int) -> None:
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        (Path(run_dir) / "REQUEUE").write_text(f"{step}\n")

