"""CPU tests of the PHSA Triton kernels under Triton's interpreter (TRITON_INTERPRET=1), small shapes.

Against the reference (phsa_train/attention/phsa/reference.py): selected blocks, outputs and the three
gradients, over the coverage list: G = hq / hk in {1, 2, 4, 8, 16}, head dim 64 and 128, block size 16 / 32 / 64,
bf16 and fp16, packed documents (cu_seqlens, batch 1), query_block 1 and > 1, both scores, the dense limit
(k >= nb) and topk = 0. Shapes are chosen so the whole file runs in a few minutes on 2 CPU cores.
"""

from __future__ import annotations

from tests.triton_interpreter import enable

enable()  # before triton is imported: triton.jit picks the interpreter at decoration time

import pytest  # noqa: E402
import torch  # noqa: E402

from phsa_train.attention.params import PHSAParams  # noqa: E402
from phsa_train.attention.phsa import reference as R  # noqa: E402
from phsa_train.attention.phsa.triton import phsa_triton, select_blocks_triton  # noqa: E402

from tests.helpers import assert_close, assert_no_near_ties  # noqa: E402


def _inputs(b, L, hq, hk, d, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, L, hq, d, generator=g).to(dtype)
    k = torch.randn(b, L, hk, d, generator=g).to(dtype)
    v = torch.randn(b, L, hk, d, generator=g).to(dtype)
    pm = torch.rand(b, L, generator=g) < 0.2
    do = torch.randn(b, L, hq, d, generator=g).to(dtype)
    return q, k, v, pm, do


def _check(b, L, hq, hk, d, dtype, p: PHSAParams, cu=None, seed=0, grads=True):
    q, k, v, pm, do = _inputs(b, L, hq, hk, d, dtype, seed)
    assert_no_near_ties(q, k, pm, p, cu)  # so that the exact comparison holds on any CPU
    sel = select_blocks_triton(q, k, pm, p, cu)
    sel_ref = R.select_blocks_reference(q, k, pm, p, cu)
    assert torch.equal(sel, sel_ref), (sel != sel_ref).nonzero()[:5]
    x = [t.clone().requires_grad_() for t in (q, k, v)]
    o = phsa_triton(*x, pm, p, cu)
    # the reference on the same inputs: it computes in fp32, and scores blocks as the kernels do (M rounded to
    # the input dtype), so both attend to the same blocks
    y = [t.clone().requires_grad_() for t in (q, k, v)]
    o_ref = R.phsa_reference(*y, pm, p, cu)
    assert o.dtype == dtype and o.shape == o_ref.shape
    assert_close("o", o_ref.float(), o.float(), 1e-2)
    if grads:
        o.backward(do)
        o_ref.backward(do)
        for a, c, name in zip(x, y, ("dq", "dk", "dv")):
            assert_close(name, c.grad.float(), a.grad.float(), 2e-2)


@pytest.mark.parametrize(
    "hq,hk,d,m,B,dtype",
    [
        (2, 2, 64, 16, 16, torch.bfloat16),  # G=1
        (4, 2, 64, 16, 64, torch.bfloat16),  # G=2, query_block 64 (128 rows: the fast path)
        (8, 2, 128, 32, 4, torch.float16),  # G=4, d=128
        (8, 1, 64, 64, 2, torch.bfloat16),  # G=8, block 64
        (16, 1, 64, 16, 8, torch.float16),  # G=16, 128 rows
        (32, 2, 64, 16, 16, torch.bfloat16),  # G=16, 256 rows: sub-tiles and chunked selection
    ],
)
def test_grouped_selection(hq, hk, d, m, B, dtype):
    p = PHSAParams(block_size=m, n_init=m + 8, local_window=2 * m, topk=2, query_block=B)
    _check(1, 8 * m if m < 64 else 320, hq, hk, d, dtype, p, seed=hq * m + B)


@pytest.mark.parametrize(
    "hq,hk,d,m,dtype,score",
    [
        (2, 2, 64, 16, torch.bfloat16, "softmax_group_sum"),
        (4, 1, 128, 16, torch.float16, "dot_group_sum"),
        (8, 2, 64, 32, torch.bfloat16, "softmax_group_sum"),  # G=4 over 2 KV heads: time is linear in hk
    ],
)
def test_per_token_selection(hq, hk, d, m, dtype, score):
    """query_block = 1: every query selects its own blocks (the reference semantics)."""
    p = PHSAParams(block_size=m, n_init=8, local_window=m, topk=2, query_block=1, score=score)
    _check(1, 4 * m, hq, hk, d, dtype, p, seed=m + hq)



@pytest.mark.parametrize(
    "hq,hk,d,m,B,dtype,cu",
    [
        (4, 2, 128, 16, 64, torch.bfloat16, None),  # the paper config's shape: 128 rows collapse into one
        (8, 1, 64, 32, 4, torch.float16, None),  # G=8
        (4, 2, 64, 16, 8, torch.bfloat16, [0, 40, 41, 120, 200]),  # packed documents
        (2, 1, 64, 16, 16, torch.float32, None),  # fp32 inputs: M unsplit
    ],
)
def test_dot_score_grouped_selection(hq, hk, d, m, B, dtype, cu):
    """score=dot_group_sum with query_block > 1: the summed-query fast path (one fp32 row per group)."""
    p = PHSAParams(block_size=m, n_init=m, local_window=2 * m, topk=3, query_block=B, score="dot_group_sum")
    cu_t = None if cu is None else torch.tensor(cu, dtype=torch.int32)
    _check(1, 200 if cu else 16 * m, hq, hk, d, dtype, p, cu=cu_t, seed=7 * B + hq, grads=dtype != torch.float32)

def test_packed_documents():
    cu = torch.tensor([0, 40, 41, 120, 200], dtype=torch.int32)
    p = PHSAParams(block_size=16, n_init=8, local_window=16, topk=2, query_block=8)
    _check(1, 200, 4, 2, 64, torch.bfloat16, p, cu=cu, seed=3)


def test_batch_dense_limit_and_topk0():
    # k >= nb: exactly dense causal attention (the dense shortcut of the kernels)
    p = PHSAParams(block_size=16, n_init=16, local_window=16, topk=100, query_block=4)
    _check(2, 80, 4, 2, 64, torch.float16, p, seed=5)
    q, k, v, pm, _ = _inputs(1, 80, 4, 2, 64, torch.float32, 5)
    o = phsa_triton(q.bfloat16(), k.bfloat16(), v.bfloat16(), pm, p)
    kk, vv = k.repeat_interleave(2, 2), v.repeat_interleave(2, 2)
    dense = torch.nn.functional.scaled_dot_product_attention(
        q.bfloat16().float().transpose(1, 2), kk.bfloat16().float().transpose(1, 2),
        vv.bfloat16().float().transpose(1, 2), is_causal=True).transpose(1, 2)
    assert_close("dense", dense, o.float(), 1e-2)
    # topk = 0: INIT and LOCAL only
    p0 = PHSAParams(block_size=16, n_init=16, local_window=32, topk=0, query_block=1)
    _check(1, 96, 2, 1, 64, torch.bfloat16, p0, seed=6, grads=False)


def test_ties_go_to_later_block():
    """Zero queries: every logit is exactly 0 on any CPU, so every eligible block scores the same and the latest
    eligible blocks must win, in the kernel and in the reference alike."""
    L, m = 96, 16
    q = torch.zeros(1, L, 2, 64).bfloat16()
    k = torch.randn(1, L, 1, 64, generator=torch.Generator().manual_seed(0)).bfloat16()
    p = PHSAParams(block_size=m, n_init=0, local_window=m, topk=2, query_block=16)
    sel = select_blocks_triton(q, k, None, p)
    assert torch.equal(sel, R.select_blocks_reference(q, k, None, p))
    assert sel[0, 64, 0].tolist() == [2, 3]  # 4 eligible blocks
    assert sel[0, 80, 0].tolist() == [3, 4]  # 5 eligible blocks: 1/5 is inexact, but the same for every block


def test_per_token_topk_among_many_blocks():
    """query_block = 1 with up to 14 eligible blocks for k = 3: the running top-k really has to choose."""
    p = PHSAParams(block_size=16, n_init=16, local_window=32, topk=3, query_block=1)
    _check(1, 256, 2, 1, 64, torch.bfloat16, p, seed=11, grads=False)


@pytest.mark.parametrize("hq,hk,B,L", [(4, 2, 64, 1024), (4, 2, 4, 640), (4, 1, 128, 768)])
def test_selection_with_unmasked_tiles(hq, hk, B, L):
    """Enough blocks (> 32 per tile) that most selection tiles are eligible for every row of a program and run
    without masks, with one group of 128 rows (the fast path), many small groups, and 512-row groups (chunked).
    The softmax score's kernel (the shipped dot score has its own, tested elsewhere)."""
    p = PHSAParams(block_size=16, n_init=16, local_window=32, topk=4, query_block=B, score="softmax_group_sum")
    q, k, _, pm, _ = _inputs(1, L, hq, hk, 64, torch.bfloat16, seed=L + B)
    assert torch.equal(select_blocks_triton(q, k, pm, p), R.select_blocks_reference(q, k, pm, p))


@pytest.mark.parametrize(
    "hq,hk,d,m,B,score,q_offset",
    [
        (4, 2, 64, 16, 16, "softmax_group_sum", 64),  # query groups of 16, a chunk starting at 64 of 160
        (4, 2, 64, 16, 16, "dot_group_sum", 96),
        (2, 1, 64, 16, 1, "softmax_group_sum", 80),  # per-token selection
    ],
)
def test_suffix_queries_q_offset(hq, hk, d, m, B, score, q_offset):
    """q_offset: the kernels compute only the query rows [q_offset, L) (a context-parallel chunk against its
    prefix) and give exactly those rows of the full call: outputs, dq, and dk/dv of the chunk's queries."""
    L = 160
    p = PHSAParams(block_size=m, n_init=m, local_window=2 * m, topk=2, query_block=B, score=score)
    q, k, v, pm, do = _inputs(1, L, hq, hk, d, torch.bfloat16, seed=q_offset + B)
    do[:, :q_offset] = 0  # the full call's gradients then come from the chunk's queries only
    x = [t.clone().requires_grad_() for t in (q, k, v)]
    o_full = phsa_triton(*x, pm, p)
    o_full.backward(do)
    y = [q[:, q_offset:].clone().requires_grad_(), k.clone().requires_grad_(), v.clone().requires_grad_()]
    o = phsa_triton(*y, pm, p, q_offset=q_offset)
    assert o.shape == (1, L - q_offset, hq, d)
    assert torch.equal(o, o_full[:, q_offset:])
    o.backward(do[:, q_offset:])
    assert torch.equal(y[0].grad, x[0].grad[:, q_offset:])
    assert_close("dk", x[1].grad.float(), y[1].grad.float(), 1e-6)  # fp32 atomics: summation order may differ
    assert_close("dv", x[2].grad.float(), y[2].grad.float(), 1e-6)
    # the public API, reference backend (pads internally) agrees with the kernels
    from phsa_train.attention import phsa_attention

    o_ref = phsa_attention(q[:, q_offset:].float(), k.float(), v.float(), pm, block_size=m, n_init=m,
                           local_window=2 * m, topk=2, query_block=B, score=score, backend="reference",
                           q_offset=q_offset)
    assert_close("o vs reference", o_ref, o.float(), 1e-2)
    with pytest.raises(ValueError, match="q_offset"):
        phsa_triton(q[:, 8:], k, v, pm, PHSAParams(block_size=m, n_init=m, local_window=2 * m, topk=2,
                                                   query_block=16), q_offset=8)


@pytest.mark.parametrize("score", ["softmax_group_sum", "dot_group_sum"])
def test_selection_from_reps_q_offset(score):
    """The context-parallel overlap's pieces: representatives of block-aligned pieces are the whole sequence's rows
    for those blocks; a selection made from representatives that cover more keys than the call (the whole
    sequence's, for a chunk's prefix) drives attend_forward / attend_backward to the outputs and dq of the
    autograd operator, and dk / dv accumulate into the caller's fp32 buffers (batch 2)."""
    from phsa_train.attention.phsa.triton import attend_backward, attend_forward, block_reps_of, select_from_reps

    L, n_keys, q_offset, m, B = 192, 160, 64, 16, 16
    p = PHSAParams(block_size=m, n_init=m, local_window=2 * m, topk=2, query_block=B, score=score)
    q, k, v, pm, do = _inputs(2, L, 4, 2, 64, torch.bfloat16, seed=3)
    reps = block_reps_of(k, pm, p)
    pieces = torch.cat([block_reps_of(k[:, :64], pm[:, :64], p), block_reps_of(k[:, 64:], pm[:, 64:], p)], dim=1)
    assert reps.shape == (2, L // m, 2, 64) and torch.equal(pieces, reps)
    qs, ks, vs, pms, dos = q[:, q_offset:n_keys], k[:, :n_keys], v[:, :n_keys], pm[:, :n_keys], do[:, q_offset:n_keys]
    x = [t.clone().requires_grad_() for t in (qs, ks, vs)]
    o_own = phsa_triton(*x, pms, p, q_offset=q_offset)
    o_own.backward(dos)
    sel = select_from_reps(qs, reps, p, q_offset=q_offset)
    o, lse = attend_forward(qs, ks, vs, p, sel, q_offset=q_offset)
    acc = torch.zeros(2, 2, L, 2, 64)  # [b, (dk, dv), L, hk, d], wider than the call's keys
    dq = attend_backward(qs, ks, vs, o, dos, lse, p, sel, q_offset, (acc[:, 0, :n_keys], acc[:, 1, :n_keys]))
    assert torch.equal(o, o_own) and torch.equal(dq, x[0].grad)
    assert_close("dk", x[1].grad.float(), acc[:, 0, :n_keys], 1e-2)  # the operator rounds to bf16; acc is fp32
    assert_close("dv", x[2].grad.float(), acc[:, 1, :n_keys], 1e-2)
    assert not acc[:, :, n_keys:].any()


@pytest.mark.parametrize("score", ["softmax_group_sum", "dot_group_sum"])
def test_selection_of_two_pieces_in_one_launch(score):
    """A context-parallel rank's two chunks selected in one launch (q_offset=(o0, o1)) select as each chunk alone
    (group-start rows, the rows the kernels write). 20 groups per piece: the dot score's programs (16 groups) and
    the softmax score's (one group) both span a piece's end and its start."""
    from phsa_train.attention.phsa.triton import block_reps_of, select_from_reps

    L, B = 1024, 16
    p = PHSAParams(block_size=16, n_init=16, local_window=32, topk=4, query_block=B, score=score)
    q, k, _, pm, _ = _inputs(1, L, 4, 2, 32, torch.float32, seed=5)
    reps = block_reps_of(k, pm, p)
    first, second = (128, 448), (640, 960)
    both = select_from_reps(torch.cat([q[:, s:e] for s, e in (first, second)], dim=1), reps, p,
                            q_offset=(first[0], second[0]))
    alone = torch.cat([select_from_reps(q[:, s:e], reps, p, q_offset=s) for s, e in (first, second)], dim=1)
    assert both.shape == alone.shape and torch.equal(both[:, ::B], alone[:, ::B])
    with pytest.raises(ValueError, match="q_offset"):
        select_from_reps(q[:, :64], reps, p, q_offset=(0, 16))  # pieces overlap


# opt-in variants of the softmax score's selection (select_launch keywords, bench/tune.py --stages select_variants)
SELECT_VARIANTS = [  # together they run every code path of the variants (pass 1 x pass 2 x pipelined)
    dict(lse_mode="offset", topk_prefilter=True, lse_block_n=16),
    dict(lse_mode="offset_t", lse_block_n=64, transposed=True, block_n=64),
    dict(pipelined=True),
    dict(pipelined=True, lse_mode="offset", transposed=True, block_n=64, topk_prefilter=True),
    dict(pipelined=True, lse_mode="offset_t", lse_block_n=64),
    dict(max_rows=256, pipelined=True, transposed=True, block_n=64),  # two 128-row groups per program
]


def _with_select_variant(monkeypatch, variant):
    import functools

    from phsa_train.attention.phsa import triton as T
    from phsa_train.attention.phsa.kernels.select import select_launch

    monkeypatch.setattr(T, "select_launch", functools.partial(select_launch, **variant))


_SHAPES = [(4, 2, 64, 1024), (4, 2, 4, 640), (4, 1, 128, 768)]  # (hq, hk, query_block, L)


@pytest.mark.parametrize(
    "variant,hq,hk,B,L",
    [(v, *shape) for v in SELECT_VARIANTS for shape in (_SHAPES[:2] if v.get("pipelined") else _SHAPES)],
    ids=lambda x: "-".join(f"{k}={y}" for k, y in x.items()) if isinstance(x, dict) else None)
def test_selection_variants(monkeypatch, variant, hq, hk, B, L):
    """Every opt-in selection variant gives the reference's selection: one 128-row group per program, many small
    groups per program, and 512-row groups (chunked, normalisers through the scratch; pipelining applies to
    one-chunk programs only, so the pipelined variants skip them), with unmasked tiles."""
    _with_select_variant(monkeypatch, variant)
    p = PHSAParams(block_size=16, n_init=16, local_window=32, topk=4, query_block=B, score="softmax_group_sum")
    q, k, _, pm, _ = _inputs(1, L, hq, hk, 64, torch.bfloat16, seed=L + B)
    assert torch.equal(select_blocks_triton(q, k, pm, p), R.select_blocks_reference(q, k, pm, p))


@pytest.mark.parametrize("pipelined", [False, True])
@pytest.mark.parametrize("lse_mode", ["online", "offset", "offset_t"])
def test_selection_offset_overflow_falls_back(monkeypatch, lse_mode, pipelined):
    """A block whose logits exceed the first tile's by more than 2^7 (log2 units) overflows the fixed-offset sum: those
    programs must redo pass 1 with the online max and still select that block."""
    _with_select_variant(monkeypatch, dict(lse_mode=lse_mode, block_n=16, pipelined=pipelined))
    L, m = 640, 16
    g = torch.Generator().manual_seed(1)
    q = (torch.randn(1, L, 2, 64, generator=g) * 0.1 + 1.0).bfloat16()
    k = (torch.randn(1, L, 1, 64, generator=g) * 0.1).bfloat16()
    k[0, 20 * m:21 * m] = 16.0  # block 20 (second tile of 16): logit ~ 64 * 16 / 8 = 128 nats = 185 log2 units
    p = PHSAParams(block_size=m, n_init=0, local_window=m, topk=1, query_block=64, score="softmax_group_sum")
    sel = select_blocks_triton(q, k, None, p)
    assert torch.equal(sel, R.select_blocks_reference(q, k, None, p))
    assert (sel[0, 384:, 0] == 20).all()


def test_topk_above_the_register_buffer_uses_the_chunked_reference(monkeypatch):
    """A top-k wider than the selection kernel's register buffer (SELECT_MAX_TOPK: curriculum ramps at long L)
    takes the reference's selection scored a few query groups at a time: bounded memory, the same blocks."""
    import phsa_train.attention.phsa.triton as T

    monkeypatch.setattr(T, "WIDE_SELECT_BYTES", 4 * 16 * 4 * 40 * 4)  # fp32 logits of 4 query groups
    monkeypatch.setattr(T, "SELECT_MAX_TOPK", 4)
    q, k, _, pm, _ = _inputs(1, 640, 4, 2, 16, torch.bfloat16, 3)
    p = PHSAParams(block_size=16, n_init=16, local_window=16, topk=6, query_block=16)
    assert torch.equal(select_blocks_triton(q, k, pm, p), R.select_blocks_reference(q, k, pm, p))


@pytest.mark.parametrize("score", ["dot_group_sum", "softmax_group_sum"])
def test_widest_register_topk_matches_the_reference(score):
    """topk up to SELECT_MAX_TOPK (the curriculum's hold at 128k needs k = 184) stays in the kernel: same blocks."""
    import phsa_train.attention.phsa.triton as T

    q, k, _, pm, _ = _inputs(1, 3072, 2, 1, 16, torch.bfloat16, 5)  # one KV head: the width is what is tested
    p = PHSAParams(block_size=16, n_init=16, local_window=16, topk=150, query_block=64, score=score)
    assert 128 < p.topk <= T.SELECT_MAX_TOPK
    assert torch.equal(select_blocks_triton(q, k, pm, p), R.select_blocks_reference(q, k, pm, p))
