"""The prose quality study's CPU-side scripts: corpus extraction helpers and the summarizer (no training)."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

REPO = Path(__file__).resolve().parents[2]


def _module(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "bench" / "quality" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_roff_to_text_keeps_prose_and_drops_markup():
    pc = _module("prose_corpus")
    src = ('.\\" a comment\n.TH LS 1\n.SH DESCRIPTION\nList information about the \\fBFILEs\\fR '
           '(the current directory by default).\n.PP\n.TP\n\\fB\\-a\\fR, \\fB\\-\\-all\\fR\ndo not ignore entries '
           'starting with \\(aq.\\(aq\n')
    text = pc.roff_to_text(src)
    assert "Description" in text and "comment" not in text and "\\f" not in text and ".TH" not in text
    assert "List information about the FILEs (the current directory by default)." in text
    assert "-a, --all" in text and "starting with '.'" in text


def test_code_share_heuristic():
    pc = _module("prose_corpus")
    assert pc.code_share("A sentence, with commas; and a clause.\nAnother plain sentence.") == 0.0
    assert pc.code_share(">>> x = f(a[0])\n    return {k: v}\nif (a == b) { c(); }") == 1.0


def test_site_docs_corpus_tags_packages_and_measures_code(tmp_path, monkeypatch):
    """The code-heavy corpus: one row per docstring with its package as the source, tests/ skipped, and per package
    the documents, characters and code-line share that corpus_stats.py reports beside the prose corpus's."""
    monkeypatch.syspath_prepend(str(REPO / "bench" / "quality"))  # as when the script runs: prose_corpus beside it
    sd = _module("site_docs_corpus")
    prose = "Return the sum of the elements, computed in a numerically stable order. " * 4
    example = "Add two arrays.\n\nExamples\n--------\n>>> add(a, b)\narray([2, 4])\n    indented(code)"
    pkg = tmp_path / "site" / "pkg"
    (pkg / "tests").mkdir(parents=True)
    (pkg / "a.py").write_text(f'"""{prose}"""\n\ndef add(a, b):\n    """{example * 5}"""\n')
    (pkg / "tests" / "t.py").write_text(f'"""{prose} in a test"""\n')
    out, stats = tmp_path / "c.jsonl", tmp_path / "s.json"
    sd.main([str(out), "--packages", "pkg", "absent", "--roots", str(tmp_path / "site"), "--stats", str(stats),
             "--min-chars", "50"])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["source"] for r in rows] == ["pkg", "pkg"] and rows[0]["text"] == prose.strip()
    st = json.loads(stats.read_text())
    assert set(st) == {"pkg"} and st["pkg"]["docs"] == 2 and st["pkg"]["chars"] == sum(len(r["text"]) for r in rows)
    assert 0 < st["pkg"]["code_line_share"] < 1  # the >>> lines, their output and the indented line; not the prose


def test_prose_data_refuses_an_unknown_corpus_in_one_line(tmp_path):
    r = subprocess.run(["bash", str(REPO / "bench/quality/prose_data.sh"), str(tmp_path / "d")], cwd=REPO,
                       env={"PATH": "/usr/bin:/bin", "CORPUS": "code"}, capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and r.stdout.count("\n") == 1 and r.stdout.startswith("CORPUS=code: must be prose")
    assert not (tmp_path / "d").exists()


def _fake_run(root: Path, name: str, loss: float, topk: int | None, em: float):
    d = root / name
    (d / "eval").mkdir(parents=True)
    rows = [{"step": s, "train/loss": 8 - 0.1 * s + loss, "train/tokens_seen": 100 * s, "perf/tokens_per_sec": 1e3}
            for s in range(1, 21)]
    rows += [{"step": 20, "valid/loss": 6 + loss}]
    if topk:
        rows += [{"step": s, "phsa/phase": "hold", "phsa_stats/layer01/recall": 0.2 + 0.01 * s,
                  "phsa_stats/layer01/recall_meanpool": 0.2} for s in (5, 10, 20)]
    (d / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    grid = {"lengths": [256, 512], "depths": [0.0, 0.5, 1.0],
            "exact_match": [[1.0, em, 1.0], [1.0, em, 1.0]], "token_accuracy": [[1, em, 1], [1, em, 1]]}
    res = {"step": 20, "train_topk": topk and 2, "eval_topk": topk, "device": "cpu",
           "perplexity": [{"topk": topk, "attention": "sparse" if topk else "dense", "loss": 6 + loss}],
           "retrieval": {"by_topk": [dict(grid, topk=topk)]}}
    if topk:
        res["perplexity"].append({"topk": 2, "attention": "sparse", "loss": 6.1 + loss})
        res["recall"] = {"by_topk": [{"topk": topk, "recall_phsa": 0.3, "recall_meanpool": 0.25,
                                      "info_loss_reduction": 1 - 0.7 / 0.75}]}
    (d / "eval" / "results.json").write_text(json.dumps(res))


def test_summarize_mean_and_spread_over_seeds(tmp_path):
    runs = tmp_path / "runs"
    _fake_run(runs, "dense-s1", 0.0, None, 0.5)
    _fake_run(runs, "dense-s2", 0.2, None, 0.7)
    _fake_run(runs, "phsa-qb64-s1", 0.1, 4, 0.25)
    _fake_run(runs, "phsa-qb1-s1", 0.3, 4, 0.0)
    out = subprocess.run([sys.executable, str(REPO / "bench/quality/summarize.py"), str(runs), "--json",
                          str(tmp_path / "s.json"), "--plots", str(tmp_path / "plots")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    s = json.loads((tmp_path / "s.json").read_text())["variants"]
    assert s["dense"]["final_valid_loss"]["mean"] == 6.1 and abs(s["dense"]["final_valid_loss"]["spread"] - 0.1) < 1e-9
    assert s["dense"]["retrieval_by_topk"]["dense"]["beyond_local"]["mean"] == 0.6  # depth 0.5 only
    assert s["phsa-qb64"]["retrieval_by_topk"]["4"]["controls"]["mean"] == 1.0
    assert "query_block 1 vs 64" in out.stdout
    for f in ("loss.png", "recall_over_training.png", "retrieval_vs_k.png", "retrieval_grid.png"):
        assert (tmp_path / "plots" / f).read_bytes()[:4] == b"\x89PNG"


def test_summarize_reads_real_eval_results(tmp_path):
    """The eval JSON as `phsa_train.eval` wrote it on the GPU (2026-11-27 study, trimmed): a dense model's
    ``recall`` is ``{"skipped": ...}`` (no ``by_topk``), retrieval rows carry ``answer_logprob``."""
    sm = _module("summarize")
    real = json.loads((REPO / "tests/evaluation/fixtures/quality_eval_results_h200.json").read_text())
    assert "by_topk" not in real["dense"]["recall"]
    warm = [{"step": s, "phsa/phase": "dense"} for s in (1, 2)] + [{"step": 3, "phsa/phase": "hold"}]
    for name, res, v2 in (("dense-s1", real["dense"], 6.0), ("phsa-qb64-s1", real["phsa"], 6.2),
                          ("meanpool-qb64-s1", real["phsa"], 6.1)):
        d = tmp_path / name
        (d / "eval").mkdir(parents=True)
        rows = [{"step": 1, "train/loss": 9.0}, {"step": 2, "valid/loss": v2}, {"step": 3, "valid/loss": 5.0}]
        (d / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows + (warm if "phsa" in name or
                                                                                    "pool" in name else [])))
        (d / "eval" / "results.json").write_text(json.dumps(res))
    runs = [sm.run_summary(d) for d in sorted(tmp_path.iterdir())]
    dense = next(r for r in runs if r["name"] == "dense-s1")
    assert dense["recall"] == {} and dense["perplexity"] == {"dense": real["dense"]["perplexity"][0]["loss"]}
    assert dense["retrieval"]["dense"]["answer_logprob_beyond_local"] < 0
    phsa = next(r for r in runs if r["name"] == "phsa-qb64-s1")
    assert phsa["eval_topk"] == 4 and set(phsa["recall"]) == {2, 4}
    assert phsa["recall"][4]["recall"] == next(r["recall_phsa"] for r in real["phsa"]["recall"]["by_topk"]
                                               if r["topk"] == 4)
    agg = sm.aggregate(runs)
    pair = sm.paired(runs, "phsa-qb64", "meanpool-qb64")
    assert pair["seeds"] == [1] and pair["loss"]["deltas"] == [0.0]
    floor = sm.warmup_noise_floor(runs)
    assert floor["1"]["step"] == 2 and abs(floor["1"]["range"] - 0.2) < 1e-9
    md = sm.markdown(agg, [pair], floor)
    assert "PHSA λ=0.5 − mean-pool λ=1" in md and "range 0.200" in md


def test_repeat_document_writes_every_span_twice_in_order():
    import numpy as np

    cd = _module("copy_data")
    rng = np.random.default_rng(0)
    hay = np.arange(1000, 1200)
    spans = [np.full(5, 7), np.arange(20, 31)]
    doc = cd.repeat_document(hay, spans, rng)
    assert len(doc) == len(hay) + 2 * sum(len(s) for s in spans)
    rest = doc[doc >= 1000]
    assert (rest == hay).all()  # the prose keeps its order around the inserted copies
    text = ",".join(map(str, doc.tolist()))
    for s in spans:
        assert text.count(",".join(map(str, s.tolist()))) >= 2


def _copy_result(em_by_k: dict, topk_none: bool = False) -> dict:
    depths = [0.0, 0.5, 1.0]
    rows = [{"topk": None if topk_none else k, "depths": depths,
             "exact_match": [[1.0, em, 1.0]], "answer_logprob": [[0.0, em - 1, 0.0]]} for k, em in em_by_k.items()]
    return {"retrieval": {"by_topk": rows}, "perplexity": []}


def test_copy_summary_tables_and_plot(tmp_path):
    cs = _module("copy_summary")
    for seed, shift in (("1", 0.0), ("2", 0.02)):
        for sub, em in (("eval_dense", None), ("eval_a_lam0.5", 0.3), ("eval_a_lam1", 0.1)):
            d = tmp_path / f"dense-s{seed}" / sub
            d.mkdir(parents=True)
            res = _copy_result({0: 0.9}, topk_none=True) if em is None else _copy_result({1: em + shift, 4: em + 0.2})
            (d / "results.json").write_text(json.dumps(res))
    png = tmp_path / "r.png"
    out = tmp_path / "s.json"
    assert cs.main([str(tmp_path), "--json", str(out), "--plot", str(png)]) == 0
    table = json.loads(out.read_text())["retrieval"]
    assert table["(a) λ=0.5"]["2"]["1"]["em_beyond"] == 0.32
    md = cs.markdown(cs.collect(tmp_path))
    assert "| (a) λ=0.5 | 2 | 0.31 ± 0.01 | 0.50 ± 0.00 |" in md and "| dense | 2 | 0.90 ± 0.00 | 0.90 ± 0.00 |" in md
    assert png.stat().st_size > 0



def test_copy_summary_pairs_lambdas_by_seed(tmp_path):
    """λ=0.5 - λ=1 per seed on the same weights: mean, range, seeds ahead (a tie is not) and the sign test; a seed
    that only one variant has is left out of the pair, and the title says so."""
    cs = _module("copy_summary")
    em = {"0.5": ({1: 0.75, 4: 0.5}, {1: 0.5, 4: 0.5}, {1: 0.25, 4: 0.5}),
          "1": ({1: 0.25, 4: 0.25}, {1: 0.5, 4: 0.25}, {1: 0.5, 4: 0.25})}
    for lam, by_seed in em.items():
        for seed, by_k in enumerate(by_seed, 1):
            for run, sub in ((f"dense-s{seed}", f"eval_a_lam{lam}"), (f"ft-lam{float(lam)}-s{seed}", "eval_b")):
                if sub == "eval_b" and lam == "1" and seed == 3:
                    continue  # (b) λ=1 lacks seed 3
                (tmp_path / run / sub).mkdir(parents=True)
                (tmp_path / run / sub / "results.json").write_text(json.dumps(_copy_result(by_k)))
    out = tmp_path / "s.json"
    assert cs.main([str(tmp_path), "--json", str(out)]) == 0
    pairs = json.loads(out.read_text())["paired"]
    a1, a4 = pairs["(a)"]["em_beyond"]["1"], pairs["(a)"]["em_beyond"]["4"]
    assert a1["by_seed"] == {"1": 0.5, "2": 0.0, "3": -0.25} and (a1["min"], a1["max"]) == (-0.25, 0.5)
    assert abs(a1["mean"] - 0.25 / 3) < 1e-12 and (a1["ahead"], a1["n"], a1["p_sign"]) == (1, 3, 0.875)
    assert (a4["mean"], a4["ahead"], a4["p_sign"]) == (0.25, 3, 0.125)
    assert pairs["(a)"]["logprob_beyond"]["1"]["by_seed"] == a1["by_seed"]  # _copy_result: log-prob = em - 1
    assert pairs["(b)"]["seeds"] == ["1", "2"] and pairs["(b)"]["left_out"] == {"(b) λ=0.5": ["3"]}
    assert pairs["(b)"]["em_beyond"]["4"]["p_sign"] == 0.25
    md = cs.paired_markdown(cs.paired(cs.collect(tmp_path)))
    assert "left out, in only one variant: (b) λ=0.5 seed 3" in md
    assert "| (a) | exact match | 3 | +0.083 [-0.250, +0.500] 1/3, p=0.88 | +0.250 [+0.250, +0.250] 3/3, p=0.12 |" in md
    assert "| (b) | answer log-prob | 2 | +0.250 [+0.000, +0.500] 1/2, p=0.75 |" in md

def test_copy_summary_labels_the_length_extension_stage(tmp_path):
    """copy_test.sh with STAGE1_STEPS > 0: dense1-s<seed> (the short-sequence stage) gets a training row and
    never a retrieval row; without it the summary has no training table (the single-stage output is unchanged)."""
    cs = _module("copy_summary")
    d = tmp_path / "dense-s1" / "eval_dense"
    d.mkdir(parents=True)
    (d / "results.json").write_text(json.dumps(_copy_result({0: 0.9}, topk_none=True)))
    assert cs.collect_training(tmp_path) == {}
    for run, losses in (("dense1-s1", (3.0, 2.0)), ("dense-s1", (2.5, 1.5))):
        rows = [{"step": 0, "valid/loss": losses[0] + 1}] + [
            {"step": i, "train/loss": losses[0] - i * 0.1, "train/tokens_seen": i * 1000} for i in range(1, 11)]
        rows[-1]["valid/loss"] = losses[1]
        (tmp_path / run).mkdir(exist_ok=True)
        (tmp_path / run / "metrics.jsonl").write_text("\n".join(map(json.dumps, rows)))
    (tmp_path / "dense1-s1" / "eval_dense").mkdir()  # a stray evaluation of stage 1 stays out of the tables
    (tmp_path / "dense1-s1" / "eval_dense" / "results.json").write_text(json.dumps(_copy_result({0: 0.0}, True)))
    assert list(cs.collect(tmp_path)["dense"]) == ["1"] and cs.collect(tmp_path)["dense"]["1"][None]["em_beyond"] == 0.9
    out = tmp_path / "s.json"
    assert cs.main([str(tmp_path), "--json", str(out)]) == 0
    tr = json.loads(out.read_text())["training"]
    assert tr["stage 1 (short seq)"]["1"]["steps"] == 10 and tr["stage 1 (short seq)"]["1"]["valid_loss"] == 2.0
    md = cs.training_markdown(cs.collect_training(tmp_path))
    assert "| stage 1 (short seq) | 1 | 10 | 10,000 | 2.200 | 2.000 |" in md and "| dense (extended) | 1 |" in md


def test_copy_test_refuses_a_bad_stage1_in_one_line(tmp_path):
    """The length-extension knobs are checked before anything runs: one line naming the knob, exit 2."""
    data, other = tmp_path / "data", tmp_path / "other"
    for d, tok in ((data, "a"), (other, "b")):
        d.mkdir()
        (d / "cmix.idx").write_text("")
        (d / "prose_tokenizer.json").write_text(tok)
    cases = (({"STAGE1_STEPS": "x"}, "STAGE1_STEPS=x: must be an integer >= 0"),
             ({"STAGE1_STEPS": "5"}, "STAGE1_DATA=: must be a copy_data.py dir"),
             ({"STAGE1_STEPS": "5", "STAGE1_DATA": str(other)}, "its prose_tokenizer.json must be the one of DATA_DIR"))
    for env, msg in cases:
        r = subprocess.run(["bash", str(REPO / "bench/quality/copy_test.sh"), str(data), str(tmp_path / "out")],
                           env={"PATH": "/usr/bin:/bin", "WORK_DIR": str(tmp_path / "w"), **env},
                           capture_output=True, text=True, timeout=30)
        assert r.returncode == 2 and r.stdout.count("\n") == 1 and msg in r.stdout, (env, r.stdout, r.stderr)
    assert not (tmp_path / "w").exists()  # nothing ran


def _study_call(data: Path, work: Path, out: Path, plan: str, timeout: int = 600,
                **env) -> subprocess.CompletedProcess:
    """One call of bench/quality/gpu_x4.sh at toy scale (one tiny run, CPU) on WORK_DIR ``work``."""
    from tests.helpers import subprocess_env

    (out.parent / f"{out.name}.plan").write_text(plan + "\n")
    env = subprocess_env(QUALITY_TOY="1", WORK_DIR=str(work), PLAN=str(out.parent / f"{out.name}.plan"), STEPS="6",
                         LENGTHS="[256]", DEPTHS="[0.0,1.0]", RSAMPLES="1", PYTHON=sys.executable, **env)
    return subprocess.run(["bash", "bench/quality/gpu_x4.sh", str(data), str(out)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


@pytest.mark.slow
def test_a_study_continues_across_calls(tmp_path, cache_dir):
    """A study spanning three calls on one warm machine (~3 min on 2 busy cores): call 1 trains part of the run
    without evaluating (EVAL=0), call 2 (the same command) resumes it from its checkpoint to STEPS on the whole
    run's learning-rate schedule and curriculum and evaluates it, call 3 finds it trained and evaluated and runs
    nothing. Call 1 stops at step 3 by ``train.exit_after_steps`` (on the GPU, the call's deadline stops it)."""
    from phsa_train.data.prepare import prepare_default_corpus
    from phsa_train.training.optimizer import lr_at_step

    prepared = prepare_default_corpus(Path(cache_dir) / "embedded")  # the corpus the other tests train on
    data = tmp_path / "data"
    data.mkdir()
    for name, src in (("rmix.bin", prepared.prefix + ".bin"), ("rmix.idx", prepared.prefix + ".idx"),
                      ("prose_tokenizer.json", prepared.tokenizer_path), ("rmix_punct.json", prepared.punct_path)):
        (data / name).symlink_to(src)
    work, run = tmp_path / "work", tmp_path / "work" / "runs" / "phsa-s1"
    row = "0 phsa-s1 1234 attention=phsa attention.query_block=64"

    first = _study_call(data, work, tmp_path / "out1", row + " train.exit_after_steps=3", EVAL="0")
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert [r["step"] for r in _rows(run) if "train/loss" in r] == [1, 2, 3], (run / "train.log").read_text()[-3000:]
    assert not (run / "eval").exists() and (tmp_path / "out1" / "runs.tar.gz").exists()

    second = _study_call(data, work, tmp_path / "out2", row)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    log = (run / "train.log").read_text()
    assert "resumed at step 3" in log and log.count("step      1/6") == 1, log[-3000:]
    rows = [r for r in _rows(run) if "train/loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]  # both parts, each step once
    t = SimpleNamespace(lr=1e-3, min_lr=1e-4, warmup_steps=1, steps=6, lr_decay_style="cosine")
    assert all(abs(r["train/lr"] - lr_at_step(r["step"] - 1, t)) < 1e-12 for r in rows)  # the whole run's schedule
    assert [r["phsa/phase"] for r in rows] == ["dense", "ramp", "ramp", "hold", "hold", "hold"]
    for sub in ("eval", "eval_lam1"):
        assert json.loads((run / sub / "results.json").read_text())["step"] == 6, (run / f"{sub}.log").read_text()
    assert json.loads((tmp_path / "out2" / "summary.json").read_text())["variants"]
    status = (run / "status.txt").read_text().splitlines()  # one line per call, then one per evaluation
    assert " from step 0: train_rc=0 " in status[0] and status[0].endswith(" step=3"), status
    assert " from step 3: train_rc=0 " in status[1] and status[1].endswith(" step=6"), status
    assert status[2].startswith("eval_rc=0 ") and status[3].startswith("eval_lam1_rc=0 "), status

    third = _study_call(data, work, tmp_path / "out3", row, timeout=120, RESUME_ONLY="1")
    assert third.returncode == 0, third.stdout[-3000:] + third.stderr[-3000:]
    status = (run / "status.txt").read_text().splitlines()
    assert status[4].endswith(" from step 6: train=complete step=6") and status[5:] == [
        "eval=done_at_6", "eval_lam1=done_at_6"], status
    assert [r["step"] for r in _rows(run) if "train/loss" in r] == [1, 2, 3, 4, 5, 6]

