"""One training or evaluation step in Megatron's schedule contract: ``forward_step``, ``loss_func``, ``evaluate``.

:func:`get_forward_backward` picks the schedule: Megatron's on GPU, :func:`forward_backward_local` on CPU
(Megatron's schedules count tokens in a ``device="cuda"`` tensor).
"""
from __future__ import annotations

import functools

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from phsa_train.training.data import batches


def loss_func(loss_mask: torch.Tensor, n_tokens_global: torch.Tensor, output: torch.Tensor):
    """Per-token losses [b, s_local] -> this rank's share of the micro-batch mean loss.

    Under CP each rank holds a slice of every sequence: dividing the local sum by the *global* token
    count (times cp, since gradients are averaged over the DP x CP group) makes CP=N equal CP=1.
    """
    cp = parallel_state.get_context_parallel_world_size()
    local_sum = (output.float() * loss_mask).sum()
    loss = local_sum * cp / n_tokens_global
    reported = local_sum.detach().clone()
    if cp > 1:
        dist.all_reduce(reported, group=parallel_state.get_context_parallel_group())
    return loss, {"loss": reported / n_tokens_global}


def forward_step(data_iterator, model):
    """Megatron's ``forward_step_func``: next micro-batch -> (per-token losses, loss_func)."""
    batch = next(data_iterator)
    n_tokens = batch["loss_mask"].sum().float()
    if parallel_state.get_context_parallel_world_size() > 1:
        from megatron.core.utils import get_batch_on_this_cp_rank

        # a copy: Megatron's slicer writes each rank's slice back into the dict it is given, so a caller that
        # reuses its batch (a benchmark timing the same batch) would get half of a half on the next step
        batch = get_batch_on_this_cp_rank(dict(batch))
    output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"],
                   extra_block_kwargs={"attention_bias": batch["token_info"]})
    return output, functools.partial(loss_func, batch["loss_mask"].float(), n_tokens)


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


def get_forward_backward(on_gpu: bool):
    if not on_gpu:
        return forward_backward_local
    from megatron.core.pipeline_parallel import get_forward_backward_func

    return get_forward_backward_func()


def num_microbatches(t) -> int:
    return t.global_batch_size // (t.micro_batch_size * parallel_state.get_data_parallel_world_size())


def train_step(model, forward_backward, data_iterator, cfg, device) -> float:
    """Forward + backward over one global batch; returns its mean loss over the data-parallel group."""
    t = cfg.train
    out = forward_backward(forward_step_func=forward_step, data_iterator=data_iterator, model=[model],
                           num_microbatches=num_microbatches(t), seq_length=cfg.data.seq_len,
                           micro_batch_size=t.micro_batch_size, forward_only=False)
    loss = torch.stack([r["loss"] for r in out]).mean() if out else torch.zeros((), device=device)
    dist.all_reduce(loss, group=parallel_state.get_data_parallel_group())
    return loss.item() / parallel_state.get_data_parallel_world_size()


def evaluate(model, forward_backward, data, cfg, device) -> float:
    """Mean validation loss over ``train.eval_iters`` fixed global batches (the same ones every time)."""
    t = cfg.train
    it = batches(data.valid, start_sample=0, global_batch_size=t.global_batch_size,
                 micro_batch_size=t.micro_batch_size, data=data,
                 reset_attention_mask=cfg.data.reset_attention_mask, device=device)
    model.eval()
    total = torch.zeros((), device=device)
    with torch.no_grad():
        for _ in range(t.eval_iters):
            out = forward_backward(forward_step_func=forward_step, data_iterator=it, model=[model],
                                   num_microbatches=num_microbatches(t), seq_length=cfg.data.seq_len,
                                   micro_batch_size=t.micro_batch_size, forward_only=True)
            total += sum(r["loss"] for r in out) / max(1, len(out))
    model.train()
    dist.all_reduce(total, group=parallel_state.get_data_parallel_group())
    return (total / (t.eval_iters * parallel_state.get_data_parallel_world_size())).item()
