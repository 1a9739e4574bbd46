"""The curriculum in a real run: warm-up -> ramp -> hold, read back from W&B offline files and the console."""
import pytest

from phsa_train.training.curriculum import build_curriculum
from phsa_train.training.metrics import read_metrics
from tests.wandb_reader import find_run_file, read_history
from tests.helpers import compose
from tests.helpers import finish, launch

CURRICULUM = ["attention=phsa", "attention.n_init=16", "attention.local_window=16", "attention.eval_topk=4",
              "attention.backend=reference", "curriculum=linear", "curriculum.warmup_steps=6",
              "curriculum.ramp_steps=12", "curriculum.target_topk=1", "curriculum.target_activation=null",
              "curriculum.dense_fallback_activation=0.9", "curriculum.stats_interval=6", "curriculum.stats_queries=32",
              "train.steps=24", "train.eval_interval=0", "checkpoint.interval=4"]


def expected_schedule():
    cfg = compose(["model=tiny", "data.seq_len=128", *CURRICULUM])
    c = build_curriculum(cfg)
    return {s: c.sparsity_at_step(s - 1) for s in range(1, 25)}  # metrics row `step` is logged after step-1 ran


@pytest.mark.slow
def test_warmup_ramp_hold_switches_path_and_follows_schedule(tmp_path, cache_dir):
    run = tmp_path / "run"
    out = finish(launch(run, *CURRICULUM, cache_dir=cache_dir))
    expected = expected_schedule()
    history = {r["_step"]: r for r in read_history(find_run_file(run)) if "phsa/topk" in r}
    assert sorted(history) == list(range(1, 25))
    for step, state in expected.items():
        row = history[step]
        assert row["phsa/phase"] == state.phase and row["phsa/topk"] == state.train_topk, step
        assert row["phsa/eval_topk"] == state.eval_topk == 4, step  # attention.eval_topk holds under a schedule
        layers_x_micro = row["phsa/dense_calls"] + row["phsa/sparse_calls"]
        assert row["phsa/dense_calls" if state.dense else "phsa/sparse_calls"] == layers_x_micro > 0, step
    phases = [history[s]["phsa/phase"] for s in sorted(history)]
    assert phases[0] == "dense" and "ramp" in phases and phases[-1] == "hold"
    assert history[1]["phsa/dense_calls"] > 0 and history[24]["phsa/sparse_calls"] > 0
    assert [history[s]["phsa/topk"] for s in (19, 24)] == [1, 1]
    # selection statistics were computed in the dense warm-up too, with mean-pooling as the baseline
    stats = [r for r in read_metrics(run) if "phsa_stats/recall" in r]
    assert [r["step"] for r in stats] == [6, 12, 18, 24]
    assert all(0 < r["phsa_stats/recall"] <= 1 and 0 < r["phsa_stats/recall_meanpool"] <= 1 for r in stats)
    assert "phsa_stats/churn" in stats[-1]
    # the console shows the phase and the path
    assert "dense: dense path" in out and "hold: k=1" in out
    assert (run / "selection.png").exists() and (run / "loss.png").exists()


@pytest.mark.slow
def test_resume_mid_ramp_logs_the_same_sparsity_sequence(tmp_path, cache_dir):
    run = tmp_path / "run"
    finish(launch(run, *CURRICULUM, "train.exit_after_steps=10", cache_dir=cache_dir))  # stops mid-ramp
    first = read_metrics(run)
    assert max(r["step"] for r in first if "phsa/topk" in r) == 10
    finish(launch(run, *CURRICULUM, cache_dir=cache_dir))
    logged = {}
    for r in read_metrics(run):
        if "phsa/topk" in r:
            logged[r["step"]] = (r["phsa/phase"], r["phsa/topk"], r["phsa/activation_ratio"], r["phsa/dense"])
    expected = {s: (e.phase, e.train_topk, e.activation_ratio, float(e.dense)) for s, e in expected_schedule().items()}
    assert logged == expected
