"""The optimizer's one face for the loop: ``set_lr``, ``zero_grad()``, ``step() -> grad_norm``.

Two implementations behind it:

* :class:`MegatronOptimizer` (GPU): Megatron DDP (gradients reduced in fp32 buffers) + Megatron's (distributed)
  optimizer, which syncs, clips and steps in one ``step()``.
* :class:`LocalOptimizer` (CPU): ``torch.optim.AdamW`` plus the gradient sync Megatron DDP and
  ``finalize_model_grads`` do on GPU, as explicit all-reduces over Megatron's groups, and a TP-aware clip.
  Megatron's DDP and optimizers allocate CUDA streams, so they cannot run on CPU.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
from megatron.core import parallel_state


def lr_at_step(step: int, t) -> float:
    """Linear warm-up, then cosine/linear decay to ``min_lr`` at ``train.steps`` (a pure function of step)."""
    if step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    if t.lr_decay_style == "constant":
        return t.lr
    frac = min(1.0, (step - t.warmup_steps) / max(1, t.steps - t.warmup_steps))
    decay = 0.5 * (1 + math.cos(math.pi * frac)) if t.lr_decay_style == "cosine" else 1 - frac
    return t.min_lr + (t.lr - t.min_lr) * decay


class LocalOptimizer:
    """AdamW + explicit DP x CP gradient all-reduce + TP-aware clipping (CPU)."""

    sharded = False  # its state is per rank, saved beside the distributed checkpoint

    def __init__(self, model: torch.nn.Module, t):
        self.model = model  # the module the forward runs on (the model itself)
        decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
        no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
        self.optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": t.weight_decay},
                                            {"params": no_decay, "weight_decay": 0.0}],
                                           lr=t.lr, betas=(t.adam_beta1, t.adam_beta2), eps=1e-8)
        self.clip_grad = t.clip_grad

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def zero_grad(self) -> None:
        self.optimizer.zero_grad()

    def step(self) -> float:
        """Sync and clip the gradients, then update; a non-finite norm skips the update (the loop raises)."""
        allreduce_grads(self.model)
        grad_norm = clip_grad_norm(self.model, self.clip_grad)
        if math.isfinite(grad_norm):
            self.optimizer.step()
        return grad_norm

    def reload_model_params(self) -> None:
        """Weights were loaded into the model after the optimizer was built: nothing to copy (no main params)."""

    def state_dict(self) -> dict:
        return self.optimizer.state_dict()

    def load_state_dict(self, sd: dict) -> None:
        self.optimizer.load_state_dict(sd)


class MegatronOptimizer:
    """Megatron DDP + Megatron's (distributed) optimizer (GPU)."""

    sharded = True  # its state goes into the distributed checkpoint

    def __init__(self, model: torch.nn.Module, cfg):
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

        t, use_dist = cfg.train, cfg.parallel.use_distributed_optimizer
        self.model = DistributedDataParallel(
            config=model.config, module=model,
            ddp_config=DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False,
                                                     use_distributed_optimizer=use_dist))
        bf16 = model.config.bf16
        self.optimizer = get_megatron_optimizer(
            OptimizerConfig(optimizer="adam", lr=t.lr, min_lr=t.min_lr, weight_decay=t.weight_decay,
                            adam_beta1=t.adam_beta1, adam_beta2=t.adam_beta2, clip_grad=t.clip_grad, bf16=bf16,
                            params_dtype=torch.bfloat16 if bf16 else torch.float32,
                            use_distributed_optimizer=use_dist), [self.model])
        model.config.no_sync_func = self.model.no_sync
        model.config.finalize_model_grads_func = finalize_model_grads

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def zero_grad(self) -> None:
        self.model.zero_grad_buffer()
        self.optimizer.zero_grad()

    def step(self) -> float:
        _, grad_norm, _ = self.optimizer.step()
        return float(grad_norm or 0.0)

    def reload_model_params(self) -> None:
        """Copy loaded weights into the fp32 main params (they were copied from the random init at build)."""
        self.optimizer.reload_model_params()

    def sharded_state_dict(self, model_sharded_sd: dict, **kwargs) -> dict:
        return self.optimizer.sharded_state_dict(model_sharded_sd, **kwargs)

    def load_state_dict(self, sd: dict) -> None:
        self.optimizer.load_state_dict(sd)


def build_optimizer(cfg, model: torch.nn.Module, on_gpu: bool) -> LocalOptimizer | MegatronOptimizer:
    return MegatronOptimizer(model, cfg) if on_gpu else LocalOptimizer(model, cfg.train)


def _allreduce_flat(grads: list[torch.Tensor], group, divide_by: int = 1) -> None:
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, group=group)
    if divide_by > 1:
        flat /= divide_by
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def allreduce_grads(model: torch.nn.Module) -> None:
    """The gradient sync Megatron DDP + ``finalize_model_grads`` do on GPU.

    1. QK-layernorm weights are replicated over TP ranks but each rank only sees its own heads:
       sum their gradients over the TP group.
    2. Average every gradient over the data-parallel x context-parallel group.
    """
    if parallel_state.get_tensor_model_parallel_world_size() > 1:
        qk_norm = [p.grad for n, p in model.named_parameters()
                   if p.grad is not None and ("q_layernorm" in n or "k_layernorm" in n)]
        if qk_norm:
            _allreduce_flat(qk_norm, parallel_state.get_tensor_model_parallel_group())
    group = parallel_state.get_data_parallel_group(with_context_parallel=True)
    world = dist.get_world_size(group)
    if world > 1:
        _allreduce_flat([p.grad for p in model.parameters() if p.grad is not None], group, world)


def clip_grad_norm(model: torch.nn.Module, max_norm: float) -> float:
    """Global L2 grad norm over the model-parallel group (TP shards counted once), clipped to max_norm."""
    from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate

    params = [p for p in model.parameters() if p.grad is not None]
    sq = torch.zeros((), dtype=torch.float64)
    for p in params:
        if param_is_not_tensor_parallel_duplicate(p):
            sq += p.grad.detach().double().pow(2).sum()
    dist.all_reduce(sq, group=parallel_state.get_model_parallel_group())
    norm = math.sqrt(sq.item())
    if max_norm > 0 and norm > max_norm:
        for p in params:
            p.grad.mul_(max_norm / (norm + 1e-6))
    return norm
