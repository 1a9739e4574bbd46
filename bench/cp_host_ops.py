"""What the host issues per PHSA layer, forward + backward: the overlapped CP path against CP=1 (the launch overhead
that the as-launched timings of ``bench/context_parallel.py`` pay and the host-ahead ones hide).

    TRITON_INTERPRET=1 torchrun --nproc-per-node=2 bench/cp_host_ops.py      # CPU: gloo, Triton interpreter
    torchrun --nproc-per-node=2 bench/cp_host_ops.py                         # GPU: NCCL, the compiled kernels

Counts, per rank: Triton kernel launches (by kernel), aten ops that run a kernel (by op), aten allocations, aten
views (host time only), and collective / point-to-point calls. Counts do not depend on the shape (a small one is
used), except that the last dK/dV message goes in ``TAIL_PIECES`` pieces. On CPU, the CUDA-only host work (events,
stream switches) is absent. Prints one JSON object per rank.
"""
from __future__ import annotations

import json
import os
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, under torchrun

if os.environ.get("TRITON_INTERPRET") == "1":  # the interpreter's shims (bf16 dot, sort), before the kernels load
    from tests.triton_interpreter import patch

    patch()

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

ALLOCATIONS = {"empty", "empty_strided", "new_empty", "new_empty_strided", "empty_like"}
_in_launch = [0]  # > 0 while a Triton launch runs: the interpreter's own tensor traffic is not the host's


class HostOps(TorchDispatchMode):
    """Counts the aten ops run inside it: views (no kernel), allocations, collectives (c10d) and the rest (a kernel
    each on GPU)."""

    def __init__(self):
        super().__init__()
        self.kernels, self.allocations, self.views, self.collectives = Counter(), Counter(), Counter(), Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if _in_launch[0]:
            pass
        elif func.namespace == "c10d":
            self.collectives[name] += 1
        elif func.is_view or name in ("as_strided", "view", "_unsafe_view", "alias"):
            self.views[name] += 1
        elif name in ALLOCATIONS:
            self.allocations[name] += 1
        else:
            self.kernels[name] += 1
        return func(*args, **(kwargs or {}))


def count_triton_launches() -> Counter:
    """Counter of Triton launches by kernel name, filled from now on (compiled or interpreted kernels)."""
    launches = Counter()
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    for cls in (JITFunction, InterpretedFunction):
        run = cls.run

        def counted(self, *args, _run=run, **kwargs):
            launches[self.fn.__name__ if hasattr(self, "fn") else str(self)] += 1
            _in_launch[0] += 1
            try:
                return _run(self, *args, **kwargs)
            finally:
                _in_launch[0] -= 1
        cls.run = counted
    return launches


def main():
    from megatron.core import parallel_state

    from phsa_train.megatron.context_parallel import cp_phsa_attention, natural_to_zigzag, overlap_kernels
    from phsa_train.megatron.local_attention import phsa_local
    from phsa_train.megatron.token_info import PUNCT_BIT
    from phsa_train.training.distributed import init_distributed, init_model_parallel

    env = init_distributed()
    init_model_parallel(1, 1, env.world_size)
    group = parallel_state.get_context_parallel_group()
    cp, rank, dev = env.world_size, env.rank, env.device
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    b, L, hq, hk, d = 1, 256, 4, 2, 16
    kw = dict(block_size=16, n_init=16, local_window=32, topk=3, lam=0.5, score="softmax_group_sum",
              query_block=4, backend="triton")
    g = torch.Generator().manual_seed(0)
    q, k, v, do = (torch.randn(b, L, h, d, generator=g).to(dev, dtype) for h in (hq, hk, hk, hq))
    info = ((torch.rand(b, L, generator=g) < 0.1).to(torch.int32) * PUNCT_BIT).to(dev)
    mine = lambda x: natural_to_zigzag(x, cp)[rank].contiguous()  # noqa: E731
    launches = count_triton_launches()

    def counted(fn, inputs, grad) -> dict:
        inputs = [x.clone().requires_grad_() for x in inputs]
        fn(*inputs).backward(grad)  # warm-up: compiled kernels, the per-batch caches
        for x in inputs:
            x.grad = None
        launches.clear()
        with HostOps() as ops:
            fn(*inputs).backward(grad)
        return {"triton_launches": sum(launches.values()), "aten_kernel_ops": sum(ops.kernels.values()),
                "aten_allocations": sum(ops.allocations.values()), "aten_views": sum(ops.views.values()),
                "collective_calls": sum(ops.collectives.values()),
                "by_kernel": dict(launches), "by_aten_op": dict(ops.kernels), "by_collective": dict(ops.collectives)}

    q_l, k_l, v_l, info_l = (mine(x) for x in (q, k, v, info))
    assert overlap_kernels(q_l, k_l, v_l, info_l, group, kw, False) is not None, "not the overlapped path"
    row = {"rank": rank, "device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu", "L": L,
           "cp1": counted(lambda q_, k_, v_: phsa_local(q_, k_, v_, info, kw), (q, k, v), do),
           f"cp{cp}_allgather": counted(
               lambda q_, k_, v_: cp_phsa_attention(q_, k_, v_, info_l, group, "allgather", kw),
               (q_l, k_l, v_l), mine(do))}
    print(json.dumps(row), flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
