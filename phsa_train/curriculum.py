"""Sparsity curriculum: which top-k (or dense) the PHSA layers use at each step.

The schedule is a pure function of the step (``sparsity_at_step``), so a resumed run lands exactly on it.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class SparsityState:
    """What the model runs at one step, and what gets logged about it."""

    phase: str  # dense | ramp | hold | fixed | off
    train_topk: int | None
    eval_topk: int | None
    dense: bool
    activation_ratio: float | None = None
    causal_activation_ratio: float | None = None

    def metrics(self) -> dict:
        if self.phase == "off":
            return {}
        m = {"phsa/dense": float(self.dense), "phsa/phase": self.phase}
        if self.train_topk is not None:
            m["phsa/topk"] = self.train_topk
            m["phsa/eval_topk"] = self.eval_topk
        if self.activation_ratio is not None:
            m["phsa/activation_ratio"] = self.activation_ratio
            m["phsa/causal_activation_ratio"] = self.causal_activation_ratio
        return m

    def console(self) -> str:
        if self.phase == "off":
            return ""
        if self.dense:
            return f" | {self.phase} (dense attn)"
        return f" | {self.phase} k={self.train_topk} act {self.activation_ratio:.1%}"

    def attended_tokens(self, seq_len: int) -> float | None:
        if self.phase == "off" or self.dense or self.causal_activation_ratio is None:
            return None
        return self.causal_activation_ratio * (seq_len + 1) / 2


class ConstantCurriculum:
    """The attention config's train/eval top-k from step 0 (also 'off' for dense models)."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.phsa = cfg.attention.name != "dense"

    def sparsity_at_step(self, step: int) -> SparsityState:
        a = self.cfg.attention
        if not self.phsa:
            return SparsityState("off", None, None, True)
        return self._state("fixed", a.train_topk, a.eval_topk, False)

    def _state(self, phase, k, k_eval, dense) -> SparsityState:
        from phsa_train.attention import activation_ratio, causal_activation_ratio

        a, L = self.cfg.attention, self.cfg.data.seq_len
        ratio = 1.0 if dense else activation_ratio(L, a.n_init, a.local_window, k, a.block_size)
        causal = 1.0 if dense else causal_activation_ratio(L, a.n_init, a.local_window, k, a.block_size)
        return SparsityState(phase, k, k_eval, dense, float(ratio), float(causal))

    def apply(self, model, step: int) -> SparsityState:
        s = self.sparsity_at_step(step)
        if self.phsa:
            from phsa_train.megatron import set_sparsity

            set_sparsity(model, train_topk=s.train_topk, eval_topk=s.eval_topk, dense=s.dense)
        return s

    def state(self) -> dict:
        return {"name": "constant"}


def build_curriculum(cfg):
    return ConstantCurriculum(cfg)
