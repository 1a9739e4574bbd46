"""One training forward/backward of the tiny GPT on a fixed global batch, under any TP x CP x DP layout.

Run under torchrun. ``--cases`` is a JSON object {name: [layout arguments]} (``--tp``, ``--cp``,
``--reset-docs``, then Hydra overrides after ``--``); every case runs in this one process group (Megatron's
model-parallel groups rebuilt per case: one torchrun start serves a whole test module). Writes (rank 0)
{name: {"loss", "grads", "batch_kept"}}, the loss, the full (TP-gathered) gradients and whether the step left the
caller's micro-batch as it was, to ``--out`` so a test can compare
layouts with the single-process run. Uses the real training step (``phsa_train.training.step.forward_step`` /
``loss_func``) and the real grad sync of the CPU path.
"""
import argparse
import json

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from phsa_train import compat
from phsa_train.training.distributed import init_distributed, init_model_parallel
from phsa_train.megatron.token_info import make_token_info
from phsa_train.megatron.model import build_model
from phsa_train.training.optimizer import allreduce_grads
from phsa_train.training.step import forward_backward_local, forward_step
from tests.helpers import compose

VOCAB, SEQ, GLOBAL_BATCH = 256, 64, 4


def global_batch(reset_docs: bool):
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(1, VOCAB, (GLOBAL_BATCH, SEQ + 1), generator=g)
    if reset_docs:
        tokens[:, 20] = 0  # EOD (id 0) in the middle of every row
    punct_lut = torch.zeros(VOCAB, dtype=torch.bool)
    punct_lut[::7] = True
    x, y = tokens[:, :-1], tokens[:, 1:]
    return {"tokens": x, "labels": y, "loss_mask": torch.ones_like(x, dtype=torch.float),
            "position_ids": torch.arange(SEQ).expand(GLOBAL_BATCH, SEQ).clone(),
            "token_info": make_token_info(x, punct_lut, 0 if reset_docs else None)}


def gather_tp(name: str, param: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """The TP=1 layout of a TP-sharded gradient."""
    tp = parallel_state.get_tensor_model_parallel_world_size()
    if tp == 1 or not getattr(param, "tensor_model_parallel", False):
        return grad
    parts = [torch.empty_like(grad) for _ in range(tp)]
    dist.all_gather(parts, grad.contiguous(), group=parallel_state.get_tensor_model_parallel_group())
    if "linear_fc1" in name:  # SwiGLU: every shard is [gate_r; up_r]; TP=1 is [gate; up]
        halves = [p.chunk(2, dim=0) for p in parts]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)
    return torch.cat(parts, dim=param.partition_dim)


def run_case(argv: list[str], is_rank0: bool) -> dict | None:
    """One layout's forward/backward: rank 0 gets {"loss", "grads"}, the other ranks None."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--cp", type=int, default=1)
    ap.add_argument("--reset-docs", action="store_true")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)
    init_model_parallel(args.tp, 1, args.cp)
    cfg = compose(["model=tiny", f"data.seq_len={SEQ}", f"parallel.tensor_model_parallel_size={args.tp}",
                   f"parallel.context_parallel_size={args.cp}",
                   *(["data.reset_attention_mask=true"] if args.reset_docs else []), *args.overrides])
    torch.manual_seed(1234)
    model = build_model(cfg, VOCAB, torch.float32)

    batch = global_batch(args.reset_docs)
    dp, dp_rank = parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()
    rows = slice(dp_rank * GLOBAL_BATCH // dp, (dp_rank + 1) * GLOBAL_BATCH // dp)
    micro = {k: v[rows] for k, v in batch.items()}
    given = dict(micro)
    out = forward_backward_local(forward_step_func=forward_step, data_iterator=iter([micro]), model=[model],
                                 num_microbatches=1)
    # the caller's micro-batch as it was (a benchmark reuses it: a CP slice written back would halve it each step)
    kept = micro.keys() == given.keys() and all(micro[k] is given[k] for k in given)
    allreduce_grads(model)
    loss = out[0]["loss"].clone()
    dist.all_reduce(loss, group=parallel_state.get_data_parallel_group())
    grads = {n: gather_tp(n, p, p.grad) for n, p in model.named_parameters()}
    parallel_state.destroy_model_parallel()
    return {"loss": loss.item() / dp, "grads": grads, "batch_kept": kept} if is_rank0 else None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--cases", required=True, help='JSON: {"name": ["--tp", "2", "--", "attention=phsa"], ...}')
    args = ap.parse_args()
    env = init_distributed()
    compat.apply(on_gpu=False)
    results = {name: run_case(argv, env.rank == 0) for name, argv in json.loads(args.cases).items()}
    if env.rank == 0:
        torch.save(results, args.out)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
