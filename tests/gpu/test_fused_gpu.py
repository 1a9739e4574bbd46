"""The compiled RMSNorm and RoPE (phsa_train.megatron.fused) on a GPU, forward and backward, against the same
functions run eagerly in fp32 at the 0.6B shapes (skipped without CUDA). Compiled kernels compute in fp32 and round
once, the eager bf16 ops round after every op: the bf16 results agree to bf16 rounding, not bit for bit."""
import pytest
import torch

from phsa_train.megatron.fused import compiled, rms_norm, rope_bshd

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _fwd_bwd(fn, *xs):
    """fn(*xs) and the gradients of the xs that require them, for one fixed random output gradient (fp32)."""
    out = fn(*xs)
    g = torch.randn(out.shape, device=out.device, generator=torch.Generator(out.device).manual_seed(7))
    out.backward(g.to(torch.bfloat16).to(out.dtype))  # the same (bf16-exact) output gradient for both runs
    return out.float(), [None if x.grad is None else x.grad.float() for x in xs]


@pytest.mark.parametrize("shape", [(8192, 1, 1024), (8192, 1, 16, 128), (8192, 1, 8, 128)])
def test_compiled_rms_norm(shape):
    torch.manual_seed(0)
    x = (torch.randn(shape, device="cuda") * 3).to(torch.bfloat16).requires_grad_()
    w = (1 + 0.1 * torch.randn(shape[-1], device="cuda")).to(torch.bfloat16).requires_grad_()
    out, (gx, gw) = _fwd_bwd(lambda a, b: compiled(rms_norm, a)(a, b, 1e-6), x, w)
    ref, (rx, rw) = _fwd_bwd(lambda a, b: rms_norm(a, b, 1e-6), x.detach().float().requires_grad_(),
                             w.detach().float().requires_grad_())
    torch.testing.assert_close(out, ref, rtol=1.6e-2, atol=1e-2)
    torch.testing.assert_close(gx, rx, rtol=1.6e-2, atol=1e-2)
    # dweight sums over every row: rounded to bf16 at the end (and near zero where the sum cancels), so its error
    # scales with the largest entry, not with each one
    torch.testing.assert_close(gw, rw, rtol=1.6e-2, atol=1e-2 * rw.abs().max().item())


@pytest.mark.parametrize("heads", [16, 8])
def test_compiled_rope(heads):
    torch.manual_seed(0)
    s, d = 8192, 128
    t = torch.randn(s, 1, heads, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    inv = 1.0 / (1e6 ** (torch.arange(0, d, 2, device="cuda").float() / d))
    f = torch.outer(torch.arange(s, device="cuda").float(), inv)
    freqs = torch.cat((f, f), -1)[:, None, None, :]
    out, (gt, _) = _fwd_bwd(lambda a, b: compiled(rope_bshd, a)(a, b), t, freqs)
    ref, (rt, _) = _fwd_bwd(rope_bshd, t.detach().float().requires_grad_(), freqs)
    torch.testing.assert_close(out, ref, rtol=1.6e-2, atol=1.6e-2)
    torch.testing.assert_close(gt, rt, rtol=1.6e-2, atol=1.6e-2)
