"""phsa_train.eval and phsa_train.evaluation.retrieval on CPU: hand-made cases, the retrieval data mix, and the CLI end to
end on a tiny PHSA checkpoint trained here by the real launcher (about 1.5 min on 2 cores in all)."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from phsa_train.evaluation.retrieval import Fact, make_sample, random_fact, score_answers
from tests.helpers import REPO, subprocess_env
from tests.helpers import finish, launch

SEQ, NB = 128, 8  # tiny checkpoint: 128 tokens = 8 blocks of 16


class CharTokenizer:
    """Stub tokenizer: one id per character, ids 3..258 (0 = EOD), never colliding with haystack ids >= 1000."""

    eod = 0

    def tokenize(self, text: str) -> list[int]:
        return [3 + (ord(c) % 256) for c in text]


def _fact() -> Fact:
    return random_fact(np.random.default_rng(0), CharTokenizer(), "kv", 5)


# ------------------------------------------------------------------------------------------ hand-made cases


@pytest.mark.parametrize("depth", [0.0, 0.3, 0.5, 1.0])
def test_planted_fact_is_where_the_generator_says(depth):
    fact, length = _fact(), 400
    hay = np.arange(1000, 2000)
    s = make_sample(hay, fact, length, depth)
    n = length - fact.overhead
    assert len(s.tokens) == length and s.needle_start == round(depth * n)
    assert s.tokens[s.needle_start:s.needle_end].tolist() == list(fact.needle)
    assert s.tokens[:s.needle_start].tolist() == hay[:s.needle_start].tolist()  # real text before ...
    assert s.tokens[s.needle_end:s.needle_end + n - s.needle_start].tolist() == hay[s.needle_start:n].tolist()
    q0 = s.needle_end + n - s.needle_start  # ... and after it, then the query and the answer end the sample
    assert s.tokens[q0:s.answer_start].tolist() == list(fact.query)
    assert s.tokens[s.answer_start:].tolist() == list(fact.answer) and s.answer_start == length - len(fact.answer)
    assert fact.value in "".join(chr(t - 3) for t in fact.answer) and fact.key in "".join(chr(t - 3) for t in fact.query)
    with pytest.raises(ValueError, match="cannot hold the fact"):
        make_sample(hay, fact, fact.overhead - 1, depth)


def _oracle_logits(tokens: torch.Tensor, vocab: int, wrong_at=()) -> torch.Tensor:
    """Logits whose argmax at t is tokens[t + 1] (a model that 'outputs the answer'), off at ``wrong_at``."""
    b, L = tokens.shape
    logits = torch.zeros(b, L, vocab)
    nxt = torch.cat([tokens[:, 1:], tokens[:, :1]], 1)
    logits.scatter_(2, nxt[..., None], 20.0)
    for t in wrong_at:
        logits[:, t] = 0
        logits[:, t, (nxt[0, t] + 1) % vocab] = 20.0
    return logits


def test_scorer_is_one_on_the_answer_and_zero_otherwise():
    fact = _fact()
    s = make_sample(np.arange(1000, 1300), fact, 300, 0.5)
    tokens = torch.as_tensor(s.tokens)[None]
    a, start = s.answer_len, s.answer_start
    right = score_answers(_oracle_logits(tokens, 2000), tokens, start, a)
    assert right["exact_match"] == [1.0] and right["token_accuracy"] == [1.0] and right["answer_logprob"][0] > -1e-3
    one_off = score_answers(_oracle_logits(tokens, 2000, wrong_at=[start]), tokens, start, a)
    assert one_off["exact_match"] == [0.0] and one_off["token_accuracy"][0] == pytest.approx((a - 1) / a)
    # the prediction for the last answer token is made at start + a - 2; position L-1 predicts nothing
    assert score_answers(_oracle_logits(tokens, 2000, wrong_at=[299]), tokens, start, a)["exact_match"] == [1.0]
    wrong = score_answers(_oracle_logits(tokens, 2000, wrong_at=range(start - 1, 300)), tokens, start, a)
    assert wrong["exact_match"] == [0.0] and wrong["token_accuracy"] == [0.0]


def test_retrieval_grid_scores_an_oracle_model_one_and_a_blind_one_zero():
    from phsa_train.evaluation.evaluate import RetrievalConfig, TopKPlan, retrieval_eval, retrieval_set

    vocab = 2100
    data = SimpleNamespace(valid=[{"tokens": np.arange(1000, 1000 + SEQ) + i} for i in range(5)], eod=0,
                           punct_lut=torch.zeros(vocab, dtype=torch.bool), tokenizer=CharTokenizer())
    cfg = OmegaConf.create({"data": {"seq_len": 256, "reset_attention_mask": False},
                            "model": {"max_position_embeddings": 512}})
    rc = OmegaConf.structured(RetrievalConfig(lengths=[120, 256], samples=3, batch_size=2))
    rs = retrieval_set(data, cfg, rc)
    assert rs.lengths == [120, 256] and all(len(h) == 256 for h in rs.haystacks)
    oracle = lambda tokens, *a, **k: _oracle_logits(tokens, vocab)  # noqa: E731
    blind = lambda tokens, *a, **k: torch.zeros(*tokens.shape, vocab)  # noqa: E731  argmax = id 0, never an answer
    for model, want in ((oracle, 1.0), (blind, 0.0)):
        model.eval = lambda: None
        (row,) = retrieval_eval(model, data, cfg, "cpu", TopKPlan(None, None, "off", []), rc, rs)
        assert row["topk"] is None and np.shape(row["exact_match"]) == (2, 5)
        assert np.all(np.asarray(row["exact_match"]) == want) and row["exact_match_mean"] == want


def test_recall_is_one_when_topk_covers_everything():
    from phsa_train.evaluation.selection_stats import layer_recall, probe_positions

    a = OmegaConf.create({"block_size": 16, "n_init": 16, "local_window": 32, "query_block": 1,
                          "score": "softmax_group_sum", "lam": 0.5})
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, SEQ, 4, 32, generator=g) * 3, torch.randn(1, SEQ, 2, 32, generator=g) * 3
    pm = torch.rand(1, SEQ, generator=g) < 0.2
    pos = probe_positions(SEQ, a, 64)
    assert pos.min() == 48 and pos.max() == SEQ - 1  # first query with an eligible block: w + m
    for lam in (0.5, 1.0):
        assert layer_recall(q, k, pm, a, NB, lam, pos)[0] == pytest.approx(1.0, abs=1e-6)
        assert layer_recall(q, k, pm, a, 1, lam, pos)[0] < 0.99


# ------------------------------------------------------------------------------------- retrieval data mix


def test_retrieval_mix_is_deterministic_and_plants_real_text(tmp_path, cache_dir):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from phsa_train.data import MegatronTokenizer, prepare_default_corpus
    from phsa_train.evaluation.retrieval import write_retrieval_mix

    base = prepare_default_corpus(Path(cache_dir) / "embedded")
    tok = MegatronTokenizer(base.tokenizer_path)
    kw = dict(share=0.02, seq_len=512, kind="passkey")
    r1 = write_retrieval_mix(base.prefix, str(tmp_path / "a"), tok, seed=1, **kw)
    r3 = write_retrieval_mix(base.prefix, str(tmp_path / "c"), tok, seed=2, **kw)
    cli = subprocess.run([sys.executable, "-m", "data_prep", "retrieval-mix", "--base-prefix", base.prefix,
                          "--output-prefix", str(tmp_path / "b"), "--share", "0.02", "--seq-len", "512", "--seed", "1"],
                         cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert cli.returncode == 0 and "retrieval documents" in cli.stdout, cli.stderr[-2000:]
    a, b, c = ((tmp_path / f"{x}.bin").read_bytes() for x in "abc")
    assert a == b and a != c  # same seed (function or CLI) -> same bytes
    assert 0.015 < r1.planted_tokens / r1.tokens < 0.025 and r3.planted_docs == r1.planted_docs
    assert (tmp_path / "a_punct.json").exists()

    base_ds, mixed = IndexedDataset(base.prefix), IndexedDataset(str(tmp_path / "a"))
    assert len(mixed) == len(base_ds) + r1.planted_docs
    stream = np.memmap(base.prefix + ".bin", dtype=base_ds.index.dtype, mode="r")
    query = tuple(tok.tokenize(" What is the pass key? The pass key is"))
    i = j = 0
    planted_at = []
    while i < len(mixed):  # walk both: every extra document is a planted one
        doc = mixed[i].astype(np.int64)
        if j < len(base_ds) and np.array_equal(doc, base_ds[j]):
            i, j = i + 1, j + 1
            continue
        planted_at.append(i)
        assert doc[-1] == tok.eod and 128 <= len(doc) - 1 <= 256  # default lengths seq_len/4 .. /2 (min 128)
        body = doc[:-1]
        q0 = max(p for p in range(len(body) - len(query)) if tuple(body[p:p + len(query)]) == query)
        answer = body[q0 + len(query):]  # the query is followed by the answer only
        value = tok.detokenize(answer).strip()
        assert len(value) == 5 and value.isdigit() and tok.tokenize(" " + value) == answer.tolist()
        needle = tok.tokenize(f" The pass key is {value}. Remember it. {value} is the pass key.")
        starts = [p for p in range(q0) if np.array_equal(body[p:p + len(needle)], needle)]
        assert len(starts) == 1
        if len(planted_at) <= 3:  # the haystack is one contiguous slice of the base corpus stream
            hay = np.concatenate([body[:starts[0]], body[starts[0] + len(needle):q0]])
            first = np.flatnonzero(np.asarray(stream[:len(stream) - len(hay) + 1]) == hay[0])
            assert any(np.array_equal(stream[f:f + len(hay)], hay) for f in first)
        i += 1
    assert len(planted_at) == r1.planted_docs
    assert planted_at[0] < len(mixed) // 2 < planted_at[-1]  # interleaved, not appended (train/valid split)


def test_multi_fact_mix_answers_every_query_and_keeps_the_tail_pure(tmp_path, cache_dir):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from phsa_train.data import MegatronTokenizer, prepare_default_corpus
    from phsa_train.evaluation.retrieval import QUERY_GAP, write_retrieval_mix

    base = prepare_default_corpus(Path(cache_dir) / "embedded")
    tok = MegatronTokenizer(base.tokenizer_path)
    r = write_retrieval_mix(base.prefix, str(tmp_path / "m"), tok, share=0.1, seq_len=512, min_len=384,
                            max_len=512, kind="kv", fact_every=192, pure_tail=0.1, seed=3)
    base_ds, mixed = IndexedDataset(base.prefix), IndexedDataset(str(tmp_path / "m"))
    n_tail = int(np.ceil(0.1 * len(mixed)))
    for i in range(1, n_tail + 1):  # the tail is the base corpus's own last documents, in order
        assert np.array_equal(mixed[len(mixed) - i], base_ds[len(base_ds) - i])
    tail_start = int(np.sum(base_ds.index.sequence_lengths[:len(base_ds) - n_tail]))
    tail = np.asarray(np.memmap(base.prefix + ".bin", dtype=base_ds.index.dtype, mode="r")[tail_start:])

    ask = tok.tokenize(' What is the value of key "')
    planted = [mixed[i].astype(np.int64) for i in range(len(mixed) - n_tail)
               if len(mixed[i]) > 300 and any(list(mixed[i][p:p + len(ask)]) == ask for p in range(len(mixed[i])))]
    assert len(planted) == r.planted_docs
    for doc in planted[:5]:
        body = doc[:-1]
        qs = [p for p in range(len(body)) if list(body[p:p + len(ask)]) == ask]
        assert len(qs) == len(body) // 192 and all(b - a >= QUERY_GAP[0] + len(ask) for a, b in zip(qs, qs[1:]))
        text = tok.detokenize(body.tolist())
        asked = re.findall(r'What is the value of key "([a-z-]+)"\? The value of key "\1" is (\d{5})', text)
        assert len(asked) == len(qs) and len({k for k, _ in asked}) == len(qs)  # one query per key
        for key, value in asked:  # each answer is the value its needle gave, earlier in the prose
            assert re.findall(rf'The value of key "{key}" is (\d+)\.', text) == [value]
        hay = body[:qs[0]][:64]  # the prose is cut from before the pure tail
        assert not any(np.array_equal(tail[f:f + 64], hay) for f in np.flatnonzero(tail[:len(tail) - 63] == hay[0]))


# ----------------------------------------------------------------------------- CLI on a tiny checkpoint


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, cache_dir):
    run = tmp_path_factory.mktemp("eval") / "run"
    finish(launch(run, "train.steps=10", "train.eval_interval=0", "checkpoint.interval=10", "attention=phsa",
                  "attention.n_init=16", "attention.local_window=32", "attention.train_topk=2", "attention.eval_topk=4",
                  "attention.query_block=16",
                  "logging=stdout", "logging.plots=false", cache_dir=cache_dir))
    return run


def _eval(*overrides, cache_dir, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "phsa_train.eval", *overrides], cwd=REPO,
                          env=subprocess_env(PHSA_CACHE_DIR=cache_dir), capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_cli_end_to_end_writes_json_and_plots(tiny_run, tmp_path, cache_dir):
    out = tmp_path / "out"
    p = _eval(f"eval.checkpoint={tiny_run}", "eval.topks=[1,8]", f"eval.output_dir={out}", "eval.retrieval.samples=2",
              "eval.retrieval.lengths=[64,128]", "eval.retrieval.depths=[0.0,0.5,1.0]", cache_dir=cache_dir)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "[eval] perplexity k=2" in p.stdout and "[eval] recall k=8" in p.stdout and "[eval] wrote" in p.stdout
    r = json.loads((out / "results.json").read_text())
    assert r["step"] == 10 and r["train_topk"] == 2 and r["eval_topk"] == 4 and r["topks"] == [1, 2, 4, 8]
    assert r["files"] == ["results.json", "retrieval.png", "recall.png"]
    for f in ("retrieval.png", "recall.png"):
        assert (out / f).stat().st_size > 10_000
    ppl = {row["topk"]: row for row in r["perplexity"]}
    assert set(ppl) == {1, 2, 4, 8, None} and ppl[2]["roles"] == ["train"] and ppl[4]["roles"] == ["eval"]
    assert all(row["ppl"] == pytest.approx(np.exp(row["loss"])) for row in r["perplexity"])
    # k = 8 covers every block of a 128-token sequence: exactly dense, recall 1, nothing to reduce
    assert ppl[8]["loss"] == pytest.approx(ppl[None]["loss"], abs=1e-5)
    rec = {row["topk"]: row for row in r["recall"]["by_topk"]}
    assert rec[8]["recall_phsa"] == pytest.approx(1.0, abs=1e-5) and rec[8]["info_loss_reduction"] is None
    assert rec[1]["recall_phsa"] < rec[2]["recall_phsa"] < rec[8]["recall_phsa"]
    assert [row["layer"] for row in rec[2]["layers"]] == [1, 2]
    ret = r["retrieval"]["by_topk"]
    assert [row["topk"] for row in ret] == [2, 4]
    for row in ret:
        assert row["lengths"] == [64, 128] and np.shape(row["exact_match"]) == (2, 3)
        assert all(0 <= v <= 1 for v in np.ravel(row["token_accuracy"]))


@pytest.mark.slow
@pytest.mark.parametrize("case", ["missing_dir", "too_long"])
def test_bad_input_gives_one_line_naming_the_knob(case, tiny_run, tmp_path, cache_dir):
    if case == "missing_dir":
        p = _eval(f"eval.checkpoint={tmp_path / 'nope'}", cache_dir=cache_dir)
        want = f"error: eval.checkpoint={tmp_path / 'nope'}: no such directory"
    else:
        p = _eval(f"eval.checkpoint={tiny_run}", "eval.retrieval.lengths=[128,2048]", cache_dir=cache_dir)
        want = "error: eval.retrieval.lengths: 2048 is over the model's limit model.max_position_embeddings=1024"
    assert p.returncode == 2
    assert [line for line in p.stdout.splitlines() if line.startswith("error")] == [want], p.stdout
    assert "Traceback" not in p.stdout + p.stderr
