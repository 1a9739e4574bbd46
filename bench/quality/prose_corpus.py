"""English prose that every machine here has without network, as a .jsonl corpus, with per-source measurements.

    python bench/quality/prose_corpus.py OUT.jsonl [--sources man info doc pkgmeta pydoc] [--max-mb 80]
        [--stats OUT_stats.json]

Sources (all local files, read as text, never executed):
  man      /usr/share/man/man[1-8] English pages, roff markup stripped
  info     /usr/share/info GNU manuals (already plain text)
  doc      /usr/share/doc: copyright/licence texts, README / NEWS / .txt / .md / .rst
  pkgmeta  long descriptions of installed Python distributions (``*.dist-info/METADATA`` bodies)
  pydoc    the Python language reference topics (``pydoc_data.topics``)

By default only the paragraphs made of sentences are kept (``--keep prose``, :func:`is_prose_paragraph`):
option lists, synopses, tables, code and licence boilerplate in capitals go. Each document is deduplicated by
content. ``--stats`` writes per source: documents, characters and the share
of lines that look like code (:func:`is_code_line`), the number the quality study reports beside the tokenizer's
punctuation rate (``bench/quality/corpus_stats.py``).
"""
from __future__ import annotations

import argparse
import glob
import gzip
import hashlib
import json
import os
import re
import site
import sys

SOURCES = ("man", "info", "doc", "pkgmeta", "pydoc")
_CODE_CHARS = set("{}[]()<>=;$_\\/|#*&@`~^")


def is_code_line(line: str) -> bool:
    """A heuristic for 'this line is code, a command or markup, not a sentence': indented by 4+ spaces or a
    tab, an interpreter prompt, or more than 12% of its non-space characters are code symbols."""
    s = line.strip()
    if not s:
        return False
    if line.startswith(("    ", "\t")) or s.startswith((">>>", "...", "$ ", "# ", "%")):
        return True
    chars = [c for c in s if not c.isspace()]
    return sum(c in _CODE_CHARS for c in chars) > 0.12 * len(chars)


_SENTENCE_END = re.compile(r"[a-z)\]\"'][.!?][\"')]?(\s|$)")


def is_prose_paragraph(par: str) -> bool:
    """A paragraph of sentences: no code-like line, at least 8 words, at least 80% letters and spaces, and a
    sentence end (a lower-case letter or closing quote/bracket followed by . ! or ?)."""
    lines = [ln for ln in par.splitlines() if ln.strip()]
    if not lines or any(map(is_code_line, lines)):
        return False
    s = " ".join(ln.strip() for ln in lines)
    if len(s.split()) < 8 or not _SENTENCE_END.search(s):
        return False
    return sum(c.isalpha() or c == " " for c in s) >= 0.8 * len(s)


def prose_only(text: str, seen: set[bytes]) -> str:
    """The prose paragraphs of a document (blank-line separated) not in ``seen`` (updated), in order."""
    out = []
    for par in re.split(r"\n\s*\n", text):
        par = par.strip()
        h = hashlib.sha1(" ".join(par.split()).encode()).digest()
        if h not in seen and is_prose_paragraph(par):
            seen.add(h)
            out.append(par)
    return "\n\n".join(out)


def code_share(text: str) -> float:
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return sum(map(is_code_line, lines)) / max(1, len(lines))


def _read(path: str) -> str | None:
    try:
        raw = gzip.open(path).read() if path.endswith(".gz") else open(path, "rb").read()
        return raw.decode("utf-8")
    except (OSError, UnicodeDecodeError, EOFError, gzip.BadGzipFile):
        return None


_ROFF_ESCAPES = [(re.compile(p), r) for p, r in (
    (r"\\f(\[[^\]]*\]|\(..|.)", ""), (r"\\s[-+]?\d", ""), (r"\\\((em|en)", "-"), (r"\\\((lq|rq|dq)", '"'),
    (r"\\\((oq|cq|aq)", "'"), (r"\\\(bu", "*"), (r"\\\(co", "(c)"), (r"\\\(..", ""), (r"\\\[[^\]]*\]", ""),
    (r"\\[-e]", lambda m: "-" if m.group(0) == r"\-" else "\\"), (r"\\[&|^%:!c,/]", ""), (r"\\\*\(..", ""),
    (r"\\\*.", ""), (r"\\ ", " "), (r"\\'", "'"), (r"\\`", "`"), (r"\\\.", "."))]
_KEEP_ARGS = {"SH", "SS", "TP", "IP", "B", "I", "BR", "IR", "RB", "RI", "BI", "IB", "SM", "SB", "Nm", "Nd",
              "Sh", "Ss", "It", "Fl", "Ar", "Pa", "Xr", "Dv", "Er", "Ev", "Cm", "Em", "Sy", "Li", "Ql"}


def roff_to_text(src: str) -> str:
    """Plain text of a man page: comments and layout requests dropped, font/size escapes removed, the text
    arguments of heading and font macros kept. Good enough for language-model prose, not for display."""
    out = []
    for line in src.splitlines():
        if line.startswith(('.\\"', "'\\\"", '.\\}', ".ig")):
            continue
        if line.startswith((".", "'")):
            parts = line[1:].strip().split(None, 1)
            if not parts or parts[0] not in _KEEP_ARGS or len(parts) == 1:
                if parts and parts[0] in ("SH", "SS", "PP", "P", "LP", "sp", "Pp", "Sh"):
                    out.append("")
                continue
            line = parts[1].replace('"', "") if parts[0] in ("SH", "SS", "B", "I", "BR", "IR", "RB", "RI") else parts[1]
            if parts[0] in ("SH", "Sh"):
                line = "\n" + line.title()
        for pat, rep in _ROFF_ESCAPES:
            line = pat.sub(rep, line)
        out.append(line)
    text = "\n".join(out)
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def man_docs():
    for path in sorted(glob.glob("/usr/share/man/man[1-8]/*")):
        src = _read(path)
        if src and not src.lstrip().startswith(".so "):  # .so: an alias page
            yield "man", roff_to_text(src)


def info_docs():
    for path in sorted(glob.glob("/usr/share/info/*.info*")):
        src = _read(path)
        if src:  # nodes are separated by \x1f; each node is one document
            for node in src.split("\x1f"):
                yield "info", node.strip()


_DOC_NAMES = re.compile(r"(^copyright$|^licen[cs]e|^readme|^news|^authors|\.(txt|md|rst)(\.gz)?$)", re.I)


def doc_docs():
    for root, dirs, files in os.walk("/usr/share/doc"):
        dirs.sort()
        for f in sorted(files):
            if _DOC_NAMES.search(f) and not f.lower().startswith("changelog"):
                src = _read(os.path.join(root, f))
                if src:
                    yield "doc", src


def pkgmeta_docs():
    roots = [p for p in site.getsitepackages() + [site.getusersitepackages()] if os.path.isdir(p)]
    for r in roots:
        for path in sorted(glob.glob(os.path.join(r, "*.dist-info", "METADATA"))):
            src = _read(path)
            if src and "\n\n" in src:
                yield "pkgmeta", src.split("\n\n", 1)[1]  # the body after the RFC 822 headers


def pydoc_docs():
    try:
        from pydoc_data.topics import topics
    except ImportError:
        return
    for name in sorted(topics):
        yield "pydoc", topics[name]


GENERATORS = {"man": man_docs, "info": info_docs, "doc": doc_docs, "pkgmeta": pkgmeta_docs, "pydoc": pydoc_docs}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    ap.add_argument("--sources", nargs="*", default=list(SOURCES), choices=SOURCES)
    ap.add_argument("--max-mb", type=float, default=80, help="stop after this many MB of text")
    ap.add_argument("--min-chars", type=int, default=300)
    ap.add_argument("--max-code-share", type=float, default=0.5, help="drop documents whose code share is above")
    ap.add_argument("--keep", choices=["prose", "all"], default="prose",
                    help="prose: only the paragraphs made of sentences (is_prose_paragraph); all: whole documents")
    ap.add_argument("--stats", help="write per-source statistics (JSON) here")
    args = ap.parse_args(argv)
    seen: set[bytes] = set()
    seen_paragraphs: set[bytes] = set()  # licence and template paragraphs repeat across documents
    stats = {s: {"docs": 0, "chars": 0, "code_lines": 0, "lines": 0, "dropped_code_docs": 0} for s in args.sources}
    total = 0
    with open(args.out, "w") as out:
        for source in args.sources:
            for name, text in GENERATORS[source]():
                if args.keep == "prose":
                    text = prose_only(text, seen_paragraphs)
                if len(text) < args.min_chars:
                    continue
                h = hashlib.sha1(text.encode()).digest()
                if h in seen:
                    continue
                seen.add(h)
                lines = [ln for ln in text.splitlines() if ln.strip()]
                n_code = sum(map(is_code_line, lines))
                st = stats[name]
                if n_code > args.max_code_share * max(1, len(lines)):
                    st["dropped_code_docs"] += 1
                    continue
                out.write(json.dumps({"text": text, "source": name}) + "\n")
                st["docs"] += 1
                st["chars"] += len(text)
                st["lines"] += len(lines)
                st["code_lines"] += n_code
                total += len(text)
                if total > args.max_mb * 1e6:
                    break
            s = stats[source]
            s["code_line_share"] = round(s["code_lines"] / max(1, s["lines"]), 4)
            print(f"[prose] {source}: {s['docs']} docs, {s['chars'] / 1e6:.1f} MB, code lines {s['code_line_share']:.1%}"
                  f" (dropped {s['dropped_code_docs']} code-heavy docs)", file=sys.stderr, flush=True)
            if total > args.max_mb * 1e6:
                break
    if args.stats:
        with open(args.stats, "w") as f:
            json.dump(stats, f, indent=1)


if __name__ == "__main__":
    main()
