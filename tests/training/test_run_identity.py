"""One run per run dir: which config changes a resume accepts (no training here; test_faults.py starts one)."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from phsa_train.config import ConfigError, compose
from phsa_train.training.run_identity import check_same_run, run_differences


@pytest.fixture(scope="module")
def saved() -> dict:
    return OmegaConf.to_container(compose(["attention=phsa", "train.steps=100"]), resolve=True)


@pytest.mark.parametrize("key, value", [
    ("train.steps", 200), ("train.exit_after_steps", 50), ("train.micro_batch_size", 1),
    ("attention.backend", "triton"),
    ("data.prefixes", ["/elsewhere/corpus"]), ("data.cache_dir", "/elsewhere/cache"), ("train.eval_interval", 7),
    ("curriculum.stats_interval", 5)])
def test_a_resume_may_change_how_long_where_and_how_it_is_computed(saved, key, value):
    now = copy.deepcopy(saved)
    section, name = key.split(".")
    now[section][name] = value
    assert run_differences(saved, now) == []
    check_same_run(Path("ckpt"), saved, now)


@pytest.mark.parametrize("key, value", [
    ("attention.lam", 1.0), ("attention.name", "meanpool"), ("model.num_layers", 3), ("train.seed", 7),
    ("train.lr", 1.0), ("train.global_batch_size", 64), ("data.seq_len", 128), ("curriculum.warmup_steps", 9)])
def test_another_run_is_refused_in_one_line_naming_the_setting(saved, key, value):
    now = copy.deepcopy(saved)
    section, name = key.split(".")
    old, now[section][name] = now[section][name], value
    with pytest.raises(ConfigError) as e:
        check_same_run(Path("runs/x/checkpoints/iter_0000050"), saved, now)
    msg = str(e.value)
    assert "\n" not in msg and f"{key}={old!r} (now {value!r})" in msg, msg
    assert msg.startswith("runs/x/checkpoints/iter_0000050 belongs to another run") and "PHSA_RUN_DIR" in msg


def test_a_knob_newer_than_the_checkpoint_is_not_compared(saved):
    old = copy.deepcopy(saved)
    del old["attention"]["score"]
    assert run_differences(old, saved) == []
