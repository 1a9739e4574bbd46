"""The real ``launch/pretrain.sh`` and ``launch/sweep.sh`` on a real single-node Slurm cluster (CPU, gloo).

Every job runs 2 ranks (NPROC=2, one torchrun per node) of the tiny model. What is checked:
  * a plain ``sbatch`` trains in its default run dir ``runs/<job name>-<job id>`` (the USR1 tests' first start:
    one cluster job start is ~20 s of a 2-core CI runner, so no job runs only for this);
  * ``scancel --batch --signal=USR1`` (what ``#SBATCH --signal=B:USR1@120`` does near the time limit) ->
    the batch script relays it through a stop file -> every rank saves a checkpoint at the same step -> the
    batch script requeues the job -> the same job id restarts, finds its run dir and resumes exactly at
    that step -> finishes; no step is lost. The same with USR1 sent to the job step's processes instead;
  * ``scancel`` (SIGTERM to every process of the job, as preemption does) -> every rank saves a verified
    checkpoint of the step it was in before the job ends;
  * ``scontrol requeue`` of a running job (Slurm kills it) -> it restarts and resumes from its latest
    checkpoint, losing at most ``checkpoint.interval`` steps, and finishes (PHSA_RUN_DIR respected);
  * a 2-job Hydra multirun through hydra-submitit-launcher (``launch/sweep.sh``) completes, each job in its
    own run dir and its own W&B run, both in one W&B group.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from phsa_train.training import checkpoint as ckpt
from phsa_train.training.metrics import read_metrics
from tests.helpers import REPO, subprocess_env

pytestmark = pytest.mark.slow

JOB_NAME = "phsa-slurmtest"
STEPS, INTERVAL = 60, 10
TRAIN = ["model=tiny", "data.seq_len=128", "train.micro_batch_size=4", "train.global_batch_size=8",
         "train.warmup_steps=5", "train.lr=3e-3", "train.log_interval=10", "train.eval_interval=0",
         f"checkpoint.interval={INTERVAL}"]
# The #SBATCH defaults are for GPU nodes; a CPU-only cluster overrides them on the command line.
SBATCH_CPU = ["--gpus-per-node=0", "--cpus-per-task=2", "--time=10"]


def job_env(slurm, **extra) -> dict:
    """The submitting environment; sbatch exports it to the job (--export=ALL, Slurm's default)."""
    env = subprocess_env(SLURM_CONF=slurm.conf, PYTHON=sys.executable, NPROC=2, **extra)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    if "PHSA_RUN_DIR" not in extra:
        env.pop("PHSA_RUN_DIR", None)
    return env


def submit(slurm, log_dir: Path, *overrides, env: dict) -> int:
    log_dir.mkdir(parents=True, exist_ok=True)
    return slurm.sbatch([f"--job-name={JOB_NAME}", *SBATCH_CPU, f"--output={log_dir}/%x-%j.out",
                         f"--error={log_dir}/%x-%j.out", "launch/pretrain.sh", *TRAIN, *overrides],
                        env=env, cwd=REPO)


def train_steps(run_dir: Path) -> list[int]:
    return [r["step"] for r in read_metrics(run_dir) if "train/loss" in r]


def wait_for_step(slurm, job: int, run_dir: Path, step: int, log: Path, timeout: float = 240) -> int:
    deadline = time.time() + timeout
    while time.time() < deadline:
        steps = train_steps(run_dir)
        if steps and steps[-1] >= step:
            return steps[-1]
        state = slurm.state(job)
        assert state in ("PENDING", "RUNNING", "CONFIGURING"), f"job {job} is {state}:\n{_read(log)}"
        time.sleep(0.2)
    raise TimeoutError(f"job {job} did not reach step {step} in {timeout}s:\n{_read(log)}\n{slurm.logs()}")


def finish(slurm, job: int, log: Path, timeout: float = 300) -> str:
    state = slurm.wait(job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"},
                       timeout=timeout)
    out = _read(log)
    assert state == "COMPLETED", f"job {job} ended {state} ({slurm.job(job).get('ExitCode')}):\n{out[-8000:]}"
    return out


def _read(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else f"(no {path})"


def resumed_at(out: str) -> int:
    assert "resumed at step " in out, out[-6000:]
    return int(out.split("resumed at step ")[1].split()[0].rstrip(","))


def assert_finished(run_dir: Path) -> None:
    steps = train_steps(run_dir)
    assert steps[-1] == STEPS and sorted(set(steps)) == list(range(1, STEPS + 1)), steps
    ckpt = run_dir / "checkpoints"
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text() == str(STEPS)
    assert (ckpt / f"iter_{STEPS:07d}" / "meta.json").exists()
    assert not (run_dir / "REQUEUE").exists()


@pytest.fixture
def default_run_dirs():
    """Jobs without PHSA_RUN_DIR write to <repo>/runs/<job name>-<job id>: remove those afterwards."""
    made: list[Path] = []
    yield made
    for d in made:
        shutil.rmtree(d, ignore_errors=True)


@pytest.mark.parametrize("target", ["batch", "step"])
def test_usr1_warning_checkpoints_requeues_and_resumes_without_losing_a_step(slurm, tmp_path, default_run_dirs,
                                                                             target):
    """batch: what #SBATCH --signal=B:USR1@120 does (the default), relayed to the ranks by a stop file;
    step: what --signal=USR1@120 without B: does, USR1 to every process of the job step."""
    logs = tmp_path / "logs"
    job = submit(slurm, logs, f"train.steps={STEPS}", env=job_env(slurm))
    run = REPO / "runs" / f"{JOB_NAME}-{job}"  # found again after the requeue: same job id
    default_run_dirs.append(run)
    log = logs / f"{JOB_NAME}-{job}.out"
    wait_for_step(slurm, job, run, 2 * INTERVAL, log)
    assert slurm.job(job)["Restarts"] == "0"
    slurm.run(["scancel", "--signal=USR1", *(["--batch"] if target == "batch" else []), str(job)])
    out = finish(slurm, job, log)
    assert f"slurm job {job} (restart 0)" in out and "x 2 ranks" in out and "world 2" in out, out[-4000:]
    assert "training step exited with 0" in out.split("(restart 1)", 1)[1], out[-4000:]

    assert slurm.job(job)["Restarts"] == "1", out[-6000:]
    first, second = out.split("(restart 1)", 1)
    if target == "batch":
        assert "batch shell got SIGUSR1" in first and f"found {run}/STOP" in first, first[-6000:]
    else:
        assert first.count("received SIGUSR1") >= 2, first[-6000:]  # both ranks
    saved_at = int(first.split("checkpoint saved at step ")[1].split(";")[0])
    assert f"requeueing job {job}" in first
    assert 2 * INTERVAL <= saved_at < STEPS
    steps = train_steps(run)
    assert steps[:saved_at] == list(range(1, saved_at + 1)), steps  # the first start stopped at the saved step
    assert resumed_at(second) == saved_at  # graceful: not a single step is redone or lost
    assert steps == list(range(1, STEPS + 1)), steps
    assert_finished(run)


def test_scontrol_requeue_restarts_from_the_latest_checkpoint(slurm, tmp_path):
    run, logs = tmp_path / "run", tmp_path / "logs"
    job = submit(slurm, logs, f"train.steps={STEPS}", env=job_env(slurm, PHSA_RUN_DIR=run))
    log = logs / f"{JOB_NAME}-{job}.out"
    wait_for_step(slurm, job, run, 2 * INTERVAL + 5, log)
    slurm.run(["scontrol", "requeue", str(job)])  # Slurm terminates the job and queues it again
    out = finish(slurm, job, log)

    assert slurm.job(job)["Restarts"] == "1", out[-6000:]
    resumed = resumed_at(out.split("(restart 1)", 1)[1])
    steps = train_steps(run)
    restart = next((i for i in range(1, len(steps)) if steps[i] <= steps[i - 1]), None)
    killed_at = steps[restart - 1] if restart else resumed  # last step the first start logged
    assert killed_at - INTERVAL <= resumed <= killed_at, (killed_at, resumed, steps)
    assert steps[len(steps) - (STEPS - resumed):] == list(range(resumed + 1, STEPS + 1)), steps
    assert_finished(run)


def test_scancel_sigterm_to_every_process_of_the_job_saves_a_checkpoint_first(slurm, tmp_path):
    """scancel (and preemption) send SIGTERM to every process of the job: torchrun, the ranks and their
    checkpoint-writer helpers alike, then SIGKILL after KillWait. The ranks still save after their step."""
    run, logs = tmp_path / "run", tmp_path / "logs"
    job = submit(slurm, logs, "train.steps=500", "checkpoint.interval=1000", env=job_env(slurm, PHSA_RUN_DIR=run))
    log = logs / f"{JOB_NAME}-{job}.out"
    wait_for_step(slurm, job, run, 5, log)
    slurm.run(["scancel", str(job)])
    slurm.wait(job, {"CANCELLED", "COMPLETED", "FAILED"}, timeout=120)
    deadline = time.time() + 60  # the job is CANCELLED at once; its processes finish their step and save
    while time.time() < deadline and not (run / "checkpoints" / ckpt.TRACKER).exists():
        time.sleep(0.5)
    out = _read(log)
    assert out.count("received SIGTERM") >= 2, out[-6000:]  # both ranks
    last = train_steps(run)[-1]
    assert ckpt.newest_verified(run / "checkpoints") == (last, []), out[-6000:]
    assert not list((run / "checkpoints").glob("*.tmp"))


def test_hydra_multirun_through_submitit(slurm, tmp_path):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="pip install -e '.[slurm]'")
    sweep = tmp_path / "sweep"
    env = job_env(slurm, PHSA_SWEEP_DIR=sweep, PHSA_SWEEP_GROUP="slurmtest-sweep")
    cmd = ["bash", "launch/sweep.sh", "hydra.launcher.tasks_per_node=2", "hydra.launcher.gpus_per_node=0",
           "hydra.launcher.cpus_per_task=1", "hydra.launcher.timeout_min=10", *TRAIN, "train.steps=20",
           "train.lr=1e-3,3e-3"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-6000:]
    wandb_ids = set()
    for num, lr in enumerate((1e-3, 3e-3)):
        run = sweep / str(num)
        assert train_steps(run) == list(range(1, 21)), (run, list(sweep.rglob("*"))[:50])
        assert (run / "checkpoints" / "latest_checkpointed_iteration.txt").read_text() == "20"
        rows = read_metrics(run)
        assert max(r["train/lr"] for r in rows if "train/lr" in r) == pytest.approx(lr)
        group, run_id = wandb_run_group(run)
        assert group == "slurmtest-sweep"
        wandb_ids.add(run_id)
    assert len(wandb_ids) == 2  # one W&B run per job
    assert len(list((sweep / ".submitit").glob("*/*_log.out"))) >= 2  # submitit's per-task logs


def wandb_run_group(run_dir: Path) -> tuple[str, str]:
    """(group, run id) of the W&B offline run in ``run_dir``, read from its ``run`` record."""
    from wandb.proto import wandb_internal_pb2

    from tests.wandb_reader import _payloads, find_run_file

    for payload in _payloads(find_run_file(run_dir).read_bytes()):
        rec = wandb_internal_pb2.Record()
        rec.ParseFromString(payload)
        if rec.WhichOneof("record_type") == "run":
            return rec.run.run_group, rec.run.run_id
    raise AssertionError(f"no run record in {run_dir}")
