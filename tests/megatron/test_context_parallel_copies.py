"""The overlapped CP path's copies, casts and sums on the tensors it hands them (Triton interpreter). Backward
(``_rounded_rows``, ``_sum_into``): one ``sum_rounded`` launch per call for dk and dv together, no PyTorch
elementwise op, and the results are the reference sums bit for bit: fp32, in rank order, rounded once. Forward:
the kernel that places K and V is tested in tests/attention/test_triton_rows.py."""
from tests.triton_interpreter import enable

enable()  # before triton is imported: triton.jit picks the interpreter at decoration time

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from phsa_train.attention.phsa import triton as tri  # noqa: E402
from phsa_train.megatron.context_parallel import _rounded_rows, _sum_into  # noqa: E402

ELEMENTWISE = {torch.ops.aten.copy_.default, torch.ops.aten.add.Tensor, torch.ops.aten.add.out,
               torch.ops.aten.add_.Tensor}


_in_launch = [0]  # > 0 inside a kernel launch: the interpreter's own tensor traffic is not the caller's


class ElementwiseOps(TorchDispatchMode):
    """Records the elementwise aten ops run inside it, outside kernel launches."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in ELEMENTWISE and not _in_launch[0]:
            self.ops.append(func)
        return func(*args, **(kwargs or {}))


class CountedKernels:
    """``tri`` with its ``sum_rounded`` launches counted."""

    def __init__(self):
        self.launches = 0

    def sum_rounded(self, *args):
        self.launches += 1
        _in_launch[0] += 1
        try:
            tri.sum_rounded(*args)
        finally:
            _in_launch[0] -= 1


def test_dkv_casts_and_sums_are_one_launch_each_and_exact():
    torch.manual_seed(0)
    c, E, rest = 8, 32, (2, 3, 4)  # chunk rows, key end, [b, hk, d]
    acc = torch.randn(2, E, *rest) * 100  # [dk | dv, E, b, hk, d], fp32 sums of this rank
    parts = [torch.randn(2, c, *rest).bfloat16() for _ in range(3)]  # the peers' contributions, rank order
    home = torch.empty(2, 2, c, *rest, dtype=torch.bfloat16)  # [dk | dv, half, C, b, hk, d]
    j, lo, hi = 1, 2, 6
    expected_msg = acc[:, j * c + lo:j * c + hi].bfloat16()
    expected_sum = acc[:, 2 * c:3 * c].clone()
    for part in parts[:-1]:
        expected_sum.add_(part)
    expected_sum = torch.add(expected_sum, parts[-1], out=torch.empty_like(home[:, 1]))
    expected_copy = acc[:, 0:c].bfloat16()

    kernels = CountedKernels()
    with ElementwiseOps() as mode:
        msg = _rounded_rows(kernels, acc, j * c + lo, j * c + hi, torch.bfloat16)
        _sum_into(kernels, home[:, 1], acc[:, 2 * c:3 * c], parts)  # a chunk with contributions from three peers
        _sum_into(kernels, home[:, 0, lo:hi], acc[:, lo:hi], [])  # a piece nobody else reaches: the rounding alone

    assert msg.is_contiguous() and msg.shape == (2, hi - lo, *rest)
    assert torch.equal(msg, expected_msg)
    assert torch.equal(home[:, 1].view(torch.int16), expected_sum.view(torch.int16))
    assert torch.equal(home[:, 0, lo:hi], expected_copy[:, lo:hi])
    assert kernels.launches == 1 + 3 + 1 and not mode.ops, mode.ops
