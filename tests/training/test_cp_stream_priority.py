"""parallel.cp_high_priority_stream reaches Megatron as its "cp" group's NCCL option, and only where it means
something (NCCL, CP > 1). The NCCL side itself (the group's streams) is checked on GPUs by bench/context_parallel.py,
whose rows record each CP group's priority as built."""
import pytest
from megatron.core import parallel_state

from phsa_train.config.schema import ParallelConfig
from phsa_train.training import distributed


@pytest.fixture
def asked(monkeypatch):
    """The high_priority_stream_groups each init_model_parallel call hands Megatron, on a pretend NCCL world."""
    calls = []
    monkeypatch.setattr(parallel_state, "initialize_model_parallel",
                        lambda **kw: calls.append(kw["high_priority_stream_groups"]))
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(distributed.dist, "get_backend", lambda *a: "nccl")
    return calls


@pytest.mark.parametrize("cp,high,expected", [(2, True, ["cp"]), (2, False, None), (1, True, None),
                                              (2, None, ["cp"] if ParallelConfig.cp_high_priority_stream else None)])
def test_cp_group_priority_reaches_megatron(asked, cp, high, expected):
    distributed.init_model_parallel(1, 1, cp, high)
    assert asked == [expected]


def test_gloo_gets_no_stream_option(asked, monkeypatch):
    monkeypatch.setattr(distributed.dist, "get_backend", lambda *a: "gloo")
    distributed.init_model_parallel(1, 1, 2, True)
    assert asked == [None]
