"""The overlapped CP path's copies, casts and sums on the tensors it hands them. Backward (``_rounded_rows``,
``_sum_into``): every elementwise op reads and writes contiguous tensors (on CUDA strided ones run PyTorch's slow
offset-calculator loop), and the results are the reference sums bit for bit: fp32, in rank order, rounded once.
Forward (``_copy_bits``): V as Megatron hands it (a view of the fused QKV output), and K, are copied into the
interleaved K/V buffer as 8-byte words."""
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from phsa_train.megatron.context_parallel import _copy_bits, _rounded_rows, _sum_into

ELEMENTWISE = {torch.ops.aten.copy_.default, torch.ops.aten.add.Tensor, torch.ops.aten.add.out,
               torch.ops.aten.add_.Tensor}


class ElementwiseOperands(TorchDispatchMode):
    """Records, for each elementwise aten op run inside it, whether all its tensor operands were contiguous."""

    def __init__(self):
        super().__init__()
        self.ops, self.dtypes = [], []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in ELEMENTWISE:
            tensors = [x for x in (*args, *kwargs.values()) if isinstance(x, torch.Tensor)]
            self.ops.append((func, all(t.is_contiguous() for t in tensors)))
            self.dtypes.append({t.dtype for t in tensors})
        return func(*args, **kwargs)


def test_dkv_casts_and_sums_are_contiguous_and_exact():
    torch.manual_seed(0)
    c, E, rest = 8, 32, (2, 3, 4)  # chunk rows, key end, [b, hk, d]
    acc = torch.randn(2, E, *rest) * 100  # [dk | dv, E, b, hk, d], fp32 sums of this rank
    parts = [torch.randn(2, c, *rest).bfloat16() for _ in range(3)]  # the peers' contributions, rank order
    home = torch.empty(2, 2, c, *rest, dtype=torch.bfloat16)  # [dk | dv, half, C, b, hk, d]
    j, lo, hi = 1, 2, 6
    expected_msg = acc[:, j * c + lo:j * c + hi].bfloat16()
    expected_sum = acc[:, 2 * c:3 * c].clone()
    for part in parts:
        expected_sum = expected_sum + part.float()
    expected_sum = expected_sum.bfloat16()
    expected_copy = acc[:, 0:c].bfloat16()

    with ElementwiseOperands() as mode:
        msg = _rounded_rows(acc, j * c + lo, j * c + hi, torch.bfloat16)
        _sum_into(home[:, 1], acc[:, 2 * c:3 * c], parts)  # a chunk with contributions from three peers
        _sum_into(home[:, 0, lo:hi], acc[:, lo:hi], [])  # a piece nobody else reaches: the rounding alone

    assert msg.is_contiguous() and msg.shape == (2, hi - lo, *rest)
    assert torch.equal(msg, expected_msg)
    assert torch.equal(home[:, 1], expected_sum)
    assert torch.equal(home[:, 0, lo:hi], expected_copy[:, lo:hi])
    assert len(mode.ops) == 2 + 2 * 3 + 2, mode.ops
    assert all(contiguous for _, contiguous in mode.ops), mode.ops


def test_v_from_fused_qkv_is_placed_as_words():
    s, b, hq, hk, d = 12, 2, 4, 2, 8
    mixed_qkv = torch.randn(s, b, hk, (hq // hk + 2) * d).bfloat16()  # Megatron's [sq, b, ng, (np/ng + 2) * hn]
    _, _, value = torch.split(mixed_qkv, [hq // hk * d, d, d], dim=3)  # as get_query_key_value_tensors hands it
    v_local = value.permute(1, 0, 2, 3)  # core attention's [b, s, hk, d]
    kv = torch.zeros(20, 2, b, hk, d, dtype=torch.bfloat16)  # [E, k | v, b, hk, d]: K and V rows interleave
    k_rows = torch.randn(6, b, hk, d).bfloat16()  # K arrives contiguous
    with ElementwiseOperands() as mode:
        _copy_bits(kv[4:10, 1], v_local[:, 6:12].transpose(0, 1))
        _copy_bits(kv[4:10, 0], k_rows)
    assert torch.equal(kv[4:10, 1], value[6:12]) and torch.equal(kv[4:10, 0], k_rows)
    assert not kv[:4].any() and not kv[10:].any()
    assert mode.dtypes == [{torch.int64}, {torch.int64}]

    odd = torch.randn(3, 5, dtype=torch.bfloat16)  # 5 bf16 are not whole words: a plain copy
    dst = torch.empty(3, 5, dtype=torch.bfloat16)
    with ElementwiseOperands() as mode:
        _copy_bits(dst, odd)
    assert torch.equal(dst, odd) and mode.dtypes == [{torch.bfloat16}]
