"""Attention on one rank, in the ``[b, s, h, d]`` layout, from ``token_info``: dense causal SDPA and PHSA.

Both :mod:`phsa_train.megatron.core_attention` (CP = 1) and :mod:`phsa_train.megatron.context_parallel` (each
chunk against its causal prefix) call these, so neither imports the other.

``documents`` says whether token_info carries document starts (``data.reset_attention_mask``). It comes from the
configuration, not from the data: finding out from the data means reading a GPU value on the host, which stalls
the launch queue until the GPU catches up, once per layer. With documents on, the document boundaries are read
once per batch (:func:`batch_cu_seqlens`) and every layer reuses them.
"""
from __future__ import annotations

import weakref
from typing import Optional

import torch
import torch.nn.functional as F

from phsa_train.attention import phsa_attention
from phsa_train.attention.params import pad_queries_front
from phsa_train.megatron.token_info import document_cu_seqlens, document_ids, punct_mask


class PerBatch:
    """``fn(token_info, *args)`` kept while that tensor lives unchanged: every layer of a step gets the same
    ``attention_bias`` object, so the first layer computes (and syncs, where ``fn`` reads the GPU, or runs a
    collective) and the others reuse. A few slots, for the tensors derived from one batch (the two chunk prefixes
    under context parallelism). Every rank of a group sees the same hits and misses, so a collective inside ``fn``
    runs on all of them or on none."""

    def __init__(self, fn, slots: int = 4):
        self.fn, self.slots, self.entries = fn, slots, []  # [(weakref to the tensor, its version, args, value)]

    def __call__(self, info: torch.Tensor, *args):
        for ref, version, a, value in self.entries:
            if ref() is info and version == info._version and a == args:
                return value
        value = self.fn(info, *args)
        self.entries = [(weakref.ref(info), info._version, args, value), *self.entries[: self.slots - 1]]
        return value


def _cu_seqlens_on_host(info: torch.Tensor) -> Optional[torch.Tensor]:
    cu = document_cu_seqlens(info)
    return None if cu is None else cu.cpu()  # the operators only read it on the host (sequence tables)


_host_cu_seqlens = PerBatch(_cu_seqlens_on_host)


def batch_cu_seqlens(info: torch.Tensor) -> Optional[torch.Tensor]:
    """token_info [b, s] -> :func:`document_cu_seqlens` on the host (CPU int32), or None: computed once per
    token_info tensor (one host sync per batch, not per layer)."""
    return _host_cu_seqlens(info)


def dense_causal_attention(q, k, v, token_info: Optional[torch.Tensor], softmax_scale=None, *,
                           documents: bool = False) -> torch.Tensor:
    """Dense causal GQA attention. q [b, sq, hq, d], k/v [b, s, hk, d] -> [b, sq, hq, d].

    ``sq < s``: q holds the last ``sq`` positions (a context-parallel chunk against its causal prefix; the mask is
    bottom-right aligned). ``documents``: token_info's DOC_START bits are masked block-diagonally.
    """
    sq, sk = q.shape[1], k.shape[1]
    docs = documents and token_info is not None and batch_cu_seqlens(token_info) is not None
    if sq < sk:
        return _dense_suffix_attention(q, k, v, token_info if docs else None, softmax_scale)
    q, k, v = (x.transpose(1, 2) for x in (q, k, v))  # [b, h, s, d]
    mask = None
    if docs:
        doc = document_ids(token_info)  # [b, s]
        same = doc[:, :, None] == doc[:, None, :]
        mask = (same & torch.ones_like(same[0]).tril()).unsqueeze(1)  # [b, 1, s, s]
    if q.is_cuda and mask is None:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        # cuDNN is ~1.7x faster than Flash for these shapes (measured on an H100).
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION,
                          SDPBackend.EFFICIENT_ATTENTION], set_priority=True):
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=softmax_scale, enable_gqa=True)
    else:
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                           scale=softmax_scale, enable_gqa=True)
    return o.transpose(1, 2)


def _dense_suffix_attention(q, k, v, token_info, softmax_scale) -> torch.Tensor:
    # A bottom-right causal mask keeps SDPA on its fused kernels; only document masking builds a [sq, s] mask.
    from torch.nn.attention.bias import causal_lower_right

    sq, sk = q.shape[1], k.shape[1]
    if token_info is not None:
        doc = document_ids(token_info)  # [b, sk]
        pos = torch.arange(sk, device=q.device)
        mask = (pos[None, :] <= pos[sk - sq:, None])[None] & (doc[:, sk - sq:, None] == doc[:, None, :])
        mask = mask[:, None]
    else:
        mask = causal_lower_right(sq, sk)
    g = q.shape[2] // k.shape[2]
    qt, kt, vt = q.transpose(1, 2), k.repeat_interleave(g, 2).transpose(1, 2), v.repeat_interleave(g, 2).transpose(1, 2)
    return F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, scale=softmax_scale).transpose(1, 2)


def phsa_local(q, k, v, token_info, kwargs, *, documents: bool = False) -> torch.Tensor:
    """PHSA on one rank. k/v [b, s, hk, d], token_info [b, s], q [b, s_q, hq, d] -> [b, s_q, hq, d]; s_q < s
    means q holds the last s_q positions (a context-parallel chunk against its causal prefix).

    ``kwargs``: :func:`phsa_train.attention.phsa_attention`'s knobs (``PHSACoreAttention.phsa_kwargs``).
    ``documents``: token_info's DOC_START bits split each row into independent documents.
    """
    cu_seqlens = batch_cu_seqlens(token_info) if documents else None
    pm = punct_mask(token_info)
    q_offset = k.shape[1] - q.shape[1]
    if cu_seqlens is None:
        return phsa_attention(q, k, v, pm, q_offset=q_offset, **kwargs)
    if q_offset:  # packed documents: a query group may straddle the chunk start; pad to the prefix instead
        return phsa_local(pad_queries_front(q, q_offset), k, v, token_info, kwargs, documents=True)[:, q_offset:]
    b, s = pm.shape
    flat = lambda x: x.reshape(1, b * s, *x.shape[2:])  # noqa: E731  packed documents: one long row
    o = phsa_attention(flat(q), flat(k), flat(v), pm.reshape(1, b * s), cu_seqlens=cu_seqlens, **kwargs)
    return o.reshape(b, s, *o.shape[2:])
