"""The chunked output layer + cross-entropy (phsa_train.megatron.chunked_loss) against Megatron's unchunked path.

fp32 everywhere, so the only differences are the GEMMs' summation order (rows split into chunks, the weight
gradient summed over chunks): losses and gradients agree to fp32 rounding (rtol 1e-5 / atol 1e-6 on gradients of
size ~1e-2..1, a few ulps). Chunk sizes that do not divide the token count are included.
"""
import pytest
import torch
from megatron.core import tensor_parallel
from torch.utils._python_dispatch import TorchDispatchMode

from phsa_train.config.check import check
from phsa_train.megatron.chunked_loss import linear_cross_entropy
from tests.helpers import assert_same, compose, run_layout

VOCAB, SEQ, BATCH = 256, 64, 2


def megatron_loss(hidden, weight, labels):
    """GPTModel's path: output layer, then ``vocab_parallel_cross_entropy`` on [s, b, V]."""
    logits = hidden @ weight.t()
    return tensor_parallel.vocab_parallel_cross_entropy(logits, labels.t().contiguous()).t()


@pytest.mark.parametrize("chunk", [1, 23, 60, 1000])
def test_function_equals_megatrons_cross_entropy(single_process, chunk):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(30, 2, 16, generator=g, requires_grad=True)
    weight = (torch.randn(50, 16, generator=g) * 0.5).requires_grad_()
    labels = torch.randint(0, 50, (2, 30), generator=g)
    upstream = torch.rand(2, 30, generator=g)  # per-token weights, as loss_func's mask / token count gives
    ref = megatron_loss(hidden, weight, labels)
    ref_grads = torch.autograd.grad((ref * upstream).sum(), (hidden, weight))
    got = linear_cross_entropy(hidden, weight, labels, chunk=chunk)
    assert got.shape == (2, 30) and got.dtype == torch.float32
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)
    grads = torch.autograd.grad((got * upstream).sum(), (hidden, weight))
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_bf16_follows_megatrons_rounding(single_process):
    """bf16 logits, fp32 softmax, gradient cast to bf16 before the GEMMs, as Megatron's bf16 path: the same losses
    and input gradient; the weight gradient (each chunk's product rounded to bf16, summed in fp32) as close to
    the fp32 result as Megatron's single bf16 GEMM is (measured: 2.8e-3 against 2.4e-3 relative, 7 chunks)."""
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(400, 1, 32, generator=g).bfloat16().requires_grad_()
    weight = (torch.randn(64, 32, generator=g) * 0.3).bfloat16().requires_grad_()
    labels = torch.randint(0, 64, (1, 400), generator=g)
    exact = [t.detach().float().requires_grad_() for t in (hidden, weight)]
    exact_grads = torch.autograd.grad(megatron_loss(*exact, labels).sum(), exact)
    ref = megatron_loss(hidden, weight, labels)
    got = linear_cross_entropy(hidden, weight, labels, chunk=64)
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)  # the same bf16 logits, row by row
    ref_grads = torch.autograd.grad(ref.sum(), (hidden, weight))
    grads = torch.autograd.grad(got.sum(), (hidden, weight))
    assert grads[0].dtype == grads[1].dtype == torch.bfloat16
    torch.testing.assert_close(grads[0], ref_grads[0], rtol=0, atol=0)
    error = [(a.float() - e).norm() / e.norm() for a, e in zip((grads[1], ref_grads[1]), (exact_grads[1],) * 2)]
    assert error[0] < 1.5 * error[1]


def build(overrides, seed=0):
    from phsa_train.megatron.model import build_model

    torch.manual_seed(seed)
    return build_model(compose(["model=tiny", f"data.seq_len={SEQ}", "attention=dense", *overrides]), VOCAB,
                       torch.float32)


@pytest.mark.parametrize("tied", [True, False])
def test_model_losses_and_gradients_equal_megatrons_path(single_process, tied):
    """The whole GPT: per-token losses [b, s] and every parameter's gradient, chunked (48 tokens: does not divide
    s x b = 128) against Megatron's output layer + loss. Same parameters and state-dict keys."""
    ref = build(["train.loss_chunk_tokens=0", f"model.tie_embeddings={tied}"])
    model = build(["train.loss_chunk_tokens=48", f"model.tie_embeddings={tied}"])
    assert ref.output_loss is None and model.output_loss is not None
    assert list(model.state_dict()) == list(ref.state_dict())
    model.load_state_dict(ref.state_dict())
    g = torch.Generator().manual_seed(2)
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
    labels = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
    pos = torch.arange(SEQ).expand(BATCH, SEQ)
    upstream = torch.rand(BATCH, SEQ, generator=g)
    out_ref, out = ref(tokens, pos, None, labels=labels), model(tokens, pos, None, labels=labels)
    assert out.shape == out_ref.shape == (BATCH, SEQ)
    torch.testing.assert_close(out, out_ref, rtol=1e-6, atol=1e-6)
    (out * upstream).sum().backward()
    (out_ref * upstream).sum().backward()
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6, msg=name)
    assert torch.equal(model(tokens, pos, None), ref(tokens, pos, None))  # no labels: Megatron's logits


class LargestTensor(TorchDispatchMode):
    """The most elements of any tensor an op returns while active."""

    def __init__(self):
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.numel = max(self.numel, t.numel())
        return out


def test_no_tensor_holds_all_the_logits(single_process):
    """Forward and backward never create a tensor of more than max(chunk x V, V x h, tokens x h) elements,
    whereas Megatron's path creates [tokens, V] ones (here 2048 x 512 against a chunk of 128 x 512)."""
    g = torch.Generator().manual_seed(3)
    n, v, h, chunk = 2048, 512, 16, 128
    hidden = torch.randn(n, 1, h, generator=g, requires_grad=True)
    weight = torch.randn(v, h, generator=g, requires_grad=True)
    labels = torch.randint(0, v, (1, n), generator=g)
    for fn, bound in ((lambda: linear_cross_entropy(hidden, weight, labels, chunk=chunk), chunk * v),
                      (lambda: megatron_loss(hidden, weight, labels), n * v)):
        with LargestTensor() as largest:
            fn().sum().backward()
        assert largest.numel == bound


def test_negative_chunk_is_one_line():
    assert check(["train.loss_chunk_tokens=-1"], 1) == (
        "train.loss_chunk_tokens=-1 must be >= 0 (tokens per chunk of the output layer + loss; 0 = Megatron's "
        "unchunked path)")


@pytest.mark.slow
def test_tensor_parallel_2_chunked_equals_tp1_megatron(tmp_path):
    """TP=2 over gloo, tied embeddings (the 0.6B's layout), chunked at 48 tokens, against one process on Megatron's
    path: the vocabulary split over the ranks (max / sum / target reductions per chunk, the input gradient's
    all-reduce) gives the TP=1 loss and gradients."""
    ref = run_layout(tmp_path, 1, "--", "train.loss_chunk_tokens=0")
    assert_same(ref, run_layout(tmp_path, 2, "--tp", "2", "--", "train.loss_chunk_tokens=48"))
