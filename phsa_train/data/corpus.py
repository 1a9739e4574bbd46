"""Embedded default corpus: English documentation prose that ships with every CPython install.

Why this source: the no-network default needs real sentences with real punctuation (PHSA's anchors are
punctuation tokens), and it must exist on any machine without downloads. The standard library's
docstrings plus ``pydoc_data/topics.py`` (the language-reference text that ``help()`` prints) give about
2.5 MB of such prose on CPython 3.11.

Nothing is imported: ``.py`` files are parsed with :mod:`ast`, so module import side effects never run.
The walk is sorted, so the result is deterministic for a given Python version (the stdlib text changes
between versions, which is why :class:`CorpusSummary` records ``python_version`` and a content hash).
"""
from __future__ import annotations

import ast
import hashlib
import os
import sys
import sysconfig
from dataclasses import dataclass

# Test suites are mostly code and fixtures, not prose; __pycache__ holds no sources.
_SKIP_DIRS = frozenset({"test", "tests", "idle_test", "__pycache__", "site-packages", "dist-packages"})
_DOC_NODES = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)


@dataclass(frozen=True)
class CorpusSummary:
    """What :func:`load_embedded_corpus` returned: document count, characters, and a content hash."""

    docs: int
    chars: int
    sha256: str  # over the documents joined with "\0": changes iff the corpus text changes
    python_version: str
    stdlib_dir: str


def stdlib_dir() -> str:
    """The directory holding the pure-Python standard library (the base install, also inside a venv)."""
    path = sysconfig.get_paths().get("stdlib") or os.path.dirname(os.__file__)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"standard library directory not found: {path}")
    return path


def _stdlib_files(root: str) -> list[str]:
    """Sorted .py/.rst/.txt files of stdlib top-level modules (names in sys.stdlib_module_names)."""
    files: list[str] = []
    for top in sorted(os.listdir(root)):
        name = top[:-3] if top.endswith(".py") else top
        if name not in sys.stdlib_module_names or name in _SKIP_DIRS:
            continue
        path = os.path.join(root, top)
        if os.path.isfile(path):
            files.append(path)
            continue
        for dirpath, dirnames, filenames in os.walk(path):
            dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)  # sorted: deterministic walk
            for fname in sorted(filenames):
                if fname.endswith((".py", ".rst", ".txt")) and "Grammar" not in fname:  # grammars aren't prose
                    files.append(os.path.join(dirpath, fname))
    return files


def _docstrings(source: str, path: str) -> list[str]:
    """Module/class/function docstrings of one source file, in ast.walk order, plus pydoc topics."""
    try:
        tree = ast.parse(source, filename=path)
    except (SyntaxError, ValueError):
        return []
    out = [d for node in ast.walk(tree) if isinstance(node, _DOC_NODES) if (d := ast.get_docstring(node))]
    if path.endswith(os.path.join("pydoc_data", "topics.py")):
        # `topics = {name: text}`: the reference manual as plain text; literal_eval never executes code.
        for node in tree.body:
            if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "topics" for t in node.targets):
                topics = ast.literal_eval(node.value)
                out.extend(topics[k] for k in sorted(topics))
    return out


def load_embedded_corpus(min_chars: int = 64) -> tuple[list[str], CorpusSummary]:
    """Collect the embedded corpus.

    Args:
        min_chars: documents shorter than this (after stripping) are dropped; most are one-liners such
            as "Return self+value." that add little prose and many near-duplicates.

    Returns:
        (docs, summary): ``docs`` is a list[str], one document per docstring / pydoc topic / doc file,
        exact duplicates removed, in a deterministic order; ``summary`` a :class:`CorpusSummary`.
    """
    root = stdlib_dir()
    docs: list[str] = []
    seen: set[str] = set()
    for path in _stdlib_files(root):
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError):
            continue
        candidates = _docstrings(text, path) if path.endswith(".py") else [text]
        for doc in candidates:
            doc = doc.strip()
            if len(doc) >= min_chars and doc not in seen:
                seen.add(doc)
                docs.append(doc)
    if not docs:
        raise RuntimeError(f"embedded corpus is empty: no documentation text found under {root}")
    digest = hashlib.sha256("\0".join(docs).encode("utf-8")).hexdigest()
    summary = CorpusSummary(
        docs=len(docs),
        chars=sum(len(d) for d in docs),
        sha256=digest,
        python_version=".".join(map(str, sys.version_info[:3])),
        stdlib_dir=root,
    )
    return docs, summary
