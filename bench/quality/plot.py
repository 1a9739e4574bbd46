"""One figure comparing the quality runs: train loss (smoothed) and validation loss vs step, with the
curriculum's phases shaded from the sparse runs' logged top-k. Usage:
    python bench/quality/plot.py RUNS_DIR OUT.png          (RUNS_DIR holds dense/, phsa/, meanpool/)"""
from __future__ import annotations

import json
import sys
from pathlib import Path


def load(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def main(runs: Path, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_v) = plt.subplots(1, 2, figsize=(11, 4))
    labels = {"dense": "dense", "phsa": "PHSA λ=0.5", "meanpool": "mean-pool λ=1"}
    phases = None
    for name, label in labels.items():
        f = runs / name / "metrics.jsonl"
        if not f.exists():
            continue
        rows = load(f)
        tr = [(r["step"], r["train/loss"]) for r in rows if "train/loss" in r]
        va = [(r["step"], r["valid/loss"]) for r in rows if "valid/loss" in r]
        ema, sm = None, []
        for s, v in tr:  # exponential smoothing: one micro-batch's loss is noisy
            ema = v if ema is None else 0.9 * ema + 0.1 * v
            sm.append((s, ema))
        ax_t.plot(*zip(*sm), label=label)
        ax_v.plot(*zip(*va), marker="o", label=label)
        if phases is None and any("phsa/phase" in r for r in rows):
            phases = [(r["step"], r["phsa/phase"]) for r in rows if "phsa/phase" in r]
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
    ax_t.set(xlabel="step", ylabel="train loss (EMA 0.9)", ylim=(None, 7))
    ax_v.set(xlabel="step", ylabel="validation loss", ylim=(None, 6))
    for ax in (ax_t, ax_v):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    print("wrote", out)


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] in ("-h", "--help"):
        print(__doc__)
        sys.exit(0 if len(sys.argv) > 1 and sys.argv[1] in ("-h", "--help") else 2)
    main(Path(sys.argv[1]), Path(sys.argv[2]))
