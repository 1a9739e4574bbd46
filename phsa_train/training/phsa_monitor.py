"""What the loop logs about PHSA besides the curriculum state: core-attention calls per path, loss spikes after
a phase change, and selection statistics on a probe batch."""
from __future__ import annotations

from phsa_train.evaluation.selection_stats import SelectionMonitor
from phsa_train.megatron.core_attention import PathCounter
from phsa_train.training.curriculum import LossSpikeDetector


class PHSAMonitor:
    def __init__(self, cfg, model, data, device, curriculum, is_main: bool):
        self.model, self.is_main = model, is_main
        self.path_calls = PathCounter(model) if curriculum.phsa else None  # core-attention calls per step
        self.spike = LossSpikeDetector(cfg.curriculum.loss_spike_factor)
        self.selection = SelectionMonitor(cfg, data, device, curriculum)

    def metrics(self, step: int, loss: float, sparsity) -> dict:
        """The PHSA metrics of the step just taken (call once per step, after it)."""
        m = {}
        if self.path_calls is not None:
            calls = self.path_calls.pop()
            m.update({"phsa/dense_calls": calls["dense"], "phsa/sparse_calls": calls["sparse"]})
        if self.spike.update(step, sparsity.phase, loss):
            m["phsa/loss_spike"] = 1.0
            if self.is_main:
                print(f"[phsa_train] WARNING: loss spike at step {step} ({loss:.4f} vs running mean "
                      f"{self.spike.mean_before:.4f}) {step - self.spike.changed_at} steps after the switch to "
                      f"phase '{sparsity.phase}'", flush=True)
        if self.selection.due(step):
            m.update(self.selection.collect(self.model))
            self.path_calls.pop()  # the probe forward is not training work
        return m
