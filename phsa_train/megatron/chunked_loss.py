"""The output layer and the cross-entropy in chunks of tokens: the [tokens, vocab] logits never exist whole.

Megatron's path (``output_layer`` then ``vocab_parallel_cross_entropy``) materialises the logits in the compute
dtype and an fp32 copy of them that backward keeps as the softmax: at 64k tokens per rank and a 151,936-entry
vocabulary that is 18.5 + 37.1 GiB, most of a long-context step's peak memory. Here each chunk of ``chunk``
tokens computes its logits, reduces them to a per-token maximum, sum of exponentials and target logit, and
drops them; backward recomputes each chunk's logits from the saved hidden states. Live memory is
O(chunk x vocab / tp) instead of O(tokens x vocab / tp); the price is one more [chunk, h] x [h, vocab / tp] GEMM
per chunk (the recompute), a third more output-layer FLOPs. With ``fused`` (``train.fused_kernels`` on a GPU) the
elementwise work on a chunk's logits is compiled: the sum of exponentials reads the compute-dtype logits once
and the gradient ``softmax - onehot`` is one kernel from the logits to the compute-dtype gradient, where
Megatron's path writes and reads fp32 [tokens, vocab] tensors several times.

Why recompute rather than computing the gradients in forward: the gradient of a token's loss is scaled by
the caller's per-token weight (the loss mask over the token count, the micro-batch count, CP), which arrives
only in backward. The weight gradient sums over tokens with those weights, so it cannot be formed in forward
without the weights.

The arithmetic is Megatron's, step for step, per chunk: logits in the weight's dtype, the fp32 max / shifted
exp / sum / log, the three reductions over the tensor-parallel group (max, then the target logit and the sum of
exponentials), and in backward ``softmax - onehot`` scaled by the incoming gradient, cast to the compute dtype
before the two GEMMs. Only the GEMMs' summation order differs (rows split into chunks; the weight gradient
summed over chunks in fp32, each chunk's product rounded to the compute dtype first), so fp32 results agree to
rounding and bf16 ones to bf16 rounding. The input gradient is all-reduced over the
tensor-parallel group, as ``ColumnParallelLinear``'s backward does for the output layer.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from phsa_train.megatron.fused import compiled


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                         tp_group: dist.ProcessGroup | None = None, *, chunk: int, fused: bool = False) -> torch.Tensor:
    """Per-token cross-entropy of ``hidden @ weight.T`` against ``labels``, ``chunk`` tokens at a time.

    hidden: [s, b, h]; weight: [V / tp, h], this rank's shard of the vocabulary (rank r holds the r-th
    consecutive shard of ``tp_group``, as ``ColumnParallelLinear`` splits it); labels: [b, s], global token ids.
    Returns the fp32 losses [b, s], as GPTModel's ``compute_language_model_loss`` does. ``fused``: compile the
    elementwise steps for CUDA tensors.
    """
    s, b, h = hidden.shape
    losses = _LinearCrossEntropy.apply(hidden.reshape(s * b, h), weight, labels.t().reshape(s * b), chunk, tp_group,
                                       fused)
    return losses.view(s, b).t().contiguous()


def sum_exp(logits: torch.Tensor, row_max: torch.Tensor) -> torch.Tensor:
    """logits [c, V] (compute dtype), row_max [c] (fp32) -> sum(exp(logits - row_max), -1) [c] in fp32."""
    return (logits.float() - row_max.unsqueeze(-1)).exp().sum(dim=-1)


def grad_logits(logits: torch.Tensor, row_max: torch.Tensor, row_sum: torch.Tensor, target: torch.Tensor,
                grad: torch.Tensor) -> torch.Tensor:
    """(softmax - onehot(target)) * grad in fp32, returned in the logits' dtype [c, V]. ``target`` [c] indexes the
    columns of ``logits``; -1 where the target is in another rank's shard (no onehot here)."""
    softmax = (logits.float() - row_max.unsqueeze(-1)).exp() / row_sum.unsqueeze(-1)
    onehot = torch.arange(logits.shape[-1], device=logits.device) == target.unsqueeze(-1)
    return ((softmax - onehot.float()) * grad.unsqueeze(-1)).to(logits.dtype)


def _tp(group) -> tuple[int, int]:
    if group is None or not dist.is_initialized():
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


class _LinearCrossEntropy(torch.autograd.Function):
    """hidden [n, h], weight [V / tp, h], labels [n] -> fp32 losses [n]."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk, tp_group, fused):
        rank, tp = _tp(tp_group)
        n, v_local = hidden.shape[0], weight.shape[0]
        target = labels - rank * v_local  # the target's column in this shard; -1 where it is in another
        target = target.masked_fill_((target < 0) | (target >= v_local), -1)
        sum_exp_fn = compiled(sum_exp, hidden) if fused else sum_exp
        losses = torch.empty(n, dtype=torch.float32, device=hidden.device)
        logits_max, logits_sum_exp = torch.empty_like(losses), torch.empty_like(losses)
        for i in range(0, n, chunk):
            rows = slice(i, min(i + chunk, n))
            logits = hidden[rows] @ weight.t()
            row_max = logits.amax(dim=-1).float()
            if tp > 1:
                dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=tp_group)
            t = target[rows]
            target_logit = (logits.gather(1, t.clamp(min=0).unsqueeze(-1)).squeeze(-1).float() - row_max)
            target_logit.masked_fill_(t < 0, 0.0)
            row_sum = sum_exp_fn(logits, row_max)
            del logits
            if tp > 1:  # one collective for both sums
                both = torch.stack([target_logit, row_sum])
                dist.all_reduce(both, group=tp_group)
                target_logit, row_sum = both
            losses[rows] = torch.log(row_sum) - target_logit
            logits_max[rows], logits_sum_exp[rows] = row_max, row_sum
        ctx.save_for_backward(hidden, weight, target, logits_max, logits_sum_exp)
        ctx.chunk, ctx.tp_group, ctx.tp, ctx.fused = chunk, tp_group, tp, fused
        return losses

    @staticmethod
    def backward(ctx, grad_losses):
        hidden, weight, target, logits_max, logits_sum_exp = ctx.saved_tensors
        need_hidden, need_weight = ctx.needs_input_grad[:2]
        n, chunk = hidden.shape[0], ctx.chunk
        grad_logits_fn = compiled(grad_logits, hidden) if ctx.fused else grad_logits
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        # The weight gradient sums over the chunks in fp32 (whatever the compute dtype) and is rounded to it once.
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight else None
        for i in range(0, n, chunk):
            rows = slice(i, min(i + chunk, n))
            g = grad_logits_fn(hidden[rows] @ weight.t(), logits_max[rows], logits_sum_exp[rows], target[rows],
                               grad_losses[rows])
            if need_hidden:
                torch.mm(g, weight, out=grad_hidden[rows])
            if need_weight and weight.dtype == torch.float32:
                grad_weight.addmm_(g.t(), hidden[rows])
            elif need_weight:  # cuBLAS accumulates each chunk's product in fp32 and rounds it to bf16 once
                grad_weight += g.t() @ hidden[rows]
        if need_hidden and ctx.tp > 1:
            dist.all_reduce(grad_hidden, group=ctx.tp_group)
        if need_weight:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None, None, None, None
