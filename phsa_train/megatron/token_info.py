"""Per-token side information that every attention layer needs: punctuation flags and document starts.

How it reaches the layers (the design decision the operator issue asks for): the training step computes
one small int tensor ``token_info [b, s]`` from the batch's token ids and hands it to
``GPTModel.forward(extra_block_kwargs={"attention_bias": token_info})``. Megatron-Core passes
``attention_bias`` unchanged through TransformerBlock -> TransformerLayer -> SelfAttention ->
core_attention, including under selective/full activation recomputation (its checkpoint closures
capture it), and every pipeline stage's forward step receives its own copy from the batch, so there
is no hidden global state and nothing to keep in sync. Under context parallelism the tensor is split
along the sequence with the rest of the batch (Megatron's zigzag), like the tokens.

Bit layout of ``token_info`` (int32):
  bit 0  the token is punctuation (its id is in the tokenizer's punctuation table, phsa_train/data/punctuation.py)
  bit 1  the token starts a new document (the position after an EOD), only when
         ``data.reset_attention_mask`` is on; position 0 of every row always starts a document.
"""
from __future__ import annotations

import torch

PUNCT_BIT = 1
DOC_START_BIT = 2


def make_token_info(tokens: torch.Tensor, punct_lut: torch.Tensor, eod_id: int | None) -> torch.Tensor:
    """tokens [b, s] int64, punct_lut [vocab] bool -> token_info [b, s] int32.

    ``eod_id=None`` means documents are not separated (one causal sequence per row, Megatron's default).
    """
    info = punct_lut.to(tokens.device)[tokens].to(torch.int32) * PUNCT_BIT
    if eod_id is not None:
        starts = torch.zeros_like(tokens, dtype=torch.bool)
        starts[:, 1:] = tokens[:, :-1] == eod_id
        info |= starts.to(torch.int32) * DOC_START_BIT
    return info


def punct_mask(info: torch.Tensor) -> torch.Tensor:
    """token_info [b, s] -> bool [b, s]."""
    return (info & PUNCT_BIT) != 0


def document_ids(info: torch.Tensor) -> torch.Tensor:
    """token_info [b, s] -> int64 [b, s]: per row, how many document starts lie at or before each position.

    Two positions of a row are in one document iff their ids are equal. This module is the only reader of the
    token_info bits; everything else goes through these functions.
    """
    return torch.cumsum((info & DOC_START_BIT) != 0, dim=1)


def document_cu_seqlens(info: torch.Tensor) -> torch.Tensor | None:
    """token_info [b, s] -> cu_seqlens [n_docs + 1] int32 over the flattened [b * s] sequence.

    Returns None when no row holds a document start past position 0 (then each row is one sequence
    and the caller can keep the batch dimension).
    """
    b, s = info.shape
    starts = (info & DOC_START_BIT) != 0
    if not bool(starts.any()):
        return None
    starts = starts.clone()
    starts[:, 0] = True
    idx = torch.nonzero(starts.reshape(-1), as_tuple=False).flatten().to(torch.int32)
    return torch.cat([idx, idx.new_tensor([b * s])])
