"""Everything that lets Megatron-Core train on a CPU-only machine, in one place.

Megatron-Core 0.16.1 hard-codes CUDA in a few spots that a CPU run (tests, the demo, CI) reaches:
``torch.cuda.current_device()`` in RoPE and buffer allocation, ``torch.cuda.synchronize()`` in the
distributed-checkpoint writer, ``.cuda()``/pinned memory in the CP slice of the RoPE table, the
``device="cuda"`` token counter in the pipeline schedules, and CUDA streams in its DDP and optimizers.
On GPU none of this module is used. On CPU we replace:

* the schedules by :func:`forward_backward_local` (same call signature, microbatch accumulation, no PP),
* Megatron DDP + the (distributed) optimizer by ``torch.optim.AdamW`` plus an explicit all-reduce of the
  gradients over Megatron's data-parallel x context-parallel group (:func:`allreduce_grads`), and
* the grad-norm of Megatron's clip_grads by a TP-aware one (:func:`clip_grad_norm`).
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate

_installed = False


def install_cpu_shims() -> None:
    """Patch the CUDA-only calls Megatron-Core makes on CPU. Idempotent; a no-op when CUDA exists."""
    global _installed
    if _installed or torch.cuda.is_available():
        return
    torch.cuda.current_device = lambda: torch.device("cpu")
    torch.cuda.synchronize = lambda *args, **kwargs: None
    from megatron.core.models.common.embeddings import rope_utils, rotary_pos_embedding

    def get_pos_emb_on_this_cp_rank(pos_emb, seq_dim, cp_group=None):
        # Megatron's version builds a pinned CUDA index; same zigzag slice, on the tensor's device.
        cp_size = cp_group.size() if cp_group is not None else parallel_state.get_context_parallel_world_size()
        cp_rank = cp_group.rank() if cp_group is not None else parallel_state.get_context_parallel_rank()
        idx = torch.tensor([cp_rank, 2 * cp_size - cp_rank - 1], device=pos_emb.device)
        pos_emb = pos_emb.view(*pos_emb.shape[:seq_dim], 2 * cp_size, -1, *pos_emb.shape[seq_dim + 1:])
        pos_emb = pos_emb.index_select(seq_dim, idx)
        return pos_emb.view(*pos_emb.shape[:seq_dim], -1, *pos_emb.shape[seq_dim + 2:])

    for mod in (rope_utils, rotary_pos_embedding):
        if hasattr(mod, "get_pos_emb_on_this_cp_rank"):
            mod.get_pos_emb_on_this_cp_rank = get_pos_emb_on_this_cp_rank
    _installed = True


def forward_backward_local(*, forward_step_func, data_iterator, model, num_microbatches, forward_only=False,
                           **_unused):
    """CPU stand-in for Megatron's ``forward_backward_no_pipelining`` (PP = 1).

    Returns the list of per-microbatch reduced-loss dicts, as Megatron's schedules do. Each microbatch's
    loss is divided by ``num_microbatches`` before backward so gradients equal the full-batch mean.
    """
    model = model[0] if isinstance(model, list) else model
    losses = []
    for _ in range(num_microbatches):
        output, loss_func = forward_step_func(data_iterator, model)
        loss, reduced = loss_func(output)
        if not forward_only:
            (loss / num_microbatches).backward()
        losses.append(reduced)
    return losses


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
