"""Does a checkpoint copy from its context? The induction test on held-out prose (dense, or PHSA at each k).

    python bench/quality/copy_probe.py RUN_DIR/checkpoints [--json out.json] [--samples 16] [--span 32]
        [--override attention.name=phsa attention.lam=0.5 ... --topks 1 4 16]   (the same weights, sparse)

Each sample is ``[prose | S | prose of D tokens | S]``, S a span of ``--span`` tokens drawn i.i.d. from the
validation text's unigram distribution, for D in ``--distances``. The per-token loss on S's second copy (after
its first two tokens) against the loss on its first copy is the copy gain: ~0 for a model that cannot copy,
log(vocab-ish) for a perfect induction head. A distance beyond INIT + the local window is the setting where a
sparse layer must select the first copy's block. Prints one JSON line per distance.
"""
from __future__ import annotations

import argparse
import json
import sys

import numpy as np
import torch


@torch.no_grad()
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint")
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--span", type=int, default=32)
    p.add_argument("--distances", type=int, nargs="+", default=[16, 256, 1024])
    p.add_argument("--prefix", type=int, default=64, help="prose tokens before the first copy")
    p.add_argument("--override", nargs="*", default=[], help="dotted overrides of the checkpoint's config")
    p.add_argument("--topks", type=int, nargs="*", default=[4], help="top-k values when attention is sparse")
    p.add_argument("--json", help="write the rows here as well")
    a = p.parse_args(argv)

    from phsa_train.evaluation.evaluate import resolve_checkpoint, training_config
    from phsa_train.megatron.core_attention import set_sparsity
    from phsa_train.megatron.model import build_model, padded_vocab_size
    from phsa_train.megatron.token_info import make_token_info
    from phsa_train.training import checkpoint as ckpt
    from phsa_train.training.data import build_data
    from phsa_train.training.distributed import init_distributed, init_model_parallel, prepare_device, shutdown

    root, step = resolve_checkpoint(a.checkpoint, None)
    cfg, _ = training_config(root, step, ["train.seed=1234", f"data.cache_dir={root.parent}/cache_probe",
                                                 *a.override])
    env = init_distributed()
    rows = []
    try:
        init_model_parallel(1, 1, 1)
        on_gpu = prepare_device(env, 1234)
        data = build_data(cfg, env, lambda v: padded_vocab_size(v, cfg.model.make_vocab_size_divisible_by, 1))
        model = build_model(cfg, data.vocab_size, torch.bfloat16 if on_gpu else torch.float32)
        ckpt.load(root, step, model)
        model.eval()
        valid = np.concatenate([np.asarray(data.valid[i]["tokens"], dtype=np.int64) for i in range(len(data.valid))])
        unigram = valid[valid != data.eod]
        sparse = cfg.attention.name != "dense"
        for k in (a.topks if sparse else [None]):
            if sparse:
                set_sparsity(model, eval_topk=k, dense=False)
            rng = np.random.default_rng(0)  # the same samples for every k
            for dist in a.distances:
                n = a.prefix + 2 * a.span + dist
                if n > cfg.data.seq_len:
                    continue
                seqs = []
                for _ in range(a.samples):
                    s = unigram[rng.integers(0, len(unigram), a.span)]
                    o = int(rng.integers(0, len(unigram) - a.prefix - dist))
                    seqs.append(np.concatenate([unigram[o:o + a.prefix], s, unigram[o + a.prefix:o + a.prefix + dist], s]))
                tokens = torch.as_tensor(np.stack(seqs), device=env.device)
                info = make_token_info(tokens, data.punct_lut, None)
                logits = model(tokens, torch.arange(n, device=env.device).expand(len(seqs), n), None,
                               extra_block_kwargs={"attention_bias": info}).float()
                nll = -torch.log_softmax(logits[:, :-1], -1).gather(-1, tokens[:, 1:, None])[..., 0]  # [b, n-1]
                first = nll[:, a.prefix + 1:a.prefix + a.span - 1].mean().item()  # predicting S[2:] of copy 1
                second = nll[:, n - a.span + 1:].mean().item()  # predicting S[2:] of copy 2
                acc = (logits[:, n - a.span + 1:-1].argmax(-1) == tokens[:, n - a.span + 2:]).float().mean().item()
                rows.append({"distance": dist, "loss_first": round(first, 3), "loss_second": round(second, 3),
                             "copy_gain": round(first - second, 3), "second_copy_accuracy": round(acc, 3),
                             "step": step, "attention": cfg.attention.name,
                             "lam": cfg.attention.lam if sparse else None, "topk": k})
                print(json.dumps(rows[-1]), flush=True)
    finally:
        shutdown()
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
