"""Every bad value is one line: a table of bad overrides and the exact line each must print.

Most rows go through ``phsa_train.config.check.check`` in-process (what ``launch/pretrain.sh`` runs before
torchrun starts a rank); two go through the launcher itself, to show exit status 2 and no torchrun traceback.
"""
import subprocess

import pytest

from phsa_train.config.check import check
from tests.helpers import REPO, subprocess_env

PHSA = ["attention=phsa"]
NB = "the number of blocks data.seq_len // attention.block_size = 256 // 16"
MOVED = "curriculum.eval_topk is not a knob of this config; use attention.eval_topk (null = the current training top-k)"

# (overrides, world size, the exact message)
BAD = [
    (["model.num_layers=-1"], 1, "model.num_layers=-1 must be >= 1"),
    (["model.num_layers=0"], 1, "model.num_layers=0 must be >= 1"),
    (["model.num_query_groups=0"], 1, "model.num_query_groups=0 must be >= 1"),
    (["model.num_attention_heads=6", "model.num_query_groups=4"], 1,
     "model.num_attention_heads=6 is not divisible by model.num_query_groups=4"),
    (["parallel.tensor_model_parallel_size=3"], 3,
     "model.num_attention_heads=4 is not divisible by parallel.tensor_model_parallel_size=3"),
    (["train.global_batch_size=0"], 1, "train.global_batch_size=0 must be >= 1"),
    (["train.global_batch_size=6"], 4,
     "train.global_batch_size=6 is not divisible by train.micro_batch_size=4 x data-parallel size 4"),
    (["train.log_interval=0"], 1, "train.log_interval=0 must be >= 1"),
    (["train.eval_iters=0"], 1, "train.eval_iters=0 must be >= 1 (or train.eval_interval=0: no validation)"),
    (["train.min_lr=1.0"], 1, "train.min_lr=1.0 must be in [0, train.lr=0.003]"),
    (["train.steps=abc"], 1,
     "Error merging override train.steps=abc; Value 'abc' of type 'str' could not be converted to Integer"),
    (["+attention.topk=abc"], 1, "attention.topk is not a knob of this config; did you mean attention.eval_topk?"),
    (["model.hiden_size=64"], 1, "model.hiden_size is not a knob of this config; did you mean model.hidden_size?"),
    (["+train.stepz=5"], 1, "train.stepz is not a knob of this config; did you mean train.steps?"),
    (PHSA + ["attention.score=dot"], 1,
     "attention.score='dot' must be one of softmax_group_sum | dot_group_sum"),
    (PHSA + ["attention.eval_topk=100"], 1, f"attention.eval_topk=100 is larger than {NB} = 16"),
    (PHSA + ["curriculum=constant", "attention.eval_topk=100"], 1, f"attention.eval_topk=100 is larger than {NB} = 16"),
    (PHSA + ["curriculum=constant", "curriculum.target_topk=100"], 1,
     f"curriculum.target_topk=100 must be in [1, 16] ({NB})"),
    (PHSA + ["curriculum.eval_topk=4"], 1, MOVED),
    (PHSA + ["+curriculum.eval_topk=4"], 1, MOVED),
    (["parallel.context_parallel_size=2", "data.seq_len=250"], 2,
     "data.seq_len=250 must be divisible by 2 x parallel.context_parallel_size=4 (Megatron's load-balanced split)"),
    (PHSA + ["parallel.context_parallel_size=2", "data.seq_len=96", "attention.train_topk=2",
             "attention.eval_topk=2"], 2,
     "data.seq_len=96 must be divisible by 2 x parallel.context_parallel_size x attention.block_size = 64 for "
     "PHSA context parallelism"),
    (["parallel.cp_high_priority_stream=maybe"], 1,
     "Error merging override parallel.cp_high_priority_stream=maybe; Value 'maybe' is not a valid bool (type str)"),
    (["checkpoint.interval=0"], 1, "checkpoint.interval=0 must be >= 1"),
    (["data.split='90,10'"], 1, "data.split='90,10' must be three non-negative weights 'train,valid,test', e.g. 949,50,1"),
    (["data=megatron_bin", "data.prefixes=[/nonexistent/corpus]"], 1,
     "data.prefixes: /nonexistent/corpus.bin and /nonexistent/corpus.idx not found (data.prefixes=[P] names the "
     "P.bin/P.idx that `python -m data_prep --output-prefix P` writes)"),
    (["checkpoint.init_from=/nonexistent/ckpt"], 1, "checkpoint.init_from=/nonexistent/ckpt: no such directory"),
]


@pytest.mark.parametrize("overrides,world,message", BAD, ids=[" ".join(o) for o, _, _ in BAD])
def test_bad_override_is_one_exact_line(overrides, world, message):
    assert check(overrides, world) == message


def test_missing_tokenizer_beside_the_data_is_one_line(tmp_path):
    prefix = tmp_path / "corpus"
    for ext in (".bin", ".idx", "_punct.json"):
        (tmp_path / f"corpus{ext}").write_bytes(b"")
    assert check(["data=megatron_bin", f"data.prefixes=[{prefix}]"], 1) == (
        f"data.tokenizer is not set and there is no {prefix}_tokenizer.json (written by data_prep --tokenizer "
        "train) nor tokenizer.json beside it; set data.tokenizer=<the tokenizer data_prep used>")
    (tmp_path / "corpus_tokenizer.json").write_text("{}")
    assert check(["data=megatron_bin", f"data.prefixes=[{prefix}]"], 1) is None


@pytest.mark.parametrize("overrides,message", [
    (["model.num_layers=0"], "error: model.num_layers=0 must be >= 1"),
    (["attention=phsa", "attention.score=dot"],
     "error: attention.score='dot' must be one of softmax_group_sum | dot_group_sum"),
])
def test_launcher_exits_2_with_the_line_before_torchrun(tmp_path, overrides, message):
    proc = subprocess.run(["bash", "launch/pretrain.sh", *overrides], cwd=REPO, capture_output=True, text=True,
                          env=subprocess_env(PHSA_RUN_DIR=tmp_path / "run", NPROC=2), timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.strip() == message and proc.stdout == ""  # no torchrun start, no traceback
