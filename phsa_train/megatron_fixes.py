"""Work-arounds for Megatron-Core 0.16.1 bugs hit on GPU machines without Apex / Transformer Engine.

``DistributedOptimizer._set_main_param_and_optimizer_states`` copies every key of the live torch-Adam
state from the loaded tensors, but without Apex/TE torch Adam keeps a per-parameter ``step`` that the
checkpoint's parameter state never holds (Megatron stores it in the param groups), so every resume
fails with ``KeyError: 'step'`` (seen on H100, torch 2.11, both fully_reshardable and dp_reshardable).
The fix copies only the keys the checkpoint provides; ``step`` is restored from the param groups by
Megatron itself. Applied once, on GPU, before the optimizer loads a checkpoint. Verified on an H100
(2026-11-23): `launch/pretrain.sh model=tiny train.steps=4 checkpoint.interval=2`, then `train.steps=6` in the
same run dir -> "resumed at step 4", steps 5-6 train on (loss 8.20 -> 8.02).
"""
from __future__ import annotations

_applied = False


def apply_megatron_fixes() -> None:
    global _applied
    if _applied:
        return
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    original = DistributedOptimizer._set_main_param_and_optimizer_states

    def _set_main_param_and_optimizer_states(self, model_param, tensors):
        if self.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
            return original(self, model_param, tensors)
        group_index, group_order = self.model_param_group_index_map[model_param]
        main_param = self.optimizer.param_groups[group_index]["params"][group_order]
        dst = {"param": main_param, **self.optimizer.state[main_param]}
        for key, src in tensors.items():
            dst[key].copy_(src)

    DistributedOptimizer._set_main_param_and_optimizer_states = _set_main_param_and_optimizer_states
    _applied = True
