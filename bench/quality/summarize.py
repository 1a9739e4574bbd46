"""Summarize a quality study (bench/quality/gpu_x4.sh): mean +- spread over seeds per variant, plots, tables.

    python bench/quality/summarize.py RUNS_DIR [--json SUMMARY.json] [--plots DIR] [--md TABLES.md]

RUNS_DIR holds one folder per run named ``<variant>-s<seed index>`` with metrics.jsonl (training log),
eval/results.json (phsa_train.eval), optionally eval_lam1/results.json (the same weights evaluated with
mean-pooled selection, lam = 1), overrides.txt and status.txt. Spread = half the range over seeds
(with two seeds: half their difference), printed as ``mean ± spread (n)``.

Retrieval accuracy is the exact match of the key-value task averaged over the depths strictly between 0 and 1
(the needle outside INIT and the local window, reachable only through the selected blocks) and all lengths;
depth 0 / 1 (inside INIT / the local window) are reported apart as controls.

Plots (--plots): loss.png (train EMA and validation loss), recall_over_training.png (mean over layers of the
recall of the model's own selection and of mean pooling at the hold's top-k, the information-loss reduction and
the selection churn, vs step), retrieval_vs_k.png (exact match and answer log-prob), retrieval_grid.png (length x
depth at the evaluation top-k, one panel per variant).

Also: paired differences between variants trained from the same seed (``paired``), and the noise floor
(``warmup_noise_floor``): the spread of validation losses at the end of the dense warm-up among runs of one seed,
which compute the same function there.
"""
from __future__ import annotations

import argparse
import json
import re
from collections import defaultdict
from pathlib import Path

import numpy as np


def load_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            pass  # a line cut by a killed run
    return out


def load_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def variant_of(name: str) -> str:
    return re.sub(r"-s\d+$", "", name)


def seed_index(name: str) -> int | None:
    m = re.search(r"-s(\d+)$", name)
    return int(m.group(1)) if m else None


def mean_spread(xs) -> dict | None:
    xs = [float(x) for x in xs if x is not None and np.isfinite(x)]
    if not xs:
        return None
    return {"mean": float(np.mean(xs)), "spread": float((max(xs) - min(xs)) / 2), "n": len(xs), "values": xs}


def fmt(ms: dict | None, digits: int = 3) -> str:
    if ms is None:
        return "—"
    return f"{ms['mean']:.{digits}f} ± {ms['spread']:.{digits}f} ({ms['n']})" if ms["n"] > 1 else \
        f"{ms['mean']:.{digits}f} (1)"


def retrieval_scores(res: dict | None) -> dict:
    """{topk or 'dense': {'beyond_local': acc, 'controls': acc, 'grid': [[..]], 'lengths', 'depths'}}."""
    out = {}
    if not res or "retrieval" not in res:
        return out
    for row in res["retrieval"]["by_topk"]:
        em = np.asarray(row["exact_match"], dtype=float)  # [lengths, depths]
        depths = np.asarray(row["depths"], dtype=float)
        inner = (depths > 0) & (depths < 1)
        key = "dense" if row.get("topk") is None else int(row["topk"])
        out[key] = {"beyond_local": float(em[:, inner].mean()) if inner.any() else None,
                    "controls": float(em[:, ~inner].mean()) if (~inner).any() else None,
                    "token_accuracy_beyond_local": float(np.asarray(row["token_accuracy"])[:, inner].mean())
                    if inner.any() else None,
                    "answer_logprob_beyond_local": float(np.asarray(row["answer_logprob"])[:, inner].mean())
                    if inner.any() and "answer_logprob" in row else None,
                    "answer_logprob_controls": float(np.asarray(row["answer_logprob"])[:, ~inner].mean())
                    if (~inner).any() and "answer_logprob" in row else None,
                    "grid": em.tolist(), "lengths": row["lengths"], "depths": row["depths"]}
    return out


def run_summary(rd: Path) -> dict:
    rows = load_jsonl(rd / "metrics.jsonl")
    res = load_json(rd / "eval" / "results.json")
    res1 = load_json(rd / "eval_lam1" / "results.json")
    tps = sorted(r["perf/tokens_per_sec"] for r in rows if "perf/tokens_per_sec" in r and r.get("step", 0) > 2)
    valid = [(r["step"], r["valid/loss"]) for r in rows if "valid/loss" in r]
    dense_steps = [r["step"] for r in rows if r.get("phsa/phase") == "dense"]
    s = {"name": rd.name, "variant": variant_of(rd.name), "seed_index": seed_index(rd.name),
         "valid_loss": valid, "warmup_end": max(dense_steps) if dense_steps else None,
         "steps": max((r["step"] for r in rows if "train/loss" in r), default=0),
         "tokens": max((r.get("train/tokens_seen", 0) for r in rows), default=0),
         "final_valid_loss": valid[-1][1] if valid else None,
         "median_tokens_per_s": tps[len(tps) // 2] if tps else None,
         "status": (rd / "status.txt").read_text().split() if (rd / "status.txt").exists() else None}
    if res:
        s["eval_step"] = res.get("step")
        s["train_topk"], s["eval_topk"] = res.get("train_topk"), res.get("eval_topk")
        s["device"] = res.get("device")
        s["perplexity"] = {("dense" if p["attention"] == "dense" else p["topk"]): p["loss"]
                           for p in res.get("perplexity", [])}
        # A dense model's eval writes {"recall": {"skipped": "..."}}: recall is 1 by construction there.
        s["recall"] = {r["topk"]: {"recall": r["recall_phsa"], "recall_meanpool": r["recall_meanpool"],
                                   "info_loss_reduction": r["info_loss_reduction"]}
                       for r in (res.get("recall") or {}).get("by_topk", [])}
    s["retrieval"] = retrieval_scores(res)
    s["retrieval_lam1"] = retrieval_scores(res1)
    if res1:
        s["perplexity_lam1"] = {p["topk"]: p["loss"] for p in res1.get("perplexity", []) if p["attention"] != "dense"}
    return s


def aggregate(runs: list[dict]) -> dict:
    by = defaultdict(list)
    for r in runs:
        by[r["variant"]].append(r)
    agg = {}
    for v, rs in sorted(by.items()):
        ek = next((r["eval_topk"] for r in rs if r.get("eval_topk")), None)
        tk = next((r["train_topk"] for r in rs if r.get("train_topk")), None)
        a = {"runs": [r["name"] for r in rs], "steps": [r["steps"] for r in rs], "tokens": [r["tokens"] for r in rs],
             "train_topk": tk, "eval_topk": ek,
             "final_valid_loss": mean_spread(r["final_valid_loss"] for r in rs),
             "median_tokens_per_s": mean_spread(r["median_tokens_per_s"] for r in rs)}
        keys = sorted({k for r in rs for k in r.get("perplexity", {})}, key=str)
        a["loss_by_topk"] = {str(k): mean_spread(r.get("perplexity", {}).get(k) for r in rs) for k in keys}
        keys = sorted({k for r in rs for k in r.get("perplexity_lam1", {})}, key=str)
        a["loss_lam1_by_topk"] = {str(k): mean_spread(r["perplexity_lam1"].get(k) for r in rs
                                                      if r.get("perplexity_lam1")) for k in keys}
        keys = sorted({k for r in rs for k in r.get("recall", {})})
        a["recall_by_topk"] = {str(k): {m: mean_spread(r["recall"][k][m] for r in rs if k in r.get("recall", {}))
                                        for m in ("recall", "recall_meanpool", "info_loss_reduction")}
                               for k in keys}
        for src in ("retrieval", "retrieval_lam1"):
            keys = sorted({k for r in rs for k in r.get(src, {})}, key=str)
            a[src + "_by_topk"] = {str(k): {m: mean_spread(r[src][k][m] for r in rs if k in r.get(src, {}))
                                            for m in ("beyond_local", "controls", "token_accuracy_beyond_local",
                                                      "answer_logprob_beyond_local", "answer_logprob_controls")}
                                   for k in keys}
        agg[v] = a
    return agg


def _eval_metrics(r: dict) -> dict:
    """The headline numbers of one run at its evaluation top-k (dense: the dense row)."""
    k = r.get("eval_topk") if r.get("eval_topk") is not None else "dense"
    ret = r.get("retrieval", {}).get(k, {})
    return {"loss": r.get("perplexity", {}).get(k), "recall": r.get("recall", {}).get(k, {}).get("recall"),
            "answer_logprob": ret.get("answer_logprob_beyond_local"), "retrieval": ret.get("beyond_local")}


def paired(runs: list[dict], a: str, b: str) -> dict:
    """Per seed index: metric(a) - metric(b) for two variants trained from the same seed (same init, data order)."""
    by = {(r["variant"], r["seed_index"]): _eval_metrics(r) for r in runs}
    seeds = sorted(i for (v, i) in by if v == a and (b, i) in by)
    out = {"a": a, "b": b, "seeds": seeds}
    for m in ("loss", "recall", "answer_logprob", "retrieval"):
        d = [by[(a, i)][m] - by[(b, i)][m] for i in seeds if by[(a, i)][m] is not None and by[(b, i)][m] is not None]
        out[m] = {"deltas": d, **(mean_spread(d) or {})} if d else None
    return out


PAIRS = (("phsa-qb64", "meanpool-qb64"), ("phsa-qb1", "phsa-qb64"), ("lam0.25-qb64", "phsa-qb64"),
         ("lam0-qb64", "phsa-qb64"), ("dot-qb64", "phsa-qb64"), ("dot-qb64", "meanpool-qb64"))


def warmup_noise_floor(runs: list[dict]) -> dict:
    """Runs from the same seed compute the same function until the dense warm-up ends (only kernels and
    non-deterministic reductions differ); the spread of their validation losses there is a floor under any
    difference between variants. {seed index: {"step", "losses": {run: loss}, "range"}}."""
    end = max((r["warmup_end"] for r in runs if r.get("warmup_end")), default=None)
    out = {}
    if end is None:
        return out
    for i in sorted({r["seed_index"] for r in runs if r["seed_index"] is not None}):
        pts = {}
        for r in runs:
            if r["seed_index"] == i:
                at = [v for st, v in r["valid_loss"] if st <= end]
                if at:
                    pts[r["name"]] = at[-1]
        if len(pts) > 1:
            out[str(i)] = {"step": end, "losses": pts, "range": max(pts.values()) - min(pts.values())}
    return out


ORDER = ["dense", "phsa-qb64", "meanpool-qb64", "dot-qb64", "lam0.25-qb64", "lam0-qb64", "phsa-qb1"]
LABEL = {"dense": "dense", "phsa-qb64": "PHSA λ=0.5", "meanpool-qb64": "mean-pool λ=1", "lam0.25-qb64": "λ=0.25",
         "lam0-qb64": "λ=0 (punctuation only)", "phsa-qb1": "PHSA λ=0.5, query_block 1",
         "dot-qb64": "PHSA λ=0.5, dot score"}


def ordered(agg: dict) -> list[str]:
    return [v for v in ORDER if v in agg] + sorted(v for v in agg if v not in ORDER)


def own_and_lam1_cells(a: dict, ks: list, field: str, digits: int) -> list:
    """Per k: the retrieval ``field`` with the model's own λ and with λ=1 (same weights), then the dense value."""
    cells = []
    for k in ks:
        cells.append(fmt(a["retrieval_by_topk"].get(k, {}).get(field), digits))
        cells.append(fmt(a["retrieval_lam1_by_topk"].get(k, {}).get(field), digits))
    return cells + [fmt(a["retrieval_by_topk"].get("dense", {}).get(field), digits)]


def markdown(agg: dict, pairs: list[dict] | None = None, floor: dict | None = None) -> str:
    out = ["| variant | seeds | steps | loss @ train k | loss @ eval k | same weights, λ=1 selection: loss @ eval k "
           "| recall @ eval k (own λ) | recall @ eval k (λ=1, same model) | info-loss reduction "
           "| retrieval beyond local @ eval k (own λ) | same, λ=1 selection | tokens/s (GPU shared, see plan) |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for v in ordered(agg):
        a = agg[v]
        tk, ek = str(a["train_topk"]), str(a["eval_topk"])
        if a["train_topk"] is None:
            tk = ek = "dense"
        rec = a["recall_by_topk"].get(ek, {})
        ret = a["retrieval_by_topk"].get(ek, {}).get("beyond_local")
        ret1 = a["retrieval_lam1_by_topk"].get(ek, {}).get("beyond_local")
        out.append(f"| {LABEL.get(v, v)} | {len(a['runs'])} | {'/'.join(map(str, a['steps']))} | "
                   f"{fmt(a['loss_by_topk'].get(tk))} | {fmt(a['loss_by_topk'].get(ek))} | "
                   f"{fmt(a['loss_lam1_by_topk'].get(ek))} | {fmt(rec.get('recall'))} | "
                   f"{fmt(rec.get('recall_meanpool'))} | {fmt(rec.get('info_loss_reduction'), 4)} | {fmt(ret, 2)} | "
                   f"{fmt(ret1, 2)} | {fmt(a['median_tokens_per_s'], 0)} |")
    ks = sorted({k for a in agg.values() for k in a["retrieval_by_topk"] if k != "dense"}, key=int)
    out += ["", "Retrieval (key-value facts in prose, exact match, needle beyond INIT and the local window) vs k; "
            "`own` = the model's λ, `λ=1` = the same weights with mean-pooled selection:", "",
            "| variant | " + " | ".join(f"k={k} own | k={k} λ=1" for k in ks) + " | dense |",
            "|---|" + "---|" * (2 * len(ks) + 1)]
    for v in ordered(agg):
        a = agg[v]
        cells = own_and_lam1_cells(a, ks, "beyond_local", 2)
        out.append(f"| {LABEL.get(v, v)} | " + " | ".join(cells) + " |")
    out += ["", "Answer log-probability (mean over the answer tokens, teacher-forced; a soft retrieval signal) vs k, "
            "needle beyond INIT + local window / controls (depth 0 and 1); `λ=1` = same weights, mean-pooled "
            "selection:", "",
            "| variant | " + " | ".join(f"k={k} own | k={k} λ=1" for k in ks) + " | dense | controls @ eval k |",
            "|---|" + "---|" * (2 * len(ks) + 2)]
    for v in ordered(agg):
        a = agg[v]
        cells = own_and_lam1_cells(a, ks, "answer_logprob_beyond_local", 3)
        ek = str(a["eval_topk"]) if a["eval_topk"] is not None else "dense"
        cells.append(fmt(a["retrieval_by_topk"].get(ek, {}).get("answer_logprob_controls"), 3))
        out.append(f"| {LABEL.get(v, v)} | " + " | ".join(cells) + " |")
    if pairs:
        out += ["", "Paired by seed (same initialisation and data order), a − b at each run's eval k, "
                "mean ± half-range over seeds (per-seed values):", "",
                "| a − b | seeds | Δ loss | Δ recall | Δ answer log-prob | Δ retrieval |", "|---|---|---|---|---|---|"]
        for p in pairs:
            cells = [f"{fmt(p[m], 4)} [{', '.join(f'{d:+.4f}' for d in p[m]['deltas'])}]" if p[m] else "—"
                     for m in ("loss", "recall", "answer_logprob", "retrieval")]
            out.append(f"| {LABEL.get(p['a'], p['a'])} − {LABEL.get(p['b'], p['b'])} | {len(p['seeds'])} | "
                       + " | ".join(cells) + " |")
    if floor:
        out += ["", "Noise floor: validation loss at the end of the dense warm-up, where runs of one seed compute the "
                "same function:", ""]
        for i, f in floor.items():
            vals = ", ".join(f"{n} {v:.3f}" for n, v in sorted(f["losses"].items()))
            out.append(f"- seed index {i}, step {f['step']}: range {f['range']:.3f} ({vals})")
    if "phsa-qb64" in agg and "phsa-qb1" in agg:
        out += ["", "query_block 1 vs 64 (PHSA λ=0.5, same steps, tokens and curriculum):", "",
                "| query_block | seeds | loss @ eval k | recall @ eval k | info-loss reduction | retrieval @ eval k | tokens/s |",
                "|---|---|---|---|---|---|---|"]
        for v, qb in (("phsa-qb1", 1), ("phsa-qb64", 64)):
            a = agg[v]
            ek = str(a["eval_topk"])
            rec = a["recall_by_topk"].get(ek, {})
            out.append(f"| {qb} | {len(a['runs'])} | {fmt(a['loss_by_topk'].get(ek))} | {fmt(rec.get('recall'))} | "
                       f"{fmt(rec.get('info_loss_reduction'), 4)} | "
                       f"{fmt(a['retrieval_by_topk'].get(ek, {}).get('beyond_local'), 2)} | "
                       f"{fmt(a['median_tokens_per_s'], 0)} |")
    return "\n".join(out)


def plots(runs_dir: Path, runs: list[dict], agg: dict, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    variants = ordered(agg)
    color = {v: f"C{i}" for i, v in enumerate(variants)}
    files = []
    # 1. loss
    fig, (ax_t, ax_v) = plt.subplots(1, 2, figsize=(12, 4.2))
    phases = None
    for r in runs:
        rows = load_jsonl(runs_dir / r["name"] / "metrics.jsonl")
        tr = [(x["step"], x["train/loss"]) for x in rows if "train/loss" in x]
        va = [(x["step"], x["valid/loss"]) for x in rows if "valid/loss" in x]
        ema, sm = None, []
        for s, v in tr:
            ema = v if ema is None else 0.95 * ema + 0.05 * v
            sm.append((s, ema))
        first = r["name"] == agg[r["variant"]]["runs"][0]
        lab = LABEL.get(r["variant"], r["variant"]) if first else None
        if sm:
            ax_t.plot(*zip(*sm), color=color[r["variant"]], lw=1, label=lab)
        if va:
            ax_v.plot(*zip(*va), color=color[r["variant"]], marker="o", ms=3, lw=1, label=lab)
        if phases is None and any("phsa/phase" in x for x in rows):
            phases = [(x["step"], x["phsa/phase"]) for x in rows if "phsa/phase" in x]
    if phases:
        for ax in (ax_t, ax_v):
            start = phases[0]
            for cur in phases[1:] + [(phases[-1][0] + 1, None)]:
                if cur[1] != start[1]:
                    shade = {"dense": "0.86", "ramp": "0.94"}.get(start[1])
                    if shade:
                        ax.axvspan(start[0], cur[0], color=shade, zorder=0)
                    ax.text((start[0] + cur[0]) / 2, 1.0, start[1], transform=ax.get_xaxis_transform(),
                            ha="center", va="bottom", fontsize=8)
                    start = cur
    ax_t.set(xlabel="step", ylabel="train loss (EMA 0.95)")
    ax_v.set(xlabel="step", ylabel="validation loss")
    for ax in (ax_t, ax_v):
        lo = [min(l.get_ydata()) for l in ax.get_lines() if len(l.get_ydata())]
        if lo:
            ax.set_ylim(min(lo) - 0.1, min(lo) + 2.5)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    files.append(out / "loss.png")
    fig.savefig(files[-1], dpi=110)
    plt.close(fig)
    # 2. recall over training (mean over layers), own selection solid, mean pooling dashed
    fig, (ax_r, ax_d, ax_c) = plt.subplots(1, 3, figsize=(17, 4.2))
    for r in runs:
        rows = load_jsonl(runs_dir / r["name"] / "metrics.jsonl")
        churn = [(x["step"], x["phsa_stats/churn"]) for x in rows if "phsa_stats/churn" in x and x["step"] > 12]
        if churn:
            ax_c.plot(*zip(*churn), color=color[r["variant"]], lw=1.2,
                      label=LABEL.get(r["variant"], r["variant"]) if r["name"] == agg[r["variant"]]["runs"][0] else None)
        pts = []
        for x in rows:
            rec = [v for k, v in x.items() if k.startswith("phsa_stats/") and k.endswith("/recall")]
            mp = [v for k, v in x.items() if k.startswith("phsa_stats/") and k.endswith("/recall_meanpool")]
            if rec and mp:
                pts.append((x["step"], float(np.mean(rec)), float(np.mean(mp))))
        if not pts:
            continue
        st, rc, mp = zip(*pts)
        first = r["name"] == agg[r["variant"]]["runs"][0]
        ax_r.plot(st, rc, color=color[r["variant"]], lw=1.2, label=LABEL.get(r["variant"], r["variant"]) if first else None)
        ax_r.plot(st, mp, color=color[r["variant"]], lw=1, ls="--")
        ax_d.plot(st, 1 - (1 - np.asarray(rc)) / (1 - np.asarray(mp)), color=color[r["variant"]], lw=1.2,
                  label=LABEL.get(r["variant"], r["variant"]) if first else None)
    ax_r.set(xlabel="step", ylabel="recall at the hold's top-k (mean over layers)",
             title="solid: the model's own λ; dashed: λ=1 on the same q/k")
    ax_d.set(xlabel="step", ylabel="information-loss reduction vs λ=1")
    ax_d.axhline(0, color="k", lw=0.6)
    ax_c.set(xlabel="step", ylabel="selection churn (Jaccard distance to the previous probe)", ylim=(0, None))
    for ax in (ax_r, ax_d, ax_c):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    files.append(out / "recall_over_training.png")
    fig.savefig(files[-1], dpi=110)
    plt.close(fig)
    # 3. retrieval vs k
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.4))
    for ax, metric in zip(axes, ("beyond_local", "answer_logprob_beyond_local")):
        for v in variants:
            a = agg[v]
            for src, ls in (("retrieval_by_topk", "-"), ("retrieval_lam1_by_topk", "--")):
                pts = [(int(k), m[metric]) for k, m in a[src].items() if k != "dense" and m.get(metric)]
                if pts:
                    ks, ms = zip(*sorted(pts))
                    ax.errorbar(ks, [m["mean"] for m in ms], yerr=[m["spread"] for m in ms], color=color[v], ls=ls,
                                marker="o", ms=3, capsize=2,
                                label=LABEL.get(v, v) + (" (λ=1 selection)" if ls == "--" else ""))
            d = a["retrieval_by_topk"].get("dense", {}).get(metric)
            if d:
                ax.axhline(d["mean"], color=color[v], lw=1, ls=":", label=LABEL.get(v, v))
        ax.set_xscale("log", base=2)
        ax.grid(alpha=0.3)
    axes[0].set(xlabel="top-k blocks", ylabel="exact match, needle beyond INIT + local window", ylim=(-0.02, 1.02),
                title="key-value facts in prose: exact match")
    axes[1].set(xlabel="top-k blocks", ylabel="answer log-prob per token (beyond local)",
                title="soft signal: mean log-prob of the answer tokens")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    files.append(out / "retrieval_vs_k.png")
    fig.savefig(files[-1], dpi=110)
    plt.close(fig)
    # 4. length x depth grid at the eval top-k (first seed of each variant)
    panels = []
    for v in variants:
        r = next(x for x in runs if x["name"] == agg[v]["runs"][0])
        key = agg[v]["eval_topk"] if agg[v]["eval_topk"] is not None else "dense"
        g = r["retrieval"].get(key)
        if g:
            panels.append((v, key, g))
    if panels:
        fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.2), squeeze=False)
        for ax, (v, key, g) in zip(axes[0], panels):
            ax.imshow(np.asarray(g["grid"]), vmin=0, vmax=1, cmap="viridis", aspect="auto", origin="lower")
            ax.set_xticks(range(len(g["depths"])), [f"{d:g}" for d in g["depths"]], fontsize=7)
            ax.set_yticks(range(len(g["lengths"])), [str(n) for n in g["lengths"]], fontsize=7)
            ax.set(xlabel="depth", title=f"{LABEL.get(v, v)}\n{'dense' if key == 'dense' else f'k={key}'}")
            for (i, j), val in np.ndenumerate(np.asarray(g["grid"])):
                ax.text(j, i, f"{val:.2f}", ha="center", va="center", fontsize=6, color="w" if val < 0.6 else "k")
        axes[0][0].set_ylabel("length")
        fig.tight_layout()
        files.append(out / "retrieval_grid.png")
        fig.savefig(files[-1], dpi=110)
        plt.close(fig)
    return files


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs_dir", type=Path)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--plots", type=Path)
    ap.add_argument("--md", type=Path)
    args = ap.parse_args(argv)
    runs = [run_summary(d) for d in sorted(args.runs_dir.iterdir()) if (d / "metrics.jsonl").exists()]
    agg = aggregate(runs)
    pairs = [paired(runs, a, b) for a, b in PAIRS if a in agg and b in agg]
    pairs = [p for p in pairs if p["seeds"]]
    floor = warmup_noise_floor(runs)
    md = markdown(agg, pairs, floor)
    print(md)
    summary = {"variants": agg, "paired": pairs, "warmup_noise_floor": floor, "runs": runs}
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1, default=str))
    if args.md:
        args.md.write_text(md + "\n")
    if args.plots:
        for f in plots(args.runs_dir, runs, agg, args.plots):
            print("wrote", f)
    return summary


if __name__ == "__main__":
    main()
