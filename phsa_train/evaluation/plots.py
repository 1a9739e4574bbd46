"""PNG plots of an evaluation: retrieval exact match (length x depth) and attention recall vs top-k."""
from __future__ import annotations

from pathlib import Path

import numpy as np


def plot_retrieval(rows: list[dict], path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(rows), figsize=(1.2 + 4.2 * len(rows), 3.8), squeeze=False)
    axes[0][0].set_ylabel("sequence length (tokens)")
    for ax, row in zip(axes[0], rows):
        em = np.asarray(row["exact_match"])
        im = ax.imshow(em, vmin=0, vmax=1, cmap="viridis", aspect="auto", origin="lower")
        ax.set_xticks(range(len(row["depths"])), [f"{d:g}" for d in row["depths"]])
        ax.set_yticks(range(len(row["lengths"])), [str(n) for n in row["lengths"]])
        ax.set_xlabel("needle depth")
        for (i, j), v in np.ndenumerate(em):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", color="w" if v < 0.6 else "k", fontsize=8)
        ax.set_title("dense attention" if row["topk"] is None else
                     f"top-k {row['topk']}" + (f" ({'/'.join(row['roles'])})" if row["roles"] else ""))
    fig.colorbar(im, ax=axes[0].tolist(), label="exact match")
    fig.suptitle(title, fontsize=10)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_recall(recall: dict, path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = recall["by_topk"]
    ks = [r["topk"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for key, label in (("phsa", f"PHSA (lam={recall['lam_phsa']:g})"), ("meanpool", "mean pooling (lam=1)")):
        axes[0].plot(ks, [r[f"recall_{key}"] for r in rows], "o-", label=label)
        axes[1].plot(ks, [r[f"info_loss_{key}"] for r in rows], "o-", label=label)
    for ax, ylabel in zip(axes, ("attention recall (mean over layers)", "information loss = 1 - recall")):
        ax.set_xscale("symlog", base=2, linthresh=1)
        ax.set_xticks(ks, [str(k) for k in ks])
        ax.set_xlabel("top-k blocks")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend()
    for r in rows:
        for role in r["roles"]:
            axes[0].annotate(role, (r["topk"], r["recall_phsa"]), textcoords="offset points", xytext=(4, -12), fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
