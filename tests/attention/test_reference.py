"""The PHSA reference against a brute-force reading of docs/phsa.md, plus its structural properties."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from phsa_train.attention import PHSAParams, phsa_attention, phsa_reference, select_blocks
from phsa_train.attention.phsa import block_representatives, select_blocks_reference

from tests.helpers import DT, assert_close, assert_no_near_ties, make_inputs

def brute_force(q, k, v, pm, p: PHSAParams):
    """One query group, one KV head at a time, straight from the spec text: S(i) as a Python set."""
    b, L, hq, d = q.shape
    hk = k.shape[2]
    G, m, B, w, n_init = hq // hk, p.block_size, p.query_block, p.local_window, p.n_init
    scale = p.softmax_scale or 1 / math.sqrt(d)
    nb = L // m
    idx = torch.full((b, L, hk, p.topk), -1, dtype=torch.long)
    out = [[None] * L for _ in range(b)]
    qd, kd = q.detach(), k.detach()
    for bi in range(b):
        reps = {}
        for g in range(hk):
            for t in range(nb):
                toks = list(range(t * m, (t + 1) * m))
                m_o = sum(kd[bi, l, g] for l in toks) / m
                punct = [l for l in toks if pm is not None and pm[bi, l]]
                m_p = sum(kd[bi, l, g] for l in punct) / len(punct) if punct else m_o
                reps[g, t] = p.lam * m_o + (1 - p.lam) * m_p
        for i0 in range(0, L, B):
            group = range(i0, min(i0 + B, L))
            elig = [t for t in range(nb) if (t + 1) * m > n_init and t * m <= i0 - w]
            for g in range(hk):
                score = {t: 0.0 for t in elig}
                for i in group:
                    for h in range(g * G, (g + 1) * G):
                        dots = [float(qd[bi, i, h] @ reps[g, t]) * scale for t in elig]
                        if p.score == "softmax_group_sum" and dots:
                            mx = max(dots)
                            z = sum(math.exp(x - mx) for x in dots)
                            dots = [math.exp(x - mx) / z for x in dots]
                        for t, x in zip(elig, dots):
                            score[t] += x
                chosen = sorted(elig, key=lambda t: (-score[t], -t))[: p.topk]  # ties to the later block
                for i in group:
                    idx[bi, i, g, : len(chosen)] = torch.tensor(sorted(chosen), dtype=torch.long)
                    S = set(range(min(n_init, i + 1))) | set(range(max(0, i0 - w + 1), i + 1))
                    S |= {j for t in chosen for j in range(t * m, (t + 1) * m) if j <= i}
                    js = sorted(S)
                    heads = slice(g * G, (g + 1) * G)
                    att = torch.softmax(q[bi, i, heads] @ k[bi, js, g].T * scale, dim=-1)  # [G, |S|]
                    out[bi][i] = (out[bi][i] or []) + [att @ v[bi, js, g]]
    o = torch.stack([torch.stack([torch.cat(out[bi][i]) for i in range(L)]) for bi in range(b)])
    return o, idx


# (G, block_size, n_init, local_window, topk, query_block, score, lam, L)
CASES = [
    (1, 4, 0, 4, 1, 1, "softmax_group_sum", 0.5, 37),
    (2, 4, 5, 11, 3, 1, "softmax_group_sum", 0.0, 41),
    (4, 8, 16, 8, 3, 2, "dot_group_sum", 1.0, 50),
    (2, 8, 0, 19, 99, 4, "softmax_group_sum", 0.5, 61),
    (1, 16, 5, 16, 1, 1, "dot_group_sum", 0.5, 70),
    (4, 16, 16, 35, 3, 2, "softmax_group_sum", 0.0, 83),
    (2, 4, 16, 4, 3, 4, "softmax_group_sum", 1.0, 45),
    (1, 8, 5, 8, 99, 1, "dot_group_sum", 0.0, 39),
    (4, 4, 0, 11, 1, 2, "dot_group_sum", 0.5, 30),
    (2, 16, 0, 16, 3, 1, "softmax_group_sum", 0.5, 100),
    (1, 4, 5, 4, 3, 4, "dot_group_sum", 0.0, 29),
    (2, 8, 16, 19, 1, 4, "softmax_group_sum", 1.0, 67),
]


def case_id(c):
    G, m, n0, w, k, B, s, lam, L = c
    return f"G{G}-m{m}-init{n0}-w{w}-k{k}-B{B}-{s.split('_')[0]}-lam{lam}-L{L}"


@pytest.mark.parametrize("case", CASES, ids=[case_id(c) for c in CASES])
def test_forward_backward_vs_brute_force(case):
    G, m, n_init, w, topk, B, score, lam, L = case
    hk = 2
    p = PHSAParams(block_size=m, n_init=n_init, local_window=w, topk=topk, lam=lam, score=score, query_block=B)
    q, k, v, pm = make_inputs(2, L, G * hk, hk)
    assert_no_near_ties(q, k, pm, p)  # brute force and reference round differently
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    ref_o, ref_idx = brute_force(q, k, v, pm, p)
    o = phsa_reference(q, k, v, pm, p)
    idx = select_blocks_reference(q, k, pm, p)
    assert torch.equal(idx, ref_idx)
    assert (idx == -1).any() or topk <= 1, "the cases should include queries with fewer eligible blocks than k"
    assert_close("o", ref_o, o, 1e-12, atol=1e-12)
    do = torch.randn_like(o)
    ref_grads = torch.autograd.grad(ref_o, (q, k, v), do)
    grads = torch.autograd.grad(o, (q, k, v), do)
    for name, r, x in zip(("dq", "dk", "dv"), ref_grads, grads):
        assert_close(name, r, x, 1e-12, atol=1e-12)


@pytest.mark.parametrize("query_block", [1, 3, 4])
@pytest.mark.parametrize("n_init", [0, 7])
def test_topk_covering_all_blocks_is_dense(query_block, n_init):
    m, L, hq, hk = 4, 53, 4, 2
    q, k, v, pm = make_inputs(2, L, hq, hk, dv=8)
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    o = phsa_attention(q, k, v, pm, block_size=m, n_init=n_init, local_window=m, topk=L // m,
                       query_block=query_block, backend="reference")
    dense = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.repeat_interleave(2, 2).transpose(1, 2), v.repeat_interleave(2, 2).transpose(1, 2),
        is_causal=True,
    ).transpose(1, 2)
    assert_close("o", dense, o, 1e-12)
    do = torch.randn_like(o)
    for name, r, x in zip("qkv", torch.autograd.grad(dense, (q, k, v), do), torch.autograd.grad(o, (q, k, v), do)):
        assert_close("d" + name, r, x, 1e-12)


def test_lam_one_is_mean_pooling():
    m, L = 8, 72
    q, k, _, pm = make_inputs(2, L, 4, 2, p_punct=0.4)
    b, _, hk, d = k.shape
    reps = block_representatives(k, pm, m, 1.0)
    assert_close("reps", k[:, : (L // m) * m].reshape(b, L // m, m, hk, d).mean(2), reps, 1e-15)
    knobs = dict(block_size=m, n_init=8, local_window=8, topk=2, lam=1.0, query_block=1, backend="reference")
    mean_sel = select_blocks(q, k, None, **knobs)
    assert torch.equal(select_blocks(q, k, pm, **knobs), mean_sel)
    # lam < 1 does use the punctuation: with this many punctuation tokens the selection changes somewhere.
    assert not torch.equal(select_blocks(q, k, pm, **{**knobs, "lam": 0.5}), mean_sel)


def test_punctuation_changes_selection():
    """Block 0's punctuation key points along q but its mean does not; block 1 has no punctuation and a
    moderate mean. Query 15 (m=4, w=4) may pick one of blocks 0..2."""
    m, L = 4, 16
    e0 = torch.tensor([1.0, 0, 0, 0], dtype=DT)
    k = torch.zeros(1, L, 1, 4, dtype=DT)
    k[0, 0:4, 0] = -2 * e0
    k[0, 2, 0] = 4 * e0  # punctuation: block 0 has M_o = -0.5 e0, M_p = 4 e0, lam=0.5 -> M = 1.75 e0
    k[0, 4:8, 0] = e0  # block 1: M = e0 for every lam; block 2 stays 0
    pm = torch.zeros(1, L, dtype=torch.bool)
    pm[0, 2] = True
    q = e0.expand(1, L, 1, 4).clone()
    knobs = dict(block_size=m, n_init=0, local_window=4, topk=1, query_block=1, backend="reference")
    assert select_blocks(q, k, pm, lam=0.5, **knobs)[0, 15, 0].tolist() == [0]
    assert select_blocks(q, k, pm, lam=1.0, **knobs)[0, 15, 0].tolist() == [1]


@pytest.mark.parametrize("score", ["softmax_group_sum", "dot_group_sum"])
def test_ties_go_to_the_later_block(score):
    m, L, topk = 4, 40, 3
    _, k, _, _ = make_inputs(1, L, 2, 1)
    q = torch.zeros(1, L, 2, 8, dtype=DT)  # every logit exactly 0 on any CPU: every score ties exactly
    p = PHSAParams(block_size=m, n_init=0, local_window=m, topk=topk, score=score, query_block=1)
    idx = select_blocks_reference(q, k, None, p)
    for i in range(L):
        last = (i - m) // m  # the last eligible block, t*m <= i - w
        expect = list(range(max(0, last - topk + 1), last + 1)) if i >= m else []
        assert idx[0, i, 0].tolist() == expect + [-1] * (topk - len(expect)), i
    assert torch.equal(idx, brute_force(q, k, k, None, p)[1])


@pytest.mark.parametrize("query_block", [1, 4])
def test_packed_documents_equal_separate_runs(query_block):
    cu = torch.tensor([0, 23, 23, 60, 77], dtype=torch.int32)  # includes an empty document
    q, k, v, pm = make_inputs(1, 77, 4, 2)
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    p = PHSAParams(block_size=4, n_init=5, local_window=6, topk=2, query_block=query_block)
    o = phsa_reference(q, k, v, pm, p, cu_seqlens=cu)
    idx = select_blocks_reference(q, k, pm, p, cu_seqlens=cu)
    for s, e in [(0, 23), (23, 60), (60, 77)]:
        sl = slice(s, e)
        assert_close(f"o[{s}:{e}]", phsa_reference(q[:, sl], k[:, sl], v[:, sl], pm[:, sl], p), o[:, sl], 1e-14)
        assert torch.equal(select_blocks_reference(q[:, sl], k[:, sl], pm[:, sl], p), idx[:, sl])
    # No attention crosses a boundary: the middle document's output ignores the other documents' k and v.
    dk, dv = torch.autograd.grad(o[:, 23:60].sum(), (k, v))
    assert dk[:, :23].abs().max() == 0 and dk[:, 60:].abs().max() == 0
    assert dv[:, :23].abs().max() == 0 and dv[:, 60:].abs().max() == 0 and dv[:, 23:60].abs().max() > 0


@pytest.mark.parametrize("score", ["softmax_group_sum", "dot_group_sum"])
@pytest.mark.parametrize("query_block", [1, 4])
def test_selection_in_group_chunks_is_the_same(score, query_block):
    """max_score_bytes bounds memory by scoring a few query groups at a time (the Triton backend's path for a
    top-k above its register buffer, e.g. curriculum ramps at 128k); q_offset skips the unneeded groups."""
    q, k, _, pm = make_inputs(2, 90, 4, 2)
    p = PHSAParams(block_size=4, n_init=5, local_window=6, topk=3, query_block=query_block, score=score)
    whole = select_blocks_reference(q, k, pm, p)
    one_group = 2 * query_block * 4 * (90 // 4) * 4  # the fp32 logits of one query group, batch 2
    for budget in (1, one_group, 3 * one_group):
        assert torch.equal(select_blocks_reference(q, k, pm, p, max_score_bytes=budget), whole)
    off = 8 * query_block
    part = select_blocks_reference(q, k, pm, p, max_score_bytes=one_group, q_offset=off)
    assert torch.equal(part[:, off:], whole[:, off:]) and bool((part[:, :off] == -1).all())
    cu = torch.tensor([0, 37, 90], dtype=torch.int32)
    assert torch.equal(select_blocks_reference(q[:1], k[:1], pm[:1], p, cu, max_score_bytes=one_group),
                       select_blocks_reference(q[:1], k[:1], pm[:1], p, cu))


def test_api_reference_and_auto_on_cpu_agree():
    q, k, v, pm = make_inputs(2, 33, 4, 2)
    knobs = dict(block_size=4, n_init=4, local_window=8, topk=2, lam=0.5, query_block=2, softmax_scale=0.3)
    p = PHSAParams(**knobs)
    ref = phsa_reference(q, k, v, pm, p)
    assert torch.equal(phsa_attention(q, k, v, pm, **knobs, backend="auto"), ref)
    assert torch.equal(phsa_attention(q, k, v, pm, **knobs, backend="reference"), ref)
    assert select_blocks(q, k, pm, **knobs).shape == (2, 33, 2, 2)


def test_low_precision_inputs_keep_dtype():
    q, k, v, pm = make_inputs(1, 40, 2, 1)
    p = PHSAParams(block_size=4, n_init=4, local_window=8, topk=2)
    o32 = phsa_reference(q, k, v, pm, p)
    o16 = phsa_reference(q.bfloat16(), k.bfloat16(), v.bfloat16(), pm, p)
    assert o16.dtype == torch.bfloat16
    assert_close("o bf16", o32, o16, 2e-2)
