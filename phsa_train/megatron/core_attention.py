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

import dataclasses
from dataclasses import dataclass, field
from typing import Optional, Tuple

import torch
from megatron.core import parallel_state
from megatron.core.transformer.module import MegatronModule

from phsa_train.attention.params import PHSAParams
from phsa_train.megatron.context_parallel import cp_attention, cp_phsa_attention
from phsa_train.megatron.local_attention import dense_causal_attention, phsa_local


@dataclass
class PHSASettings:
    """The PHSA layers of one model (from ``conf/attention``): the operator's knobs plus the Megatron-side ones.

    ``params.topk`` is unused: the top-k is run-time state (``train_topk`` / ``eval_topk``, set by the curriculum).
    """

    params: PHSAParams = field(default_factory=PHSAParams)
    train_topk: int = PHSAParams.topk
    eval_topk: Optional[int] = None  # None = train_topk (attention.eval_topk=null)
    backend: str = "auto"
    dense_layers: Tuple[int, ...] = field(default_factory=tuple)  # 1-based layer numbers kept dense
    cp_mode: str = "allgather"
    documents: bool = False  # data.reset_attention_mask: token_info carries document starts


def _to_bshd(x: torch.Tensor) -> torch.Tensor:
    return x.permute(1, 0, 2, 3)  # [s, b, h, d] -> [b, s, h, d]


def _from_bshd(o: torch.Tensor) -> torch.Tensor:
    b, s, h, d = o.shape
    return o.permute(1, 0, 2, 3).reshape(s, b, h * d)  # [b, s, h, d] -> [s, b, h*d]


class DenseCoreAttention(MegatronModule):
    """Dense causal attention through SDPA (cuDNN/Flash on GPU), usable on CPU, with optional CP.

    ``documents`` (data.reset_attention_mask): token_info's document starts mask attention block-diagonally;
    a configuration fact, so no layer inspects the data to find out (that would be a host sync per layer)."""

    def __init__(self, config, layer_number: int, attn_mask_type=None, attention_type: str = "self",
                 cp_comm_type=None, softmax_scale=None, pg_collection=None, documents: bool = False, **_unused):
        super().__init__(config=config)
        self.layer_number = layer_number
        self.softmax_scale = softmax_scale
        self.documents = documents
        self.cp_group = getattr(pg_collection, "cp", None) if pg_collection is not None else None

    def _cp_group(self):
        return self.cp_group if self.cp_group is not None else parallel_state.get_context_parallel_group()

    def forward(self, query, key, value, attention_mask=None, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None, **_unused):
        q, k, v = _to_bshd(query), _to_bshd(key), _to_bshd(value)
        if self.config.context_parallel_size > 1:
            o = cp_attention(q, k, v, attention_bias, self._cp_group(), self.softmax_scale, documents=self.documents)
        else:
            o = dense_causal_attention(q, k, v, attention_bias, self.softmax_scale, documents=self.documents)
        return _from_bshd(o)


class PHSACoreAttention(DenseCoreAttention):
    """PHSA core attention: punctuation-aware block-sparse selection + one softmax over INIT ∪ LOCAL ∪ TOPK.

    ``settings`` comes from the layer spec (``get_phsa_layer_spec``). The current top-k is module state
    that the training loop sets through :func:`set_sparsity` (the curriculum), and ``self.training``
    picks ``train_topk`` vs ``eval_topk``. Layers listed in ``settings.dense_layers`` and any
    layer while ``dense`` is set run the dense path.
    """

    def __init__(self, config, layer_number: int, attn_mask_type=None, attention_type: str = "self",
                 cp_comm_type=None, softmax_scale=None, pg_collection=None, settings: PHSASettings = None,
                 **_unused):
        settings = settings or PHSASettings()
        super().__init__(config, layer_number, attn_mask_type, attention_type, cp_comm_type, softmax_scale,
                         pg_collection, documents=settings.documents)
        self.settings = settings
        self.train_topk = self.settings.train_topk
        self.eval_topk = self.settings.eval_topk if self.settings.eval_topk is not None else self.train_topk
        self.dense = layer_number in self.settings.dense_layers

    @property
    def topk(self) -> int:
        return self.train_topk if self.training else self.eval_topk

    def phsa_kwargs(self) -> dict:
        """Keyword arguments of :func:`phsa_train.attention.phsa_attention` at the current top-k."""
        params = dataclasses.replace(self.settings.params, topk=self.topk, softmax_scale=self.softmax_scale)
        return {**dataclasses.asdict(params), "backend": self.settings.backend}

    def forward(self, query, key, value, attention_mask=None, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None, **_unused):
        if self.dense:
            return super().forward(query, key, value, attention_mask, attn_mask_type, attention_bias)
        assert attention_bias is not None, (
            "PHSA needs token_info (punctuation flags) passed as attention_bias; see phsa_train/megatron/token_info.py")
        q, k, v = _to_bshd(query), _to_bshd(key), _to_bshd(value)
        if self.config.context_parallel_size > 1:
            o = cp_phsa_attention(q, k, v, attention_bias, self._cp_group(), self.settings.cp_mode,
                                  self.phsa_kwargs(), documents=self.documents)
        else:
            o = phsa_local(q, k, v, attention_bias, self.phsa_kwargs(), documents=self.documents)
        return _from_bshd(o)


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


class PathCounter:
    """Counts PHSA core-attention calls per path (dense / sparse) through forward pre-hooks; :meth:`pop` reads
    and resets. Instrumentation stays outside the modules: nothing is counted unless a counter is attached."""

    def __init__(self, model: torch.nn.Module):
        self.counts = {"dense": 0, "sparse": 0}
        self._handles = [m.register_forward_pre_hook(self._count) for m in model.modules()
                         if isinstance(m, PHSACoreAttention)]

    def _count(self, module: "PHSACoreAttention", args) -> None:
        self.counts["dense" if module.dense else "sparse"] += 1

    def pop(self) -> dict:
        counts, self.counts = self.counts, {"dense": 0, "sparse": 0}
        return counts

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
