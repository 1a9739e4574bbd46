"""Measure a prepared corpus: tokens, punctuation rate under its tokenizer, code share; per source and overall.

    python bench/quality/corpus_stats.py PREFIX [--jsonl CORPUS.jsonl --sources SOURCES.json] [--out STATS.json]

PREFIX.bin/.idx is a Megatron dataset, PREFIX_punct.json its punctuation table and PREFIX_tokenizer.json (or
--tokenizer) its tokenizer. The punctuation rate is the share of tokens whose id is in the table (the
tokens PHSA's punctuation branch pools). With --jsonl (rows {"text", "source"}), the rate is also measured
per source on up to --sample-mb of each source's text; --sources adds prose_corpus.py's code-line shares.
"""
from __future__ import annotations

import argparse
import json
from collections import defaultdict

import numpy as np


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("prefix")
    ap.add_argument("--tokenizer")
    ap.add_argument("--jsonl")
    ap.add_argument("--sources")
    ap.add_argument("--sample-mb", type=float, default=2.0)
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    from megatron.core.datasets.indexed_dataset import IndexedDataset
    from tokenizers import Tokenizer

    table = json.load(open(args.prefix + "_punct.json"))
    punct = np.zeros(table["vocab_size"] + 1, dtype=bool)
    punct[table["ids"]] = True
    ds = IndexedDataset(args.prefix)
    stream = np.memmap(args.prefix + ".bin", dtype=ds.index.dtype, mode="r")
    ids, counts = np.unique(np.asarray(stream), return_counts=True)
    n_tokens = int(counts.sum())
    ids = np.minimum(ids, table["vocab_size"])
    stats = {"documents": len(ds), "tokens": n_tokens, "bin_mib": round(stream.nbytes / 2**20, 1),
             "vocab_size": table["vocab_size"], "punct_ids": len(table["ids"]),
             "punct_rate": round(float(counts[punct[ids]].sum()) / n_tokens, 4)}
    tok = Tokenizer.from_file(args.tokenizer or args.prefix + "_tokenizer.json")
    top = sorted(zip(counts[punct[ids]].tolist(), ids[punct[ids]].tolist()), reverse=True)[:15]
    stats["top_punct_tokens"] = [[tok.decode([int(i)]), round(c / n_tokens, 4)] for c, i in top]
    if args.jsonl:
        texts = defaultdict(list)
        size = defaultdict(int)
        for line in open(args.jsonl):
            row = json.loads(line)
            s = row.get("source", "all")
            if size[s] < args.sample_mb * 1e6:
                texts[s].append(row["text"])
                size[s] += len(row["text"])
        per = {}
        for s, docs in texts.items():
            enc = tok.encode_batch(docs)
            tid = np.concatenate([np.asarray(e.ids, dtype=np.int64) for e in enc])
            per[s] = {"sampled_chars": size[s], "sampled_tokens": int(len(tid)),
                      "chars_per_token": round(size[s] / max(1, len(tid)), 2),
                      "punct_rate": round(float(punct[np.minimum(tid, table["vocab_size"])].mean()), 4)}
        if args.sources:
            for s, v in json.load(open(args.sources)).items():
                per.setdefault(s, {}).update({k: v[k] for k in ("docs", "chars", "code_line_share") if k in v})
        stats["per_source"] = per
        chars = sum(v.get("chars", 0) for v in per.values())
        if chars:
            stats["code_line_share"] = round(sum(v.get("chars", 0) * v.get("code_line_share", 0)
                                                 for v in per.values()) / chars, 4)
    text = json.dumps(stats, indent=1, ensure_ascii=False)
    if args.out:
        open(args.out, "w").write(text + "\n")
    print(text)
    return stats


if __name__ == "__main__":
    main()
