"""Real multi-process (gloo) steps give the single-process loss and gradients."""
import pytest

from tests.helpers import assert_same, run_layouts

PHSA = ["attention=phsa", "attention.n_init=8", "attention.local_window=16", "attention.train_topk=2",
        "attention.backend=reference"]
# name -> (the single-process reference's arguments, the 2-rank layout's arguments)
LAYOUTS = {
    "dp2": ([], []),
    "tp2_phsa": (["--", *PHSA], ["--tp", "2", "--", *PHSA]),
    "dp2_phsa_packed": (["--reset-docs", "--", *PHSA], ["--reset-docs", "--", *PHSA]),
}


@pytest.fixture(scope="module")
def steps(tmp_path_factory):
    """(single-process results, 2-rank results): one torchrun start per world size for every layout here."""
    tmp = tmp_path_factory.mktemp("parallel_step")
    return (run_layouts(tmp, 1, {name: ref for name, (ref, _) in LAYOUTS.items()}),
            run_layouts(tmp, 2, {name: got for name, (_, got) in LAYOUTS.items()}))


@pytest.mark.slow
def test_data_parallel_2_matches_single_process(steps):
    ref, got = steps
    assert_same(ref["dp2"], got["dp2"])


@pytest.mark.slow
def test_phsa_tensor_parallel_2_matches_tp1(steps):
    ref, got = steps
    assert_same(ref["tp2_phsa"], got["tp2_phsa"], rtol=2e-4, atol=2e-6)


@pytest.mark.slow
def test_phsa_packed_documents_dp2_matches_single_process(steps):
    ref, got = steps
    assert_same(ref["dp2_phsa_packed"], got["dp2_phsa_packed"])
