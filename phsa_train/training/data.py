"""Training data from the config: tokenizer, punctuation table, Megatron GPT datasets, and the batch iterator."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from phsa_train.megatron.token_info import make_token_info


@dataclass
class Data:
    train: object
    valid: object
    tokenizer: object
    punct_lut: torch.Tensor  # [padded_vocab] bool
    vocab_size: int  # padded
    eod: int


def build_data(cfg, env, padded_vocab_fn) -> Data:
    """Tokenizer, punctuation table and Megatron GPT datasets. Rank 0 prepares the embedded corpus first."""
    from phsa_train.config.data_files import punct_table_file, tokenizer_beside
    from phsa_train.config.validate import validate_data_files
    from phsa_train.data import (MegatronTokenizer, build_gpt_datasets, check_vocab, load_punct_mask,
                                 load_tokenizer, prepare_default_corpus)

    d = cfg.data
    cache_dir = Path(d.cache_dir).expanduser()
    if d.prefixes:
        prefixes = [str(Path(p).expanduser()) for p in d.prefixes]
        validate_data_files(cfg)  # one line naming the file when a prefix, tokenizer or table is missing
        tok_spec = d.tokenizer or tokenizer_beside(prefixes[0])
        punct_path = d.punct_table or punct_table_file(prefixes[0])
    else:
        if env.is_main:  # build once; the others wait, then find it complete
            prepare_default_corpus(cache_dir / "embedded", vocab_size=d.embedded_vocab_size, progress=True)
        dist.barrier()
        prepared = prepare_default_corpus(cache_dir / "embedded", vocab_size=d.embedded_vocab_size)
        prefixes = [prepared.prefix]
        tok_spec = d.tokenizer or prepared.tokenizer_path
        punct_path = d.punct_table or prepared.punct_path
    tokenizer = MegatronTokenizer(load_tokenizer(tok_spec))
    for p in prefixes:
        check_vocab(p, tokenizer.vocab_size)
    vocab = padded_vocab_fn(tokenizer.vocab_size)
    punct_lut = load_punct_mask(punct_path, tokenizer, vocab)

    t = cfg.train
    # Megatron's builder builds the shuffled index caches on rank 0 first, then loads them on the others.
    # Document boundaries reach attention through token_info (make_token_info), so the datasets never
    # materialise a [s, s] mask per sample.
    train_ds, valid_ds = build_gpt_datasets(
        prefixes, tokenizer=tokenizer, seq_len=d.seq_len, seed=t.seed, split=d.split,
        num_samples=(t.steps * t.global_batch_size, max(1, t.eval_iters) * t.global_batch_size),
        cache_dir=str(cache_dir / "index"), weights=list(d.weights) or None, verify_vocab=False)
    return Data(train_ds, valid_ds, tokenizer, punct_lut, vocab, tokenizer.eod)


def batches(dataset, *, start_sample: int, global_batch_size: int, micro_batch_size: int, data: Data,
            reset_attention_mask: bool, device) -> Iterator[dict]:
    """Micro-batches of this data-parallel rank, deterministic in the global sample index.

    Global batch ``g`` holds samples ``[start + g*gbs, start + (g+1)*gbs)`` (modulo the dataset), split
    evenly over DP ranks, so resuming at ``consumed_samples`` replays exactly the same data.
    """
    dp, dp_rank = parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()
    per_rank = global_batch_size // dp
    n = len(dataset)
    g = 0
    while True:
        base = start_sample + g * global_batch_size + dp_rank * per_rank
        for mb in range(0, per_rank, micro_batch_size):
            samples = [dataset[(base + mb + j) % n] for j in range(micro_batch_size)]
            batch = {k: torch.stack([torch.as_tensor(s[k]) for s in samples]).to(device)
                     for k in ("tokens", "labels", "loss_mask", "position_ids")}
            batch["tokens"] = batch["tokens"].long()
            batch["labels"] = batch["labels"].long()
            batch["token_info"] = make_token_info(batch["tokens"], data.punct_lut,
                                                  data.eod if reset_attention_mask else None)
            yield batch
        g += 1
