"""The extreme-sparsity curriculum: dense warm-up -> ramp of the activation ratio -> hold at the target.

Everything here is a pure function of the step (:func:`sparsity_at_step`), so a resumed run lands exactly
on the schedule and the logged sequence equals the uninterrupted run's. The paper's own strategy (a fixed
tiny k from the start, evaluated at a larger k; docs/phsa.md) is the special case ``warmup_steps=0,
ramp_steps=0, target_topk=2`` with ``attention.eval_topk=4`` (``conf/curriculum/constant.yaml``). The evaluation
top-k is ``attention.eval_topk`` with or without a schedule: null follows the training top-k, an int is fixed.

Activation ratio ("budget", docs/phsa.md) at the training length L: ``a = (n_init + w + k*m) / L``. The ramp
interpolates ``a`` from ``ramp_start_activation`` down to the target with the chosen shape and maps it to
the largest top-k whose budget does not exceed it (at least 1). While the current budget is above
``dense_fallback_activation`` the layers run the dense fast path instead: at that density block-sparse
attention is slower than cuDNN dense (the threshold is a knob; bench/attention.py measures where the
crossover really is on a GPU).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from phsa_train.config.validate import ConfigError, check_eval_topk

SHAPES = ("linear", "cosine", "step")


@dataclass
class SparsityState:
    """What the model runs at one step, and what gets logged about it."""

    phase: str  # off (dense model) | dense (warm-up) | ramp | hold
    train_topk: Optional[int]
    eval_topk: Optional[int]
    dense: bool  # the PHSA layers run the dense path this step
    activation_ratio: Optional[float] = None  # budget definition (docs/phsa.md), of train_topk at data.seq_len
    causal_activation_ratio: Optional[float] = None  # mean over queries of |S(i)| / (i + 1)

    def metrics(self) -> dict:
        if self.phase == "off":
            return {}
        return {"phsa/phase": self.phase, "phsa/phase_id": PHASES.index(self.phase), "phsa/dense": float(self.dense),
                "phsa/topk": self.train_topk, "phsa/eval_topk": self.eval_topk,
                "phsa/activation_ratio": self.activation_ratio,
                "phsa/causal_activation_ratio": self.causal_activation_ratio,
                "phsa/sparsity": 1.0 - self.activation_ratio}

    def console(self) -> str:
        if self.phase == "off":
            return ""
        path = "dense path" if self.dense else f"k={self.train_topk}"
        if not self.dense and self.eval_topk != self.train_topk:  # validation and eval run at another budget
            path += f" (eval k={self.eval_topk})"
        return f" | {self.phase}: {path}, sparsity {1 - self.activation_ratio:.1%}"

    def attended_tokens(self, seq_len: int) -> Optional[float]:
        """Mean keys per query actually computed (for MFU); None = dense causal."""
        if self.phase == "off" or self.dense:
            return None
        return self.causal_activation_ratio * (seq_len + 1) / 2


PHASES = ("off", "dense", "ramp", "hold")


@dataclass(frozen=True)
class Schedule:
    """Resolved curriculum knobs (see conf/curriculum/*.yaml for their meaning)."""

    seq_len: int
    block_size: int
    n_init: int
    local_window: int
    warmup_steps: int = 0
    ramp_steps: int = 0
    shape: str = "linear"
    num_step_levels: int = 4
    ramp_start_activation: float = 1.0
    target_activation: Optional[float] = None
    target_topk: Optional[int] = None
    eval_topk: Optional[int] = None  # attention.eval_topk: None = the current training top-k
    dense_fallback_activation: float = 1.0

    @property
    def num_blocks(self) -> int:
        return self.seq_len // self.block_size

    def budget(self, k: int) -> float:
        return min(1.0, (self.n_init + self.local_window + k * self.block_size) / self.seq_len)

    def topk_for_activation(self, a: float) -> int:
        """Largest k whose budget is <= a (at least 1, at most the number of blocks)."""
        k = math.floor((a * self.seq_len - self.n_init - self.local_window) / self.block_size + 1e-9)
        return max(1, min(self.num_blocks, k))

    @property
    def final_topk(self) -> int:
        return self.target_topk if self.target_topk is not None else self.topk_for_activation(self.target_activation)

    def validate(self) -> "Schedule":
        def bad(msg):
            raise ConfigError(msg)

        if self.shape not in SHAPES:
            bad(f"curriculum.shape={self.shape!r} is not supported; allowed: {', '.join(SHAPES)}")
        if self.warmup_steps < 0 or self.ramp_steps < 0:
            bad(f"curriculum.warmup_steps={self.warmup_steps} and curriculum.ramp_steps={self.ramp_steps} must be >= 0")
        if (self.target_topk is None) == (self.target_activation is None):
            bad("set exactly one of curriculum.target_topk and curriculum.target_activation")
        if self.target_topk is not None and not 1 <= self.target_topk <= self.num_blocks:
            bad(f"curriculum.target_topk={self.target_topk} must be in [1, {self.num_blocks}] (k below 1 leaves "
                f"no selected block; {self.num_blocks} = data.seq_len // attention.block_size)")
        if self.target_activation is not None:
            floor = self.budget(1)
            if not floor <= self.target_activation <= 1:
                bad(f"curriculum.target_activation={self.target_activation} must be in [{floor:.4f}, 1]: "
                    f"INIT + LOCAL + one block already take {floor:.4f} of data.seq_len={self.seq_len}")
        if not 0 < self.ramp_start_activation <= 1:
            bad(f"curriculum.ramp_start_activation={self.ramp_start_activation} must be in (0, 1]")
        if self.ramp_steps and self.budget(self.final_topk) > self.ramp_start_activation:
            bad(f"the ramp ends above its start: target activation {self.budget(self.final_topk):.4f} > "
                f"curriculum.ramp_start_activation={self.ramp_start_activation}")
        check_eval_topk(self.eval_topk, self.seq_len, self.block_size)
        if self.num_step_levels < 1:
            bad(f"curriculum.num_step_levels={self.num_step_levels} must be >= 1")
        return self


def _shape(progress: float, shape: str, levels: int) -> float:
    """Fraction of the way from start to target, progress in [0, 1]."""
    if shape == "linear":
        return progress
    if shape == "cosine":
        return 0.5 * (1 - math.cos(math.pi * progress))
    return math.floor(progress * levels + 1e-9) / levels  # step: `levels` plateaus, the target in the hold


def sparsity_at_step(step: int, s: Schedule) -> SparsityState:
    """The curriculum's state for 0-based ``step`` (pure function)."""
    from phsa_train.attention import causal_activation_ratio

    if step < s.warmup_steps:
        phase, k = "dense", s.num_blocks
    elif step < s.warmup_steps + s.ramp_steps:
        progress = (step - s.warmup_steps) / s.ramp_steps
        target = s.budget(s.final_topk)
        a = s.ramp_start_activation + (target - s.ramp_start_activation) * _shape(progress, s.shape, s.num_step_levels)
        phase, k = "ramp", max(s.final_topk, s.topk_for_activation(a))
    else:
        phase, k = "hold", s.final_topk
    budget = s.budget(k)
    dense = phase == "dense" or budget > s.dense_fallback_activation
    causal = causal_activation_ratio(s.seq_len, s.n_init, s.local_window, k, s.block_size)
    return SparsityState(phase, k, s.eval_topk if s.eval_topk is not None else k, dense, budget, float(causal))


def schedule_from_config(cfg) -> Schedule:
    c, a = cfg.curriculum, cfg.attention
    if c is None or c.name == "none":
        return Schedule(cfg.data.seq_len, a.block_size, a.n_init, a.local_window, target_topk=a.train_topk,
                        eval_topk=a.eval_topk).validate()
    return Schedule(
        seq_len=cfg.data.seq_len, block_size=a.block_size, n_init=a.n_init, local_window=a.local_window,
        warmup_steps=c.warmup_steps, ramp_steps=c.ramp_steps, shape=c.shape, num_step_levels=c.num_step_levels,
        ramp_start_activation=c.ramp_start_activation, target_activation=c.target_activation,
        target_topk=c.target_topk, eval_topk=a.eval_topk, dense_fallback_activation=c.dense_fallback_activation,
    ).validate()


class Curriculum:
    """Applies the schedule to the model each step. Dense models get the 'off' state."""

    def __init__(self, cfg):
        self.phsa = cfg.attention.name != "dense"
        self.schedule = schedule_from_config(cfg) if self.phsa else None

    def sparsity_at_step(self, step: int) -> SparsityState:
        if not self.phsa:
            return SparsityState("off", None, None, True)
        return sparsity_at_step(step, self.schedule)

    def apply(self, model, step: int) -> SparsityState:
        s = self.sparsity_at_step(step)
        if self.phsa:
            from phsa_train.megatron import set_sparsity

            set_sparsity(model, train_topk=s.train_topk, eval_topk=s.eval_topk, dense=s.dense)
        return s

    def state(self) -> dict:
        return {"schedule": None if self.schedule is None else self.schedule.__dict__}


def build_curriculum(cfg) -> Curriculum:
    return Curriculum(cfg)


class LossSpikeDetector:
    """Flags a loss above ``factor`` x its running mean within ``window`` steps after a phase change."""

    def __init__(self, factor: float, window: int = 20, decay: float = 0.9):
        self.factor, self.window, self.decay = factor, window, decay
        self.mean = None
        self.mean_before = None
        self.phase = None
        self.changed_at = -10**9

    def update(self, step: int, phase: str, loss: float) -> bool:
        if self.phase is not None and phase != self.phase:
            self.changed_at, self.mean_before = step, self.mean
        self.phase = phase
        spike = (self.mean_before is not None and step - self.changed_at < self.window
                 and loss > self.factor * self.mean_before)
        self.mean = loss if self.mean is None else self.decay * self.mean + (1 - self.decay) * loss
        return spike
