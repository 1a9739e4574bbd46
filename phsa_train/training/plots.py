"""PNG plots of a run from its ``metrics.jsonl`` (for users without W&B, and for quick looks)."""
from __future__ import annotations

from pathlib import Path

from phsa_train.training.metrics import read_metrics


def _series(rows, key):
    pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
    return [p[0] for p in pts], [p[1] for p in pts]


def plot_run(run_dir: str | Path) -> list[Path]:
    """Write ``loss.png`` (train/valid loss, with the PHSA activation ratio when logged) into the run dir."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    rows = read_metrics(run_dir)
    if not rows:
        return []
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for key, style in (("train/loss", "-"), ("valid/loss", "o-")):
        x, y = _series(rows, key)
        if x:
            ax.plot(x, y, style, label=key, markersize=3)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    x, y = _series(rows, "phsa/activation_ratio")
    if x:
        ax2 = ax.twinx()
        ax2.plot(x, [1 - v for v in y], "--", color="tab:red", label="sparsity (budget)")
        ax2.set_ylabel("sparsity")
        ax2.set_ylim(0, 1)
        ax2.legend(loc="upper center")
    ax.legend(loc="upper right")
    ax.set_title(run_dir.name)
    fig.tight_layout()
    out = run_dir / "loss.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    outs = [out]
    x, _ = _series(rows, "phsa_stats/recall")
    if x:
        fig, ax = plt.subplots(figsize=(8, 4.5))
        for key, label in (("phsa_stats/recall", "PHSA recall"), ("phsa_stats/recall_meanpool", "mean-pool recall"),
                           ("phsa_stats/punct_block_frac", "selected blocks with punctuation"),
                           ("phsa_stats/churn", "selection churn")):
            xs, ys = _series(rows, key)
            if xs:
                ax.plot(xs, ys, "o-", label=label, markersize=3)
        ax.set_xlabel("step")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        ax.legend()
        ax.set_title(f"{run_dir.name}: selection quality at the hold's top-k (probe sequence)")
        fig.tight_layout()
        outs.append(run_dir / "selection.png")
        fig.savefig(outs[-1], dpi=110)
        plt.close(fig)
    return outs
