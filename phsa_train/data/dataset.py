"""GPT train/valid datasets over Megatron ``.bin/.idx`` prefixes via megatron.core.datasets.

Packing follows Megatron's GPTDataset: EOD-separated documents are concatenated and cut into ``seq_len + 1``
windows across document boundaries (a design decision of this project: a window is one causal sequence
and EOD is just another anchor). ``reset_attention_mask=True`` switches to document-masked attention.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import numpy as np
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
from megatron.core.datasets.indexed_dataset import IndexedDataset

from phsa_train.config.validate import ConfigError
from phsa_train.data.tokenizer import MegatronTokenizer

_CHECK_TOKENS = 1 << 26  # build_gpt_datasets scans at most this many tokens per prefix (~0.1 s uint16)


def check_vocab(prefix: str, vocab_size: int, max_tokens: int | None = None) -> int:
    """Check that every token id in ``prefix.bin`` is < ``vocab_size``; return the max id seen.

    Args:
        max_tokens: scan only the first ``max_tokens`` tokens (None: the whole file).

    Raises:
        ValueError naming ``data.tokenizer`` when the data was tokenized with a larger vocabulary.
    """
    dtype = IndexedDataset(prefix).index.dtype
    data = np.memmap(prefix + ".bin", dtype=dtype, mode="r")
    n = len(data) if max_tokens is None else min(len(data), max_tokens)
    max_id, step = -1, 1 << 24  # chunked so a huge file is never materialised as one array
    for start in range(0, n, step):
        max_id = max(max_id, int(data[start : min(n, start + step)].max()))
    del data
    if max_id >= vocab_size:
        raise ValueError(
            f"data.tokenizer has vocab_size {vocab_size}, but {prefix}.bin contains token id {max_id}: "
            f"the data was tokenized with a different tokenizer (data.prefixes vs data.tokenizer)"
        )
    return max_id


def _check_splits_not_empty(prefixes, split_matrix, split: str, num_samples) -> None:
    """A split that must yield samples but holds no document would loop forever in Megatron's epoch count;
    say which prefix and split instead (Megatron's own document rounding)."""
    for p in prefixes:
        n_docs = len(IndexedDataset(p).document_indices) - 1
        for name, (lo, hi), wanted in zip(("train", "valid"), split_matrix, num_samples):
            beg, end = int(round(lo * float(n_docs))), int(round(hi * float(n_docs)))
            if wanted and end <= beg:
                raise ConfigError(f"data.split={split}: the {name} split of {p} gets 0 of its {n_docs} documents; "
                                 "use more documents or give that split a larger share")


def build_gpt_datasets(
    prefixes: Sequence[str],
    *,
    tokenizer: MegatronTokenizer,
    seq_len: int,
    seed: int,
    split: str = "949,50,1",
    num_samples: tuple[int, int],
    cache_dir: str,
    weights: Sequence[float] | None = None,
    reset_attention_mask: bool = False,
    reset_position_ids: bool = False,
    eod_mask_loss: bool = False,
    is_built_on_rank: Callable[[], bool] = lambda: True,
    verify_vocab: bool = True,
):
    """Build (train_ds, valid_ds) of GPT samples.

    Each sample is a dict of torch tensors: ``tokens`` [seq_len] int64, ``labels`` [seq_len] int64 (tokens
    shifted by one), ``loss_mask`` [seq_len] float32, ``position_ids`` [seq_len] int64, plus
    ``attention_mask`` [1, seq_len, seq_len] bool (True = masked) only when ``reset_attention_mask``.

    Args:
        prefixes: Megatron data prefixes (``prefix.bin``/``prefix.idx``); blended by ``weights`` (None:
            proportional to size).
        num_samples: (train, valid) minimum sample counts; Megatron builds whole epochs, so len() may be
            larger (repeating the data as needed).
        cache_dir: where Megatron writes its shuffled ``.npy`` index caches (keyed by tokenizer hash, seed,
            seq_len, split), so later runs load instead of rebuild.
        is_built_on_rank: Megatron-Core's builder already builds on rank 0 first, then calls
            ``torch.distributed.barrier()`` and builds on the other ranks, which then load rank 0's cache;
            so ``lambda: True`` is correct on a shared FS. Return False on ranks that do not need data
            (e.g. middle pipeline stages); those ranks get None.
        verify_vocab: run :func:`check_vocab` on the first 2**26 tokens of each prefix.

    Raises:
        FileNotFoundError naming ``data.prefixes`` for a missing prefix; ValueError on a vocab mismatch.
    """
    if isinstance(prefixes, (str, os.PathLike)):
        prefixes = [prefixes]
    prefixes = [os.fspath(p) for p in prefixes]
    for p in prefixes:
        if not IndexedDataset.exists(p):
            raise FileNotFoundError(f"data.prefixes: {p}.bin/.idx not found (prepare it with `python -m data_prep`)")
        if verify_vocab:
            check_vocab(p, tokenizer.vocab_size, _CHECK_TOKENS)
    config = GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_len,
        blend=(prefixes, list(weights) if weights is not None else None),
        split=split,
        path_to_cache=cache_dir,
        tokenizer=tokenizer,
        reset_position_ids=reset_position_ids,
        reset_attention_mask=reset_attention_mask,
        eod_mask_loss=eod_mask_loss,
        # A dense [1, s, s] mask per sample costs s^2 bytes; the model builds the causal mask itself and
        # only needs a materialised one for document masking.
        create_attention_mask=reset_attention_mask,
    )
    _check_splits_not_empty(prefixes, config.split_matrix, split, num_samples)
    # The test split is never read: size None (one pass, no sample count), since a 0-sample request on an empty
    # split never returns from Megatron's epoch count (GPTDataset._get_num_epochs, megatron-core 0.16.1).
    train_ds, valid_ds, _ = BlendedMegatronDatasetBuilder(
        GPTDataset, [num_samples[0], num_samples[1], None], is_built_on_rank, config
    ).build()
    return train_ds, valid_ds
