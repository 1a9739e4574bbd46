"""Tables of bench/quality/copy_test.sh: retrieval vs k for dense, (a) training-free and (b) fine-tuned selection.

    python bench/quality/copy_summary.py RUNS_DIR [--json summary.json] [--plot retrieval_vs_k.png]   (prints markdown)

Also the induction probe (bench/quality/copy_probe.py) of the dense weights, dense and under each selection rule.

RUNS_DIR holds dense-s<seed>/{eval_dense,eval_a_lam0.5,eval_a_lam1}/results.json and
ft-lam<lam>-s<seed>/eval_b/results.json. "beyond" = the depths strictly between 0 and 1 (the fact is neither in
INIT nor in the local window, so a sparse layer reaches it only through its selected blocks); depth 0 and 1 are
the controls. Each cell is the mean over seeds, with +- half the range when there are two or more.

λ=0.5 and λ=1 share each seed's weights (in (a) the same dense model, in (b) fine-tunes of it), so whether λ=0.5
is ahead is read from the paired per-seed difference λ=0.5 - λ=1, with a one-sided sign test over the seeds.

With length extension (STAGE1_STEPS > 0) the short-sequence stage lives in dense1-s<seed>: it is never evaluated,
and only its training (and that of the extended dense-s<seed>) gets a table, so the two stages can be compared.
"""
from __future__ import annotations

import argparse
import json
import math
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


PAIRS = (("(a)", "(a) λ=0.5", "(a) λ=1"), ("(b)", "(b) λ=0.5", "(b) λ=1"))
PAIRED_METRICS = (("em_beyond", "exact match"), ("logprob_beyond", "answer log-prob"))


def sign_test(ahead: int, n: int) -> float:
    """The chance that at least `ahead` of n fair coin flips come up heads (one-sided sign test)."""
    return sum(math.comb(n, i) for i in range(ahead, n + 1)) / 2 ** n


def paired(table: dict) -> dict:
    """Per setting ((a), (b)): {"seeds": paired seeds, "left_out": {variant: seeds it alone has},
    metric: {k: {by_seed: λ=0.5 - λ=1, mean, min, max, ahead (seeds with a difference > 0; a tie is not ahead),
    n, p_sign}}}, over the seeds that have both variants and the ks that both evaluated."""
    out = {}
    for setting, lam05, lam1 in PAIRS:
        a, b = table.get(lam05, {}), table.get(lam1, {})
        seeds = sorted(a.keys() & b.keys())
        if not seeds:
            continue
        alone = {lam05: sorted(a.keys() - b.keys()), lam1: sorted(b.keys() - a.keys())}
        entry = {"seeds": seeds, "left_out": {lab: s for lab, s in alone.items() if s}}
        ks = sorted(set.intersection(*(set(a[s]) & set(b[s]) for s in seeds)) - {None})
        for metric, _ in PAIRED_METRICS:
            entry[metric] = {}
            for k in ks:
                diff = {s: a[s][k][metric] - b[s][k][metric] for s in seeds}
                ahead = sum(d > 0 for d in diff.values())
                entry[metric][k] = {"by_seed": diff, "mean": float(np.mean(list(diff.values()))),
                                    "min": min(diff.values()), "max": max(diff.values()),
                                    "ahead": ahead, "n": len(seeds), "p_sign": sign_test(ahead, len(seeds))}
        out[setting] = entry
    return out


def paired_markdown(pairs: dict) -> str:
    left = "; ".join(f"{lab} seed {', '.join(s)}" for e in pairs.values() for lab, s in e["left_out"].items())
    ks = sorted({k for e in pairs.values() for m, _ in PAIRED_METRICS for k in e[m]})
    lines = ["**paired difference λ=0.5 − λ=1 (same seed's weights)**, beyond INIT + local window: mean [min, max] "
             "over seeds; n>0/n = seeds where λ=0.5 is ahead (a tie is not); p = the chance of at least that many "
             "ahead if each seed were a coin flip (one-sided sign test)"
             + (f"; left out, in only one variant: {left}" if left else ""), "",
             "| setting | metric | seeds | " + " | ".join(f"k={k}" for k in ks) + " |",
             "|---|---|---|" + "---|" * len(ks)]
    for setting, e in pairs.items():
        for metric, name in PAIRED_METRICS:
            cells = [f"{c['mean']:+.3f} [{c['min']:+.3f}, {c['max']:+.3f}] {c['ahead']}/{c['n']}, p={c['p_sign']:.2g}"
                     if (c := e[metric].get(k)) else "—" for k in ks]
            lines.append(f"| {setting} | {name} | {len(e['seeds'])} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


PROBES = (("dense", "probe_dense"), ("(a) λ=0.5", "probe_a_lam0.5"), ("(a) λ=1", "probe_a_lam1"))


def collect_probes(runs: Path) -> dict:
    """{variant: {seed: [rows of copy_probe.py]}}."""
    out = {}
    for label, name in PROBES:
        for rd in sorted(runs.glob("dense-s*")):
            f = rd / f"{name}.json"
            if f.exists():
                out.setdefault(label, {})[re.sub(r".*-s", "", rd.name)] = json.loads(f.read_text())
    return out


def probe_markdown(probes: dict) -> str:
    """Copy gain (loss on a random span's first copy minus its second) per distance and top-k."""
    dists = sorted({r["distance"] for v in probes.values() for rows in v.values() for r in rows})
    ks = sorted({r["topk"] for v in probes.values() for rows in v.values() for r in rows if r["topk"] is not None})
    lines = ["**induction probe: copy gain in nats (second-copy accuracy)**, random 32-token span repeated after "
             "D tokens of prose; mean ± half the range over seeds", "",
             "| variant | D | " + " | ".join(f"k={k}" for k in ks) + " |", "|---|---|" + "---|" * max(1, len(ks))]
    for label, seeds in probes.items():
        for dist in dists:
            cells = []
            for k in (ks if label != "dense" else [None]):
                rows = [r for rs in seeds.values() for r in rs if r["distance"] == dist and r["topk"] == k]
                cells.append(f"{fmt([r['copy_gain'] for r in rows], 2)} ({fmt([r['second_copy_accuracy'] for r in rows], 2)})")
            lines.append(f"| {label} | {dist} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


STAGES = (("stage 1 (short seq)", "dense1-s*"), ("dense (extended)", "dense-s*"))


def collect_training(runs: Path) -> dict:
    """{stage: {seed: {steps, tokens, train_loss (mean of the last 5 logged), valid_loss (last)}}}, from each
    dense run's metrics.jsonl; empty unless there is a stage-1 run (a single-stage test needs no such table)."""
    if not any(runs.glob("dense1-s*/metrics.jsonl")):
        return {}
    out = {}
    for label, pattern in STAGES:
        for rd in sorted(runs.glob(pattern)):
            f = rd / "metrics.jsonl"
            if not f.exists():
                continue
            rows = [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
            train = [r["train/loss"] for r in rows if "train/loss" in r]
            valid = [r["valid/loss"] for r in rows if "valid/loss" in r]
            out.setdefault(label, {})[re.sub(r".*-s", "", rd.name)] = {
                "steps": max((r["step"] for r in rows), default=0),
                "tokens": max((r.get("train/tokens_seen", 0) for r in rows), default=0),
                "train_loss": float(np.mean(train[-5:])) if train else None,
                "valid_loss": valid[-1] if valid else None}
    return out


def training_markdown(training: dict) -> str:
    lines = ["**dense training** (train loss: mean of the last 5 logged steps; valid loss: the last evaluation, on "
             "each stage's own data and sequence length)", "",
             "| stage | seed | steps | tokens | train loss | valid loss |", "|---|---|---|---|---|---|"]
    for label, seeds in training.items():
        for seed, r in seeds.items():
            tl, vl = (f"{r[k]:.3f}" if r[k] is not None else "—" for k in ("train_loss", "valid_loss"))
            lines.append(f"| {label} | {seed} | {r['steps']} | {r['tokens']:,} | {tl} | {vl} |")
    return "\n".join(lines) + "\n"


def plot(table: dict, path: str) -> None:
    """Exact match and answer log-prob beyond the window vs k, one line per variant (dense: a level), bars = the
    seeds' range."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = sorted({k for v in table.values() for s in v.values() for k in s if k is not None})
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, metric, ylabel in ((axes[0], "em_beyond", "exact match"), (axes[1], "logprob_beyond", "answer log-prob")):
        for label, seeds in table.items():
            vals = [[s[None if label == "dense" else k][metric] for s in seeds.values()] for k in ks]
            mean = np.array([np.mean(v) for v in vals])
            half = np.array([(max(v) - min(v)) / 2 for v in vals])
            style = dict(ls="--", color="k") if label == "dense" else dict(marker="o", capsize=3)
            ax.errorbar(ks, mean, yerr=half, label=f"{label} ({len(seeds)} seeds)", **style)
        ax.set_xscale("log", base=2)
        ax.set_xticks(ks, [str(k) for k in ks])
        ax.set_xlabel("selected blocks k")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    axes[0].set_title("fact beyond INIT + local window")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs")
    p.add_argument("--json", help="also write the table as JSON")
    p.add_argument("--plot", help="also plot retrieval vs k (PNG)")
    a = p.parse_args(argv)
    runs = Path(a.runs)
    if not runs.is_dir():
        sys.exit(f"copy_summary.py: {runs}: no such directory")
    table, probes, training = collect(runs), collect_probes(runs), collect_training(runs)
    pairs = paired(table)
    if a.json:
        doc = {"retrieval": {lab: {s: {str(k): v for k, v in c.items()} for s, c in seeds.items()}
                             for lab, seeds in table.items()},
               "paired": pairs,  # its int keys (k) become strings, as in "retrieval"
               "probe": probes}
        if training:
            doc["training"] = training
        Path(a.json).write_text(json.dumps(doc, indent=1))
    if a.plot and table:
        plot(table, a.plot)
    print(markdown(table) if table else f"no retrieval results under {runs}")
    if pairs:
        print(paired_markdown(pairs))
    if probes:
        print(probe_markdown(probes))
    if training:
        print(training_markdown(training))
    return 0


if __name__ == "__main__":
    sys.exit(main())
