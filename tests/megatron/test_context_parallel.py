"""Context parallelism with real processes (gloo): same outputs, selections and gradients as CP=1."""
import pytest

from tests.helpers import subprocess_env, torchrun
from tests.helpers import assert_same, run_layout


def _cp_operator(tmp_path, nproc, *args):
    out = tmp_path / "ok"
    torchrun(nproc, ["tests/workers/cp_operator.py", "--out", str(out), *args])
    assert sorted(p.read_text() for p in tmp_path.glob("ok.*")) == ["ok"] * nproc


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["allgather", "ulysses"])
@pytest.mark.parametrize("nproc,extra", [(2, []), (4, []), (4, ["--tp", "2"]), (2, ["--query-block", "4"])],
                         ids=["cp2", "cp4", "tp2xcp2", "cp2-qb4"])
def test_cp_operator_matches_single_rank(tmp_path, mode, nproc, extra):
    if mode == "ulysses":
        pytest.importorskip("deepspeed")
        if nproc == 4 and not extra:
            pytest.skip("4 KV heads / CP=4 = 1 head per rank is covered by tp2xcp2; keep the suite short")
    _cp_operator(tmp_path, nproc, "--mode", mode, *extra)


@pytest.mark.slow
@pytest.mark.parametrize("nproc,batch", [(2, 2), (4, 1)], ids=["cp2", "cp4"])
def test_triton_kernels_with_query_offset(tmp_path, nproc, batch):
    """The all-gather path through the Triton kernels (interpreter on CPU), the one that selects while K/V travel
    and exchanges only the chunks each rank reads: each chunk runs as suffix queries (native q_offset, no padded
    rows) and must equal the kernels' own CP=1 run. CP=4 has ranks that both send and receive in every step
    (one sequence there: the interpreter is slow)."""
    out = tmp_path / "ok"
    torchrun(nproc, ["tests/workers/cp_operator.py", "--out", str(out), "--backend", "triton", "--query-block", "4",
                     "--batch", str(batch)], env={**subprocess_env(), "TRITON_INTERPRET": "1"})
    assert sorted(p.read_text() for p in tmp_path.glob("ok.*")) == ["ok"] * nproc


@pytest.mark.slow
@pytest.mark.parametrize("attention", ["dense", "phsa"])
def test_cp2_training_step_matches_cp1(tmp_path, attention):
    phsa = ["attention=phsa", "attention.n_init=8", "attention.local_window=16", "attention.train_topk=2",
            "attention.query_block=4", "attention.backend=reference"] if attention == "phsa" else []
    ref = run_layout(tmp_path, 1, *(["--"] + phsa if phsa else []))
    got = run_layout(tmp_path, 2, "--cp", "2", *(["--"] + phsa if phsa else []))
    assert_same(ref, got, rtol=2e-4, atol=2e-6)
