import pytest
import torch.distributed as dist

from phsa_train import compat
from tests.helpers import free_port


@pytest.fixture(scope="module")
def single_process():
    """One gloo rank with Megatron's model-parallel state (TP = PP = 1) and the CPU work-arounds: what building a
    Megatron model in this process needs."""
    from megatron.core import parallel_state

    store = dist.TCPStore("127.0.0.1", free_port(), 1, is_master=True)
    dist.init_process_group("gloo", rank=0, world_size=1, store=store)  # no MASTER_* left in os.environ
    parallel_state.initialize_model_parallel(1, 1)
    compat.apply(on_gpu=False)
    yield
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()
