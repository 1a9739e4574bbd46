"""PHSA under context parallelism (x optional TP head split) against the single-rank reference.

Run under torchrun; every rank checks its own zigzag slice of outputs, selected blocks and dq/dk/dv
against a full-sequence run of the reference operator, in float64, for every (query block, mode) pair of
``--query-blocks`` x ``--modes`` in one process group (one torchrun start per layout keeps the CPU suite short),
and writes ``ok`` on success. ``--backend triton`` (under TRITON_INTERPRET=1 on CPU): float32, both runs through
the Triton kernels, so the chunk path's native query offset is checked against the kernels' own full-sequence
result.
"""
import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root: `tests.` helpers under torchrun

if os.environ.get("TRITON_INTERPRET") == "1":  # --backend triton on CPU: the interpreter's shims, before the kernels
    from tests.triton_interpreter import patch

    patch()

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from megatron.core import parallel_state  # noqa: E402

from phsa_train.attention import PHSAParams, phsa_attention, select_blocks  # noqa: E402
from phsa_train.megatron import context_parallel  # noqa: E402
from phsa_train.megatron.context_parallel import overlap_kernels, cp_phsa_attention, natural_to_zigzag  # noqa: E402
from phsa_train.megatron.token_info import PUNCT_BIT  # noqa: E402
from phsa_train.training.distributed import init_distributed, init_model_parallel  # noqa: E402
from tests.workers.cp_selection import cp_select_blocks  # noqa: E402
from tests.helpers import assert_no_near_ties  # noqa: E402


def full_sequence_run(q, k, v, punct, w, kw: dict) -> list[torch.Tensor]:
    """The CP=1 run of the whole sequence: o, dq, dk, dv of loss = sum(o * w), and the selected blocks.

    Heads are independent, so each rank of the world runs its contiguous share of the KV heads (with their query
    heads) and the shares are gathered: every rank gets the whole result for 1 / world of the work (under the
    Triton interpreter this run is most of the worker's time)."""
    world, rank = dist.get_world_size(), dist.get_rank()
    hk, group = k.shape[2], q.shape[2] // k.shape[2]
    assert hk % world == 0, f"{hk} KV heads do not split over {world} ranks"
    kh = slice(rank * hk // world, (rank + 1) * hk // world)
    qh = slice(kh.start * group, kh.stop * group)
    x = [t[:, :, h].clone().requires_grad_() for t, h in ((q, qh), (k, kh), (v, kh))]
    o = phsa_attention(*x, punct, **kw)
    (o * w[:, :, qh]).sum().backward()
    sel = select_blocks(q[:, :, qh], k[:, :, kh], punct, **kw)
    gathered = []
    for part in (o.detach(), *(t.grad for t in x), sel):
        shares = [torch.empty_like(part) for _ in range(world)]
        dist.all_gather(shares, part.contiguous())
        gathered.append(torch.cat(shares, dim=2))
    return gathered


def check(args, cp_group, mode: str, query_block: int) -> None:
    """This rank's CP slice of one (mode, query block) case against the full-sequence run; raises on a mismatch."""
    cp, cp_rank = dist.get_world_size(cp_group), dist.get_rank(cp_group)
    tp, tp_rank = args.tp, parallel_state.get_tensor_model_parallel_rank()
    case = f"mode={mode} query_block={query_block} cp={cp} tp={tp} backend={args.backend}"

    b, L, hq, hk, d = args.batch, 256, 8, 4, 16
    kw = dict(block_size=8, n_init=8, local_window=16, topk=3, lam=0.5, score="softmax_group_sum",
              query_block=query_block, backend=args.backend)
    dtype, tol = torch.float64, dict(rtol=1e-9, atol=1e-10)
    if args.backend == "triton":  # kernel tiles: blocks of 16; fp32; dk/dv sum in another order (atomics, CP)
        kw.update(block_size=16, n_init=16, local_window=32)
        dtype, tol = torch.float32, dict(rtol=1e-5, atol=1e-6)
    g = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(b, L, h, d, generator=g, dtype=dtype) for h in (hq, hk, hk))
    punct = torch.rand(b, L, generator=g) < 0.15
    w = torch.randn(b, L, hq, d, generator=g, dtype=dtype)

    o_ref, dq_ref, dk_ref, dv_ref, sel_ref = full_sequence_run(q, k, v, punct, w, kw)

    # This rank's share: its TP heads, its CP zigzag slice.
    qh, kh = slice(tp_rank * hq // tp, (tp_rank + 1) * hq // tp), slice(tp_rank * hk // tp, (tp_rank + 1) * hk // tp)
    mine = lambda x: natural_to_zigzag(x, cp)[cp_rank]  # noqa: E731
    q_l, k_l, v_l = (mine(x[:, :, hs]).clone().requires_grad_() for x, hs in ((q, qh), (k, kh), (v, kh)))
    info_l = mine(punct.to(torch.int32) * PUNCT_BIT)
    if args.backend == "triton" and mode == "allgather":  # the path that selects while K/V are in flight
        assert overlap_kernels(q_l, k_l, v_l, info_l, cp_group, kw, False) is not None, case
    o = cp_phsa_attention(q_l, k_l, v_l, info_l, cp_group, mode, kw)
    (o * mine(w[:, :, qh])).sum().backward()
    if args.backend == "triton" and mode == "allgather" and cp > 2:  # the backward's other schedule, the same sums
        # (at CP > 2, where ranks both send and receive early contributions; one extra run under the interpreter)
        context_parallel.SUMS_BESIDE_PROGRAMS = 2
        try:
            x = [t.detach().clone().requires_grad_() for t in (q_l, k_l, v_l)]
            o2 = cp_phsa_attention(*x, info_l, cp_group, mode, kw)
            (o2 * mine(w[:, :, qh])).sum().backward()
        finally:
            context_parallel.SUMS_BESIDE_PROGRAMS = None
        for a, b_ in ((o2, o), *((t.grad, u.grad) for t, u in zip(x, (q_l, k_l, v_l)))):
            assert torch.equal(a, b_), f"{case}: SUMS_BESIDE_PROGRAMS changes the result"

    torch.testing.assert_close(o, mine(o_ref[:, :, qh]), **tol, msg=lambda m: f"{case}: o: {m}")
    for name, got, ref, heads in (("dq", q_l, dq_ref, qh), ("dk", k_l, dk_ref, kh), ("dv", v_l, dv_ref, kh)):
        torch.testing.assert_close(got.grad, mine(ref[:, :, heads]), **tol, msg=lambda m: f"{case}: {name}: {m}")
    if mode == "allgather":
        # exact comparison of two differently rounded runs: only sound away from near-ties
        assert_no_near_ties(q, k, punct, PHSAParams(**{x: y for x, y in kw.items() if x != "backend"}))
        sel = cp_select_blocks(q_l, k_l, info_l, cp_group, kw)
        assert torch.equal(sel, mine(sel_ref[:, :, kh])), f"{case}: selected blocks differ from the CP=1 run"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--modes", nargs="+", default=["allgather"], choices=["allgather", "ulysses"])
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--query-blocks", type=int, nargs="+", default=[1])
    ap.add_argument("--backend", default="reference", choices=["reference", "triton"])
    ap.add_argument("--batch", type=int, default=2)
    args = ap.parse_args()
    init_distributed()
    init_model_parallel(args.tp, 1, dist.get_world_size() // args.tp)
    cp_group = parallel_state.get_context_parallel_group()
    for query_block in args.query_blocks:
        for mode in args.modes:
            check(args, cp_group, mode, query_block)
    Path(f"{args.out}.{dist.get_rank()}").write_text("ok")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
