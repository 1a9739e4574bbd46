"""One run per run dir: a start that finds checkpoints resumes them only if it is the same run.

The same run means the same model, attention, curriculum, data stream and optimisation as the checkpoint was
trained with. A resume may change how long the run goes (``train.steps``), how it is computed (kernels, precision,
recompute, micro-batching, parallel layout), logged, evaluated and checkpointed, and where its files are (data
paths, caches: the same corpus moved to another machine). A start with any other setting changed is refused in
one line, before any model is built: resuming it would continue someone else's weights and optimizer state and
mix two runs in one metrics.jsonl.
"""
from __future__ import annotations

from pathlib import Path

from phsa_train.config import ConfigError

# The config sections that define a run; every key in them counts unless listed in MAY_CHANGE.
RUN_SECTIONS = ("model", "attention", "curriculum", "data", "train")
MAY_CHANGE = frozenset({
    "model.transformer_impl", "attention.backend", "attention.eval_topk",
    "curriculum.stats_interval", "curriculum.stats_queries", "curriculum.loss_spike_factor",
    "data.prefixes", "data.tokenizer", "data.punct_table", "data.cache_dir", "data.num_workers",
    "train.steps", "train.exit_after_steps", "train.micro_batch_size", "train.precision", "train.recompute",
    "train.fused_kernels", "train.loss_chunk_tokens", "train.eval_interval", "train.eval_iters",
    "train.log_interval", "train.max_skipped_steps",
})


def _flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, name + "."))
        else:
            out[name] = value
    return out


def run_differences(saved: dict, now: dict) -> list[tuple[str, object, object]]:
    """``(key, saved value, current value)`` for every run-defining key that differs. Both configs are resolved
    dicts (``OmegaConf.to_container(cfg, resolve=True)``); a key the saved config lacks (written before that knob
    existed) is not compared."""
    old = _flatten({s: saved.get(s, {}) for s in RUN_SECTIONS})
    new = _flatten({s: now.get(s, {}) for s in RUN_SECTIONS})
    return [(k, old[k], new.get(k)) for k in sorted(old) if k not in MAY_CHANGE and old[k] != new.get(k)]


def check_same_run(ckpt_path: Path, saved: dict, now: dict) -> None:
    """Raise :class:`ConfigError` (one line) when the checkpoint at ``ckpt_path`` with config ``saved`` belongs
    to another run than config ``now``."""
    diffs = run_differences(saved, now)
    if not diffs:
        return
    shown = ", ".join(f"{k}={old!r} (now {new!r})" for k, old, new in diffs[:3])
    more = f" and {len(diffs) - 3} more" if len(diffs) > 3 else ""
    raise ConfigError(f"{ckpt_path} belongs to another run: it was trained with {shown}{more}; start this run in "
                      "another run dir (PHSA_RUN_DIR, or hydra.run.dir), or give the settings of that run to resume it")
