"""Cross-field checks of a composed config, run before anything heavy is built.

Every error is one line that names the knob(s) and the allowed values, so a bad override fails in
seconds at start-up instead of minutes later inside a kernel or a collective.
"""
from __future__ import annotations

from omegaconf import DictConfig

from phsa_train.attention.params import BACKENDS
from phsa_train.config.schema import phsa_params_from_config

ATTENTION_NAMES = ("dense", "phsa", "meanpool")
DENSE_BACKENDS = ("auto", "sdpa")
TRANSFORMER_IMPLS = ("local", "transformer_engine")
CP_MODES = ("allgather", "ulysses")
PRECISIONS = ("auto", "bf16", "fp32")
RESUME = ("auto", "true", "false")
WANDB_MODES = ("offline", "online", "disabled")
LR_STYLES = ("cosine", "linear", "constant")


class ConfigError(ValueError):
    """A bad knob value or combination; the message names the knob."""


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def _one_of(name: str, value, allowed) -> None:
    _check(value in allowed, f"{name}={value!r} is not supported; allowed: {', '.join(map(str, allowed))}")


def validate(cfg: DictConfig, world_size: int = 1) -> None:
    """Raise ConfigError on the first inconsistent knob. ``world_size`` is the number of ranks of the job."""
    check_known_keys(cfg)
    check_ranges(cfg)
    m, a, p, d, t = cfg.model, cfg.attention, cfg.parallel, cfg.data, cfg.train
    _one_of("model.transformer_impl", m.transformer_impl, TRANSFORMER_IMPLS)
    _one_of("attention.name", a.name, ATTENTION_NAMES)
    _one_of("parallel.cp_mode", p.cp_mode, CP_MODES)
    _one_of("train.precision", t.precision, PRECISIONS)
    _one_of("train.recompute", t.recompute, ("none", "selective", "full"))
    _one_of("train.lr_decay_style", t.lr_decay_style, LR_STYLES)
    _one_of("checkpoint.resume", str(cfg.checkpoint.resume).lower(), RESUME)
    _one_of("checkpoint.optimizer_sharding", cfg.checkpoint.optimizer_sharding, ("fully_reshardable", "dp_reshardable"))
    _one_of("logging.wandb.mode", cfg.logging.wandb.mode, WANDB_MODES)

    tp, pp, cp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size, p.context_parallel_size
    for name, v in (("tensor_model_parallel_size", tp), ("pipeline_model_parallel_size", pp),
                    ("context_parallel_size", cp)):
        _check(v >= 1, f"parallel.{name}={v} must be >= 1")
    _check(world_size % (tp * pp * cp) == 0,
           f"world size {world_size} is not divisible by parallel.tensor_model_parallel_size={tp} x "
           f"parallel.pipeline_model_parallel_size={pp} x parallel.context_parallel_size={cp}")
    dp = world_size // (tp * pp * cp)

    _check(m.num_attention_heads % m.num_query_groups == 0,
           f"model.num_attention_heads={m.num_attention_heads} is not divisible by "
           f"model.num_query_groups={m.num_query_groups}")
    _check(m.num_attention_heads % tp == 0,
           f"model.num_attention_heads={m.num_attention_heads} is not divisible by "
           f"parallel.tensor_model_parallel_size={tp}")
    _check(m.num_query_groups % tp == 0 or tp % m.num_query_groups == 0,
           f"model.num_query_groups={m.num_query_groups} and parallel.tensor_model_parallel_size={tp}: "
           "one must divide the other")
    _check(m.num_layers % pp == 0,
           f"model.num_layers={m.num_layers} is not divisible by parallel.pipeline_model_parallel_size={pp}")
    _check(m.ffn_hidden_size % tp == 0,
           f"model.ffn_hidden_size={m.ffn_hidden_size} is not divisible by parallel.tensor_model_parallel_size={tp}")

    _check(d.seq_len >= 1, f"data.seq_len={d.seq_len} must be >= 1")
    _check(d.seq_len <= m.max_position_embeddings,
           f"data.seq_len={d.seq_len} is over the model's limit "
           f"model.max_position_embeddings={m.max_position_embeddings}")
    if cp > 1:
        _check(d.seq_len % (2 * cp) == 0,
               f"data.seq_len={d.seq_len} must be divisible by 2 x parallel.context_parallel_size={2 * cp} "
               "(Megatron's load-balanced split)")
        if p.cp_mode == "ulysses":
            _check(m.num_query_groups // min(tp, m.num_query_groups) % cp == 0,
                   f"parallel.cp_mode=ulysses needs the KV heads per TP rank "
                   f"(model.num_query_groups={m.num_query_groups} / tp={tp}) divisible by "
                   f"parallel.context_parallel_size={cp}; use parallel.cp_mode=allgather")
    if d.prefixes and d.weights:
        _check(len(d.weights) == len(d.prefixes),
               f"data.weights has {len(d.weights)} entries but data.prefixes has {len(d.prefixes)}")

    _check(t.micro_batch_size >= 1, f"train.micro_batch_size={t.micro_batch_size} must be >= 1")
    _check(t.global_batch_size % (t.micro_batch_size * dp) == 0,
           f"train.global_batch_size={t.global_batch_size} is not divisible by train.micro_batch_size="
           f"{t.micro_batch_size} x data-parallel size {dp}")
    _check(t.steps >= 1, f"train.steps={t.steps} must be >= 1")
    _check(cfg.checkpoint.interval >= 1, f"checkpoint.interval={cfg.checkpoint.interval} must be >= 1")

    if a.name == "dense":
        _one_of("attention.backend", a.backend, DENSE_BACKENDS)
    else:
        _validate_phsa(a, d.seq_len, cp, scheduled=cfg.curriculum.name != "none")
    check_curriculum_topk(cfg)
    validate_data_files(cfg)


def _validate_phsa(a, seq_len: int, cp: int, scheduled: bool) -> None:
    _one_of("attention.backend", a.backend, BACKENDS)
    _one_of("attention.rep_keys", a.rep_keys, ("post_rope",))
    _one_of("attention.punct_charset", a.punct_charset, ("en", "en_zh"))
    try:  # the operator's own checks: block_size, n_init, local_window, lam, score, query_block
        phsa_params_from_config(a).validate()
    except ValueError as e:
        raise ConfigError(str(e)) from None
    _check(a.train_topk >= 0, f"attention.train_topk={a.train_topk} must be >= 0")
    _check(seq_len % a.block_size == 0,
           f"data.seq_len={seq_len} is not a multiple of attention.block_size={a.block_size}; allowed: "
           f"multiples of {a.block_size} (training sequences are whole key blocks)")
    nb = seq_len // a.block_size
    if not scheduled:  # a curriculum sets the training top-k itself
        _check(a.train_topk <= nb,
               f"attention.train_topk={a.train_topk} is larger than the number of blocks data.seq_len // "
               f"attention.block_size = {seq_len} // {a.block_size} = {nb}")
    check_eval_topk(a.eval_topk, seq_len, a.block_size)
    if cp > 1:
        _check(seq_len % (2 * cp * a.block_size) == 0,
               f"data.seq_len={seq_len} must be divisible by 2 x parallel.context_parallel_size x "
               f"attention.block_size = {2 * cp * a.block_size} for PHSA context parallelism")
        _check((seq_len // (2 * cp)) % a.query_block == 0,
               f"data.seq_len / (2 x parallel.context_parallel_size) = {seq_len // (2 * cp)} must be a multiple "
               f"of attention.query_block={a.query_block} (query groups may not straddle CP chunks)")


# Knobs that were merged into another: the old name's error line names the knob to use instead.
MOVED_KNOBS = {"curriculum.eval_topk": "attention.eval_topk (null = the current training top-k)"}


def unknown_knob(key: str, known: list[str]) -> str:
    """The one line for ``key``, which its schema node (whose fields are ``known``) does not have."""
    import difflib

    if key in MOVED_KNOBS:
        return f"{key} is not a knob of this config; use {MOVED_KNOBS[key]}"
    parent, _, leaf = key.rpartition(".")
    close = difflib.get_close_matches(leaf, known, n=1)
    hint = f"; did you mean {parent + '.' if parent else ''}{close[0]}?" if close else f"; known: {', '.join(known)}"
    return f"{key} is not a knob of this config{hint}"


def check_known_keys(cfg: DictConfig) -> None:
    """Every key of the composed config must be a field of its schema node: a ``+`` override (which Hydra lets
    add keys) or a typo in a YAML file is an error, not a setting that is silently ignored."""
    import dataclasses

    from omegaconf import OmegaConf

    def walk(node: DictConfig, prefix: str) -> None:
        schema = OmegaConf.get_type(node)
        if not dataclasses.is_dataclass(schema):
            return
        known = [f.name for f in dataclasses.fields(schema)]
        for key in node.keys():
            if key not in known:
                raise ConfigError(unknown_knob(f"{prefix}{key}", known))
            child = node._get_node(key)
            if isinstance(child, DictConfig) and not child._is_missing() and not child._is_none():
                walk(child, f"{prefix}{key}.")

    walk(cfg, "")


def _at_least(name: str, value, low) -> None:
    _check(value is not None and value >= low, f"{name}={value} must be >= {low}")


def check_ranges(cfg: DictConfig) -> None:
    """Single-knob ranges, checked before any cross-field rule divides by one of them."""
    m, t, d, c, p = cfg.model, cfg.train, cfg.data, cfg.curriculum, cfg.parallel
    for name in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
                 "kv_channels", "max_position_embeddings", "make_vocab_size_divisible_by"):
        _at_least(f"model.{name}", m[name], 1)
    if m.vocab_size is not None:
        _at_least("model.vocab_size", m.vocab_size, 1)
    for name in ("rotary_base", "layernorm_epsilon", "init_method_std"):
        _check(m[name] > 0, f"model.{name}={m[name]} must be > 0")
    for name in ("steps", "micro_batch_size", "global_batch_size", "log_interval"):
        _at_least(f"train.{name}", t[name], 1)
    _at_least("train.eval_interval", t.eval_interval, 0)  # 0 = no validation during training
    if t.eval_interval > 0:
        _check(t.eval_iters >= 1, f"train.eval_iters={t.eval_iters} must be >= 1 (or train.eval_interval=0: "
                                  "no validation)")
    _at_least("train.warmup_steps", t.warmup_steps, 0)
    _at_least("train.max_skipped_steps", t.max_skipped_steps, 0)  # 0 = stop at the first non-finite loss
    _check(t.loss_chunk_tokens >= 0, f"train.loss_chunk_tokens={t.loss_chunk_tokens} must be >= 0 (tokens per chunk "
                                     "of the output layer + loss; 0 = Megatron's unchunked path)")
    _check(t.lr >= 0, f"train.lr={t.lr} must be >= 0 (0 = no update)")
    _check(0 <= t.min_lr <= t.lr, f"train.min_lr={t.min_lr} must be in [0, train.lr={t.lr}]")
    _check(t.weight_decay >= 0, f"train.weight_decay={t.weight_decay} must be >= 0")
    for name in ("adam_beta1", "adam_beta2"):
        _check(0 <= t[name] < 1, f"train.{name}={t[name]} must be in [0, 1)")
    _check(t.clip_grad >= 0, f"train.clip_grad={t.clip_grad} must be >= 0 (0 = no clipping)")
    if t.exit_after_steps is not None:
        _at_least("train.exit_after_steps", t.exit_after_steps, 1)
    _at_least("checkpoint.keep_last", cfg.checkpoint.keep_last, 0)  # 0 = keep every checkpoint
    _at_least("parallel.nproc_per_node", p.nproc_per_node, 1)
    _at_least("data.num_workers", d.num_workers, 0)
    _at_least("data.embedded_vocab_size", d.embedded_vocab_size, 258)
    split = str(d.split).split(",")
    _check(len(split) == 3 and all(s.strip().replace(".", "", 1).isdigit() for s in split)
           and sum(float(s) for s in split) > 0,
           f"data.split={d.split!r} must be three non-negative weights 'train,valid,test', e.g. 949,50,1")
    _check(all(w >= 0 for w in d.weights), f"data.weights={list(d.weights)} must all be >= 0")
    for name in ("warmup_steps", "ramp_steps", "stats_interval"):
        _at_least(f"curriculum.{name}", c[name], 0)
    _at_least("curriculum.num_step_levels", c.num_step_levels, 1)
    _at_least("curriculum.stats_queries", c.stats_queries, 1)
    for name in ("ramp_start_activation", "target_activation", "dense_fallback_activation"):
        if c[name] is not None:
            _check(0 < c[name] <= 1, f"curriculum.{name}={c[name]} must be in (0, 1]")
    if c.target_topk is not None:
        _at_least("curriculum.target_topk", c.target_topk, 1)


def check_eval_topk(eval_topk, seq_len: int, block_size: int) -> None:
    """attention.eval_topk, with or without a curriculum: null (the current training top-k) or a k in [0, blocks]."""
    if eval_topk is None:
        return
    nb = seq_len // block_size
    _check(eval_topk >= 0, f"attention.eval_topk={eval_topk} must be >= 0 (or null: the current training top-k)")
    _check(eval_topk <= nb, f"attention.eval_topk={eval_topk} is larger than the number of blocks data.seq_len // "
                            f"attention.block_size = {seq_len} // {block_size} = {nb}")


def check_curriculum_topk(cfg: DictConfig) -> None:
    """curriculum.target_topk is in [1, blocks of a sequence]: below 1 no block is selected while training."""
    c, a, d = cfg.curriculum, cfg.attention, cfg.data
    if a.name == "dense" or c.name == "none" or a.block_size < 1 or c.target_topk is None:
        return
    nb = d.seq_len // a.block_size
    _check(1 <= c.target_topk <= nb,
           f"curriculum.target_topk={c.target_topk} must be in [1, {nb}] (the number of blocks data.seq_len // "
           f"attention.block_size = {d.seq_len} // {a.block_size})")


def validate_data_files(cfg: DictConfig) -> None:
    """The files a run reads exist: every data prefix's .bin/.idx, the tokenizer (data.tokenizer, or the one
    data_prep left beside the first prefix), the punctuation table, checkpoint.init_from."""
    import os

    from phsa_train.config.data_files import missing_dataset_files, punct_table_file, tokenizer_beside

    d = cfg.data
    prefixes = [os.path.expanduser(str(p)) for p in d.prefixes]
    for p in prefixes:
        missing = missing_dataset_files(p)
        _check(not missing, f"data.prefixes: {' and '.join(missing)} not found (data.prefixes=[P] names the "
                            "P.bin/P.idx that `python -m data_prep --output-prefix P` writes)")
    if prefixes and d.tokenizer is None:
        _check(tokenizer_beside(prefixes[0]) is not None,
               f"data.tokenizer is not set and there is no {prefixes[0]}_tokenizer.json (written by data_prep "
               f"--tokenizer train) nor tokenizer.json beside it; set data.tokenizer=<the tokenizer data_prep used>")
    tok = None if d.tokenizer is None else os.path.expanduser(str(d.tokenizer))
    if tok is not None and (tok.endswith(".json") or tok.startswith((".", "/", "~"))):
        _check(os.path.exists(tok), f"data.tokenizer={d.tokenizer}: no such file or directory")
    if prefixes:
        punct = os.path.expanduser(str(d.punct_table)) if d.punct_table else punct_table_file(prefixes[0])
        _check(os.path.isfile(punct), f"data.punct_table={punct}: no such file (data_prep writes P_punct.json; "
                                      "`python -m data_prep punct` builds one for a tokenizer)")
    init = cfg.checkpoint.init_from
    if init:
        path = os.path.expanduser(str(init)[3:] if str(init).startswith("hf:") else str(init))
        _check(os.path.isdir(path), f"checkpoint.init_from={init}: no such directory")
