"""Graceful stop on SIGUSR1 / SIGTERM (Slurm's time-limit warning, preemption, scancel).

The handler only sets a flag. Every step all ranks agree through an all-reduce (MAX), so they all stop
at the *same* step, save one consistent checkpoint and exit; rank 0 then drops a ``REQUEUE`` marker in
the run dir that ``launch/pretrain.sh`` turns into ``scontrol requeue``.
"""
from __future__ import annotations

import signal
from pathlib import Path

import torch
import torch.distributed as dist


class PreemptionWatcher:
    SIGNALS = (signal.SIGUSR1, signal.SIGTERM)

    def __init__(self):
        self._flag = False
        self.stopped = False
        for sig in self.SIGNALS:
            signal.signal(sig, self._handler)

    def _handler(self, signum, frame):
        if not self._flag:
            print(f"[phsa_train] received {signal.Signals(signum).name}: checkpoint at the end of this step, then exit",
                  flush=True)
        self._flag = True

    def should_stop(self) -> bool:
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
