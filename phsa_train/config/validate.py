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


def _validate_phsa(a, seq_len: int, cp: int, scheduled: bool) -> None:
    _one_of("attention.backend", a.backend, BACKENDS)
    _one_of("attention.rep_keys", a.rep_keys, ("post_rope",))
    _one_of("attention.punct_charset", a.punct_charset, ("en", "en_zh"))
    try:  # the operator's own checks: block_size, n_init, local_window, lam, score, query_block
        phsa_params_from_config(a).validate()
    except ValueError as e:
        raise ConfigError(str(e)) from None
    for name in ("train_topk", "eval_topk"):
        _check(a[name] >= 0, f"attention.{name}={a[name]} must be >= 0")
    _check(seq_len % a.block_size == 0,
           f"data.seq_len={seq_len} is not a multiple of attention.block_size={a.block_size}; allowed: "
           f"multiples of {a.block_size} (training sequences are whole key blocks)")
    nb = seq_len // a.block_size
    for name in () if scheduled else ("train_topk", "eval_topk"):  # a curriculum sets both itself
        _check(a[name] <= nb,
               f"attention.{name}={a[name]} is larger than the number of blocks data.seq_len // "
               f"attention.block_size = {seq_len} // {a.block_size} = {nb}")
    if cp > 1:
        _check(seq_len % (2 * cp * a.block_size) == 0,
               f"data.seq_len={seq_len} must be divisible by 2 x parallel.context_parallel_size x "
               f"attention.block_size = {2 * cp * a.block_size} for PHSA context parallelism")
        _check((seq_len // (2 * cp)) % a.query_block == 0,
               f"data.seq_len / (2 x parallel.context_parallel_size) = {seq_len // (2 * cp)} must be a multiple "
               f"of attention.query_block={a.query_block} (query groups may not straddle CP chunks)")
