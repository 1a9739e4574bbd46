"""Distributed checkpoints: Megatron-Core ``dist_checkpointing`` + what a faithful resume needs.

Layout (Megatron-LM's, so its users find their way)::

    <dir>/iter_0000050/              model (+ distributed optimizer on GPU) in torch_dist format,
                                     meta.json (step, consumed samples, config, W&B run id, versions),
                                     rank_00000.pt ... (per-rank RNG states and, on CPU, AdamW state)
    <dir>/latest_checkpointed_iteration.txt

A save is written to ``iter_XXXXXXX.tmp`` and renamed by rank 0 only after every rank finished, and the
tracker is replaced (temp + ``os.replace``) after that. A crash or SIGKILL mid-save therefore leaves
the previous checkpoint as the latest valid one; stale ``.tmp`` directories are removed on the next save.
"""
from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing

TRACKER = "latest_checkpointed_iteration.txt"


@dataclass
class TrainState:
    """Everything besides weights and optimizer that resuming must restore."""

    step: int = 0
    consumed_samples: int = 0
    wandb_run_id: Optional[str] = None
    extra: dict = field(default_factory=dict)


def _iter_dir(root: Path, step: int) -> Path:
    return root / f"iter_{step:07d}"


def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def latest_step(root: str | Path) -> Optional[int]:
    """The step of the newest complete checkpoint under ``root``, or None."""
    root = Path(root)
    tracker = root / TRACKER
    if tracker.exists():
        step = int(tracker.read_text().strip())
        if (_iter_dir(root, step) / "meta.json").exists():
            return step
    # Tracker missing or pointing at a removed dir: fall back to the newest complete iter_* dir.
    steps = sorted(int(p.name[5:]) for p in root.glob("iter_*") if p.is_dir() and p.name[5:].isdigit()
                   and (p / "meta.json").exists())
    return steps[-1] if steps else None


def save(root: str | Path, model, optimizer, state: TrainState, config: dict[str, Any], *,
         megatron_optimizer: bool, keep_last: int = 2, optimizer_sharding: str = "fully_reshardable") -> Path:
    """Save a checkpoint of ``state.step``; collective over all ranks."""
    root = Path(root)
    rank = dist.get_rank()
    final, tmp = _iter_dir(root, state.step), Path(str(_iter_dir(root, state.step)) + ".tmp")
    if rank == 0:
        for stale in root.glob("iter_*.tmp"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir(parents=True, exist_ok=True)
    dist.barrier()

    sharded = {"model": model.sharded_state_dict()}
    if megatron_optimizer:
        sharded["optimizer"] = optimizer.sharded_state_dict(sharded["model"], metadata=_optim_metadata(optimizer_sharding))
    dist_checkpointing.save(sharded, str(tmp))
    per_rank = {"rng": _rng_state()}
    if not megatron_optimizer:
        per_rank["optimizer"] = optimizer.state_dict()
    torch.save(per_rank, tmp / f"rank_{rank:05d}.pt")
    dist.barrier()

    if rank == 0:
        meta = {"step": state.step, "consumed_samples": state.consumed_samples, "wandb_run_id": state.wandb_run_id,
                "extra": state.extra, "world_size": dist.get_world_size(), "config": config,
                "optimizer_sharding": optimizer_sharding if megatron_optimizer else None,
                "versions": _versions()}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1, default=str))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _write_tracker(root, state.step)
        _prune(root, keep_last)
    dist.barrier()
    return final


def _optim_metadata(sharding: str) -> dict:
    # Megatron's DistributedOptimizer formats: fully_reshardable (a canonical per-parameter state: loads into
    # any TP/PP/DP layout; gathers on DP rank 0 while saving) or dp_reshardable (fully parallel, DP-only
    # resharding). Its old default, fully_sharded_model_space, is deprecated and fails on 0.16.1.
    return {"distrib_optim_sharding_type": sharding}


def _init_optimizer_state(optimizer) -> None:
    """Give a fresh Megatron optimizer's Adam its (zero) state so a checkpoint can be loaded into it.

    Its sharded_state_dict needs existing per-parameter state, and without Apex/TE also a ``step`` per
    parameter, which Megatron's own ``init_state_fn`` does not create (0.16.1).
    """
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = opt.optimizer
        for group in inner.param_groups:
            for p in group["params"]:
                if len(inner.state[p]) == 0:
                    inner.state[p]["exp_avg"] = torch.zeros_like(p.data)
                    inner.state[p]["exp_avg_sq"] = torch.zeros_like(p.data)
                if "step" not in inner.state[p]:
                    inner.state[p]["step"] = torch.tensor(0.0)


def _write_tracker(root: Path, step: int) -> None:
    t = root / (TRACKER + ".tmp")
    t.write_text(str(step))
    os.replace(t, root / TRACKER)


def _prune(root: Path, keep_last: int) -> None:
    steps = sorted(int(p.name[5:]) for p in root.glob("iter_*") if p.is_dir() and p.name[5:].isdigit())
    for s in steps[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(_iter_dir(root, s), ignore_errors=True)


def load(root: str | Path, step: int, model, optimizer, *, megatron_optimizer: bool,
         load_optimizer: bool = True) -> TrainState:
    """Load checkpoint ``step`` into ``model`` (and ``optimizer``); returns the saved TrainState."""
    path = _iter_dir(Path(root), step)
    meta = json.loads((path / "meta.json").read_text())
    sharded = {"model": model.sharded_state_dict()}
    if load_optimizer and megatron_optimizer:
        sharding = meta.get("optimizer_sharding", "fully_reshardable")
        _init_optimizer_state(optimizer)
        sharded["optimizer"] = optimizer.sharded_state_dict(sharded["model"], is_loading=True,
                                                            metadata=_optim_metadata(sharding))
    loaded = dist_checkpointing.load(sharded, str(path))
    model_sd = loaded["model"]
    model_sd.pop("content_metadata", None)
    model.load_state_dict(model_sd)
    if load_optimizer and megatron_optimizer:
        optimizer.load_state_dict(loaded["optimizer"])
    rank_file = path / f"rank_{dist.get_rank():05d}.pt"
    if load_optimizer and rank_file.exists() and meta.get("world_size") == dist.get_world_size():
        per_rank = torch.load(rank_file, weights_only=False)
        if not megatron_optimizer:
            optimizer.load_state_dict(per_rank["optimizer"])
        _set_rng_state(per_rank["rng"])
    elif load_optimizer and not megatron_optimizer:
        raise RuntimeError(f"checkpoint {path} was written by {meta.get('world_size')} ranks; the CPU optimizer "
                           f"state cannot be resharded to {dist.get_world_size()} ranks (load weights only with "
                           "checkpoint.init_from)")
    return TrainState(step=meta["step"], consumed_samples=meta["consumed_samples"],
                      wandb_run_id=meta.get("wandb_run_id"), extra=meta.get("extra", {}))


def _versions() -> dict:
    import megatron.core

    return {"torch": torch.__version__, "megatron_core": getattr(megatron.core, "__version__", "?")}
