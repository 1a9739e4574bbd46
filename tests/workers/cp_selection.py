"""The blocks the context-parallel paths select, for the CP workers to compare with a CP=1 run (test-only code)."""
import torch

from phsa_train.attention import select_blocks
from phsa_train.attention.params import pad_queries_front
from phsa_train.megatron.context_parallel import _attend_chunks, ulysses_attention
from phsa_train.megatron.token_info import document_cu_seqlens, punct_mask


def cp_select_blocks(q, k, token_info, group, phsa_kwargs: dict, mode: str = "allgather",
                     documents: bool = False) -> torch.Tensor:
    """The blocks the CP path selects for this rank's queries: [b, s_local, hk, topk] (int64, -1 padded).

    ``allgather``: the same gather and chunking as :func:`cp_phsa_attention`; ``ulysses``: the same all-to-all,
    selection over the full sequence for this rank's KV heads (tests and selection statistics use it to compare
    the selections themselves with a CP=1 run). ``documents``: packed documents (DOC_START bits) are honoured as in
    training with data.reset_attention_mask.
    """
    kwargs = {k_: v_ for k_, v_ in phsa_kwargs.items() if k_ != "softmax_scale"}

    def suffix_select(q_, k_, v_, info_):
        start = k_.shape[1] - q_.shape[1]  # select_blocks has no query offset: pad, then keep the chunk's rows
        qp, pm = pad_queries_front(q_, start), punct_mask(info_)
        cu = document_cu_seqlens(info_) if documents else None
        if cu is None:
            return select_blocks(qp, k_, pm, **kwargs)[:, start:]
        b, s = pm.shape  # packed documents: one long row, as phsa_local runs them
        flat = lambda x: x.reshape(1, b * s, *x.shape[2:])  # noqa: E731
        sel = select_blocks(flat(qp), flat(k_), pm.reshape(1, b * s), cu_seqlens=cu, **kwargs)
        return sel.reshape(b, s, *sel.shape[2:])[:, start:]

    with torch.no_grad():
        if mode == "ulysses":
            return ulysses_attention(q, k, k, token_info, group, suffix_select)
        return _attend_chunks(q, k, k, token_info, group, suffix_select,
                              query_context=phsa_kwargs.get("query_block", 1) - 1, documents=documents)
