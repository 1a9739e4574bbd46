"""Config composition and the one-line, knob-naming errors for bad input."""
import itertools
import subprocess
import sys

import pytest

from phsa_train.config import ConfigError, validate
from tests.helpers import REPO, compose, subprocess_env

MODELS = ["tiny", "small", "qwen3_0.6b", "qwen3_8b"]
ATTENTIONS = ["dense", "phsa", "meanpool"]
PARALLEL = {"single": 1, "tp2": 2, "cp2": 2, "tp2_cp2": 4}


@pytest.mark.parametrize("model,attention,parallel", list(itertools.product(MODELS, ATTENTIONS, PARALLEL)))
def test_every_combination_composes_and_validates(model, attention, parallel):
    cfg = compose([f"model={model}", f"attention={attention}", f"parallel={parallel}", "data.seq_len=1024",
                   "train.global_batch_size=16", "attention.train_topk=2", "attention.eval_topk=4"])
    validate(cfg, world_size=PARALLEL[parallel] * 2)


def test_saved_config_of_an_older_run_moves_its_eval_topk_to_attention():
    from phsa_train.config.schema import upgrade_saved_config

    def saved(curriculum, eval_topk):
        return {"attention": {"eval_topk": 16}, "curriculum": {"name": curriculum, "eval_topk": eval_topk}}

    assert upgrade_saved_config(saved("constant", 4)) == {"attention": {"eval_topk": 4},
                                                          "curriculum": {"name": "constant"}}
    assert upgrade_saved_config(saved("linear", None))["attention"] == {"eval_topk": None}
    assert upgrade_saved_config(saved("none", None))["attention"] == {"eval_topk": 16}  # none used attention's


def test_meanpool_is_phsa_with_lam_one():
    cfg = compose(["attention=meanpool"])
    assert cfg.attention.lam == 1.0 and cfg.attention.name == "meanpool" and cfg.attention.block_size == 16


def test_typo_in_a_knob_fails_at_compose_time():
    with pytest.raises(Exception, match="hiden_size"):
        compose(["model.hiden_size=64"])


@pytest.mark.parametrize("overrides,world,knob", [
    (["attention.name=sparse9"], 1, "attention.name"),
    (["parallel.tensor_model_parallel_size=3"], 3, "num_attention_heads"),
    (["parallel.tensor_model_parallel_size=2"], 3, "world size 3"),
    (["parallel.context_parallel_size=2", "data.seq_len=250"], 2, "data.seq_len"),
    (["data.seq_len=4096"], 1, "model.max_position_embeddings"),
    (["attention=phsa", "data.seq_len=250"], 1, "attention.block_size"),
    (["attention=phsa", "attention.local_window=8"], 1, "attention.local_window"),
    (["attention=phsa", "attention.train_topk=-1"], 1, "attention.train_topk"),
    (["attention=phsa", "attention.n_init=16", "attention.local_window=32", "attention.train_topk=64"], 1,
     "larger than the number of blocks"),
    (["attention=phsa", "attention.score=max"], 1, "attention.score"),
    (["attention=phsa", "attention.backend=cuda"], 1, "attention.backend"),
    (["parallel.context_parallel_size=2", "parallel.cp_mode=ulysses", "model.num_query_groups=1"], 2, "ulysses"),
    (["train.global_batch_size=6"], 4, "train.global_batch_size"),
    (["model.transformer_impl=te"], 1, "model.transformer_impl"),
])
def test_bad_config_names_the_knob(overrides, world, knob):
    cfg = compose(overrides)
    with pytest.raises(ConfigError, match=knob.replace(".", r"\.")):
        validate(cfg, world_size=world)


def _run_train(*overrides):
    return subprocess.run([sys.executable, "-m", "phsa_train.train", *overrides], cwd=REPO, env=subprocess_env(),
                          capture_output=True, text=True, timeout=300)


def test_cli_unknown_model_lists_the_options():
    proc = _run_train("model=gpt5")
    assert proc.returncode != 0
    assert "Could not find 'model/gpt5'" in proc.stderr and "tiny" in proc.stderr


def test_cli_bad_config_is_one_line_exit_2(tmp_path):
    proc = _run_train("attention=phsa", "attention.local_window=4", f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "error: attention.local_window=4 must be >= attention.block_size=16" in proc.stdout
    assert "Traceback" not in proc.stdout + proc.stderr


def test_cli_missing_data_path(tmp_path):
    proc = _run_train("data=megatron_bin", f"data.prefixes=[{tmp_path}/nope]", f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "data.prefixes" in proc.stdout and "nope" in proc.stdout


def test_cli_help_lists_groups_and_knobs():
    proc = _run_train("--help")
    assert proc.returncode == 0
    for word in ("attention=dense|meanpool|phsa", "+experiment=cpu_demo", "dense_warmup_to_97", "train.steps"):
        assert word in proc.stdout, proc.stdout
    model_line = next(line for line in proc.stdout.splitlines() if line.startswith("model="))
    assert set(model_line[len("model="):].split("|")) == {f.stem for f in (REPO / "conf" / "model").glob("*.yaml")}
    assert "base_" not in proc.stdout.split("== Config (defaults) ==")[0]  # schema nodes are not user options


def test_eval_help_says_what_eval_does():
    proc = subprocess.run([sys.executable, "-m", "phsa_train.eval", "--help"], cwd=REPO, env=subprocess_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0
    for word in ("quality evaluation of a training checkpoint", "perplexity", "retrieval", "eval.checkpoint=RUN_DIR",
                 "eval.topks=", "eval.retrieval.samples="):
        assert word in proc.stdout, proc.stdout
