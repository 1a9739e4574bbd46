"""Tables of bench/quality/copy_test.sh: retrieval vs k for dense, (a) training-free and (b) fine-tuned selection.

    python bench/quality/copy_summary.py RUNS_DIR [--json summary.json]     (prints markdown)

RUNS_DIR holds dense-s<seed>/{eval_dense,eval_a_lam0.5,eval_a_lam1}/results.json and
ft-lam<lam>-s<seed>/eval_b/results.json. "beyond" = the depths strictly between 0 and 1 (the fact is neither in
INIT nor in the local window, so a sparse layer reaches it only through its selected blocks); depth 0 and 1 are
the controls. Each cell is the mean over seeds, with +- half the range when there are two or more.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import numpy as np

VARIANTS = (("dense", "dense-s*", "eval_dense"), ("(a) λ=0.5", "dense-s*", "eval_a_lam0.5"),
            ("(a) λ=1", "dense-s*", "eval_a_lam1"), ("(b) λ=0.5", "ft-lam0.5-s*", "eval_b"),
            ("(b) λ=1", "ft-lam1.0-s*", "eval_b"))


def cell(res: dict) -> dict:
    """Per top-k (None for dense): exact match / answer log-prob beyond the window, and at the controls."""
    out = {}
    for row in res["retrieval"]["by_topk"]:
        d = np.asarray(row["depths"])
        mid, ctl = (d > 0) & (d < 1), (d == 0) | (d == 1)
        em, lp = np.asarray(row["exact_match"]).mean(0), np.asarray(row["answer_logprob"]).mean(0)
        out[row["topk"]] = {"em_beyond": float(em[mid].mean()), "logprob_beyond": float(lp[mid].mean()),
                            "em_controls": float(em[ctl].mean()), "logprob_controls": float(lp[ctl].mean()),
                            "em_by_depth": dict(zip(map(str, d.tolist()), em.tolist()))}
    for row in res.get("perplexity", []):
        if row["topk"] in out or row["topk"] is None:
            out.setdefault(row["topk"], {})["loss"] = row["loss"]
    return out


def collect(runs: Path) -> dict:
    table = {}
    for label, pattern, sub in VARIANTS:
        for rd in sorted(runs.glob(pattern)):
            f = rd / sub / "results.json"
            if f.exists():
                seed = re.sub(r".*-s", "", rd.name)
                table.setdefault(label, {})[seed] = cell(json.loads(f.read_text()))
    return table


def fmt(vals: list[float], digits: int) -> str:
    if not vals:
        return "—"
    m = float(np.mean(vals))
    return f"{m:.{digits}f}" + (f" ± {(max(vals) - min(vals)) / 2:.{digits}f}" if len(vals) > 1 else "")


def markdown(table: dict) -> str:
    ks = sorted({k for v in table.values() for s in v.values() for k in s if k is not None})
    lines = []
    for metric, digits, title in (("em_beyond", 2, "exact match, fact beyond INIT + local window"),
                                  ("logprob_beyond", 2, "answer log-prob, fact beyond INIT + local window"),
                                  ("em_controls", 2, "exact match, controls (depth 0 and 1)")):
        lines += [f"**{title}** (mean ± half the range over seeds; dense: one value for every k)", "",
                  "| variant | seeds | " + " | ".join(f"k={k}" for k in ks) + " |",
                  "|---|---|" + "---|" * len(ks)]
        for label, seeds in table.items():
            row = []
            for k in ks:
                kk = None if label == "dense" else k
                row.append(fmt([s[kk][metric] for s in seeds.values() if kk in s and metric in s[kk]], digits))
            lines.append(f"| {label} | {len(seeds)} | " + " | ".join(row) + " |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs")
    p.add_argument("--json", help="also write the table as JSON")
    a = p.parse_args(argv)
    runs = Path(a.runs)
    if not runs.is_dir():
        sys.exit(f"copy_summary.py: {runs}: no such directory")
    table = collect(runs)
    if a.json:
        Path(a.json).write_text(json.dumps({lab: {s: {str(k): v for k, v in c.items()} for s, c in seeds.items()}
                                            for lab, seeds in table.items()}, indent=1))
    print(markdown(table) if table else f"no evaluation results under {runs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
