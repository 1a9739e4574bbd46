"""Attention recall (docs/phsa.md): how much of the dense causal softmax mass a selection keeps.

recall(i, h) = sum_{j in S(i)} softmax_j(scale * q[i,h]·k[j])  over the dense causal row j <= i.
The project reports ``information_loss = 1 - recall`` (the paper's own definition is not known here).
"""

from __future__ import annotations

import torch

from .params import PHSAParams, check_shapes, doc_bounds
from .phsa.reference import support_rows


def attention_recall(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor | None,
    block_indices: torch.Tensor,
    *,
    block_size: int,
    n_init: int,
    local_window: int,
    query_block: int = 1,
    cu_seqlens: torch.Tensor | None = None,
    softmax_scale: float | None = None,
    chunk: int = 256,
) -> torch.Tensor:
    """Share of each query's dense causal attention mass that falls inside S(i) = INIT ∪ LOCAL ∪ TOPK.

    Args:
        q: [b, L, hq, d], k: [b, L, hk, d]. v: unused (recall measures attention weights, not outputs); kept so
            the call mirrors ``phsa_attention``. Pass None freely.
        block_indices: LongTensor [b, L, hk, topk] from ``select_blocks`` (-1 = padding); document-local with
            cu_seqlens, where the dense reference is the document's own causal attention.
        block_size, n_init, local_window, query_block, softmax_scale: as in ``phsa_attention`` (same meaning;
            they must match the selection's).
        chunk: query rows processed at a time; memory is O(b * hq * chunk * L).

    Returns:
        recall: float32 [b, L, hq] in [0, 1] (float64 for float64 inputs).
    """
    params = PHSAParams(
        block_size=block_size,
        n_init=n_init,
        local_window=local_window,
        topk=block_indices.shape[-1],
        query_block=query_block,
        softmax_scale=softmax_scale,
    ).validate()
    check_shapes(q, k, v, None, cu_seqlens)
    b, L, hq, d = q.shape
    hk = k.shape[2]
    if block_indices.shape[:3] != (b, L, hk):
        raise ValueError(f"block_indices{tuple(block_indices.shape)} must be [b, L, hk, topk] = [{b}, {L}, {hk}, *]")
    G = hq // hk
    ct = torch.promote_types(q.dtype, torch.float32)
    scale = params.scale(d)
    out = torch.empty(b, L, hq, dtype=ct, device=q.device)
    with torch.no_grad():
        for s, e in doc_bounds(cu_seqlens, L):
            n = e - s
            k_h = k[:, s:e].to(ct).repeat_interleave(G, dim=2)  # [b, n, hq, d]
            for r0 in range(0, n, chunk):
                r1 = min(r0 + chunk, n)
                logits = torch.einsum("bihd,bjhd->bhij", q[:, s + r0 : s + r1].to(ct), k_h) * scale
                i = torch.arange(r0, r1, device=q.device)[:, None]
                causal = torch.arange(n, device=q.device)[None, :] <= i
                logits = logits.masked_fill(~causal, float("-inf"))
                p = torch.softmax(logits, dim=-1)  # [b, hq, r, n], dense causal weights
                sup = support_rows(block_indices[:, s:e], r0, r1, n, params).repeat_interleave(G, dim=1)
                out[:, s + r0 : s + r1] = (p * sup).sum(dim=-1).transpose(1, 2)
    return out
