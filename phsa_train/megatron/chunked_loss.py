"""The output layer and the cross-entropy in chunks of tokens: the [tokens, vocab] logits never exist whole.

Megatron's path (``output_layer`` then ``vocab_parallel_cross_entropy``) materialises the logits in the compute
dtype and an fp32 copy of them that backward keeps as the softmax: at 64k tokens per rank and a 151,936-entry
vocabulary that is 18.5 + 37.1 GiB, most of a long-context step's peak memory. Here each chunk of ``chunk``
tokens computes its logits, reduces them to a per-token maximum, sum of exponentials and target logit, and
drops them; backward recomputes each chunk's logits from the saved hidden states. Live memory is
O(chunk x vocab / tp) instead of O(tokens x vocab / tp); the price is one more [chunk, h] x [h, vocab / tp] GEMM
per chunk (the recompute), a third more output-layer FLOPs.

Why recompute rather than computing the gradients in forward: the gradient of a token's loss is scaled by
the caller's per-token weight (the loss mask over the token count, the micro-batch count, CP), which arrives
only in backward. The weight gradient sums over tokens with those weights, so it cannot be formed in forward
without the weights.

The arithmetic is Megatron's, step for step, per chunk: logits in the weight's dtype, the fp32 max / shifted
exp / sum / log, the three reductions over the tensor-parallel group (max, then the target logit and the sum of
exponentials), and in backward ``softmax - onehot`` scaled by the incoming gradient, cast to the compute dtype
before the two GEMMs. Only the GEMMs' summation order differs (rows split into chunks; the weight gradient
summed over chunks in fp32), so fp32 results agree to rounding. The input gradient is all-reduced over the
tensor-parallel group, as ``ColumnParallelLinear``'s backward does for the output layer.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                         tp_group: dist.ProcessGroup | None = None, *, chunk: int) -> torch.Tensor:
    """Per-token cross-entropy of ``hidden @ weight.T`` against ``labels``, ``chunk`` tokens at a time.

    hidden: [s, b, h]; weight: [V / tp, h], this rank's shard of the vocabulary (rank r holds the r-th
    consecutive shard of ``tp_group``, as ``ColumnParallelLinear`` splits it); labels: [b, s], global token ids.
    Returns the fp32 losses [b, s], as GPTModel's ``compute_language_model_loss`` does.
    """
    s, b, h = hidden.shape
    losses = _LinearCrossEntropy.apply(hidden.reshape(s * b, h), weight, labels.t().reshape(s * b), chunk, tp_group)
    return losses.view(s, b).t().contiguous()


def _tp(group) -> tuple[int, int]:
    if group is None or not dist.is_initialized():
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


class _LinearCrossEntropy(torch.autograd.Function):
    """hidden [n, h], weight [V / tp, h], labels [n] -> fp32 losses [n]."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk, tp_group):
        rank, tp = _tp(tp_group)
        n, v_local = hidden.shape[0], weight.shape[0]
        local = labels - rank * v_local  # target's index in this shard
        outside = (local < 0) | (local >= v_local)
        local = local.masked_fill(outside, 0)
        losses = torch.empty(n, dtype=torch.float32, device=hidden.device)
        logits_max = torch.empty_like(losses)
        sum_exp = torch.empty_like(losses)
        for i in range(0, n, chunk):
            rows = slice(i, min(i + chunk, n))
            logits = (hidden[rows] @ weight.t()).float()
            row_max = logits.max(dim=-1).values
            if tp > 1:
                dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=tp_group)
            logits -= row_max.unsqueeze(-1)
            target = logits.gather(1, local[rows].unsqueeze(-1)).squeeze(-1).masked_fill_(outside[rows], 0.0)
            row_sum = logits.exp_().sum(dim=-1)
            del logits
            if tp > 1:  # one collective for both sums
                both = torch.stack([target, row_sum])
                dist.all_reduce(both, group=tp_group)
                target, row_sum = both
            losses[rows] = torch.log(row_sum) - target
            logits_max[rows], sum_exp[rows] = row_max, row_sum
        ctx.save_for_backward(hidden, weight, local, outside, logits_max, sum_exp)
        ctx.chunk, ctx.tp_group, ctx.tp = chunk, tp_group, tp
        return losses

    @staticmethod
    def backward(ctx, grad_losses):
        hidden, weight, local, outside, logits_max, sum_exp = ctx.saved_tensors
        need_hidden, need_weight = ctx.needs_input_grad[:2]
        n, chunk = hidden.shape[0], ctx.chunk
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        # The weight gradient sums over every chunk: in fp32, so splitting the tokens adds no rounding of its own.
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight else None
        for i in range(0, n, chunk):
            rows = slice(i, min(i + chunk, n))
            logits = (hidden[rows] @ weight.t()).float()
            softmax = logits.sub_(logits_max[rows].unsqueeze(-1)).exp_().div_(sum_exp[rows].unsqueeze(-1))
            idx = torch.arange(softmax.shape[0], device=softmax.device)
            softmax[idx, local[rows]] -= 1.0 - outside[rows].float()
            grad_logits = softmax.mul_(grad_losses[rows].unsqueeze(-1)).to(hidden.dtype)
            del logits, softmax
            if need_hidden:
                torch.mm(grad_logits, weight, out=grad_hidden[rows])
            if need_weight and weight.dtype == torch.float32:
                grad_weight.addmm_(grad_logits.t(), hidden[rows])
            elif need_weight:  # each chunk's product rounds once to the compute dtype, as the unchunked GEMM does
                grad_weight += grad_logits.t() @ hidden[rows]
        if need_hidden and ctx.tp > 1:
            dist.all_reduce(grad_hidden, group=ctx.tp_group)
        if need_weight:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None, None, None
