"""Quality evaluation of a checkpoint, behind ``python -m phsa_train.eval eval.checkpoint=RUN_DIR/checkpoints [eval.*=...]``.

Reads top to bottom: checkpoint + its training config (meta.json) -> 1-rank process group -> data -> model ->
  1. validation perplexity (the training loop's own ``evaluate``) at the training top-k, the evaluation
     top-k and every ``eval.topks`` value (PHSA models; plus the same weights with dense attention),
  2. attention recall / information loss per layer (docs/phsa.md) at those top-k values, for the model's lam
     (PHSA) and lam = 1 (mean pooling) at the same budget, on the model's own post-RoPE q/k,
  3. synthetic long-context retrieval (phsa_train/evaluation/retrieval.py): a fact planted at ``eval.retrieval.depths``
     of real validation text, queried at the end, at ``eval.retrieval.lengths``; score = teacher-forced
     exact match (identical to greedy-decoding exact match), token accuracy and answer log-prob,
-> ``results.json`` + ``retrieval.png`` (heat-map length x depth) + ``recall.png`` (recall vs top-k) in
``eval.output_dir`` (default ``<run dir>/eval/iter_XXXXXXX``).

Single process on CPU (gloo) or one GPU (NCCL). The model is built with TP = PP = CP = 1; a checkpoint saved
with another layout relies on Megatron's dist_checkpointing to reshard it (tested here only for DP-saved
checkpoints), and its precision is the run's ``train.precision`` (auto: bf16 on GPU, fp32 on CPU). Knobs: conf/eval.yaml; the checkpoint's training config can
be changed with ``eval.overrides=[attention.backend=reference,data.cache_dir=/x]``.
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional

import numpy as np
import torch
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from phsa_train.config import ConfigError
from phsa_train.evaluation.retrieval import KINDS

# ---------------------------------------------------------------------------------------------------- config


@dataclass
class RecallConfig:
    enabled: bool = True
    samples: int = 2  # validation sequences (full data.seq_len) whose q/k are captured
    queries: int = 256  # query positions per sequence, spread evenly over those with an eligible block


@dataclass
class RetrievalConfig:
    enabled: bool = True
    kind: str = "passkey"  # passkey | kv (phsa_train/evaluation/retrieval.py)
    lengths: Optional[List[int]] = None  # null: data.seq_len x [1/8, 1/4, 1/2, 1]; max model.max_position_embeddings
    depths: List[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])  # needle position / haystack
    samples: int = 16  # per (length, depth) cell; sample j uses the same haystack and fact in every cell
    batch_size: int = 4
    value_digits: int = 5
    topks: Optional[List[int]] = None  # PHSA models: null = the training and evaluation top-k
    seed: int = 0


@dataclass
class EvalConfig:
    checkpoint: str = MISSING  # RUN_DIR/checkpoints (or RUN_DIR)
    step: Optional[int] = None  # null: the latest checkpoint
    output_dir: Optional[str] = None  # null: <checkpoint dir>/../eval/iter_XXXXXXX
    topks: List[int] = field(default_factory=list)  # extra top-k values (perplexity + recall)
    perplexity: bool = True
    dense_perplexity: bool = True  # PHSA models: also the perplexity with every layer dense
    valid_iters: Optional[int] = None  # validation global batches; null: the run's train.eval_iters
    overrides: List[str] = field(default_factory=list)  # dotted overrides of the checkpoint's training config
    plots: bool = True
    recall: RecallConfig = field(default_factory=RecallConfig)
    retrieval: RetrievalConfig = field(default_factory=RetrievalConfig)


@dataclass
class EvalRoot:
    eval: EvalConfig = field(default_factory=EvalConfig)


def register_eval_configs() -> None:
    ConfigStore.instance().store(name="base_eval", node=EvalRoot)



def log(msg: str) -> None:
    print(f"[eval] {msg}", flush=True)


# ------------------------------------------------------------------------------------------- checkpoint + cfg


def resolve_checkpoint(path: str, step: Optional[int]) -> tuple[Path, int]:
    """(checkpoint root, step) for ``eval.checkpoint`` (a checkpoints dir or the run dir holding one)."""
    root = Path(path).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"eval.checkpoint={path}: no such directory")
    from phsa_train.training import checkpoint as ckpt  # imports megatron: after the cheap check

    for cand in (root, root / "checkpoints"):
        last = ckpt.latest_step(cand) if cand.is_dir() else None
        if last is not None:
            break
    else:
        raise FileNotFoundError(f"eval.checkpoint={path}: no checkpoint (iter_*/meta.json) in it or in its checkpoints/")
    if step is None:
        return cand, last
    if not (ckpt.iter_dir(cand, step) / ckpt.META).exists():
        raise FileNotFoundError(f"eval.step={step}: no checkpoint {ckpt.iter_dir(cand, step).name} under {cand}")
    return cand, step


def training_config(root: Path, step: int, overrides: list[str]) -> tuple[DictConfig, dict]:
    """The run's resolved training config from meta.json (typed by the schema), overrides applied, and meta."""
    from phsa_train.config.schema import Config, upgrade_saved_config
    from phsa_train.training import checkpoint as ckpt

    meta = ckpt.read_meta(ckpt.iter_dir(root, step))
    try:
        extra = OmegaConf.from_dotlist(list(overrides))
        cfg = OmegaConf.merge(OmegaConf.structured(Config), upgrade_saved_config(meta["config"]), extra)
    except Exception as e:  # omegaconf's validation errors: a typo'd key or a wrong type
        raise ConfigError(f"eval.overrides={list(overrides)}: {str(e).splitlines()[0]}") from e
    # One rank: every parallel layout of the checkpoint is loaded into TP = PP = CP = 1.
    cfg.parallel.tensor_model_parallel_size = cfg.parallel.pipeline_model_parallel_size = 1
    cfg.parallel.context_parallel_size = 1
    return cfg, meta


@dataclass
class TopKPlan:
    """Which top-k values to evaluate and what they were in training (PHSA models)."""

    train_topk: Optional[int]
    eval_topk: Optional[int]
    phase: str  # curriculum phase of the checkpoint's last training step
    topks: list  # sorted, unique

    def roles(self, k: int) -> list[str]:
        return [r for r, v in (("train", self.train_topk), ("eval", self.eval_topk)) if v == k]


def topk_plan(cfg, step: int, extra: list[int]) -> TopKPlan:
    from phsa_train.training.curriculum import build_curriculum

    for k in extra:
        if not isinstance(k, int) or k < 0:
            raise ConfigError(f"eval.topks: {k!r} must be an int >= 0")
    cur = build_curriculum(cfg)
    if not cur.phsa:
        return TopKPlan(None, None, "off", [])
    s = cur.sparsity_at_step(max(0, step - 1))  # the step the checkpoint's weights were last trained at
    return TopKPlan(s.train_topk, s.eval_topk, s.phase, sorted({s.train_topk, s.eval_topk, *extra}))


def sparsity_info(cfg, k: int, L: int) -> dict:
    from phsa_train.attention import activation_ratio, causal_activation_ratio

    a = cfg.attention
    budget = activation_ratio(L, a.n_init, a.local_window, k, a.block_size)
    return {"activation_ratio": budget, "sparsity": 1 - budget,
            "causal_activation_ratio": causal_activation_ratio(L, a.n_init, a.local_window, k, a.block_size,
                                                               a.query_block)}


# -------------------------------------------------------------------------------------------------- measures


def perplexity(model, data, cfg, device, plan: TopKPlan, dense: bool) -> list[dict]:
    """Validation loss/ppl with ``phsa_train.training.step.evaluate`` (the numbers training logs) at each top-k, over
    ``cfg.train.eval_iters`` global batches."""
    from phsa_train.megatron.core_attention import set_sparsity
    from phsa_train.training.step import evaluate, forward_backward_local

    runs = [(None, False)] if not plan.topks else [(k, False) for k in plan.topks] + ([(None, True)] if dense else [])
    rows = []
    for k, all_dense in runs:
        t0 = time.time()
        if plan.topks:
            set_sparsity(model, eval_topk=k, dense=all_dense)
        # The plain microbatch loop (PP = 1) on CPU and GPU alike: forward only, same numbers as training logs.
        loss = evaluate(model, forward_backward_local, data, cfg, device)
        row = {"topk": k, "attention": "dense" if k is None else "sparse", "loss": loss, "ppl": math.exp(loss)}
        if k is not None:
            row.update(roles=plan.roles(k), **sparsity_info(cfg, k, cfg.data.seq_len))
        rows.append(row)
        log(f"perplexity {'dense' if k is None else f'k={k}'}: loss {loss:.4f} ppl {row['ppl']:.2f} "
            f"({cfg.train.eval_iters} x {cfg.train.global_batch_size} sequences of {cfg.data.seq_len}, {time.time() - t0:.1f} s)")
    return rows


@torch.no_grad()
def attention_recall_eval(model, data, cfg, device, plan: TopKPlan, rc: RecallConfig) -> dict:
    """Per-layer recall of PHSA (the model's lam) and mean pooling (lam = 1) at each top-k (docs/phsa.md)."""
    from phsa_train.megatron.core_attention import set_sparsity
    from phsa_train.megatron.token_info import document_cu_seqlens, make_token_info, punct_mask
    from phsa_train.evaluation.selection_stats import capture_qk, layer_recall, probe_positions

    a = cfg.attention
    n = min(rc.samples, len(data.valid))
    tokens = torch.stack([torch.as_tensor(data.valid[i]["tokens"]) for i in range(n)]).long().to(device)
    L = tokens.shape[1]
    info = make_token_info(tokens, data.punct_lut, data.eod if cfg.data.reset_attention_mask else None)
    pos = probe_positions(L, a, rc.queries, device)
    out = {"seq_len": L, "samples": n, "queries": 0 if pos is None else len(pos), "lam_phsa": a.lam,
           "lam_meanpool": 1.0, "by_topk": []}
    if pos is None:
        out["skipped"] = f"no query of a {L}-token sequence has an eligible block (n_init/local_window too large)"
        return out
    for k in plan.topks:
        t0 = time.time()
        set_sparsity(model, eval_topk=k, dense=False)
        model.eval()
        with capture_qk(model) as captured:
            model(tokens, torch.arange(L, device=device).expand(n, L), None, extra_block_kwargs={"attention_bias": info})
        layers = []
        for layer, q, kk, inf in captured:
            sums = {"phsa": 0.0, "meanpool": 0.0}
            for r in range(n):  # layer_recall averages over row 0's positions
                q1, k1, pm = q[r:r + 1].float(), kk[r:r + 1].float(), punct_mask(inf[r:r + 1])
                cu = document_cu_seqlens(inf[r:r + 1])
                sums["phsa"] += layer_recall(q1, k1, pm, a, k, a.lam, pos, cu)[0] / n
                sums["meanpool"] += layer_recall(q1, k1, pm, a, k, 1.0, pos, cu)[0] / n
            layers.append(_recall_row({"layer": layer}, sums["phsa"], sums["meanpool"]))
        mean = lambda key: sum(r[key] for r in layers) / len(layers)  # noqa: E731
        row = _recall_row({"topk": k, "roles": plan.roles(k), **sparsity_info(cfg, k, L)},
                          mean("recall_phsa"), mean("recall_meanpool"))
        row["layers"] = layers
        out["by_topk"].append(row)
        log(f"recall k={k}: PHSA {row['recall_phsa']:.4f} mean-pool {row['recall_meanpool']:.4f} "
            f"info-loss reduction {_pct(row['info_loss_reduction'])} ({len(layers)} layers, {time.time() - t0:.1f} s)")
    return out


def _pct(x) -> str:
    return "n/a" if x is None else f"{x:+.1%}"


def _recall_row(row: dict, recall_phsa: float, recall_mean: float) -> dict:
    loss_mean = 1 - recall_mean  # None below: both selections keep (almost) everything, nothing to reduce
    row.update(recall_phsa=recall_phsa, recall_meanpool=recall_mean, info_loss_phsa=1 - recall_phsa,
               info_loss_meanpool=loss_mean,
               info_loss_reduction=1 - (1 - recall_phsa) / loss_mean if loss_mean > 1e-6 else None)
    return row


def retrieval_lengths(cfg, rc: RetrievalConfig) -> list[int]:
    L, max_pos = cfg.data.seq_len, cfg.model.max_position_embeddings
    lengths = list(rc.lengths) if rc.lengths else sorted({max(1, L // d) for d in (8, 4, 2, 1)})
    for n in lengths:
        if n > max_pos:
            raise ConfigError(f"eval.retrieval.lengths: {n} is over the model's limit "
                              f"model.max_position_embeddings={max_pos}")
        if n < 1:
            raise ConfigError(f"eval.retrieval.lengths: {n} must be >= 1")
    if rc.kind not in KINDS:
        raise ConfigError(f"eval.retrieval.kind={rc.kind!r} is not supported; allowed: {', '.join(KINDS)}")
    for k in rc.topks or []:
        if not isinstance(k, int) or k < 0:
            raise ConfigError(f"eval.retrieval.topks: {k!r} must be an int >= 0")
    for d in rc.depths:
        if not 0.0 <= d <= 1.0:
            raise ConfigError(f"eval.retrieval.depths: {d} is outside [0, 1]")
    if rc.samples < 1 or rc.batch_size < 1:
        raise ConfigError(f"eval.retrieval.samples={rc.samples} and eval.retrieval.batch_size={rc.batch_size} "
                          "must be >= 1")
    return lengths


@dataclass
class RetrievalSet:
    """The facts and haystacks of the retrieval grid (built before any model work, so bad lengths fail fast)."""

    facts: list
    haystacks: list
    lengths: list


def retrieval_set(data, cfg, rc: RetrievalConfig) -> RetrievalSet:
    """Sample j: fact j (seeded by (seed, j)) in haystack j (real validation text); the same in every cell."""
    from phsa_train.evaluation.retrieval import random_fact

    lengths = retrieval_lengths(cfg, rc)
    facts = [random_fact(np.random.default_rng([rc.seed, j]), data.tokenizer, rc.kind, rc.value_digits)
             for j in range(rc.samples)]
    overhead = max(f.overhead for f in facts)
    if rc.lengths is None:  # the default grid: drop lengths too short to hold the fact in some haystack
        lengths = [n for n in lengths if n >= 2 * overhead] or [cfg.data.seq_len]
    for n in lengths:
        if n <= overhead:
            raise ConfigError(f"eval.retrieval.lengths: {n} tokens cannot hold the fact ({overhead} tokens)")
    drop_eod = bool(cfg.data.reset_attention_mask)  # an EOD between needle and query would cut them apart
    hay = [_haystack(data, j * 7919, max(lengths), drop_eod) for j in range(rc.samples)]  # spread over valid
    return RetrievalSet(facts, hay, lengths)


def _haystack(data, j: int, n: int, drop_eod: bool) -> np.ndarray:
    """``n`` tokens of real validation text: validation sequences j, j+1, ... concatenated."""
    parts, have, i = [], 0, j
    while have < n:
        t = np.asarray(data.valid[i % len(data.valid)]["tokens"], dtype=np.int64)
        if drop_eod:
            t = t[t != data.eod]
        parts.append(t)
        have += len(t)
        i += 1
        if i - j > 4 * n + 16:
            raise ValueError("the validation data has too few tokens for the retrieval haystacks")
    return np.concatenate(parts)[:n]


@torch.no_grad()
def retrieval_eval(model, data, cfg, device, plan: TopKPlan, rc: RetrievalConfig, rs: RetrievalSet) -> list[dict]:
    """Teacher-forced retrieval scores on the length x depth grid, for each top-k (or once for dense)."""
    from phsa_train.megatron.core_attention import set_sparsity
    from phsa_train.megatron.token_info import make_token_info
    from phsa_train.evaluation.retrieval import make_sample, score_answers

    lengths = rs.lengths
    if not plan.topks:
        runs = [None]  # dense model
    elif rc.topks is None:
        runs = sorted({plan.train_topk, plan.eval_topk})
    else:
        runs = sorted(set(rc.topks))
    out = []
    for k in runs:
        if k is not None:
            set_sparsity(model, eval_topk=k, dense=False)
        model.eval()
        t0 = time.time()
        grid = {m: np.zeros((len(lengths), len(rc.depths))) for m in ("exact_match", "token_accuracy", "answer_logprob")}
        for li, n in enumerate(lengths):
            for di, depth in enumerate(rc.depths):
                samples = [make_sample(h, f, n, depth) for h, f in zip(rs.haystacks, rs.facts)]
                scores = {m: [] for m in grid}
                for b0 in range(0, len(samples), rc.batch_size):
                    # Samples of one batch share the length; answers differ in length only across facts, so
                    # score each sample with its own answer span.
                    chunk = samples[b0:b0 + rc.batch_size]
                    tokens = torch.as_tensor(np.stack([s.tokens for s in chunk]), device=device)
                    info = make_token_info(tokens, data.punct_lut, data.eod if cfg.data.reset_attention_mask else None)
                    logits = model(tokens, torch.arange(n, device=device).expand(len(chunk), n), None,
                                   extra_block_kwargs={"attention_bias": info})
                    for r, s in enumerate(chunk):
                        sc = score_answers(logits[r:r + 1], tokens[r:r + 1], s.answer_start, s.answer_len)
                        for m in grid:
                            scores[m] += sc[m]
                for m in grid:
                    grid[m][li, di] = float(np.mean(scores[m]))
            log(f"retrieval {'dense' if k is None else f'k={k}'} length {n}: exact match by depth "
                + " ".join(f"{d:g}:{v:.2f}" for d, v in zip(rc.depths, grid['exact_match'][li]))
                + f" ({time.time() - t0:.1f} s)")
        row = {"topk": k, "roles": plan.roles(k) if k is not None else [], "lengths": lengths,
               "depths": list(rc.depths), **{m: g.tolist() for m, g in grid.items()},
               "exact_match_by_length": dict(zip(map(str, lengths), grid["exact_match"].mean(1).tolist())),
               "exact_match_mean": float(grid["exact_match"].mean())}
        out.append(row)
    return out


# ------------------------------------------------------------------------------------------------------- main


def run_eval(ecfg: DictConfig) -> dict:
    """Everything above for one checkpoint; returns the results dict (also written to results.json)."""
    from phsa_train.training import checkpoint as ckpt
    from phsa_train.evaluation.plots import plot_recall, plot_retrieval
    from phsa_train.training.data import build_data
    from phsa_train.config import validate
    from phsa_train.training.distributed import init_distributed, init_model_parallel, prepare_device, shutdown
    from phsa_train.megatron.model import build_model, padded_vocab_size

    logging.getLogger("megatron").setLevel(logging.WARNING)
    t_start = time.time()
    e = ecfg.eval
    root, step = resolve_checkpoint(e.checkpoint, e.step)
    cfg, meta = training_config(root, step, e.overrides)
    validate(cfg, 1)
    plan = topk_plan(cfg, step, list(e.topks))
    if e.retrieval.enabled:
        retrieval_lengths(cfg, e.retrieval)  # knob checks before the process group and the data
    valid_iters = e.valid_iters if e.valid_iters is not None else max(1, cfg.train.eval_iters)
    if valid_iters < 1:
        raise ConfigError(f"eval.valid_iters={valid_iters} must be >= 1")
    cfg.train.eval_iters = valid_iters  # build_data sizes the validation set from it
    out_dir = Path(e.output_dir) if e.output_dir else root.parent / "eval" / ckpt.iter_dir(root, step).name

    env = init_distributed()
    try:
        init_model_parallel(1, 1, 1)
        on_gpu = prepare_device(env, cfg.train.seed)
        log(f"checkpoint {root} step {step}: {cfg.model.name} {cfg.attention.name}"
            + (f" (lam {cfg.attention.lam})" if plan.topks else "") + ", "
            f"trained at seq {cfg.data.seq_len}" + (f", top-k train {plan.train_topk} / eval {plan.eval_topk} "
                                                    f"(phase {plan.phase})" if plan.topks else "")
            + f"; on {env.device.type}")
        data = build_data(cfg, env, lambda v: padded_vocab_size(v, cfg.model.make_vocab_size_divisible_by, 1))
        precision = cfg.train.precision if cfg.train.precision != "auto" else ("bf16" if on_gpu else "fp32")
        rs = retrieval_set(data, cfg, e.retrieval) if e.retrieval.enabled else None
        model = build_model(cfg, data.vocab_size, torch.bfloat16 if precision == "bf16" else torch.float32)
        ckpt.load(root, step, model)
        model.eval()
        log(f"loaded weights ({time.time() - t_start:.1f} s)")

        results: dict[str, Any] = {
            "checkpoint": str(root), "step": step, "consumed_samples": meta.get("consumed_samples"),
            "model": cfg.model.name, "attention": OmegaConf.to_container(cfg.attention, resolve=True),
            "seq_len": cfg.data.seq_len, "max_position_embeddings": cfg.model.max_position_embeddings,
            "train_topk": plan.train_topk, "eval_topk": plan.eval_topk, "curriculum_phase": plan.phase,
            "topks": plan.topks, "device": torch.cuda.get_device_name() if on_gpu else "cpu", "precision": precision,
            "eval_config": OmegaConf.to_container(e, resolve=True),
        }
        if e.perplexity:
            results["perplexity"] = perplexity(model, data, cfg, env.device, plan, e.dense_perplexity)
        if e.recall.enabled:
            results["recall"] = (attention_recall_eval(model, data, cfg, env.device, plan, e.recall) if plan.topks
                                 else {"skipped": "dense attention model: recall is 1 by construction"})
        if e.retrieval.enabled:
            results["retrieval"] = {"kind": e.retrieval.kind, "samples_per_cell": e.retrieval.samples,
                                    "score": "teacher-forced; exact_match == greedy-decoding exact match",
                                    "by_topk": retrieval_eval(model, data, cfg, env.device, plan, e.retrieval, rs)}
    finally:
        shutdown()

    out_dir.mkdir(parents=True, exist_ok=True)
    title = f"{cfg.run_name} step {step}"
    files = []
    if e.plots and e.retrieval.enabled:
        files.append(plot_retrieval(results["retrieval"]["by_topk"], out_dir / "retrieval.png", title).name)
    if e.plots and results.get("recall", {}).get("by_topk"):
        files.append(plot_recall(results["recall"], out_dir / "recall.png", title).name)
    results["files"] = ["results.json", *files]
    results["seconds"] = round(time.time() - t_start, 1)
    tmp = out_dir / "results.json.tmp"
    tmp.write_text(json.dumps(results, indent=1))
    os.replace(tmp, out_dir / "results.json")
    log(f"wrote {', '.join(results['files'])} to {out_dir} ({results['seconds']} s)")
    return results
