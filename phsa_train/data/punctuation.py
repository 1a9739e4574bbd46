"""Punctuation-id table (docs/phsa.md): which vocabulary ids are PHSA punctuation anchors.

A token is punctuation when its decoded text, stripped of whitespace, is non-empty and made only of
characters of the chosen charset. Special tokens and ids decoding to partial UTF-8 (U+FFFD, common in
byte-level BPE) are skipped. The table records the tokenizer's sha256 so a model never trains with a table
built for a different vocabulary.

Note: ``en`` is ``string.punctuation``, so symbols that are not sentence boundaries (``# % & @ * / _``) are
included; the rule (docs/phsa.md) is "made only of punctuation characters" and we keep it literal.
"""
from __future__ import annotations

import json
import os
import string

import torch
from tokenizers import Tokenizer

from phsa_train.config.data_files import punct_table_file
from phsa_train.data.tokenizer import MegatronTokenizer, tokenizer_sha256

# CJK/full-width punctuation plus the typographic marks Chinese text uses (curly quotes, ellipsis, dashes).
_CJK_PUNCT = "，。！？；：、“”‘’（）《》〈〉【】〔〕「」『』…—–·～－＿＂＇［］｛｝﹏〜"
CHARSETS: dict[str, frozenset[str]] = {
    "en": frozenset(string.punctuation),
    "en_zh": frozenset(string.punctuation) | frozenset(_CJK_PUNCT),
}


def _hf(tokenizer: Tokenizer | MegatronTokenizer) -> Tokenizer:
    return tokenizer.tokenizer if isinstance(tokenizer, MegatronTokenizer) else tokenizer


def build_punct_table(
    tokenizer: Tokenizer | MegatronTokenizer, charset: str = "en", include_newline: bool = False
) -> dict:
    """Scan the vocabulary for punctuation tokens.

    Args:
        tokenizer: HF Tokenizer or the MegatronTokenizer adapter.
        charset: "en" (ASCII string.punctuation) or "en_zh" (plus CJK punctuation).
        include_newline: also mark tokens that are only whitespace containing a newline ("\\n", "\\n\\n").

    Returns:
        dict {tokenizer_sha256: str, vocab_size: int, charset: str, include_newline: bool, ids: list[int]}
        with ``ids`` sorted ascending.
    """
    if charset not in CHARSETS:
        raise ValueError(f"punct.charset={charset!r}: unknown; allowed: {sorted(CHARSETS)}")
    tok = _hf(tokenizer)
    chars = CHARSETS[charset]
    vocab_size = tok.get_vocab_size(with_added_tokens=True)
    special = {i for i, t in tok.get_added_tokens_decoder().items() if t.special}
    # decode_batch: one Rust call for the whole vocabulary (seconds -> ms for 100k+ vocabs).
    texts = tok.decode_batch([[i] for i in range(vocab_size)], skip_special_tokens=False)
    ids = []
    for i, text in enumerate(texts):
        if i in special or not text or "\ufffd" in text:
            continue
        core = "".join(text.split())
        if core:
            if all(c in chars for c in core):
                ids.append(i)
        elif include_newline and "\n" in text:
            ids.append(i)
    return {
        "tokenizer_sha256": tokenizer_sha256(tokenizer),
        "vocab_size": vocab_size,
        "charset": charset,
        "include_newline": include_newline,
        "ids": ids,
    }


def write_punct_table(table: dict, prefix: str | os.PathLike, tokenizer: Tokenizer | MegatronTokenizer | None = None):
    """Write ``<prefix>_punct.json`` and ``<prefix>_punct.tsv`` (id, repr of the decoded token).

    The .tsv is for human review; without ``tokenizer`` its second column is empty. Returns the json path.
    """
    prefix = os.fspath(prefix)
    json_path = punct_table_file(prefix)
    tsv_path = json_path[: -len(".json")] + ".tsv"
    with open(json_path + ".tmp", "w") as f:
        json.dump(table, f, indent=1)
    tok = _hf(tokenizer) if tokenizer is not None else None
    with open(tsv_path + ".tmp", "w", encoding="utf-8") as f:
        f.write("id\ttoken\n")
        for i in table["ids"]:
            f.write(f"{i}\t{tok.decode([i], skip_special_tokens=False)!r}\n" if tok else f"{i}\t\n")
    # Rename last so a reader never sees a half-written table.
    os.replace(tsv_path + ".tmp", tsv_path)
    os.replace(json_path + ".tmp", json_path)
    return json_path


def load_punct_mask(
    path: str | os.PathLike, tokenizer: Tokenizer | MegatronTokenizer, padded_vocab_size: int
) -> torch.Tensor:
    """Load a table as a lookup mask.

    Returns:
        torch.BoolTensor [padded_vocab_size]: True at punctuation ids; ids >= the tokenizer's vocab_size
        (Megatron's padding to make_vocab_size_divisible_by x TP) are False.

    Raises:
        FileNotFoundError naming ``data.punct_table``; ValueError when the table was built for another
        tokenizer (sha256 mismatch) or does not fit ``padded_vocab_size``.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"data.punct_table={path}: no such file")
    with open(path) as f:
        table = json.load(f)
    sha = tokenizer_sha256(tokenizer)
    if table.get("tokenizer_sha256") != sha:
        raise ValueError(
            f"data.punct_table={path} was built for tokenizer sha256 {str(table.get('tokenizer_sha256'))[:12]}, "
            f"but data.tokenizer has sha256 {sha[:12]}; rebuild it with `python -m data_prep punct`"
        )
    if table["vocab_size"] > padded_vocab_size:
        raise ValueError(
            f"data.punct_table={path}: vocab_size {table['vocab_size']} > padded_vocab_size {padded_vocab_size}"
        )
    mask = torch.zeros(padded_vocab_size, dtype=torch.bool)
    mask[torch.tensor(table["ids"], dtype=torch.long)] = True
    return mask
