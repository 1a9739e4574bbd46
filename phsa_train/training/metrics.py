"""Metrics fan-out: a console line, ``metrics.jsonl`` in the run dir, and Weights & Biases.

Only global rank 0 logs. ``metrics.jsonl`` is the record tests and plots read (W&B offline files are a
binary stream); W&B mirrors it. W&B runs are resumed by id after a restart, so a requeued job keeps
one run and one curve.
"""
from __future__ import annotations

import json
import logging
import math
import os
import secrets
import sys
import time
from pathlib import Path
from typing import Any, Optional


class MetricsLogger:
    def __init__(self, run_dir: Path, *, enabled: bool, wandb_cfg, config: dict, run_name: str,
                 resume_id: Optional[str] = None, tags: tuple[str, ...] = (), first_step: int = 0):
        self.enabled = enabled
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / "metrics.jsonl"
        self.wandb = None
        self.wandb_dir: Optional[Path] = None  # this run's folder under <run dir>/wandb
        self.run_id: Optional[str] = resume_id
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._drop_rows_after(first_step)
        if wandb_cfg.mode != "disabled":
            import wandb

            os.environ.setdefault("WANDB_SILENT", "true")
            self.run_id = resume_id or secrets.token_hex(4)  # persisted in checkpoints: a restart resumes the run
            self.wandb = wandb.init(
                project=wandb_cfg.project, entity=wandb_cfg.entity, group=wandb_cfg.group, name=wandb_cfg.name or run_name,
                tags=list(tags) + list(wandb_cfg.tags), config=config, mode=wandb_cfg.mode, dir=str(self.run_dir),
                id=self.run_id, resume="allow")
            self.wandb_dir = Path(self.wandb.dir).parent
            # Line dense and sparse runs up on tokens, not on steps.
            self.wandb.define_metric("train/tokens_seen")
            for prefix in ("train/*", "valid/*", "perf/*", "phsa/*"):
                self.wandb.define_metric(prefix, step_metric="train/tokens_seen")

    def _drop_rows_after(self, step: int) -> None:
        """A start at ``step`` replays what the previous start did after its last checkpoint: keep the log one
        run's (every step once) by dropping those rows; a fresh start (0) drops them all."""
        if not self.path.exists():
            return
        keep = [line for line in self.path.read_text().splitlines(keepends=True) if step and _step_of(line) <= step]
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(keep))
        os.replace(tmp, self.path)

    def log(self, step: int, metrics: dict[str, Any], console: Optional[str] = None) -> None:
        if not self.enabled:
            return
        row = {"step": step, "time": time.time(), **{k: _plain(v) for k, v in metrics.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if self.wandb is not None:
            self._to_wandb(lambda run: run.log(metrics, step=step))
        if console:
            print(console, flush=True)

    def summary_charts(self) -> None:
        """W&B custom chart with loss and sparsity on one panel (the PNGs carry the same for offline users)."""
        if self.wandb is None:
            return
        import wandb

        rows = [r for r in read_metrics(self.run_dir) if "train/loss" in r]
        if not rows or "phsa/sparsity" not in rows[-1]:
            return
        steps = [r["step"] for r in rows]
        self._to_wandb(lambda run: run.log({"charts/loss_and_sparsity": wandb.plot.line_series(
            xs=steps, ys=[[r["train/loss"] for r in rows], [r.get("phsa/sparsity", 0.0) for r in rows]],
            keys=["train/loss", "phsa/sparsity"], title="loss and sparsity", xname="step")}))

    def finish_run(self, plots: bool) -> None:
        """End of training: PNG plots (``logging.plots``), the W&B summary chart, close W&B."""
        if self.enabled and plots:
            from phsa_train.training.plots import plot_run

            plot_run(self.run_dir)
        if self.enabled:
            self.summary_charts()
        self.finish()

    def finish(self) -> None:
        if self.wandb is not None:
            self._to_wandb(lambda run: run.finish())
            self.wandb = None

    def _to_wandb(self, call) -> None:
        """W&B only mirrors metrics.jsonl, so its failure never stops training or a save: one line, then without it.
        (Slurm's scancel and preemption SIGTERM every process of the job, W&B's service process included.)"""
        try:
            call(self.wandb)
        except Exception as e:  # noqa: BLE001 - whatever the W&B client raises once its service is gone
            print(f"[phsa_train] W&B stopped ({e.__class__.__name__}: {e}); metrics.jsonl goes on", flush=True)
            self.wandb = None


def _step_of(line: str) -> float:
    """The step of one metrics.jsonl row; infinity for a blank line or one cut short by a kill mid-write."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf


def _plain(v):
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def flops_per_token(cfg, seq_len: int, vocab_size: int, attended_tokens: Optional[float] = None) -> float:
    """Training FLOPs per token (fwd + bwd = 3x fwd), PaLM-style: 6N for the matmuls plus attention.

    ``attended_tokens`` is the mean number of keys a query attends (seq_len / 2 for dense causal);
    for PHSA pass the sparse count to get the FLOPs actually computed.
    """
    m = cfg.model
    h, f, L = m.hidden_size, m.ffn_hidden_size, m.num_layers
    q_dim, kv_dim = m.num_attention_heads * m.kv_channels, m.num_query_groups * m.kv_channels
    mlp = (3 if m.gated_linear_unit else 2) * h * f
    per_layer = h * (q_dim + 2 * kv_dim) + q_dim * h + mlp
    n_matmul = L * per_layer + h * vocab_size
    attended = seq_len / 2 if attended_tokens is None else attended_tokens
    attn = L * 2 * 2 * q_dim * attended  # QK^T and PV, 2 FLOPs per MAC
    return 6 * n_matmul + 3 * attn


PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense bf16, for MFU


class StepReport:
    """Turns one finished step into its metrics row and (every ``train.log_interval`` steps) its console line."""

    def __init__(self, cfg, world_size: int, vocab_size: int, first_step: int, stop_at: int, on_gpu: bool):
        import torch

        self.cfg, self.world_size, self.vocab_size = cfg, world_size, vocab_size
        self.tokens_per_step = cfg.train.global_batch_size * cfg.data.seq_len
        self.first_step, self.stop_at, self.t0 = first_step, stop_at, time.time()
        self.peak = next((v for k, v in PEAK_FLOPS.items() if on_gpu and k in torch.cuda.get_device_name()), None)

    def metrics(self, step: int, loss: float, lr: float, grad_norm: float, step_time: float, sparsity) -> dict:
        tps = self.tokens_per_step / step_time
        m = {"train/loss": loss, "train/lr": lr, "train/grad_norm": grad_norm,
             "train/tokens_seen": step * self.tokens_per_step, "perf/step_time_s": step_time,
             "perf/tokens_per_sec": tps, "perf/tokens_per_sec_per_gpu": tps / self.world_size, **sparsity.metrics()}
        if self.peak:
            L = self.cfg.data.seq_len
            fpt = flops_per_token(self.cfg, L, self.vocab_size, sparsity.attended_tokens(L))
            m["perf/mfu"] = fpt * m["perf/tokens_per_sec_per_gpu"] / self.peak
        return m

    def mean_tokens_per_sec(self, step: int) -> float:
        """Tokens per second over this start's steps (set-up excluded up to the first step, evaluation included)."""
        return self.tokens_per_step * max(0, step - self.first_step) / max(1e-9, time.time() - self.t0)

    @staticmethod
    def add_valid(m: dict, valid_loss: float) -> dict:
        import torch

        m.update({"valid/loss": valid_loss, "valid/ppl": float(torch.tensor(valid_loss).exp())})
        return m

    def console(self, step: int, m: dict, sparsity) -> Optional[str]:
        t = self.cfg.train
        if not (step % t.log_interval == 0 or step in (1, self.stop_at) or "valid/loss" in m):
            return None
        eta = (time.time() - self.t0) / max(1, step - self.first_step) * (self.stop_at - step) if step else 0
        return (f"step {step:>6}/{t.steps} | loss {m['train/loss']:.4f} | lr {m['train/lr']:.2e} | gnorm "
                f"{m['train/grad_norm']:.3f} | {m['perf/tokens_per_sec']:,.0f} tok/s | {m['perf/step_time_s']:.2f} "
                f"s/step{sparsity.console()}" + (f" | mfu {m['perf/mfu']:.1%}" if "perf/mfu" in m else "")
                + (f" | valid {m['valid/loss']:.4f} ppl {m['valid/ppl']:.1f}" if "valid/loss" in m else "")
                + f" | eta {eta:.0f}s")


class _Tee:
    """A text stream that writes to two (the console and the log file), flushing both."""

    def __init__(self, console, log_file):
        self.console, self.log_file = console, log_file

    def write(self, text: str) -> int:
        self.log_file.write(text)
        return self.console.write(text)

    def flush(self) -> None:
        self.log_file.flush()
        self.console.flush()

    def __getattr__(self, name):
        return getattr(self.console, name)


def log_console_to(path: Path) -> None:
    """Copy this process's console output into ``path`` (appended), where Hydra logs too: the run's own log.
    Matplotlib's font-cache INFO lines stay out of it."""
    logging.getLogger("matplotlib").setLevel(logging.WARNING)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    sys.stdout = _Tee(sys.stdout, open(path, "a", buffering=1))
