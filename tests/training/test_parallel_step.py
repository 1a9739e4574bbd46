"""Real multi-process (gloo) steps give the single-process loss and gradients."""
import pytest

from tests.helpers import assert_same, run_layout


@pytest.mark.slow
def test_data_parallel_2_matches_single_process(tmp_path):
    ref = run_layout(tmp_path, 1)
    assert_same(ref, run_layout(tmp_path, 2))


PHSA = ["--", "attention=phsa", "attention.n_init=8", "attention.local_window=16", "attention.train_topk=2",
        "attention.backend=reference"]


@pytest.mark.slow
def test_phsa_tensor_parallel_2_matches_tp1(tmp_path):
    ref = run_layout(tmp_path, 1, *PHSA)
    assert_same(ref, run_layout(tmp_path, 2, "--tp", "2", *PHSA), rtol=2e-4, atol=2e-6)


@pytest.mark.slow
def test_phsa_packed_documents_dp2_matches_single_process(tmp_path):
    ref = run_layout(tmp_path, 1, "--reset-docs", *PHSA)
    assert_same(ref, run_layout(tmp_path, 2, "--reset-docs", *PHSA))
