"""Write the docstrings of installed Python packages as a .jsonl corpus (technical English with code examples).

    python bench/quality/site_docs_corpus.py OUT.jsonl [--packages torch scipy ...] [--max-mb 60]
        [--stats OUT_stats.json]

For quality comparisons on machines without network: the embedded stdlib corpus (~0.6M tokens) is too small
for 8k-token training, while the docstrings of a scientific Python install are tens of MB. Source files are
parsed with ``ast`` (never imported), as the embedded corpus does. Rows are ``{"text", "source"}`` with the
package as the source; ``--stats`` writes per package the documents, characters and the share of code-like lines
(``prose_corpus.is_code_line``: ``>>>`` examples, indented blocks, symbol-dense lines), the same fields
``prose_corpus.py --stats`` writes, so ``corpus_stats.py`` reports both corpora alike.
"""
import argparse
import json
import os
import site
import sys

from phsa_train.data.corpus import _docstrings
from prose_corpus import is_code_line  # this script's directory is on sys.path when it runs

# Study 1's packages first (its corpus on the GPU image: torch, scipy, numpy, sklearn, transformers, sympy at
# 20 MB), then what this project's own CPU venv adds, so that the corpus reaches the prose corpus's size (~22 MB)
# on a machine without scipy / sklearn. Packages that are not installed are skipped.
DEFAULT = ["torch", "scipy", "numpy", "sklearn", "transformers", "sympy", "pandas", "jax", "matplotlib",
           "networkx", "statsmodels", "skimage", "xarray", "flax", "optax", "accelerate", "lightning",
           "megatron", "deepspeed", "wandb", "pydantic", "triton", "huggingface_hub", "PIL", "fontTools", "mpmath",
           "pygments", "rich", "setuptools", "pip", "_pytest", "jinja2", "click"]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    ap.add_argument("--packages", nargs="*", default=DEFAULT)
    ap.add_argument("--max-mb", type=float, default=60)
    ap.add_argument("--min-chars", type=int, default=200)
    ap.add_argument("--stats", help="write per-package statistics (JSON) here")
    ap.add_argument("--roots", nargs="*", help="site-packages folders to search (default: this interpreter's)")
    args = ap.parse_args(argv)
    roots = args.roots or [p for p in site.getsitepackages() + [site.getusersitepackages()] if os.path.isdir(p)]
    seen, stats, n_chars = set(), {}, 0
    with open(args.out, "w") as out:
        for pkg in args.packages:
            base = next((os.path.join(r, pkg) for r in roots if os.path.isdir(os.path.join(r, pkg))), None)
            if base is None:
                continue
            st = stats[pkg] = {"docs": 0, "chars": 0, "code_lines": 0, "lines": 0}
            for dirpath, dirnames, filenames in os.walk(base):
                dirnames[:] = sorted(d for d in dirnames if d not in ("tests", "test", "testing"))
                for fname in sorted(f for f in filenames if f.endswith(".py")):
                    try:
                        src = open(os.path.join(dirpath, fname), encoding="utf-8").read()
                    except (OSError, UnicodeDecodeError):
                        continue
                    for doc in _docstrings(src, fname):
                        doc = doc.strip()
                        if len(doc) >= args.min_chars and doc not in seen:
                            seen.add(doc)
                            out.write(json.dumps({"text": doc, "source": pkg}) + "\n")
                            lines = [ln for ln in doc.splitlines() if ln.strip()]
                            st["docs"], st["chars"] = st["docs"] + 1, st["chars"] + len(doc)
                            st["lines"], st["code_lines"] = st["lines"] + len(lines), st["code_lines"] + sum(
                                map(is_code_line, lines))
                            n_chars += len(doc)
                if n_chars > args.max_mb * 1e6:
                    break
            st["code_line_share"] = round(st["code_lines"] / max(1, st["lines"]), 4)
            print(f"[corpus] {pkg}: {st['docs']} docs, {st['chars'] / 1e6:.1f} MB, code lines "
                  f"{st['code_line_share']:.1%}; total {n_chars / 1e6:.1f} MB", file=sys.stderr, flush=True)
            if n_chars > args.max_mb * 1e6:
                break
    if args.stats:
        with open(args.stats, "w") as f:
            json.dump(stats, f, indent=1)


if __name__ == "__main__":
    main()
