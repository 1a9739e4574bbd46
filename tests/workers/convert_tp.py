"""Logits of imported Qwen3 checkpoints under any TP size (run under torchrun, gloo; or plain python for TP=1).

For every ``--case NAME HF_DIR MG_DIR`` it builds our GPTModel at TP=``--tp`` and computes the logits of
a fixed batch (TP-gathered, vocabulary unpadded) for:

* ``mg``:    the Megatron checkpoint written by ``python -m phsa_train.convert hf-to-megatron`` (saved by a
             single TP=1 process; torch_dist reshards it to this TP at load),
* ``hf``:    the HF directory loaded directly (``checkpoint.init_from=hf:`` path, per-rank slicing),
* ``phsa``:  like ``hf`` but with PHSA attention whose top-k covers every block (must equal dense).

``--save-case NAME --save-dir D`` additionally writes a training checkpoint (checkpoint.save, this TP
layout) of the ``hf`` model of that case, for the export test. Rank 0 saves everything to ``--out``.
"""
import argparse

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from omegaconf import OmegaConf

from phsa_train.training import checkpoint as ckpt
from phsa_train import compat
from phsa_train.training import hf_qwen3
from phsa_train.training.optimizer import LocalOptimizer
from phsa_train.training.distributed import init_distributed, init_model_parallel
from phsa_train.megatron.token_info import make_token_info
from phsa_train.megatron.model import build_model, padded_vocab_size
from tests.helpers import compose

SEQ, BATCH, BLOCK = 64, 2, 16


def batch(vocab: int):
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, vocab, (BATCH, SEQ), generator=g)
    punct = torch.zeros(vocab, dtype=torch.bool)
    punct[::5] = True
    return tokens, make_token_info(tokens, punct, None)


def logits_of(model, tokens, info, vocab: int) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        pos = torch.arange(SEQ).expand(BATCH, SEQ)
        out = model(tokens, pos, None, extra_block_kwargs={"attention_bias": info})  # [b, s, V_pad / tp]
    tp = parallel_state.get_tensor_model_parallel_world_size()
    if tp > 1:
        parts = [torch.empty_like(out) for _ in range(tp)]
        dist.all_gather(parts, out.contiguous(), group=parallel_state.get_tensor_model_parallel_group())
        out = torch.cat(parts, dim=-1)
    return out[..., :vocab].clone()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--case", nargs=3, action="append", metavar=("NAME", "HF_DIR", "MG_DIR"), required=True)
    ap.add_argument("--save-case")
    ap.add_argument("--save-dir")
    args = ap.parse_args()
    env = init_distributed()
    compat.apply(on_gpu=False)
    init_model_parallel(args.tp, 1, 1)
    results = {}
    for name, hf_dir, mg_dir in args.case:
        hf = hf_qwen3.read_hf_config(hf_dir)
        base = ["model=tiny", *hf_qwen3.hf_model_overrides(hf, name), f"data.seq_len={SEQ}",
                f"parallel.tensor_model_parallel_size={args.tp}"]
        cfg = compose(base)
        vocab = hf["vocab_size"]
        padded = padded_vocab_size(vocab, cfg.model.make_vocab_size_divisible_by, args.tp)
        tokens, info = batch(vocab)
        res = {}

        model = build_model(cfg, padded, torch.float32)
        ckpt.load(mg_dir, ckpt.latest_step(mg_dir), model)
        res["mg"] = logits_of(model, tokens, info, vocab)

        model = build_model(cfg, padded, torch.float32)
        hf_qwen3.load_hf_into_model(model, hf_dir, cfg)
        res["hf"] = logits_of(model, tokens, info, vocab)
        if name == args.save_case:
            opt = LocalOptimizer(model, cfg.train)
            ckpt.save(args.save_dir, model, opt, ckpt.TrainState(step=1), OmegaConf.to_container(cfg, resolve=True))

        phsa = compose([*base, "attention=phsa", f"attention.block_size={BLOCK}", f"attention.n_init={BLOCK}",
                        f"attention.local_window={BLOCK}", f"attention.train_topk={SEQ // BLOCK}",
                        f"attention.eval_topk={SEQ // BLOCK}", "attention.backend=reference"])
        model = build_model(phsa, padded, torch.float32)
        hf_qwen3.load_hf_into_model(model, hf_dir, phsa)
        res["phsa"] = logits_of(model, tokens, info, vocab)
        res["tokens"] = tokens
        results[name] = res
    if env.rank == 0:
        torch.save(results, args.out)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
