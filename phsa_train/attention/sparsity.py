"""Activation ratios of PHSA (docs/phsa.md). Sparsity = 1 - activation ratio; always say which ratio.

- ``activation_ratio``: the budget ratio (n_init + w + k*m) / L, the definition that reproduces the paper's
  "97.3% sparsity at 32k" (128 + 512 + 16*16 = 896 tokens of 32768 = 2.73% active).
- ``causal_activation_ratio``: mean over query positions i of |S(i)| / (i + 1), from the structure alone.
- ``measured_activation``: the same causal mean, counted exactly from an actual selection.
"""

from __future__ import annotations

import torch

from .params import doc_bounds


def activation_ratio(L: int, n_init: int, local_window: int, topk: int, block_size: int) -> float:
    """Budget activation ratio min(1, (n_init + w + k*m) / L): the tokens a query at the end of an L-token
    sequence may attend to, overlaps ignored (the paper's "budget" definition)."""
    return min(1.0, (n_init + local_window + topk * block_size) / L)


def _init_local_size(i: torch.Tensor, i0: torch.Tensor, n_init: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
    """|INIT ∪ LOCAL(i)| and the local window start lo for query positions i (group starts i0)."""
    lo = (i0 - w + 1).clamp(min=0)
    init = torch.clamp(i + 1, max=n_init)
    overlap = (init - lo).clamp(min=0)
    return init + (i + 1 - lo) - overlap, lo


def causal_activation_ratio(
    L: int, n_init: int, local_window: int, topk: int, block_size: int, query_block: int = 1
) -> float:
    """Mean over query positions i in [0, L) of |S(i)| / (i + 1), S(i) = INIT ∪ LOCAL(i) ∪ TOPK(i).

    TOPK(i) is taken to be the min(k, #eligible(i)) *most recent* eligible blocks (a recency-biased selection;
    ties in the real selection also go to later blocks). Overlaps with INIT and LOCAL are counted once. This is
    a structural figure, not a bound: only the oldest eligible block can overlap INIT and only the newest can
    overlap LOCAL, so any selection of the same size differs by fewer than block_size tokens per query; use
    ``measured_activation`` for the exact value of a given selection. Vectorised: L = 128k takes milliseconds.
    """
    m, w, B = block_size, local_window, query_block
    i = torch.arange(L, dtype=torch.int64)
    i0 = (i // B) * B
    base, lo = _init_local_size(i, i0, n_init, w)
    # Eligible blocks: t >= n_init // m (not entirely inside INIT) and t*m <= i0 - w; they are contiguous.
    t_min = n_init // m
    t_max = torch.div(i0 - w, m, rounding_mode="floor")
    c = (t_max - t_min + 1).clamp(min=0).clamp(max=topk)
    a = (t_max - c + 1) * m  # chosen tokens: [a, end), empty when c == 0
    end = torch.where(c > 0, (t_max + 1) * m, a)
    # [a, end) lies after the start of INIT and before lo (end - 1 <= i0 - w + m - 1, a <= i0 - w < lo): count
    # only what is neither in INIT nor at or after lo.
    extra = (torch.minimum(end, lo) - torch.clamp(a, min=n_init)).clamp(min=0)
    size = (base + extra).to(torch.float64)
    return (size / (i + 1).to(torch.float64)).mean().item()


def measured_activation(
    block_indices: torch.Tensor,
    *,
    block_size: int,
    n_init: int,
    local_window: int,
    query_block: int = 1,
    cu_seqlens: torch.Tensor | None = None,
) -> float:
    """Exact causal activation ratio of a selection: mean over batch, KV heads and query positions of
    |S(i)| / (i + 1). block_indices: LongTensor [b, L, hk, topk] (-1 = padding; document-local with
    cu_seqlens, where i counts from the document start). Assumes distinct, causal indices, as
    ``select_blocks`` returns."""
    b, L, hk, _ = block_indices.shape
    m = block_size
    total, count = 0.0, 0
    for s, e in doc_bounds(cu_seqlens, L):
        n = e - s
        i = torch.arange(n, dtype=torch.int64, device=block_indices.device)
        i0 = (i // query_block) * query_block
        base, lo = _init_local_size(i, i0, n_init, local_window)
        t = block_indices[:, s:e]  # [b, n, hk, k]
        start = torch.clamp(t * m, min=n_init)
        stop = torch.minimum((t + 1) * m, torch.minimum(lo, i + 1)[None, :, None, None])
        extra = torch.where(t >= 0, (stop - start).clamp(min=0), 0).sum(dim=-1)  # [b, n, hk]
        size = base[None, :, None] + extra
        total += (size.double() / (i + 1).double()[None, :, None]).sum().item()
        count += size.numel()
    return total / max(count, 1)
