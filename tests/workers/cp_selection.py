"""The blocks the context-parallel paths select, for the CP workers to compare with a CP=1 run (test-only code)."""
import torch

from phsa_train.attention import select_blocks
from phsa_train.attention.params import pad_queries_front
from phsa_train.megatron.context_parallel import (_attend_chunks, gathered_reps, local_chunk_positions,
                                                  overlap_kernels, ulysses_attention)
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
        kernels = overlap_kernels(q, k, k, token_info, group, phsa_kwargs, documents) if mode == "allgather" else None
        if kernels is not None:
            return _overlapped_select_blocks(q, k, token_info, group, *kernels)
        if mode == "ulysses":
            return ulysses_attention(q, k, k, token_info, group, suffix_select)
        return _attend_chunks(q, k, k, token_info, group, suffix_select,
                              query_context=phsa_kwargs.get("query_block", 1) - 1, documents=documents)


def _overlapped_select_blocks(q, k, token_info, group, tri, params) -> torch.Tensor:
    """The selection of the all-gather path that selects while K/V travel: its own steps (local representatives,
    gathered; both chunks selected from them in one launch), expanded from group-start rows to every row as
    select_blocks does."""
    c, B = q.shape[1] // 2, params.query_block
    rep_full = gathered_reps(k, token_info, group, tri, params)
    spans = local_chunk_positions(q.shape[1], torch.distributed.get_world_size(group),
                                  torch.distributed.get_rank(group))
    out = torch.full((*q.shape[:2], k.shape[2], params.topk), -1, dtype=torch.long, device=q.device)
    group_start = (torch.arange(c, device=q.device) // B) * B  # chunk starts are multiples of B
    both = tri.select_from_reps(q, rep_full, params, q_offset=tuple(start for start, _ in spans))  # one launch
    for i, (start, _) in enumerate(spans):
        if both.shape[1] == 2 * c:
            sel = both[:, i * c:(i + 1) * c]
            out[:, i * c:(i + 1) * c, :, : sel.shape[-1]] = sel[:, group_start].long()
        else:  # the dense shortcut (topk covers every eligible block): the selection is every eligible block
            i0 = start + group_start
            t = torch.arange(params.topk, device=q.device) + params.n_init // params.block_size
            t_hi = torch.div(i0 - params.local_window, params.block_size, rounding_mode="floor")
            out[:, i * c:(i + 1) * c] = torch.where(t[None] <= t_hi[:, None], t[None], -1)[None, :, None]
    return out
