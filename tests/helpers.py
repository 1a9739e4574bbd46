"""Shared test utilities: Hydra composition, real multi-process runs through torchrun and the launcher, and
tensor comparisons for the attention operators."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from phsa_train.config import compose  # noqa: F401  (re-exported for tests)

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def subprocess_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")}
    env.update(OMP_NUM_THREADS="1", WANDB_MODE="offline", WANDB_SILENT="true", PYTHONUNBUFFERED="1",
               PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""))
    env.update({k: str(v) for k, v in extra.items()})
    return env


def torchrun(nproc: int, target: list[str], *, env: dict | None = None, timeout: int = 600,
             check: bool = True) -> subprocess.CompletedProcess:
    """Run ``target`` (``["-m", "module", ...]`` or ``["script.py", ...]``) under torchrun with gloo."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
           f"--master-port={free_port()}", "--master-addr=127.0.0.1", *target]
    proc = subprocess.run(cmd, cwd=REPO, env=env or subprocess_env(), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"torchrun failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc


def run_layouts(tmp_path, nproc, cases: dict[str, list[str]]) -> dict[str, dict]:
    """One torchrun start of ``nproc`` ranks running every case of ``tests/workers/parallel_step.py`` (name ->
    its layout arguments): name -> {"loss", "grads"}."""
    out = tmp_path / f"layouts_{nproc}_{'_'.join(cases)}.pt"
    torchrun(nproc, ["tests/workers/parallel_step.py", "--out", str(out), "--cases", json.dumps(cases)])
    return torch.load(out)


def run_layout(tmp_path, nproc, *args):
    return run_layouts(tmp_path, nproc, {"case": list(args)})["case"]


def assert_same(ref, got, rtol=1e-5, atol=1e-6):
    assert got["loss"] == pytest.approx(ref["loss"], rel=1e-6)
    assert ref["grads"].keys() == got["grads"].keys()
    for name, g in ref["grads"].items():
        torch.testing.assert_close(got["grads"][name], g, rtol=rtol, atol=atol, msg=name)


SHORT = ["model=tiny", "data.seq_len=128", "train.micro_batch_size=4", "train.global_batch_size=8",
         "train.warmup_steps=5", "train.lr=3e-3", "train.log_interval=5", "train.eval_iters=2"]


def launch(run_dir: Path, *overrides, cache_dir, **popen):
    env = subprocess_env(PHSA_RUN_DIR=run_dir, PHSA_CACHE_DIR=cache_dir, NPROC=2)
    return subprocess.Popen(["bash", "launch/pretrain.sh", *SHORT, *overrides], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            **popen)


def finish(proc, timeout=600) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-6000:]
    return out


DT = torch.float64


def make_inputs(b, L, hq, hk, d=8, dv=6, p_punct=0.2, seed=42):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, L, hq, d, dtype=DT, generator=g)
    k = torch.randn(b, L, hk, d, dtype=DT, generator=g)
    v = torch.randn(b, L, hk, dv, dtype=DT, generator=g)
    pm = torch.rand(b, L, generator=g) < p_punct
    return q, k, v, pm


def assert_close(name: str, ref: torch.Tensor, out: torch.Tensor, ratio: float, atol: float | None = None) -> None:
    """Fail when ``out`` is not close to ``ref``: NaN in either, RMS of the difference above ``ratio`` times the
    RMS of ``ref``, or (when given) a max absolute difference above ``atol``. The message prints all three."""
    assert ref.shape == out.shape, f"{name}: shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    ref64, out64 = ref.detach().double(), out.detach().double()
    assert not torch.isnan(ref64).any(), f"{name}: NaN in the reference"
    assert not torch.isnan(out64).any(), f"{name}: NaN in the output"
    diff = out64 - ref64
    max_abs = diff.abs().max().item() if diff.numel() else 0.0
    rms_err = diff.pow(2).mean().sqrt().item() if diff.numel() else 0.0
    rms_ref = ref64.pow(2).mean().sqrt().item() if diff.numel() else 0.0
    rel = rms_err / (rms_ref + 1e-30)
    msg = f"{name}: rms-rel {rel:.3e} (limit {ratio:.1e}), max-abs {max_abs:.3e}"
    assert rel <= ratio, msg
    if atol is not None:
        assert max_abs <= atol, msg + f" (max-abs limit {atol:.1e})"




def selection_margin(q: torch.Tensor, k: torch.Tensor, punct_mask, params, cu_seqlens=None) -> float:
    """Smallest gap between the k-th and the (k+1)-th block score of any query group, relative to the group's
    best score, over the reference scores (inf when no group has more than k eligible blocks).

    Two implementations that round differently (another GEMM kernel, another CPU, Triton's interpreter) can only
    disagree on a selection where this gap is within their rounding error (~1e-6 in fp32), so a test that
    compares selections exactly first checks that its inputs keep clear of that."""
    from phsa_train.attention.params import doc_bounds
    from phsa_train.attention.phsa.reference import block_scores

    worst = float("inf")
    for s, e in doc_bounds(cu_seqlens, q.shape[1]):
        pm = None if punct_mask is None else punct_mask[:, s:e]
        scores = block_scores(q[:, s:e], k[:, s:e], pm, params).sort(dim=-1, descending=True).values
        if scores.shape[-1] <= params.topk or params.topk == 0:
            continue
        kth, next_ = scores[..., params.topk - 1], scores[..., params.topk]
        chooses = next_.isfinite()  # more than k eligible blocks: the top-k really chooses
        if chooses.any():
            gap = (kth - next_) / scores[..., 0].abs().clamp(min=1e-30)
            worst = min(worst, gap[chooses].min().item())
    return worst


def assert_no_near_ties(q, k, punct_mask, params, cu_seqlens=None, margin: float | None = None) -> None:
    """Precondition of an exact selection comparison between two implementations (see ``selection_margin``).
    Default margin: 1e-9 when the scores are computed in float64, 1e-4 in float32 (bf16/fp16/fp32 inputs)."""
    if margin is None:
        margin = 1e-9 if torch.promote_types(q.dtype, torch.float32) == torch.float64 else 1e-4
    gap = selection_margin(q, k, punct_mask, params, cu_seqlens)
    assert gap > margin, f"inputs hold a near-tie (relative score gap {gap:.1e} <= {margin:.0e}): change the seed"
