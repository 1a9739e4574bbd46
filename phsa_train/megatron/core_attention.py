"""Megatron-Core ``core_attention`` modules: dense SDPA and PHSA.

Both follow Megatron-Core's core-attention contract (0.16.1 .. 0.19):
  built as ``cls(config=, layer_number=, attn_mask_type=, attention_type=, cp_comm_type=, softmax_scale=,
  pg_collection=, **spec_params)``; called as ``forward(query [sq, b, np, hn], key [sk, b, ng, hn],
  value [sk, b, ng, hn], attention_mask, attn_mask_type=, attention_bias=token_info, packed_seq_params=)``
  and returning ``[sq, b, np * hn]``. q and k arrive already RoPE'd and already split over TP ranks
  (np / ng = heads per TP rank); expanding GQA is the core's job.

The modules only adapt layouts and process groups; the maths is in :mod:`phsa_train.attention`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.transformer.module import MegatronModule

from phsa_train.megatron.token_info import document_cu_seqlens, punct_mask


@dataclass
class PHSASettings:
    """Static PHSA knobs of one model (from ``conf/attention``); top-k can change at run time."""

    block_size: int = 16
    n_init: int = 128
    local_window: int = 512
    train_topk: int = 16
    eval_topk: int = 16
    lam: float = 0.5
    score: str = "softmax_group_sum"
    query_block: int = 1
    backend: str = "auto"
    dense_layers: Tuple[int, ...] = field(default_factory=tuple)  # 1-based layer numbers kept dense
    cp_mode: str = "allgather"


def _to_bshd(x: torch.Tensor) -> torch.Tensor:
    return x.permute(1, 0, 2, 3)  # [s, b, h, d] -> [b, s, h, d]


def _from_bshd(o: torch.Tensor) -> torch.Tensor:
    b, s, h, d = o.shape
    return o.permute(1, 0, 2, 3).reshape(s, b, h * d)  # [b, s, h, d] -> [s, b, h*d]


def dense_causal_attention(q, k, v, token_info: Optional[torch.Tensor], softmax_scale=None) -> torch.Tensor:
    """Dense causal GQA attention. q [b, s, hq, d], k/v [b, s, hk, d] -> [b, s, hq, d].

    Documents (token_info DOC_START bits) are masked block-diagonally when present.
    """
    q, k, v = (x.transpose(1, 2) for x in (q, k, v))  # [b, h, s, d]
    mask = None
    if token_info is not None and document_cu_seqlens(token_info) is not None:
        from phsa_train.megatron.token_info import DOC_START_BIT

        doc = torch.cumsum((token_info & DOC_START_BIT) != 0, dim=1)  # [b, s]
        same = doc[:, :, None] == doc[:, None, :]
        mask = (same & torch.ones_like(same[0]).tril()).unsqueeze(1)  # [b, 1, s, s]
    if q.is_cuda and mask is None:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        # cuDNN is ~1.7x faster than Flash on H100 for these shapes (shared/notes/gpu_facts.md).
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION,
                          SDPBackend.EFFICIENT_ATTENTION], set_priority=True):
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=softmax_scale, enable_gqa=True)
    else:
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                           scale=softmax_scale, enable_gqa=True)
    return o.transpose(1, 2)


class DenseCoreAttention(MegatronModule):
    """Dense causal attention through SDPA (cuDNN/Flash on GPU), usable on CPU, with optional CP."""

    def __init__(self, config, layer_number: int, attn_mask_type=None, attention_type: str = "self",
                 cp_comm_type=None, softmax_scale=None, pg_collection=None, **_unused):
        super().__init__(config=config)
        self.layer_number = layer_number
        self.softmax_scale = softmax_scale
        self.cp_group = getattr(pg_collection, "cp", None) if pg_collection is not None else None

    def _cp_group(self):
        return self.cp_group if self.cp_group is not None else parallel_state.get_context_parallel_group()

    def forward(self, query, key, value, attention_mask=None, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None, **_unused):
        q, k, v = _to_bshd(query), _to_bshd(key), _to_bshd(value)
        if self.config.context_parallel_size > 1:
            from phsa_train.megatron.context_parallel import cp_attention

            o = cp_attention(q, k, v, attention_bias, self._cp_group(), self.softmax_scale)
        else:
            o = dense_causal_attention(q, k, v, attention_bias, self.softmax_scale)
        return _from_bshd(o)


def dense_chunk_attention(q, k, v, token_info, softmax_scale=None) -> torch.Tensor:
    """Queries at the last ``sq`` positions of a causal prefix. q [b, sq, hq, d], k/v [b, sk, hk, d]."""
    from torch.nn.attention.bias import causal_lower_right

    sq, sk = q.shape[1], k.shape[1]
    if token_info is not None and document_cu_seqlens(token_info) is not None:
        from phsa_train.megatron.token_info import DOC_START_BIT

        doc = torch.cumsum((token_info & DOC_START_BIT) != 0, dim=1)  # [b, sk]
        pos = torch.arange(sk, device=q.device)
        mask = (pos[None, :] <= pos[sk - sq:, None])[None] & (doc[:, sk - sq:, None] == doc[:, None, :])
        mask = mask[:, None]
    else:
        mask = causal_lower_right(sq, sk)
    g = q.shape[2] // k.shape[2]
    qt, kt, vt = q.transpose(1, 2), k.repeat_interleave(g, 2).transpose(1, 2), v.repeat_interleave(g, 2).transpose(1, 2)
    return F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, scale=softmax_scale).transpose(1, 2)


class PHSACoreAttention(DenseCoreAttention):
    """PHSA core attention: punctuation-aware block-sparse selection + one softmax over INIT ∪ LOCAL ∪ TOPK.

    ``settings`` comes from the layer spec (``get_phsa_layer_spec``). The current top-k is module state
    that the training loop sets through :func:`set_sparsity` (the curriculum), and ``self.training``
    picks ``train_topk`` vs ``eval_topk`` (spec §7). Layers listed in ``settings.dense_layers`` and any
    layer while ``dense`` is set run the dense path.
    """

    def __init__(self, config, layer_number: int, attn_mask_type=None, attention_type: str = "self",
                 cp_comm_type=None, softmax_scale=None, pg_collection=None, settings: PHSASettings = None,
                 **_unused):
        super().__init__(config, layer_number, attn_mask_type, attention_type, cp_comm_type, softmax_scale,
                         pg_collection)
        self.settings = settings or PHSASettings()
        self.train_topk = self.settings.train_topk
        self.eval_topk = self.settings.eval_topk
        self.dense = layer_number in self.settings.dense_layers
        self.capture = None  # a list while phsa_train.evaluation.selection_stats.capture_qk is active
        self.calls = {"dense": 0, "sparse": 0}  # forward calls per path, read and reset by the training loop

    @property
    def topk(self) -> int:
        return self.train_topk if self.training else self.eval_topk

    def phsa_kwargs(self) -> dict:
        s = self.settings
        return dict(block_size=s.block_size, n_init=s.n_init, local_window=s.local_window, topk=self.topk,
                    lam=s.lam, score=s.score, query_block=s.query_block, backend=s.backend,
                    softmax_scale=self.softmax_scale)

    def forward(self, query, key, value, attention_mask=None, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None, **_unused):
        if self.capture is not None:
            self.capture.append((self.layer_number, _to_bshd(query), _to_bshd(key), attention_bias))
        self.calls["dense" if self.dense else "sparse"] += 1
        if self.dense:
            return super().forward(query, key, value, attention_mask, attn_mask_type, attention_bias)
        assert attention_bias is not None, (
            "PHSA needs token_info (punctuation flags) passed as attention_bias; see phsa_train/megatron/token_info.py")
        q, k, v = _to_bshd(query), _to_bshd(key), _to_bshd(value)
        if self.config.context_parallel_size > 1:
            from phsa_train.megatron.context_parallel import cp_phsa_attention

            o = cp_phsa_attention(q, k, v, attention_bias, self._cp_group(), self.settings.cp_mode,
                                  self.phsa_kwargs())
        else:
            o = phsa_local(q, k, v, attention_bias, self.phsa_kwargs())
        return _from_bshd(o)


def phsa_local(q, k, v, token_info, kwargs) -> torch.Tensor:
    """PHSA on one rank. k/v [b, s, hk, d], token_info [b, s], q [b, s_q, hq, d] -> [b, s_q, hq, d]; s_q < s
    means q holds the last s_q positions (a context-parallel chunk against its causal prefix)."""
    from phsa_train.attention import phsa_attention
    from phsa_train.attention.params import pad_queries_front

    cu_seqlens = document_cu_seqlens(token_info)
    pm = punct_mask(token_info)
    q_offset = k.shape[1] - q.shape[1]
    if cu_seqlens is None:
        return phsa_attention(q, k, v, pm, q_offset=q_offset, **kwargs)
    if q_offset:  # packed documents: a query group may straddle the chunk start; pad to the prefix instead
        return phsa_local(pad_queries_front(q, q_offset), k, v, token_info, kwargs)[:, q_offset:]
    b, s = pm.shape
    flat = lambda x: x.reshape(1, b * s, *x.shape[2:])  # noqa: E731  packed documents: one long row
    o = phsa_attention(flat(q), flat(k), flat(v), pm.reshape(1, b * s), cu_seqlens=cu_seqlens, **kwargs)
    return o.reshape(b, s, *o.shape[2:])


def set_sparsity(model: torch.nn.Module, *, train_topk: int | None = None, eval_topk: int | None = None,
                 dense: bool | None = None) -> None:
    """Set the run-time top-k / dense switch of every PHSA layer (used by the curriculum)."""
    for m in model.modules():
        if isinstance(m, PHSACoreAttention):
            if train_topk is not None:
                m.train_topk = train_topk
            if eval_topk is not None:
                m.eval_topk = eval_topk
            if dense is not None:
                m.dense = dense or m.layer_number in m.settings.dense_layers


def pop_path_counts(model: torch.nn.Module) -> dict:
    """{'dense': n, 'sparse': n} core-attention forward calls since the last pop (all PHSA layers)."""
    total = {"dense": 0, "sparse": 0}
    for m in model.modules():
        if isinstance(m, PHSACoreAttention):
            for key in total:
                total[key] += m.calls[key]
                m.calls[key] = 0
    return total
