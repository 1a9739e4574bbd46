"""Selection statistics on a fixed probe sequence, per layer, logged every ``curriculum.stats_interval`` steps.

For every PHSA layer the probe's post-RoPE q and k are captured in one no-grad forward (also during the
dense warm-up: the capture happens before the dense/sparse dispatch), then, at the hold's top-k:
  recall            share of the dense softmax mass inside S(i) with PHSA selection (docs/phsa.md)
  recall_meanpool   the same with mean-pooling selection (lam = 1) at the same budget
  info_loss_reduction  1 - (1 - recall) / (1 - recall_meanpool): the paper's headline quantity
  punct_block_frac  fraction of selected blocks holding at least one punctuation token
  churn             Jaccard distance of the selected block sets to the previous evaluation
Queries are sampled evenly among positions that have an eligible block. With TP the statistics cover the
heads of this rank; with PP the layers of this stage; under CP they are skipped (the probe is split).
"""
from __future__ import annotations

from contextlib import contextmanager

import torch

from phsa_train.megatron.core_attention import PHSACoreAttention
from phsa_train.megatron.token_info import punct_mask


@contextmanager
def capture_qk(model):
    """Record (layer_number, q [b,s,hq,d], k [b,s,hk,d], token_info) of every PHSA layer's forward calls.

    A forward pre-hook sees the core-attention inputs ([s, b, h, d], post-RoPE) before the dense/sparse dispatch.
    """
    store: list = []

    def record(module, args, kwargs):
        query, key = args[0], args[1]
        store.append((module.layer_number, query.permute(1, 0, 2, 3), key.permute(1, 0, 2, 3),
                      kwargs.get("attention_bias")))

    handles = [m.register_forward_pre_hook(record, with_kwargs=True) for m in model.modules()
               if isinstance(m, PHSACoreAttention)]
    try:
        yield store
    finally:
        for h in handles:
            h.remove()


def _jaccard_distance(a: torch.Tensor, b: torch.Tensor, nb: int) -> float:
    """a, b [..., k] block indices (-1 padded) -> mean Jaccard distance of the sets."""
    def onehot(x):
        oh = torch.zeros(*x.shape[:-1], nb + 1, dtype=torch.bool, device=x.device)
        oh.scatter_(-1, torch.where(x < 0, nb, x), True)
        return oh[..., :nb]

    oa, ob = onehot(a), onehot(b)
    inter, union = (oa & ob).sum(-1).float(), (oa | ob).sum(-1).float()
    return float(torch.where(union > 0, 1 - inter / union.clamp(min=1), torch.zeros_like(union)).mean())


def probe_positions(L: int, attn_cfg, num_queries: int, device=None) -> torch.Tensor | None:
    """Up to ``num_queries`` query positions spread evenly over those that have an eligible block (None: none)."""
    first = max(attn_cfg.local_window + attn_cfg.block_size, attn_cfg.n_init)  # earliest query with an eligible block
    if first >= L:
        return None
    return torch.linspace(first, L - 1, min(num_queries, L - first)).round().long().unique().to(device)


def layer_recall(q, k, pm, attn_cfg, topk: int, lam: float, pos: torch.Tensor, cu_seqlens=None):
    """Mean attention recall (docs/phsa.md) at query positions ``pos`` of row 0, with the selection that ``lam`` and
    ``topk`` give (reference backend). q [b, L, hq, d], k [b, L, hk, d], pm bool [b, L].
    Returns (recall, selection [b, L, hk, topk])."""
    from phsa_train.attention import attention_recall, select_blocks

    a = attn_cfg
    rk = dict(block_size=a.block_size, n_init=a.n_init, local_window=a.local_window, query_block=a.query_block,
              cu_seqlens=cu_seqlens)
    sel = select_blocks(q, k, pm, topk=topk, lam=lam, score=a.score, backend="reference", **rk)
    return attention_recall(q, k, None, sel, **rk)[0, pos].mean().item(), sel


@torch.no_grad()
def selection_stats(model, probe: dict, attn_cfg, topk: int, num_queries: int, previous: dict | None):
    """One probe forward + statistics. Returns (metrics, selections-by-layer for the next churn)."""
    was_training = model.training
    model.eval()
    with capture_qk(model) as captured:
        model(probe["tokens"][:1], probe["position_ids"][:1], None,
              extra_block_kwargs={"attention_bias": probe["token_info"][:1]})
    model.train(was_training)

    m = attn_cfg.block_size
    metrics, selections, per_layer = {}, {}, []
    for layer, q, k, info in captured:
        q, k, pm = q.float(), k.float(), punct_mask(info)
        nb = q.shape[1] // m
        pos = probe_positions(q.shape[1], attn_cfg, num_queries, q.device)
        if pos is None:
            continue
        recall, sel = layer_recall(q, k, pm, attn_cfg, topk, attn_cfg.lam, pos)
        recall_mean, _ = layer_recall(q, k, pm, attn_cfg, topk, 1.0, pos)
        block_punct = pm[0, :nb * m].reshape(nb, m).any(-1)  # [nb]
        chosen = sel[0, pos]  # [n, hk, k]
        valid = chosen >= 0
        punct_frac = block_punct[chosen.clamp(min=0)][valid].float().mean().item() if valid.any() else 0.0
        row = {"recall": recall, "recall_meanpool": recall_mean,
               "info_loss_reduction": 1 - (1 - recall) / max(1e-9, 1 - recall_mean),
               "punct_block_frac": punct_frac}
        if previous is not None and layer in previous and previous[layer].shape == chosen.shape:
            row["churn"] = _jaccard_distance(chosen, previous[layer], nb)
        selections[layer] = chosen
        per_layer.append(row)
        metrics.update({f"phsa_stats/layer{layer:02d}/{k_}": v for k_, v in row.items()})
    for key in ("recall", "recall_meanpool", "info_loss_reduction", "punct_block_frac", "churn"):
        vals = [r[key] for r in per_layer if key in r]
        if vals:
            metrics[f"phsa_stats/{key}"] = sum(vals) / len(vals)
    return metrics, selections


class SelectionMonitor:
    """``selection_stats`` on one fixed validation micro-batch every ``curriculum.stats_interval`` steps.

    Off for dense models and under CP (the probe would be split over ranks).
    """

    def __init__(self, cfg, data, device, curriculum):
        from phsa_train.training.data import batches

        cur = cfg.curriculum
        self.cfg, self.interval = cfg, cur.stats_interval
        self.enabled = curriculum.phsa and cur.stats_interval > 0 and cfg.parallel.context_parallel_size == 1
        self.topk = curriculum.schedule.final_topk if curriculum.phsa else None
        self.previous = None
        self.probe = None
        if self.enabled:
            from megatron.core import parallel_state

            mbs = cfg.train.micro_batch_size
            self.probe = next(batches(data.valid, start_sample=0,
                                      global_batch_size=mbs * parallel_state.get_data_parallel_world_size(),
                                      micro_batch_size=mbs, data=data,
                                      reset_attention_mask=cfg.data.reset_attention_mask, device=device))

    def due(self, step: int) -> bool:
        return self.enabled and step % self.interval == 0

    def collect(self, model) -> dict:
        stats, self.previous = selection_stats(model, self.probe, self.cfg.attention, self.topk,
                                               self.cfg.curriculum.stats_queries, self.previous)
        return stats
