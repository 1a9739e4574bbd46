"""Faults met the way a user meets them, through the real launcher (torchrun, 2 gloo ranks, W&B offline):
SIGTERM, damaged checkpoints, a diverging loss, a full or read-only disk, a finished run started again.
(kill -9 of the launcher, orphans and the run-dir lock: tests/training/test_train_e2e.py.)"""
import shutil
import signal
import subprocess
import time

import pytest

from phsa_train.training import checkpoint as ckpt
from phsa_train.training.metrics import read_metrics
from tests.helpers import finish, launch

pytestmark = pytest.mark.slow


def train_steps(run):
    return [r["step"] for r in read_metrics(run) if "train/loss" in r]


def wait_for_step(run, step, proc, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if train_steps(run) and train_steps(run)[-1] >= step:
            return
        assert proc.poll() is None, proc.stdout.read()[-4000:]
        time.sleep(0.2)
    raise AssertionError(f"step {step} not reached")


def test_sigterm_to_the_launcher_saves_then_stops_in_one_line(tmp_path, cache_dir):
    run = tmp_path / "run"
    proc = launch(run, "train.steps=500", "train.eval_interval=0", "checkpoint.interval=1000", cache_dir=cache_dir)
    wait_for_step(run, 3, proc)
    proc.send_signal(signal.SIGTERM)  # what scancel / preemption / `kill` send; the launcher is torchrun (exec)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, out[-4000:]
    last = train_steps(run)[-1]
    assert f"saved checkpoint step {last}" in out and last < 500, out[-4000:]
    assert ckpt.newest_verified(run / "checkpoints") == (last, [])
    assert not list((run / "checkpoints").glob("*.tmp")), list((run / "checkpoints").iterdir())
    assert "Traceback" not in out and out.rstrip().endswith("the ranks checkpointed first (see above)"), out[-3000:]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, cache_dir):
    run = tmp_path_factory.mktemp("finished") / "run"
    out = finish(launch(run, "train.steps=4", "train.eval_interval=2", "checkpoint.interval=2", cache_dir=cache_dir))
    return run, out


def test_a_finished_run_ends_with_a_summary_and_a_rerun_says_it_is_complete(finished_run, cache_dir):
    run, out = finished_run
    tail = out[out.index("[phsa_train] done at step 4/4"):]
    for what in ("valid loss", "ppl", "tok/s", f"checkpoints  {run}/checkpoints", f"{run}/loss.png",
                 f"{run}/wandb/offline-run-", f"python -m phsa_train.eval eval.checkpoint={run}/checkpoints"):
        assert what in tail, tail
    log = (run / "train.log").read_text()
    assert "step      4/4" in log and "[phsa_train] done at step 4/4" in log and "matplotlib" not in log, log[-2000:]

    again = finish(launch(run, "train.steps=4", "train.eval_interval=2", "checkpoint.interval=2",
                          cache_dir=cache_dir))
    assert f"[phsa_train] run complete: step 4/4 is checkpointed; outputs in {run}" in again, again[-2000:]
    assert "loss" not in again.split("run complete")[0].split("run dir")[-1] and train_steps(run) == [1, 2, 3, 4]


def test_another_run_in_a_finished_run_dir_is_refused_in_one_line(finished_run, cache_dir):
    """One run per run dir: a start with another learning rate finds that run's checkpoints and stops with one
    line (exit 2) before it builds a model; the run dir keeps its run (raising train.steps alone would resume it)."""
    run, _ = finished_run
    proc = launch(run, "train.steps=6", "train.eval_interval=2", "checkpoint.interval=2", "train.lr=1e-2",
                  cache_dir=cache_dir)
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode == 2, out[-3000:]
    errors = [line for line in out.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, out[-3000:]
    assert errors[0].startswith(f"error: {run}/checkpoints/iter_0000004 belongs to another run: it was trained with "
                                "train.lr=") and "(now 0.01)" in errors[0], errors
    assert "Traceback" not in out and train_steps(run) == [1, 2, 3, 4] and ckpt.latest_step(run / "checkpoints") == 4


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip_a_bit(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))


DAMAGE = {  # what happens to the newest checkpoint -> what the one line says about it
    "truncated shard": (lambda d: _truncate(d / "__0_0.distcp"), "iter_0000004: __0_0.distcp has"),
    "deleted .metadata": (lambda d: (d / ".metadata").unlink(), "iter_0000004: .metadata is missing"),
    "truncated rank_00000.pt": (lambda d: _truncate(d / "rank_00000.pt"), "iter_0000004: rank_00000.pt has"),
    "deleted rank_00001.pt": (lambda d: (d / "rank_00001.pt").unlink(), "iter_0000004: rank_00001.pt is missing"),
    "bit rot in a shard": (lambda d: _flip_a_bit(d / "__0_1.distcp"),
                           "iter_0000004: __0_1.distcp does not match its checksum"),
    "deleted manifest": (lambda d: (d / "manifest.json").unlink(), "iter_0000004: manifest.json missing"),
}


@pytest.mark.parametrize("case", DAMAGE)
def test_a_damaged_newest_checkpoint_is_skipped_with_its_reason(finished_run, tmp_path, case):
    root = tmp_path / "checkpoints"
    shutil.copytree(finished_run[0] / "checkpoints", root)
    assert ckpt.newest_verified(root) == (4, [])
    damage, reason = DAMAGE[case]
    damage(root / "iter_0000004")
    step, notes = ckpt.newest_verified(root)
    assert step == 2 and len(notes) == 1 and notes[0].startswith(reason), notes


def test_garbage_in_the_tracker_is_ignored(finished_run, tmp_path):
    root = tmp_path / "checkpoints"
    shutil.copytree(finished_run[0] / "checkpoints", root)
    (root / ckpt.TRACKER).write_text("garbage")
    assert ckpt.latest_step(root) == 4
    assert ckpt.newest_verified(root) == (4, [f"{ckpt.TRACKER} holds 'garbage', not a step (ignored)"])


def test_resume_past_bit_rot_replays_from_the_good_checkpoint_and_logs_each_step_once(finished_run, tmp_path,
                                                                                       cache_dir):
    run = tmp_path / "run"
    shutil.copytree(finished_run[0], run, ignore=shutil.ignore_patterns(".lock"))
    _flip_a_bit(run / "checkpoints" / "iter_0000004" / "__0_0.distcp")
    out = finish(launch(run, "train.steps=6", "train.eval_interval=2", "checkpoint.interval=2", cache_dir=cache_dir))
    assert ("[phsa_train] resuming from iter_0000002, skipped: iter_0000004: __0_0.distcp does not match its "
            "checksum") in out, out[-3000:]
    assert "resumed at step 2" in out
    assert train_steps(run) == [1, 2, 3, 4, 5, 6]  # steps 3-4 replayed, logged once


def test_non_finite_loss_skips_at_most_max_skipped_steps_then_stops_in_one_line(tmp_path, cache_dir):
    run = tmp_path / "run"
    proc = launch(run, "train.lr=1e30", "train.warmup_steps=1", "train.steps=20", "train.eval_interval=0",
                  "train.max_skipped_steps=2", cache_dir=cache_dir)  # a learning rate that blows the weights up
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode == 2, out[-3000:]
    assert out.count("update skipped (") == 2, out[-3000:]
    errors = [line for line in out.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "stopping (3 such steps > train.max_skipped_steps=2)" in errors[0], out[-3000:]
    assert "Traceback" not in out and "ChildFailedError" not in out, out[-3000:]


@pytest.fixture
def small_disk(tmp_path):
    """A 28 MB tmpfs: room for one checkpoint of the test model (18.5 MB), not two. Needs mount rights."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=28m", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root); the disk-full test runs in CI's container")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_a_full_disk_at_save_is_one_line_and_the_previous_checkpoint_stays_intact(tmp_path, cache_dir, small_disk):
    root = small_disk / "checkpoints"
    proc = launch(tmp_path / "run", "train.steps=6", "train.eval_interval=0", "checkpoint.interval=2",
                  f"checkpoint.dir={root}", cache_dir=cache_dir)
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode == 2, out[-3000:]
    errors = [line for line in out.splitlines() if line.startswith("error: ")]
    assert errors and set(errors) == {f"error: cannot write checkpoint step 4 to {root}/iter_0000004.tmp: No space "
                                      "left on device; iter_0000002 is intact"}, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    assert ckpt.newest_verified(root) == (2, [])


def test_an_unwritable_checkpoint_dir_is_one_line_at_start_up(small_disk):
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    with pytest.raises(ckpt.CheckpointError) as e:
        ckpt.check_writable(small_disk / "checkpoints")
    assert str(e.value) == (f"checkpoint directory {small_disk}/checkpoints is not writable: Read-only file system "
                            "(checkpoint.dir to choose another)")
