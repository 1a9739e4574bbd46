"""Data layer: embedded corpus, tokenizers, punctuation table, .bin/.idx preparation, GPT datasets."""
from phsa_train.data.corpus import CorpusSummary, load_embedded_corpus
from phsa_train.data.dataset import build_gpt_datasets, check_vocab
from phsa_train.data.prepare import (
    hf_documents,
    PreparedData,
    PrepareResult,
    prepare,
    prepare_default_corpus,
    read_documents,
    write_documents,
)
from phsa_train.data.punctuation import CHARSETS, build_punct_table, load_punct_mask, write_punct_table
from phsa_train.data.tokenizer import MegatronTokenizer, load_tokenizer, tokenizer_sha256, train_bpe_tokenizer

__all__ = [
    "CHARSETS",
    "CorpusSummary",
    "MegatronTokenizer",
    "PrepareResult",
    "PreparedData",
    "build_gpt_datasets",
    "build_punct_table",
    "check_vocab",
    "hf_documents",
    "load_embedded_corpus",
    "load_punct_mask",
    "load_tokenizer",
    "prepare",
    "prepare_default_corpus",
    "read_documents",
    "tokenizer_sha256",
    "train_bpe_tokenizer",
    "write_documents",
    "write_punct_table",
]
