"""The sparsity schedule: values at phase boundaries, purity (resume), and rejected combinations."""
import pytest

from phsa_train.config import ConfigError
from phsa_train.training.curriculum import (LossSpikeDetector, Schedule, SparsityState, build_curriculum,
                                            sparsity_at_step)
from tests.helpers import compose

PAPER_32K = dict(seq_len=32768, block_size=16, n_init=128, local_window=512)


def test_default_curriculum_reaches_97_3_percent_at_32k():
    cfg = compose(["attention=phsa", "curriculum=dense_warmup_to_97", "model=qwen3_0.6b", "data.seq_len=32768"])
    c = build_curriculum(cfg)
    w, r = cfg.curriculum.warmup_steps, cfg.curriculum.ramp_steps
    assert c.sparsity_at_step(0).phase == "dense" and c.sparsity_at_step(w - 1).dense
    first_ramp = c.sparsity_at_step(w)
    assert first_ramp.phase == "ramp" and first_ramp.activation_ratio == pytest.approx(1.0, abs=1e-3)
    hold = c.sparsity_at_step(w + r)
    assert hold.phase == "hold" and hold.train_topk == 16 and not hold.dense
    assert 1 - hold.activation_ratio == pytest.approx(0.9727, abs=1e-4)
    assert c.sparsity_at_step(10**6) == hold


@pytest.mark.parametrize("shape", ["linear", "cosine", "step"])
def test_ramp_is_monotone_and_ends_at_target(shape):
    s = Schedule(**PAPER_32K, warmup_steps=10, ramp_steps=100, shape=shape, target_topk=4).validate()
    ks = [sparsity_at_step(i, s).train_topk for i in range(10, 111)]
    assert ks == sorted(ks, reverse=True) and ks[-1] == 4
    assert sparsity_at_step(109, s).phase == "ramp" and sparsity_at_step(110, s).phase == "hold"
    if shape == "step":
        assert len(set(ks[:-1])) == s.num_step_levels


def test_linear_midpoint_and_dense_fallback():
    s = Schedule(**PAPER_32K, warmup_steps=0, ramp_steps=100, shape="linear", target_topk=16,
                 dense_fallback_activation=0.5).validate()
    mid = sparsity_at_step(50, s)
    assert mid.activation_ratio == pytest.approx((1 + s.budget(16)) / 2, abs=s.block_size / s.seq_len)
    assert mid.dense is (mid.activation_ratio > 0.5)
    assert sparsity_at_step(0, s).dense and not sparsity_at_step(99, s).dense


def test_schedule_is_a_pure_function_of_the_step():
    s = Schedule(**PAPER_32K, warmup_steps=5, ramp_steps=40, target_activation=0.05).validate()
    straight = [sparsity_at_step(i, s) for i in range(60)]
    resumed = [sparsity_at_step(i, s) for i in range(23)] + [sparsity_at_step(i, s) for i in range(23, 60)]
    assert straight == resumed


def test_paper_constant_strategy():
    c = build_curriculum(compose(["attention=phsa", "curriculum=constant", "data.seq_len=1024"]))
    s = c.sparsity_at_step(0)
    assert (s.phase, s.train_topk, s.eval_topk, s.dense) == ("hold", 2, 4, False)


@pytest.mark.parametrize("overrides,expected", [
    (["curriculum=none", "attention.train_topk=2"], [(2, 2)] * 3),  # null: the training top-k
    (["curriculum=none", "attention.train_topk=2", "attention.eval_topk=4"], [(2, 4)] * 3),
    (["curriculum=linear", "curriculum.warmup_steps=1", "curriculum.ramp_steps=1", "curriculum.target_activation=null",
      "curriculum.target_topk=2"], [(64, 64), (24, 24), (2, 2)]),  # null follows the schedule, warm-up included
    (["curriculum=linear", "curriculum.warmup_steps=1", "curriculum.ramp_steps=1", "curriculum.target_activation=null",
      "curriculum.target_topk=2", "attention.eval_topk=4"], [(64, 4), (24, 4), (2, 4)]),
])
def test_one_eval_topk_knob_with_and_without_a_schedule(overrides, expected):
    c = build_curriculum(compose(["attention=phsa", "data.seq_len=1024", *overrides]))
    assert [(s.train_topk, s.eval_topk) for s in map(c.sparsity_at_step, range(3))] == expected


def test_dense_model_has_no_schedule():
    assert build_curriculum(compose(["attention=dense"])).sparsity_at_step(3).metrics() == {}


@pytest.mark.parametrize("kwargs,msg", [
    (dict(target_topk=0), "curriculum.target_topk=0"),
    (dict(target_topk=3000), "curriculum.target_topk=3000"),
    (dict(target_topk=4, target_activation=0.1), "exactly one"),
    (dict(), "exactly one"),
    (dict(target_activation=0.001), "curriculum.target_activation"),
    (dict(target_topk=16, ramp_steps=10, ramp_start_activation=0.01), "ramp ends above its start"),
    (dict(target_topk=4, shape="exp"), "curriculum.shape"),
    (dict(target_topk=4, eval_topk=-1), "attention.eval_topk=-1 must be >= 0"),
    (dict(target_topk=4, eval_topk=3000), "attention.eval_topk=3000 is larger than the number of blocks"),
    (dict(target_topk=4, warmup_steps=-1), "curriculum.warmup_steps"),
])
def test_invalid_schedules_are_rejected(kwargs, msg):
    with pytest.raises(ConfigError, match=msg):
        Schedule(**PAPER_32K, **kwargs).validate()


def test_loss_spike_flagged_only_after_a_phase_change():
    d = LossSpikeDetector(factor=1.5)
    flags = [d.update(i, "dense", 2.0) for i in range(10)]
    flags += [d.update(10, "ramp", 4.0), d.update(11, "ramp", 2.1), d.update(50, "ramp", 9.0)]
    assert flags == [False] * 10 + [True, False, False]


def test_console_shows_the_eval_topk_when_it_differs_from_the_training_one():
    hold = SparsityState("hold", train_topk=2, eval_topk=4, dense=False, activation_ratio=0.25)
    assert hold.console() == " | hold: k=2 (eval k=4), sparsity 75.0%"
    assert "eval" not in SparsityState("hold", 4, 4, False, 0.5).console()
