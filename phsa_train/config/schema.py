"""Typed schema of every Hydra knob.

The YAML files under ``conf/`` fill these dataclasses; registering them with Hydra's ConfigStore makes a
typo (``model.hiden_size=...``) or a wrong type fail at compose time instead of deep inside a run.
Cross-field rules (heads vs TP, sequence vs block size, ...) live in :mod:`phsa_train.config.validate`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from phsa_train.attention.params import PHSAParams


@dataclass
class ModelConfig:
    name: str = MISSING
    num_layers: int = MISSING
    hidden_size: int = MISSING
    ffn_hidden_size: int = MISSING
    num_attention_heads: int = MISSING
    num_query_groups: int = MISSING  # KV heads (GQA)
    kv_channels: int = MISSING  # head dim
    max_position_embeddings: int = 4096  # longest sequence the model accepts (data.seq_len must not exceed it)
    rotary_base: float = 1_000_000.0
    normalization: str = "RMSNorm"
    layernorm_epsilon: float = 1e-5  # RMSNorm/LayerNorm epsilon (all norms, QK-norm included); Qwen3 uses 1e-6
    qk_layernorm: bool = True
    gated_linear_unit: bool = True  # SwiGLU
    tie_embeddings: bool = True
    vocab_size: Optional[int] = None  # None: take it from the tokenizer; set: the HF vocab phsa_train.convert checks
    make_vocab_size_divisible_by: int = 128
    init_method_std: float = 0.02
    transformer_impl: str = "local"  # local | transformer_engine


@dataclass
class AttentionConfig:
    name: str = "dense"  # dense | phsa | meanpool
    backend: str = "auto"  # auto | reference | triton (phsa) ; auto | sdpa (dense)
    # The PHSA knobs' defaults are PHSAParams' (one source); their meaning: PHSAParams and docs/phsa.md.
    block_size: int = PHSAParams.block_size  # m, tokens per key block
    n_init: int = PHSAParams.n_init  # INIT: first n_init tokens every query sees
    local_window: int = PHSAParams.local_window  # w: last w tokens up to and including the query
    train_topk: int = PHSAParams.topk  # k while model.training
    # k in evaluation, with or without a curriculum: null = the current training top-k; an int = that k at every
    # step (train with a small k, evaluate with a larger one; docs/phsa.md, training strategy)
    eval_topk: Optional[int] = None
    lam: float = PHSAParams.lam  # mix of mean (lam) and punctuation (1 - lam) representative; 1 = mean pooling
    score: str = PHSAParams.score  # softmax_group_sum | dot_group_sum
    query_block: int = PHSAParams.query_block  # queries sharing one selection (1 = per-token reference semantics)
    rep_keys: str = "post_rope"  # post_rope | pre_rope (only post_rope is implemented in the core)
    dense_layers: List[int] = field(default_factory=list)  # 1-based layer numbers kept dense
    first_dense_layers: int = 0  # keep layers 1..N dense as well
    punct_charset: str = "en"  # en | en_zh (phsa_train/data/punctuation.py)


def phsa_params_from_config(a, topk: int = 0) -> PHSAParams:
    """``cfg.attention`` -> the operator's PHSAParams (``topk``: the run-time top-k, set by the curriculum)."""
    return PHSAParams(block_size=a.block_size, n_init=a.n_init, local_window=a.local_window, topk=topk, lam=a.lam,
                      score=a.score, query_block=a.query_block)


@dataclass
class ParallelConfig:
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    context_parallel_size: int = 1
    cp_mode: str = "allgather"  # allgather | ulysses
    # the CP group's NCCL work on high-priority CUDA streams: its kernels get SMs when a wave of the attention kernel
    # they overlap ends, not after its last wave (NCCL only; a no-op on gloo and at CP=1)
    cp_high_priority_stream: bool = True
    use_distributed_optimizer: bool = True  # GPU only; CPU uses AdamW + explicit all-reduce
    nproc_per_node: int = 2  # used by launch/pretrain.sh outside Slurm


@dataclass
class DataConfig:
    name: str = "embedded"
    prefixes: List[str] = field(default_factory=list)  # Megatron .bin/.idx prefixes; empty = embedded corpus
    weights: List[float] = field(default_factory=list)  # blend weights, one per prefix (empty = equal)
    tokenizer: Optional[str] = None  # tokenizer.json path/dir or hub name; None = the one next to the data
    punct_table: Optional[str] = None  # <prefix>_punct.json; None = next to the tokenizer/data
    cache_dir: str = "${oc.env:PHSA_CACHE_DIR,${oc.env:HOME}/.cache/phsa_train}"
    embedded_vocab_size: int = 4096
    seq_len: int = 256
    split: str = "949,50,1"
    reset_attention_mask: bool = False  # true: attention and selection never cross an EOD boundary
    num_workers: int = 0


@dataclass
class TrainConfig:
    steps: int = 200
    micro_batch_size: int = 4
    global_batch_size: int = 8
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup_steps: int = 20
    lr_decay_style: str = "cosine"  # cosine | linear | constant
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    clip_grad: float = 1.0
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | bf16 | fp32
    seed: int = 1234
    eval_interval: int = 50
    eval_iters: int = 4
    log_interval: int = 5
    recompute: str = "none"  # none | selective (core attention) | full (whole layers; GPU only)
    fused_kernels: bool = True  # GPU: compiled SwiGLU, RMSNorm and RoPE (megatron/fused.py); CPU runs unfused
    loss_chunk_tokens: int = 8192  # output layer + cross-entropy this many tokens at a time, never the whole
    #   [tokens, vocab] logits (megatron/chunked_loss.py); 0 = Megatron's unchunked output layer and loss
    exit_after_steps: Optional[int] = None  # stop early (tests, time-boxed jobs); a checkpoint is saved
    max_skipped_steps: int = 0  # steps with a non-finite loss or grad norm to skip (no update) before stopping


@dataclass
class CheckpointConfig:
    dir: Optional[str] = None  # default: <run dir>/checkpoints
    interval: int = 50  # steps between saves (a crash loses at most this many)
    resume: str = "auto"  # auto | true | false
    keep_last: int = 2  # newest checkpoints kept; older ones are deleted at each save (0 = keep all)
    init_from: Optional[str] = None  # a checkpoint dir to start from (weights only), or hf:PATH
    optimizer_sharding: str = "fully_reshardable"  # GPU distributed optimizer: fully_reshardable | dp_reshardable


@dataclass
class WandbConfig:
    mode: str = "offline"  # offline | online | disabled
    project: str = "phsa_train"
    entity: Optional[str] = None
    group: Optional[str] = None
    name: Optional[str] = None
    tags: List[str] = field(default_factory=list)


@dataclass
class LoggingConfig:
    wandb: WandbConfig = field(default_factory=WandbConfig)
    plots: bool = True  # PNG loss/lr plots in the run dir


@dataclass
class CurriculumConfig:
    """Sparsity schedule (phsa_train/training/curriculum.py). Ignored by dense models."""

    name: str = "none"  # none = attention.train_topk from step 0 (evaluation: attention.eval_topk, always)
    warmup_steps: int = 0  # dense attention (fast path) for these first steps
    ramp_steps: int = 0  # then the activation ratio ramps down over this many steps
    shape: str = "cosine"  # linear | cosine | step
    num_step_levels: int = 4  # plateaus of the 'step' shape
    ramp_start_activation: float = 1.0  # budget activation ratio at the start of the ramp (1 = every block)
    target_activation: Optional[float] = None  # final budget activation ratio at data.seq_len ...
    target_topk: Optional[int] = None  # ... or the final top-k directly (exactly one of the two)
    dense_fallback_activation: float = 0.5  # above this budget the layers run dense (sparse would be slower)
    stats_interval: int = 0  # every N steps: selection statistics on a fixed probe sequence (0 = off)
    stats_queries: int = 256  # query positions sampled per layer for the statistics
    loss_spike_factor: float = 1.5  # flag a loss > factor x running mean within 20 steps of a phase change


@dataclass
class Config:
    model: ModelConfig = MISSING
    attention: AttentionConfig = MISSING
    parallel: ParallelConfig = MISSING
    data: DataConfig = MISSING
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = MISSING
    curriculum: CurriculumConfig = MISSING
    run_name: str = "${attention.name}-${model.name}-s${data.seq_len}"
    run_dir: Optional[str] = None  # default: Hydra's output dir


def upgrade_saved_config(config: dict) -> dict:
    """A run's saved config (checkpoint ``meta.json``) in today's schema. Runs before the merge of the two
    evaluation top-k knobs saved ``curriculum.eval_topk`` (null = the training top-k), which a schedule used
    instead of ``attention.eval_topk``; both meanings are ``attention.eval_topk`` now."""
    curriculum = dict(config.get("curriculum") or {})
    if "eval_topk" not in curriculum:
        return config
    eval_topk = curriculum.pop("eval_topk")
    attention = dict(config.get("attention") or {})
    if curriculum.get("name", "none") != "none":
        attention["eval_topk"] = eval_topk
    return {**config, "curriculum": curriculum, "attention": attention}


def register_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(name="base_config", node=Config)
    cs.store(group="model", name="base_model", node=ModelConfig)
    cs.store(group="attention", name="base_attention", node=AttentionConfig)
    cs.store(group="parallel", name="base_parallel", node=ParallelConfig)
    cs.store(group="data", name="base_data", node=DataConfig)
    cs.store(group="logging", name="base_logging", node=LoggingConfig)
    cs.store(group="curriculum", name="base_curriculum", node=CurriculumConfig)
