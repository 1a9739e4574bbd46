"""Context parallelism with real processes (gloo): same outputs, selections and gradients as CP=1."""
import pytest
import torch

from tests.helpers import torchrun
from tests.test_parallel_step import assert_same, run_layout


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
@pytest.mark.parametrize("attention", ["dense", "phsa"])
def test_cp2_training_step_matches_cp1(tmp_path, attention):
    phsa = ["attention=phsa", "attention.n_init=8", "attention.local_window=16", "attention.train_topk=2",
            "attention.backend=reference"] if attention == "phsa" else []
    ref = run_layout(tmp_path, 1, *(["--"] + phsa if phsa else []))
    got = run_layout(tmp_path, 2, "--cp", "2", *(["--"] + phsa if phsa else []))
    assert_same(ref, got, rtol=2e-4, atol=2e-6)
