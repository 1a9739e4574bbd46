"""Tokenize documents into Megatron ``<prefix>.bin/.idx`` plus the punctuation table beside them.

Input conventions (mirroring Megatron's tools/preprocess_data.py, which is not in the wheel):
  * ``.txt`` (or ``.txt.gz``): one document per file; ``split_docs="paragraph"`` splits on blank lines,
    ``"line"`` makes every non-empty line a document.
  * ``.jsonl`` / ``.json`` (or ``.gz``): one JSON object per line, text under ``json_key``.
  * ``hf_dataset=NAME``: a Hugging Face dataset through ``datasets`` (optional dependency, needs network).
EOD is appended after every document, so GPTDataset's concatenated windows see document boundaries.
"""
from __future__ import annotations

import glob
import gzip
import json
import multiprocessing
import contextlib
import os
import platform
import shutil
import socket
import tempfile
import time
import zlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder
from tokenizers import Tokenizer
from tqdm import tqdm

from phsa_train.data.corpus import load_embedded_corpus
from phsa_train.data.punctuation import build_punct_table, write_punct_table
from phsa_train.data.tokenizer import MegatronTokenizer, _offline, train_bpe_tokenizer

_SPLIT_DOCS = (None, "file", "paragraph", "line")
_BATCH_DOCS = 512  # docs per encode_batch call: big enough for Rust parallelism, small enough for memory


@dataclass(frozen=True)
class PrepareResult:
    """Outputs of :func:`prepare`: ``prefix`` names ``prefix.bin``/``prefix.idx``."""

    prefix: str
    punct_path: str
    docs: int
    tokens: int  # EODs included


def _open_text(path: str):
    return gzip.open(path, "rt", encoding="utf-8") if path.endswith(".gz") else open(path, encoding="utf-8")


def read_documents(paths: Sequence[str], json_key: str = "text", split_docs: str | None = None) -> Iterator[str]:
    """Yield documents (str) from local files in the given order; empty documents are skipped.

    A file that cannot be read as documents (not UTF-8, a ``.gz`` that is not gzip, a JSON row without a string
    under ``json_key``) raises ValueError naming the file."""
    if split_docs not in _SPLIT_DOCS:
        raise ValueError(f"data.split_docs={split_docs!r}: unknown; allowed: {list(_SPLIT_DOCS)}")
    for path in paths:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"data.inputs: no such file: {path}")
        try:
            yield from _file_documents(path, json_key, split_docs)
        except UnicodeDecodeError as e:
            raise ValueError(f"{path}: not valid UTF-8 text ({e.reason}); convert it to UTF-8 first") from e
        except (gzip.BadGzipFile, EOFError, zlib.error) as e:
            raise ValueError(f"{path}: not a readable gzip file ({e}); name it without .gz if it is plain text") from e


def _file_documents(path: str, json_key: str, split_docs: str | None) -> Iterator[str]:
    stem = path[:-3] if path.endswith(".gz") else path
    if stem.endswith((".jsonl", ".json")):
        with _open_text(path) as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    text = json.loads(line)[json_key]
                except (json.JSONDecodeError, KeyError, TypeError) as e:
                    raise ValueError(f"{path}:{lineno}: no string under --json-key {json_key!r} ({e!r})") from e
                if not isinstance(text, str) and text is not None:
                    raise ValueError(f"{path}:{lineno}: the value under --json-key {json_key!r} is "
                                     f"{type(text).__name__}, not a string")
                if text:
                    yield text
    elif stem.endswith(".txt"):
        with _open_text(path) as f:
            text = f.read()
        if split_docs == "paragraph":
            parts = text.split("\n\n")
        elif split_docs == "line":
            parts = text.splitlines()
        else:
            parts = [text]
        yield from (p.strip() for p in parts if p.strip())
    else:
        raise ValueError(f"data.inputs: {path}: unsupported extension; allowed: .txt, .jsonl, .json (+ .gz)")


def hf_documents(name: str, split: str = "train", json_key: str = "text") -> Iterator[str]:
    """Yield documents from a Hugging Face dataset (streaming). Needs ``datasets`` and network."""
    try:
        import datasets  # optional dependency
    except ImportError as e:
        raise ValueError(f"data.hf_dataset={name}: the `datasets` package is not installed (pip install datasets)") from e
    if _offline():
        raise ValueError(f"data.hf_dataset={name}: network disabled (HF_HUB_OFFLINE/PHSA_OFFLINE set)")
    for row in datasets.load_dataset(name, split=split, streaming=True):
        if row.get(json_key):
            yield row[json_key]


_worker_tok: Tokenizer | None = None


def _init_worker(tokenizer_json: str) -> None:
    global _worker_tok
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # processes give the parallelism; avoid oversubscription
    _worker_tok = Tokenizer.from_str(tokenizer_json)


def _encode_chunk(texts: list[str]) -> list[list[int]]:
    return [e.ids for e in _worker_tok.encode_batch(texts, add_special_tokens=False)]


def _chunks(docs: Iterable[str], n: int) -> Iterator[list[str]]:
    buf: list[str] = []
    for d in docs:
        buf.append(d)
        if len(buf) == n:
            yield buf
            buf = []
    if buf:
        yield buf


def prepare(
    inputs: Sequence[str | os.PathLike],
    output_prefix: str | os.PathLike,
    tokenizer: MegatronTokenizer | Tokenizer | str,
    *,
    json_key: str = "text",
    append_eod: bool = True,
    split_docs: str | None = None,
    workers: int = 1,
    progress: bool = True,
    hf_dataset: str | None = None,
    hf_split: str = "train",
    punct_charset: str = "en",
) -> PrepareResult:
    """Tokenize ``inputs`` (or ``hf_dataset``) into ``<output_prefix>.bin/.idx`` and ``<output_prefix>_punct.json``.

    See :func:`write_documents` for the output format; this only resolves where documents come from.
    """
    if hf_dataset is not None:
        docs: Iterable[str] = hf_documents(hf_dataset, hf_split, json_key)
    elif inputs:
        for path in map(os.fspath, inputs):  # fail before any output is created, not mid-stream
            if not os.path.isfile(path):
                raise FileNotFoundError(f"data.inputs: no such file: {path}")
        docs = read_documents([os.fspath(p) for p in inputs], json_key, split_docs)
    else:
        raise ValueError("data.inputs: no input files and no hf_dataset given")
    return write_documents(docs, output_prefix, tokenizer, append_eod=append_eod, workers=workers,
                           progress=progress, punct_charset=punct_charset)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    return True


def remove_orphan_tmp(prefix: str) -> list[str]:
    """Remove ``<prefix>.tmp-<pid>.bin/.idx`` left by writers that were killed (their pid is gone on this
    host); a live writer's files are left alone. Returns the removed paths."""
    removed = []
    for path in glob.glob(glob.escape(prefix) + ".tmp-*"):
        pid, _, ext = path[len(prefix) + len(".tmp-"):].partition(".")
        if pid.isdigit() and ext in ("bin", "idx") and not _pid_alive(int(pid)):
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
                removed.append(path)
    return removed


@contextlib.contextmanager
def atomic_indexed_dataset(prefix: str, dtype):
    """Yield an IndexedDatasetBuilder writing ``<prefix>.tmp-<pid>.bin``; on success finalize and rename both
    files into place (.idx last, so ``IndexedDataset.exists(prefix)`` never sees a half-written dataset);
    on any error remove the temp files."""
    remove_orphan_tmp(prefix)
    tmp = f"{prefix}.tmp-{os.getpid()}"
    builder = IndexedDatasetBuilder(tmp + ".bin", dtype=dtype)
    try:
        yield builder
        builder.finalize(tmp + ".idx")
    except BaseException:
        builder.data_file.close()
        for ext in (".bin", ".idx"):
            if os.path.exists(tmp + ext):
                os.remove(tmp + ext)
        raise
    os.replace(tmp + ".bin", prefix + ".bin")
    os.replace(tmp + ".idx", prefix + ".idx")


def write_documents(
    docs: Iterable[str],
    output_prefix: str | os.PathLike,
    tokenizer: MegatronTokenizer | Tokenizer | str,
    *,
    append_eod: bool = True,
    workers: int = 1,
    progress: bool = True,
    punct_charset: str = "en",
) -> PrepareResult:
    """Tokenize an iterable of documents (str) into ``<output_prefix>.bin/.idx`` plus the punct table.

    Token dtype is ``DType.optimal_dtype(vocab_size)`` (uint16 below 65500 ids, else int32). ``workers`` > 1
    tokenizes in that many spawned processes, keeping document order. The .idx is renamed into place
    last, so ``IndexedDataset.exists(prefix)`` is never true for a half-written dataset.
    """
    tok = tokenizer if isinstance(tokenizer, MegatronTokenizer) else MegatronTokenizer(tokenizer)
    if workers < 1:
        raise ValueError(f"data.workers={workers}: must be >= 1")
    prefix = os.fspath(output_prefix)
    os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
    n_docs = n_tokens = 0
    pool = None
    try:
        with atomic_indexed_dataset(prefix, DType.optimal_dtype(tok.vocab_size)) as builder:
            if workers > 1:
                # spawn, not fork: forking after the Rust tokenizer started its thread pool can deadlock.
                pool = multiprocessing.get_context("spawn").Pool(workers, _init_worker, (tok.tokenizer.to_str(),))
                encoded = (ids for batch in pool.imap(_encode_chunk, _chunks(docs, _BATCH_DOCS)) for ids in batch)
            else:
                encoded = (ids for batch in _chunks(docs, _BATCH_DOCS) for ids in tok.tokenize_batch(batch))
            for ids in tqdm(encoded, desc=f"tokenize -> {os.path.basename(prefix)}", unit="doc", disable=not progress):
                if append_eod:
                    ids.append(tok.eod)
                if not ids:
                    continue
                builder.add_document(np.asarray(ids), [len(ids)])
                n_docs += 1
                n_tokens += len(ids)
            if n_docs == 0:
                raise ValueError("data.inputs: no non-empty documents found")
    finally:
        if pool is not None:
            pool.terminate()
    punct_path = write_punct_table(build_punct_table(tok, punct_charset), prefix, tok)
    return PrepareResult(prefix=prefix, punct_path=punct_path, docs=n_docs, tokens=n_tokens)


_FORMAT = 1  # bump when the layout or the corpus recipe changes, so old caches are not reused
_MANIFEST = "manifest.json"


@dataclass(frozen=True)
class PreparedData:
    """The default dataset on disk: ``prefix`` (.bin/.idx), its tokenizer.json and punctuation table."""

    prefix: str
    tokenizer_path: str
    punct_path: str
    manifest: dict


def _default_paths(root: str) -> tuple[str, str, str]:
    return os.path.join(root, "corpus"), os.path.join(root, "tokenizer.json"), os.path.join(root, "corpus_punct.json")


def _load_if_complete(root: str, key: dict) -> PreparedData | None:
    """PreparedData when ``root`` holds a manifest matching ``key`` and every listed file at its size."""
    try:
        with open(os.path.join(root, _MANIFEST)) as f:
            manifest = json.load(f)
    except (OSError, ValueError):
        return None
    if manifest.get("key") != key:
        return None
    for name, size in manifest.get("files", {}).items():
        path = os.path.join(root, name)
        if not os.path.isfile(path) or os.path.getsize(path) != size:
            return None
    prefix, tok_path, punct_path = _default_paths(root)
    return PreparedData(prefix, tok_path, punct_path, manifest)


def _clean_stale_tmp(cache_dir: str, name: str) -> None:
    """Remove temp dirs of killed builds on this host (their pid is gone); other hosts' after 6 h."""
    host = socket.gethostname()
    for entry in os.listdir(cache_dir):
        if not entry.startswith(f".tmp-{name}-"):
            continue
        path = os.path.join(cache_dir, entry)
        parts = entry[len(f".tmp-{name}-"):].rsplit("-", 2)  # host-pid-random
        stale = False
        if len(parts) == 3 and parts[0] == host and parts[1].isdigit():
            try:
                os.kill(int(parts[1]), 0)
            except ProcessLookupError:
                stale = True
            except PermissionError:
                pass  # alive, owned by someone else
        else:
            try:
                stale = time.time() - os.path.getmtime(path) > 6 * 3600
            except OSError:
                continue
        if stale:
            shutil.rmtree(path, ignore_errors=True)


def prepare_default_corpus(cache_dir: str | os.PathLike, vocab_size: int = 4096, progress: bool = False) -> PreparedData:
    """Build (once) the embedded stdlib-docs corpus, a byte-level BPE trained on it, and its punct table.

    Layout: ``<cache_dir>/embedded-py<X.Y.Z>-v<vocab>-f<format>/{corpus.bin,corpus.idx,tokenizer.json,
    corpus_punct.json,corpus_punct.tsv,manifest.json}``. Idempotent: a complete directory (manifest key and
    file sizes match) is returned at once. Atomic: everything is built in a private temp dir that is
    renamed into place; if a concurrent caller won the rename, ours is discarded and theirs returned.
    vocab_size 4096 (default): 2.2 MB -> ~623k tokens (3.6 chars/token). A larger vocab would leave many ids
    seen only a handful of times in so small a corpus and grow the demo model's embedding (vocab x hidden).
    Takes ~4 s on 2 cores (2.2 MB of text, vocab 4096), plus ~3 s to import megatron-core.
    """
    cache_dir = os.path.abspath(os.fspath(cache_dir))
    name = f"embedded-py{platform.python_version()}-v{vocab_size}-f{_FORMAT}"
    key = {"format": _FORMAT, "python_version": platform.python_version(), "vocab_size": vocab_size}
    final = os.path.join(cache_dir, name)
    if (done := _load_if_complete(final, key)) is not None:
        return done
    os.makedirs(cache_dir, exist_ok=True)
    _clean_stale_tmp(cache_dir, name)
    tmp = tempfile.mkdtemp(prefix=f".tmp-{name}-{socket.gethostname()}-{os.getpid()}-", dir=cache_dir)
    try:
        t0 = time.perf_counter()
        docs, summary = load_embedded_corpus()
        tok = MegatronTokenizer(train_bpe_tokenizer(docs, vocab_size, progress=progress))
        prefix, tok_path, _ = _default_paths(tmp)
        tok.save(tok_path)
        result = write_documents(docs, prefix, tok, progress=progress)
        files = sorted(os.listdir(tmp))
        manifest = {
            "key": key,
            "corpus": {"docs": summary.docs, "chars": summary.chars, "sha256": summary.sha256},
            "tokens": result.tokens,
            "tokenizer_sha256": tok.sha256,
            "build_seconds": round(time.perf_counter() - t0, 2),
            "files": {f: os.path.getsize(os.path.join(tmp, f)) for f in files},
        }
        with open(os.path.join(tmp, _MANIFEST), "w") as f:
            json.dump(manifest, f, indent=1)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700; other users on a shared FS must read it
        if os.path.exists(final):  # incomplete or stale: move aside, then take its place
            trash = tempfile.mkdtemp(prefix=f".trash-{name}-", dir=cache_dir)
            os.replace(final, os.path.join(trash, "old"))
            shutil.rmtree(trash, ignore_errors=True)
        try:
            os.rename(tmp, final)
        except OSError:  # lost a race: a concurrent caller renamed a complete dir first
            if (done := _load_if_complete(final, key)) is None:
                raise
            shutil.rmtree(tmp, ignore_errors=True)
            return done
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    done = _load_if_complete(final, key)
    assert done is not None, f"default corpus at {final} is incomplete right after building it"
    return done
