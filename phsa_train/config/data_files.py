"""The files of a prepared dataset, named from its prefix P alone.

``python -m data_prep --output-prefix P`` writes ``P.bin``, ``P.idx``, ``P_punct.json`` and, with
``--tokenizer train``, ``P_tokenizer.json``; ``data.prefixes=[P]`` then finds all of them, so the tokenizer and
the punctuation table need no knob of their own. Kept free of heavy imports: the launcher's config check uses it.
"""
from __future__ import annotations

import os


def tokenizer_file(prefix: str) -> str:
    """Where data_prep writes the tokenizer it trains for prefix P: ``P_tokenizer.json``."""
    return f"{prefix}_tokenizer.json"


def punct_table_file(prefix: str) -> str:
    """Where data_prep writes the punctuation table of prefix P: ``P_punct.json``."""
    return f"{prefix}_punct.json"


def missing_dataset_files(prefix: str) -> list[str]:
    """The ones of ``P.bin`` / ``P.idx`` that do not exist."""
    return [prefix + ext for ext in (".bin", ".idx") if not os.path.isfile(prefix + ext)]


def tokenizer_beside(prefix: str) -> str | None:
    """The tokenizer a prepared dataset was made with, found next to it: ``P_tokenizer.json``, else a
    ``tokenizer.json`` in P's directory; None when neither exists."""
    for path in (tokenizer_file(prefix), os.path.join(os.path.dirname(os.path.abspath(prefix)), "tokenizer.json")):
        if os.path.isfile(path):
            return path
    return None
