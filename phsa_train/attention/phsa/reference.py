"""PHSA reference implementation: readable PyTorch, the oracle for the Triton kernels.

Layout: q [b, L, hq, d], k [b, L, hk, d], v [b, L, hk, dv], punct_mask bool [b, L], block indices
[b, L, hk, topk] (sorted ascending, padded with -1). GQA: query head h reads KV head h // G, G = hq // hk.

It builds the full [L, L] support mask, so memory is O(b * h * L^2): fine for tests and short sequences,
not for training lengths. Representatives and scores run in float32 (float64 for float64 inputs) and under
no_grad, except that for 16-bit inputs the representatives are rounded to the input dtype before scoring (the
score is q · M of two bf16 / fp16 operands with fp32 accumulation, see ``score_representatives``); the
attention itself is differentiable in q, k and v.

Packed documents (``cu_seqlens``, b == 1) are a decision of this project: every document is an independent
sequence. Its block grid, INIT, LOCAL, eligibility and representatives are all relative to the document
start, block indices are document-local, and a trailing partial block of a document is never eligible. The
packed result therefore equals running each document on its own, which is how it is computed here.
"""

from __future__ import annotations

import torch

from ..params import PHSAParams, doc_bounds


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)


def block_representatives(
    k: torch.Tensor, punct_mask: torch.Tensor | None, block_size: int, lam: float
) -> torch.Tensor:
    """Dual-branch representative of every complete block (docs/phsa.md).

    k: [b, L, hk, d], punct_mask: bool [b, L] or None (no punctuation) -> M: [b, nb, hk, d], nb = L // block_size.
    M_o is the block mean, M_p the mean over the block's punctuation keys (M_o when it has none),
    M = lam * M_o + (1 - lam) * M_p. Tokens after the last complete block have no representative.
    """
    b, L, hk, d = k.shape
    nb = L // block_size
    kb = k[:, : nb * block_size].to(_compute_dtype(k)).view(b, nb, block_size, hk, d)
    m_o = kb.mean(dim=2)
    if punct_mask is None:
        return m_o
    p = punct_mask[:, : nb * block_size].view(b, nb, block_size, 1, 1).to(kb.dtype)
    n_p = p.sum(dim=2)  # [b, nb, 1, 1]
    m_p = torch.where(n_p > 0, (kb * p).sum(dim=2) / n_p.clamp(min=1), m_o)
    return lam * m_o + (1.0 - lam) * m_p


def score_representatives(
    k: torch.Tensor, punct_mask: torch.Tensor | None, block_size: int, lam: float
) -> torch.Tensor:
    """The representatives the block score uses: ``block_representatives`` [b, nb, hk, d] rounded (to nearest)
    to k's dtype when that is bf16 / fp16, returned in the compute dtype.

    Why: the score is the product of two tensors of the input dtype, q and M, accumulated in fp32, as compressed
    keys are input-dtype tensors in NSA and InfLLM-v2; it is one tensor-core dot in the kernels, and the products
    of two 16-bit numbers are exact in fp32, so the reference and the kernels differ only in the order of fp32
    sums. For fp32 / fp64 inputs M is not rounded."""
    M = block_representatives(k, punct_mask, block_size, lam)
    if k.dtype in (torch.bfloat16, torch.float16):
        M = M.to(k.dtype).to(M.dtype)
    return M


def eligible_blocks(n: int, params: PHSAParams, groups: tuple[int, int] | None = None, device=None) -> torch.Tensor:
    """bool [n_groups, nb]: block t is eligible for query group j (first query i0 = j * B) when it is not
    entirely inside INIT, (t+1)*m > n_init, and starts before the local window, t*m <= i0 - w (docs/phsa.md).
    With w >= m an eligible block holds no token at or after i0; blocks past n // m do not exist.
    ``groups=(j0, j1)``: only the rows of groups j0 <= j < j1."""
    m, B = params.block_size, params.query_block
    nb, n_groups = n // m, -(-n // B)
    j0, j1 = (0, n_groups) if groups is None else groups
    t = torch.arange(nb, device=device)
    i0 = torch.arange(j0, j1, device=device) * B
    not_init = (t + 1) * m > params.n_init
    before_local = t[None, :] * m <= (i0[:, None] - params.local_window)
    return not_init[None, :] & before_local


def block_scores(
    q: torch.Tensor, k: torch.Tensor, punct_mask: torch.Tensor | None, params: PHSAParams,
    groups: tuple[int, int] | None = None, M: torch.Tensor | None = None,
) -> torch.Tensor:
    """Score of every block for every query group and KV head (one sequence, no cu_seqlens).

    q: [b, n, hq, d], k: [b, n, hk, d] -> scores [b, n_groups, hk, nb], n_groups = ceil(n / query_block),
    -inf where a block is not eligible. ``groups=(j0, j1)`` scores only the query groups j0 <= j < j1
    (-> [b, j1 - j0, hk, nb]); each group's scores are the same float operations either way. ``M``: the
    representatives ``score_representatives`` gives for k (computed here when None).
    softmax_group_sum: s(j, g, t) = sum_{i in group j} sum_{h in KV group g} softmax_t(scale * q[i,h]·M_g(t)),
        the softmax taken per query and head over the group's eligible blocks;
    dot_group_sum: the same sum of the raw scaled dot products.
    q · M: q and M (``score_representatives``) in the input dtype, products and sums in fp32.
    """
    b, n, hq, d = q.shape
    hk = k.shape[2]
    G, B = hq // hk, params.query_block
    if M is None:
        M = score_representatives(k, punct_mask, params.block_size, params.lam)  # [b, nb, hk, d]
    nb = M.shape[1]
    elig_g = eligible_blocks(n, params, groups, q.device)  # [n_groups, nb]
    if groups is not None:
        q = q[:, groups[0] * B:groups[1] * B]
        n = q.shape[1]
    n_groups = elig_g.shape[0]
    elig_q = elig_g.repeat_interleave(B, dim=0)[:n]  # [n, nb], every query uses its group's eligibility
    M_h = M.repeat_interleave(G, dim=2)  # [b, nb, hq, d]
    logits = torch.einsum("bihd,bthd->biht", q.to(M.dtype), M_h) * params.scale(d)  # [b, n, hq, nb]
    mask = elig_q[None, :, None, :]
    if params.score == "softmax_group_sum":
        p = torch.softmax(logits.masked_fill(~mask, float("-inf")), dim=-1)
        per_q = torch.where(mask, p, 0.0)  # rows with nothing eligible are NaN before this
    else:
        per_q = torch.where(mask, logits, 0.0)
    per_q = _sum_in_order(per_q.view(b, n, hk, G, nb), dim=3)  # [b, n, hk, nb]
    pad = n_groups * B - n
    per_q = torch.nn.functional.pad(per_q, (0, 0, 0, 0, 0, pad))
    s = _sum_in_order(per_q.view(b, n_groups, B, hk, nb), dim=2)
    return s.masked_fill(~elig_g[None, :, None, :], float("-inf"))


def _sum_in_order(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Sum over ``dim`` by adding its slices one after another. Every block's score then comes from the same
    sequence of float additions, so blocks whose terms are equal tie exactly, which the tie rule of
    ``topk_blocks`` needs; ``torch.sum`` rounds its vectorised lanes and its tail differently."""
    out = x.select(dim, 0)
    for j in range(1, x.shape[dim]):
        out = out + x.select(dim, j)
    return out


def topk_blocks(scores: torch.Tensor, topk: int) -> torch.Tensor:
    """Top-k over the last axis of ``scores`` [..., nb] (-inf = not eligible) -> LongTensor [..., topk].

    Ties go to the later block: the blocks are put in descending index order first, and a stable descending
    sort keeps that order among equal scores. Fewer than topk eligible blocks: the rest is -1. The result is
    sorted ascending with the -1 padding at the end.
    """
    nb = scores.shape[-1]
    kk = min(topk, nb)
    rev = scores.flip(-1)  # position p holds block nb - 1 - p
    order = torch.sort(rev, dim=-1, descending=True, stable=True).indices[..., :kk]
    valid = torch.gather(rev, -1, order).isfinite()
    blocks = torch.where(valid, nb - 1 - order, nb)  # nb sorts after every real block
    blocks = blocks.sort(dim=-1).values
    blocks = torch.where(blocks == nb, -1, blocks)
    return torch.nn.functional.pad(blocks, (0, topk - kk), value=-1)


def select_blocks_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    punct_mask: torch.Tensor | None,
    params: PHSAParams,
    cu_seqlens: torch.Tensor | None = None,
    *,
    max_score_bytes: int | None = None,
    q_offset: int = 0,
) -> torch.Tensor:
    """Blocks chosen by every query: q [b, L, hq, d], k [b, L, hk, d], punct_mask bool [b, L] or None
    -> LongTensor [b, L, hk, topk], ascending, padded with -1. Shared by the G query heads of a KV head and by
    the query_block queries of a group. With cu_seqlens the indices are document-local. Inputs are checked by
    the public API (:func:`phsa_train.attention.select_blocks`), not here.

    ``max_score_bytes``: score the query groups in chunks whose fp32 logits [b, rows, hq, nb] stay under this
    many bytes (None: all at once, O(L^2 / block_size) memory: 64 GiB at 128k tokens, 16 heads, block 16). The
    selections are the same. ``q_offset`` (no cu_seqlens): the rows before it are not needed; their groups are
    skipped and their selections left at -1."""
    b, L, hq, _ = q.shape
    B = params.query_block
    out = torch.full((b, L, k.shape[2], params.topk), -1, dtype=torch.long, device=q.device)
    with torch.no_grad():
        for s, e in doc_bounds(cu_seqlens, L):
            pm = None if punct_mask is None else punct_mask[:, s:e]
            n = e - s
            n_groups = -(-n // B)
            step = n_groups if max_score_bytes is None else max(
                1, max_score_bytes // max(1, b * B * hq * (n // params.block_size) * 4))
            M = score_representatives(k[:, s:e], pm, params.block_size, params.lam)
            for j0 in range(q_offset // B if cu_seqlens is None else 0, n_groups, step):
                j1 = min(j0 + step, n_groups)
                scores = block_scores(q[:, s:e], k[:, s:e], pm, params, (j0, j1), M)  # [b, j1 - j0, hk, nb]
                idx = topk_blocks(scores, params.topk)
                r0, r1 = j0 * B, min(j1 * B, n)
                out[:, s + r0:s + r1] = idx.repeat_interleave(B, dim=1)[:, : r1 - r0]
    return out


def support_rows(
    block_indices: torch.Tensor, r0: int, r1: int, n: int, params: PHSAParams
) -> torch.Tensor:
    """Support mask S(i) for the query rows [r0, r1) of one sequence of length n.

    block_indices: [b, n, hk, topk] -> bool [b, hk, r1 - r0, n]. S(i) = INIT ∪ LOCAL(i) ∪ TOPK(i), causal;
    with query_block B the local window of query i starts at i0 - w + 1, i0 = (i // B) * B.
    """
    m, B, w = params.block_size, params.query_block, params.local_window
    dev = block_indices.device
    i = torch.arange(r0, r1, device=dev)[:, None]
    j = torch.arange(n, device=dev)[None, :]
    i0 = (i // B) * B
    causal = j <= i
    base = causal & ((j < params.n_init) | (j >= i0 - w + 1))  # [r, n]
    idx = block_indices[:, r0:r1]  # [b, r, hk, topk]
    n_blocks = -(-n // m)
    sel = torch.zeros(*idx.shape[:3], n_blocks + 1, dtype=torch.bool, device=dev)
    sel.scatter_(-1, torch.where(idx < 0, n_blocks, idx), True)  # -1 lands in the spare last slot
    tok = sel[..., :n_blocks].repeat_interleave(m, dim=-1)[..., :n]  # [b, r, hk, n]
    mask = (tok & causal[None, :, None, :]) | base[None, :, None, :]
    return mask.permute(0, 2, 1, 3)


def attended_mask(
    block_indices: torch.Tensor, params: PHSAParams, cu_seqlens: torch.Tensor | None = None
) -> torch.Tensor:
    """Full support mask: block_indices [b, L, hk, topk] -> bool [b, hk, L, L], True where query i attends
    key j. With cu_seqlens it is block-diagonal over documents (indices document-local)."""
    b, L, hk, _ = block_indices.shape
    out = torch.zeros(b, hk, L, L, dtype=torch.bool, device=block_indices.device)
    for s, e in doc_bounds(cu_seqlens, L):
        out[:, :, s:e, s:e] = support_rows(block_indices[:, s:e], 0, e - s, e - s, params)
    return out


def _masked_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float
) -> torch.Tensor:
    """q [b, n, hq, d], k [b, n, hk, d], v [b, n, hk, dv], mask bool [b, hk, n, n] -> [b, n, hq, dv]."""
    G = q.shape[2] // k.shape[2]
    ct = _compute_dtype(q)
    k_h = k.to(ct).repeat_interleave(G, dim=2)
    v_h = v.to(ct).repeat_interleave(G, dim=2)
    logits = torch.einsum("bihd,bjhd->bhij", q.to(ct), k_h) * scale
    logits = logits.masked_fill(~mask.repeat_interleave(G, dim=1), float("-inf"))
    p = torch.softmax(logits, dim=-1)  # every row holds at least j = i (LOCAL), so never all -inf
    return torch.einsum("bhij,bjhd->bihd", p, v_h).to(q.dtype)


def phsa_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    punct_mask: torch.Tensor | None,
    params: PHSAParams,
    cu_seqlens: torch.Tensor | None = None,
) -> torch.Tensor:
    """PHSA forward: o[i,h] = sum_{j in S(i)} softmax_j(scale * q[i,h]·k[j]) v[j] (docs/phsa.md).

    q: [b, L, hq, d], k: [b, L, hk, d], v: [b, L, hk, dv], punct_mask: bool [b, L] or None,
    cu_seqlens: [n_docs + 1] with b == 1, or None -> o: [b, L, hq, dv] in q's dtype.
    Keys are used as given (the caller decides pre- or post-RoPE). Gradients reach q, k, v through the
    attention only; the selection is made under no_grad. Inputs are checked by the public API
    (:func:`phsa_train.attention.phsa_attention`), not here.
    """
    idx = select_blocks_reference(q, k, punct_mask, params, cu_seqlens)
    scale = params.scale(q.shape[-1])
    outs = []
    for s, e in doc_bounds(cu_seqlens, q.shape[1]):
        mask = support_rows(idx[:, s:e], 0, e - s, e - s, params)
        outs.append(_masked_attention(q[:, s:e], k[:, s:e], v[:, s:e], mask, scale))
    return torch.cat(outs, dim=1) if outs else q.new_zeros(*q.shape[:3], v.shape[-1])
