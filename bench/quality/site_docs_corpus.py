"""Write the docstrings of installed Python packages as a .jsonl corpus (real technical English prose).

    python bench/quality/site_docs_corpus.py OUT.jsonl [--packages torch scipy ...] [--max-mb 60]

For quality comparisons on machines without network: the embedded stdlib corpus (~0.6M tokens) is too small
for 8k-token training, while the docstrings of a scientific Python install are tens of MB. Source files are
parsed with ``ast`` (never imported), as the embedded corpus does.
"""
import argparse
import json
import os
import site
import sys

from phsa_train.data.corpus import _docstrings

DEFAULT = ["torch", "scipy", "numpy", "sklearn", "transformers", "sympy", "pandas", "jax", "matplotlib",
           "networkx", "statsmodels", "skimage", "xarray", "flax", "optax", "accelerate", "lightning"]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    ap.add_argument("--packages", nargs="*", default=DEFAULT)
    ap.add_argument("--max-mb", type=float, default=60)
    ap.add_argument("--min-chars", type=int, default=200)
    args = ap.parse_args()
    roots = [p for p in site.getsitepackages() + [site.getusersitepackages()] if os.path.isdir(p)]
    seen, n_docs, n_chars = set(), 0, 0
    with open(args.out, "w") as out:
        for pkg in args.packages:
            base = next((os.path.join(r, pkg) for r in roots if os.path.isdir(os.path.join(r, pkg))), None)
            if base is None:
                continue
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
                            out.write(json.dumps({"text": doc}) + "\n")
                            n_docs, n_chars = n_docs + 1, n_chars + len(doc)
                if n_chars > args.max_mb * 1e6:
                    break
            print(f"[corpus] after {pkg}: {n_docs} docs, {n_chars / 1e6:.1f} MB", file=sys.stderr, flush=True)
            if n_chars > args.max_mb * 1e6:
                break


if __name__ == "__main__":
    main()
