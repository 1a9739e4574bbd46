"""Context parallelism with real processes (gloo): same outputs, selections and gradients as CP=1."""
import pytest

from tests.helpers import subprocess_env, torchrun
from tests.helpers import assert_same, run_layouts


def _cp_operator(tmp_path, nproc, *args):
    out = tmp_path / "ok"
    torchrun(nproc, ["tests/workers/cp_operator.py", "--out", str(out), *args])
    assert sorted(p.read_text() for p in tmp_path.glob("ok.*")) == ["ok"] * nproc


# One torchrun start per layout, every case of it in that process group: all-gather at CP=2 (query_block 1 and
# 4), CP=4 and TP=2 x CP=2; Ulysses at CP=2 (query_block 1 and 4) and TP=2 x CP=2 (CP=4 with 4 KV heads would give
# one head per rank, the head split TP=2 x CP=2 already covers).
@pytest.mark.slow
@pytest.mark.parametrize("nproc,args", [
    (2, ["--modes", "allgather", "ulysses", "--query-blocks", "1", "4"]),
    (4, ["--modes", "allgather"]),
    (4, ["--modes", "allgather", "ulysses", "--tp", "2"]),
], ids=["cp2", "cp4", "tp2xcp2"])
def test_cp_operator_matches_single_rank(tmp_path, nproc, args):
    pytest.importorskip("deepspeed")  # Ulysses' all-to-all (a pinned test dependency)
    _cp_operator(tmp_path, nproc, *args)


@pytest.mark.slow
@pytest.mark.parametrize("nproc,batch", [(2, 2), (4, 1)], ids=["cp2", "cp4"])
def test_triton_kernels_with_query_offset(tmp_path, nproc, batch):
    """The all-gather path through the Triton kernels (interpreter on CPU), the one that selects while K/V travel
    and exchanges only the chunks each rank reads: each chunk runs as suffix queries (native q_offset, no padded
    rows) and must equal the kernels' own CP=1 run. CP=4 has ranks that both send and receive in every step
    (one sequence there: the interpreter is slow)."""
    out = tmp_path / "ok"
    torchrun(nproc, ["tests/workers/cp_operator.py", "--out", str(out), "--backend", "triton", "--query-blocks", "4",
                     "--batch", str(batch)], env={**subprocess_env(), "TRITON_INTERPRET": "1"})
    assert sorted(p.read_text() for p in tmp_path.glob("ok.*")) == ["ok"] * nproc


PHSA = ["attention=phsa", "attention.n_init=8", "attention.local_window=16", "attention.train_topk=2",
        "attention.query_block=4", "attention.backend=reference"]


@pytest.fixture(scope="module")
def training_steps(tmp_path_factory):
    """(CP=1 results, CP=2 results) of one training step, dense and PHSA: one torchrun start per world size."""
    tmp = tmp_path_factory.mktemp("cp_step")
    return (run_layouts(tmp, 1, {"dense": [], "phsa": ["--", *PHSA]}),
            run_layouts(tmp, 2, {"dense": ["--cp", "2"], "phsa": ["--cp", "2", "--", *PHSA]}))


@pytest.mark.slow
@pytest.mark.parametrize("attention", ["dense", "phsa"])
def test_cp2_training_step_matches_cp1(training_steps, attention):
    ref, got = training_steps
    assert_same(ref[attention], got[attention], rtol=2e-4, atol=2e-6)
    # the step slices its own copy of the batch for CP: a caller that reuses the batch dict (bench/train_step.py
    # times the same batch every step) gets the full sequence again, not half of the last slice
    assert got[attention]["batch_kept"]
