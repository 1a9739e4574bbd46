"""Tokenizers: load or train a Hugging Face ``tokenizers`` model and adapt it to Megatron-Core.

``megatron.core.datasets.GPTDataset`` needs a duck-typed tokenizer with ``vocab_size``, ``eod``, ``pad`` and
``unique_identifiers`` (the last one keys its ``.npy`` index cache). :class:`MegatronTokenizer` provides
those plus ``tokenize``/``detokenize`` and a ``sha256`` that the punctuation table (punctuation.py) is bound to.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import socket
import urllib.parse
from collections.abc import Iterable, Sequence

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

DEFAULT_SPECIAL = ("<eod>", "<pad>")
# Tried in order when a tokenizer (e.g. from the hub) has no "<eod>"/"<pad>" of ours.
_EOD_CANDIDATES = ("<eod>", "<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>")
_PAD_CANDIDATES = ("<pad>", "[PAD]", "<|pad|>", "<|padding|>")
_NO_PAD = -1  # megatron's own "no pad token" value (_PAD_TOKEN_ID in megatron_dataset.py)
_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_ALLOWED = "allowed: a tokenizer.json path, a directory with tokenizer.json, or a hub name"


def _offline() -> bool:
    return any(os.environ.get(k, "") not in ("", "0") for k in ("HF_HUB_OFFLINE", "PHSA_OFFLINE"))


def _hub_cached(name: str) -> str | None:
    """tokenizer.json of ``name`` in the local Hugging Face hub cache, if any (newest snapshot)."""
    home = os.environ.get("HF_HUB_CACHE") or os.path.join(
        os.environ.get("HF_HOME", os.path.join(os.path.expanduser("~"), ".cache", "huggingface")), "hub")
    snaps = os.path.join(home, "models--" + name.replace("/", "--"), "snapshots")
    found = sorted(glob.glob(os.path.join(snaps, "*", "tokenizer.json")), key=os.path.getmtime)
    return found[-1] if found else None


def _hub_reachable(timeout_s: float = 3.0) -> bool:
    """One TCP connect to the hub; the Rust client would otherwise retry for ~25 s before failing."""
    host = urllib.parse.urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or ""
    try:
        socket.create_connection((host, 443), timeout=timeout_s).close()
        return True
    except OSError:
        return False


def load_tokenizer(spec: str | os.PathLike) -> Tokenizer:
    """Load a tokenizer from a tokenizer.json path, a directory holding one, or a hub name.

    Hub names are looked up in the local HF hub cache first, then downloaded only when network is allowed
    (``HF_HUB_OFFLINE``/``PHSA_OFFLINE`` unset) and the hub answers a 3 s TCP probe.
    Raises ValueError naming ``data.tokenizer`` when ``spec`` cannot be resolved.
    """
    spec = os.fspath(spec)
    if os.path.isdir(spec):
        path = os.path.join(spec, "tokenizer.json")
        if not os.path.isfile(path):
            raise ValueError(f"data.tokenizer={spec}: directory has no tokenizer.json; {_ALLOWED}")
        return Tokenizer.from_file(path)
    if os.path.isfile(spec):
        try:
            return Tokenizer.from_file(spec)
        except Exception as e:  # noqa: BLE001 - tokenizers raises a bare Exception on bad JSON
            raise ValueError(f"data.tokenizer={spec}: not a valid tokenizer.json ({e}); {_ALLOWED}") from e
    looks_like_path = spec.endswith(".json") or os.sep in spec.lstrip(".") and spec.count("/") > 1
    if not spec or looks_like_path or not _HUB_NAME.match(spec):
        raise ValueError(f"data.tokenizer={spec!r}: no such file or directory; {_ALLOWED}")
    if (cached := _hub_cached(spec)) is not None:
        return Tokenizer.from_file(cached)
    if _offline() or not _hub_reachable():
        raise ValueError(f"data.tokenizer={spec}: not found locally and no network; {_ALLOWED}")
    try:
        return Tokenizer.from_pretrained(spec)
    except Exception as e:  # noqa: BLE001 - network/hub errors surface as generic exceptions
        raise ValueError(f"data.tokenizer={spec}: not found locally and no network ({e}); {_ALLOWED}") from e


def train_bpe_tokenizer(
    texts: Iterable[str], vocab_size: int, special: Sequence[str] = DEFAULT_SPECIAL, progress: bool = False
) -> Tokenizer:
    """Train a byte-level BPE (GPT-2 style: bytes, no unknown token) on ``texts``.

    Special tokens get the first ids (``<eod>`` = 0, ``<pad>`` = 1 by default). Deterministic for the same
    input order. About 3 s for 2.2 MB at vocab 4096 on 2 cores.
    """
    if vocab_size < 256 + len(special):
        raise ValueError(f"data.vocab_size={vocab_size}: must be >= 256 bytes + {len(special)} special tokens")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(special),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes: any text is encodable
        show_progress=progress,
    )
    texts = list(texts)
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    return tok


def tokenizer_sha256(tok: Tokenizer | "MegatronTokenizer") -> str:
    """SHA-256 of the tokenizer's canonical JSON (sorted keys), stable across save/load round trips."""
    if isinstance(tok, MegatronTokenizer):
        return tok.sha256
    canonical = json.dumps(json.loads(tok.to_str()), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


class MegatronTokenizer:
    """Adapter from a HF ``tokenizers.Tokenizer`` to what megatron-core's GPTDataset expects.

    Attributes:
        vocab_size (int): ids in the tokenizer, specials included (unpadded; the model pads it).
        eod (int): end-of-document id appended after every document.
        pad (int): pad id, or -1 (megatron's "none") when the tokenizer has no pad token.
        unique_identifiers (dict): keys megatron's index cache; includes ``tokenizer_sha256``.
        sha256 (str): hash of the canonical tokenizer JSON.
    """

    def __init__(self, tokenizer: Tokenizer | str | os.PathLike):
        self.tokenizer = tokenizer if isinstance(tokenizer, Tokenizer) else load_tokenizer(tokenizer)
        self.vocab_size = self.tokenizer.get_vocab_size(with_added_tokens=True)
        self.sha256 = tokenizer_sha256(self.tokenizer)
        eod = next((i for t in _EOD_CANDIDATES if (i := self.tokenizer.token_to_id(t)) is not None), None)
        if eod is None:
            raise ValueError(f"data.tokenizer: no end-of-document token; expected one of {list(_EOD_CANDIDATES)}")
        self.eod = eod
        pad = next((i for t in _PAD_CANDIDATES if (i := self.tokenizer.token_to_id(t)) is not None), None)
        self.pad = _NO_PAD if pad is None else pad
        self.unique_identifiers = {
            "class": "phsa_train.data.MegatronTokenizer",
            "tokenizer_sha256": self.sha256,
            "vocab_size": self.vocab_size,
        }

    def tokenize(self, text: str) -> list[int]:
        """text -> ids (no special tokens added)."""
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def tokenize_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """list of texts -> list of id lists; parallel in Rust."""
        return [e.ids for e in self.tokenizer.encode_batch(list(texts), add_special_tokens=False)]

    def detokenize(self, ids: Sequence[int]) -> str:
        """ids -> text (special tokens kept, so EOD stays visible)."""
        return self.tokenizer.decode(list(map(int, ids)), skip_special_tokens=False)

    def save(self, path: str | os.PathLike) -> None:
        """Write tokenizer.json to ``path``."""
        self.tokenizer.save(os.fspath(path))

    def __repr__(self) -> str:
        return f"MegatronTokenizer(vocab_size={self.vocab_size}, eod={self.eod}, pad={self.pad}, sha256={self.sha256[:12]})"
