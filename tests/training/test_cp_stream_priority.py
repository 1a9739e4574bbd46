"""parallel.cp_high_priority_stream reaches Megatron as its "cp" group's NCCL option, and only where it means
something (NCCL, CP > 1); the benchmark's CTA limit (``new_group_like(..., max_ctas)``) reaches the NCCL options or
fails in one line. The NCCL side itself (the group's streams, its CTAs) is checked on GPUs by
bench/context_parallel.py, whose rows record each CP group's priority and CTA limit as built."""
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


class _Config:  # the fields of torch's ProcessGroupNCCL.NCCLConfig that new_group_like sets
    max_ctas = -2147483648  # NCCL_CONFIG_UNDEF_INT: NCCL's default


class _Options:
    def __init__(self, is_high_priority_stream=False):
        self.is_high_priority_stream, self.config = is_high_priority_stream, _Config()


@pytest.fixture
def built(monkeypatch):
    """The pg_options each new_group call of new_group_like gets, on a pretend two-rank NCCL world."""
    calls = []
    monkeypatch.setattr(distributed.dist, "get_process_group_ranks", lambda g: [0, 1])
    monkeypatch.setattr(distributed.dist, "get_world_size", lambda *a: 2)
    monkeypatch.setattr(distributed.dist, "get_backend", lambda *a: "nccl")
    monkeypatch.setattr(distributed.dist, "ProcessGroupNCCL", type("PG", (), {"Options": _Options}), raising=False)
    monkeypatch.setattr(distributed.dist, "new_group", lambda ranks, pg_options=None: calls.append(pg_options))
    return calls


def test_cp_group_cta_limit_reaches_nccl_options(built):
    """bench/context_parallel.py --cp-nccl-max-ctas: the limit is the new group's NCCL maxCTAs, priority kept."""
    distributed.new_group_like(object(), True, max_ctas=4)
    distributed.new_group_like(object(), False)
    (limited, plain) = built
    assert (limited.config.max_ctas, limited.is_high_priority_stream) == (4, True)
    assert plain.config.max_ctas < 0 and not plain.is_high_priority_stream


def test_cp_group_cta_limit_fails_in_one_line_where_unsupported(built, monkeypatch):
    monkeypatch.setattr(distributed.dist.ProcessGroupNCCL, "Options", lambda **kw: object())  # no .config
    with pytest.raises(ValueError, match=r"max_ctas=4 needs ProcessGroupNCCL.Options.config.max_ctas"):
        distributed.new_group_like(object(), False, max_ctas=4)
    monkeypatch.setattr(distributed.dist, "get_backend", lambda *a: "gloo")
    with pytest.raises(ValueError, match="max_ctas=2 needs the NCCL backend; this group runs gloo"):
        distributed.new_group_like(object(), False, max_ctas=2)
