"""Real multi-process (gloo) steps give the single-process loss and gradients."""
import pytest
import torch

from tests.helpers import torchrun


def run_layout(tmp_path, nproc, *args):
    out = tmp_path / f"out_{nproc}_{'_'.join(a.replace('/', '') for a in args)}.pt"
    torchrun(nproc, ["tests/workers/parallel_step.py", "--out", str(out), *args])
    return torch.load(out)


def assert_same(ref, got, rtol=1e-5, atol=1e-6):
    assert got["loss"] == pytest.approx(ref["loss"], rel=1e-6)
    assert ref["grads"].keys() == got["grads"].keys()
    for name, g in ref["grads"].items():
        torch.testing.assert_close(got["grads"][name], g, rtol=rtol, atol=atol, msg=name)


@pytest.mark.slow
def test_data_parallel_2_matches_single_process(tmp_path):
    ref = run_layout(tmp_path, 1)
    assert_same(ref, run_layout(tmp_path, 2))
