"""The all-gather path's point-to-point plans (``kv_plan``, ``dkv_plan``) against causality, for many CP sizes:
a rank receives exactly the K/V chunks its queries read, each chunk's dK/dV sums reach their owner from exactly
the ranks whose queries read it, only once final, and every send meets a receive in the same step and order.
(The gloo tests run the plans; here every rank of CP up to 8 is checked without processes.)"""
import pytest
import torch.distributed as dist

from phsa_train.megatron.context_parallel import dkv_plan, kv_plan


def owner(j: int, cp: int) -> int:
    return j if j < cp else 2 * cp - 1 - j


def reads(r: int, cp: int) -> set:
    """Natural chunks rank r's queries read keys of (causal): 0 .. 2cp-1-r (its second chunk's prefix)."""
    return set(range(2 * cp - r))


def matched(plans: list[list]) -> None:
    """plans[r] = rank r's ops of one step: rank r's sends to s are rank s's receives from r, in order."""
    for r, ops in enumerate(plans):
        for s, other in enumerate(plans):
            sent = [j for fn, j, peer in ops if fn is dist.isend and peer == s]
            got = [j for fn, j, peer in other if fn is dist.irecv and peer == r]
            assert sent == got, (r, s, sent, got)


@pytest.mark.parametrize("cp", [2, 3, 4, 8])
def test_kv_plan_moves_exactly_what_causality_reads(cp):
    plans = [kv_plan(r, cp) for r in range(cp)]
    for step in range(2):
        matched([p[step] for p in plans])
    for r, (first, second) in enumerate(plans):
        own = {r, 2 * cp - 1 - r}
        got = [j for fn, j, _ in first + second if fn is dist.irecv]
        assert sorted(got) == sorted(reads(r, cp) - own)  # all it reads, nothing twice, nothing else
        assert set(range(r)) <= {j for fn, j, _ in first if fn is dist.irecv}  # the first chunk's prefix: step 1


@pytest.mark.parametrize("cp", [2, 3, 4, 8])
def test_dkv_plan_sends_only_nonzero_final_sums(cp):
    plans = [dkv_plan(s, cp) for s in range(cp)]
    for step in range(2):
        matched([p[step] for p in plans])
    for s, (early, last) in enumerate(plans):
        sent = [(j, t) for fn, j, t in early + last if fn is dist.isend]
        # one message per chunk this rank's queries read and another rank owns, to that owner
        assert sorted(sent) == sorted((j, owner(j, cp)) for j in reads(s, cp) if owner(j, cp) != s)
        # early only what the first chunk (keys of chunks 0 .. s) does not touch
        assert all(j > s for fn, j, _ in early if fn is dist.isend)
        got = [(t, j) for fn, j, t in early + last if fn is dist.irecv]
        assert got == sorted(got)  # received in rank order: the owner's fp32 sum runs in rank order
