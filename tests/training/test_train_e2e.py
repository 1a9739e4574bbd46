"""End-to-end: the real launcher, real torchrun (2 gloo ranks), real data, W&B offline, checkpoints."""
import os
import signal
import socket
import subprocess
import time

import psutil
import pytest

from phsa_train.training.metrics import read_metrics
from tests.helpers import REPO, finish, launch

# One uninterrupted run serves both tests: what a run writes, and the reference a killed + resumed run must match.
RUN = ["train.steps=60", "train.eval_interval=30", "checkpoint.interval=10"]


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory, cache_dir):
    run = tmp_path_factory.mktemp("straight") / "run"
    return run, finish(launch(run, *RUN, cache_dir=cache_dir))


@pytest.mark.slow
def test_demo_trains_and_writes_everything(straight_run):
    run, out = straight_run
    rows = read_metrics(run)
    valid = [r["valid/loss"] for r in rows if "valid/loss" in r]
    assert len(valid) == 3 and valid[-1] < valid[0] - 0.5, valid
    assert [r["step"] for r in rows if "train/loss" in r] == list(range(1, 61))
    assert (run / "checkpoints" / "iter_0000060" / "meta.json").exists()
    assert (run / "checkpoints" / "latest_checkpointed_iteration.txt").read_text() == "60"
    assert list((run / "wandb").glob("offline-run-*/run-*.wandb")), "no W&B offline run"
    assert (run / "loss.png").stat().st_size > 10_000
    assert "step     60/60" in out and "tok/s" in out


@pytest.mark.slow
def test_sigkill_then_restart_resumes_and_matches_uninterrupted(tmp_path, cache_dir, straight_run):
    run = tmp_path / "killed"
    proc = launch(run, *RUN, cache_dir=cache_dir)
    deadline = time.time() + 300
    while time.time() < deadline:
        steps = [r["step"] for r in read_metrics(run) if "train/loss" in r]
        if steps and steps[-1] >= 25:
            break
        time.sleep(0.2)
    second = launch(run, *RUN, cache_dir=cache_dir)  # a second run on the live run dir is refused
    out = second.communicate(timeout=60)[0]
    assert second.returncode == 2 and out.strip() == (f"error: run dir {run} is in use by a live run (pid {proc.pid} "
                                                      f"on {socket.gethostname()}); wait for it, stop it, or choose "
                                                      "another PHSA_RUN_DIR"), out
    family = psutil.Process(proc.pid).children(recursive=True)  # ranks, their checkpoint writers, W&B
    assert len(family) >= 4, family
    os.kill(proc.pid, signal.SIGKILL)  # the launcher (torchrun) only: its ranks die with it, as in a node crash
    proc.wait()
    _, alive = psutil.wait_procs(family, timeout=10)
    assert not alive, [(p.pid, p.cmdline()[:4]) for p in alive]  # no orphan trains on or lingers
    assert subprocess.run(["flock", "-n", str(run / ".lock"), "true"]).returncode == 0  # its lock died with it
    assert (run / "checkpoints" / "latest_checkpointed_iteration.txt").exists()
    killed_at = [r["step"] for r in read_metrics(run) if "train/loss" in r][-1]
    assert killed_at < 60

    out = finish(launch(run, *RUN, cache_dir=cache_dir))
    resumed_from = int(out.split("resumed at step ")[1].split()[0].rstrip(","))
    assert killed_at - 10 <= resumed_from <= killed_at and resumed_from % 10 == 0
    steps = [r["step"] for r in read_metrics(run) if "train/loss" in r]
    assert steps == list(range(1, 61)), steps  # the replayed steps are logged once: the log reads like one run
    final = {r["step"]: r["train/loss"] for r in read_metrics(run) if "train/loss" in r}
    ref = {r["step"]: r["train/loss"] for r in read_metrics(straight_run[0]) if "train/loss" in r}
    assert max(final) == 60
    for step in range(resumed_from + 1, 61):  # same data, weights, optimizer and RNG -> same losses
        assert final[step] == pytest.approx(ref[step], rel=1e-5), step


def test_default_run_dir_name_is_a_valid_hydra_value():
    """The launcher derives the run dir from the overrides; Hydra must accept it as hydra.run.dir."""
    script = f'source <(sed -n "/^run_name()/,/^}}/p" {REPO}/launch/pretrain.sh); run_name "$@"'
    name = subprocess.run(["bash", "-c", script, "_", "+experiment=cpu_demo", "data.prefixes=[/a/b]"],
                          capture_output=True, text=True, check=True).stdout.strip()
    assert name.startswith("experiment_cpu_demo_data.prefixes") and set(name) <= set(
        "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-")
