"""The copy curriculum's training data: prose, exact-repeat documents and key-value fact documents.

A model that cannot copy from its context cannot show whether a selection rule finds the right block: study 4's
dense model, trained on 50 % fact documents for 27.5M tokens, never copied (the answer's log-prob was the same with
the fact right before the question as with no fact at all). Exact repeats teach copying ("induction heads") in far
fewer tokens than facts do, because every token of a repeated span after its first one or two is predictable only
by copying, where a fact document has 2-3 such tokens per ~256. So the mix here has three kinds of documents,
EOD-separated, shuffled among each other:

  prose   the base corpus's documents, unchanged;
  repeat  a prose slice with ``--repeats-every`` spacing of repeated spans: span i (16-64 tokens; i.i.d. tokens
          drawn from the corpus's unigram distribution with probability ``--random-share``, else a slice of other
          prose) is written at two uniformly random places of the document, so the distance between its two copies
          runs from 0 to the document length, mostly beyond a 128-token local window;
  kv      the evaluation's fact format (phsa_train/evaluation/retrieval.py): ``' The value of key "amber-falcon" is
          48213.'`` written into prose, one per ``--fact-every`` tokens, every one asked at the end of the document.

The last ``--pure-tail`` of the documents is base prose only (no planted document before it, no haystack or span
cut from it): with ``data.split=949,50,1`` validation and the evaluation's haystacks are prose never trained on.

    python bench/quality/copy_data.py --base-prefix BASE/prose --tokenizer TOK.json --output-prefix DIR/cmix \\
        [--repeat-share 0.35 --kv-share 0.25 --min-len 256 --max-len 2048 --pure-tail 0.06 --seed 1234]

Writes DIR/cmix.bin/.idx, DIR/cmix_punct.json and DIR/cmix_stats.json (document and token counts per kind).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

SPAN = (16, 64)  # tokens of one repeated span


def repeat_document(hay: np.ndarray, spans: list[np.ndarray], rng: np.random.Generator) -> np.ndarray:
    """``hay`` [n] with every span of ``spans`` inserted twice, at two uniformly random places (sorted)."""
    cuts = []
    for i, s in enumerate(spans):
        a, b = np.sort(rng.integers(0, len(hay) + 1, 2))
        cuts += [(int(a), 2 * i, s), (int(b), 2 * i + 1, s)]
    cuts.sort(key=lambda c: (c[0], c[1]))  # the first copy of a span always precedes its second
    parts, prev = [], 0
    for p, _, s in cuts:
        parts += [hay[prev:p], s]
        prev = p
    parts.append(hay[prev:])
    return np.concatenate([np.asarray(x, dtype=np.int64) for x in parts])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base-prefix", required=True, help="prepared prose P.bin/P.idx")
    p.add_argument("--tokenizer", required=True, help="the tokenizer of the base prose (tokenizer.json)")
    p.add_argument("--output-prefix", required=True)
    p.add_argument("--repeat-share", type=float, default=0.35, help="share of output tokens in repeat documents")
    p.add_argument("--kv-share", type=float, default=0.25, help="share of output tokens in kv fact documents")
    p.add_argument("--min-len", type=int, default=256, help="shortest planted document (tokens)")
    p.add_argument("--max-len", type=int, default=2048, help="longest planted document (<= the training seq_len)")
    p.add_argument("--repeats-every", type=int, default=128, help="one repeated span per this many tokens")
    p.add_argument("--random-share", type=float, default=0.5, help="share of spans that are i.i.d. tokens")
    p.add_argument("--fact-every", type=int, default=256, help="one fact per this many tokens of a kv document")
    p.add_argument("--pure-tail", type=float, default=0.06, help="last share of documents kept pure prose")
    p.add_argument("--base-tokens", type=int, default=0, help="use only the first N base tokens (toy data; 0: all)")
    p.add_argument("--seed", type=int, default=1234)
    a = p.parse_args(argv)
    for name in ("repeat_share", "kv_share"):
        if not 0.0 <= getattr(a, name) < 1.0:
            sys.exit(f"copy_data.py: --{name.replace('_', '-')}={getattr(a, name)} must be in [0, 1)")
    if a.repeat_share + a.kv_share >= 1.0:
        sys.exit(f"copy_data.py: --repeat-share + --kv-share = {a.repeat_share + a.kv_share} must be < 1")
    if not 2 * SPAN[1] <= a.min_len <= a.max_len:
        sys.exit(f"copy_data.py: --min-len={a.min_len} --max-len={a.max_len}: need {2 * SPAN[1]} <= min <= max")

    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from phsa_train.data import MegatronTokenizer, build_punct_table, write_punct_table
    from phsa_train.data.prepare import atomic_indexed_dataset
    from phsa_train.evaluation.retrieval import distinct_facts, haystack_slice, make_multi_fact_document

    tok = MegatronTokenizer(a.tokenizer)
    base = IndexedDataset(a.base_prefix)
    lens = np.asarray(base.index.sequence_lengths, dtype=np.int64)
    n_base = len(base) if not a.base_tokens else int(np.searchsorted(np.cumsum(lens), a.base_tokens) + 1)
    n_base = min(n_base, len(base))
    base_tokens = int(lens[:n_base].sum())
    rng = np.random.default_rng(a.seed)
    mean_len = (a.min_len + a.max_len) / 2
    prose_share = 1.0 - a.repeat_share - a.kv_share
    n_rep = int(round(a.repeat_share / prose_share * base_tokens / mean_len))
    n_kv = int(round(a.kv_share / prose_share * base_tokens / mean_len))
    n_tail = int(np.ceil(a.pure_tail * (n_base + n_rep + n_kv)))
    if n_tail >= n_base:
        sys.exit(f"copy_data.py: --pure-tail={a.pure_tail} leaves no base text for the planted documents")
    stream = np.memmap(a.base_prefix + ".bin", dtype=base.index.dtype, mode="r")
    source = np.asarray(stream[:int(lens[:n_base - n_tail].sum())], dtype=np.int64)
    unigram = source[source != tok.eod]  # i.i.d. draws from it follow the corpus's unigram distribution
    kinds = rng.permutation(np.array(["repeat"] * n_rep + ["kv"] * n_kv))
    slots = np.sort(rng.integers(0, n_base - n_tail + 1, len(kinds)))

    counts = {"prose": [0, 0], "repeat": [0, 0], "kv": [0, 0]}
    spans = facts = 0
    j = 0
    with atomic_indexed_dataset(a.output_prefix, base.index.dtype) as builder:
        for i in range(n_base + 1):
            while j < len(kinds) and slots[j] == i:
                length = int(rng.integers(a.min_len, a.max_len + 1))
                if kinds[j] == "repeat":
                    span_lens = rng.integers(SPAN[0], min(SPAN[1], length // 4) + 1, max(1, length // a.repeats_every))
                    span_lens = span_lens[np.cumsum(2 * span_lens) <= length // 2]  # at least half is prose
                    sp = [unigram[rng.integers(0, len(unigram), n)] if rng.random() < a.random_share
                          else haystack_slice(source, int(n), rng) for n in span_lens]
                    hay = haystack_slice(source, length - 2 * int(span_lens.sum()), rng)
                    doc = repeat_document(hay, sp, rng)
                    spans += len(sp)
                else:
                    fs = distinct_facts(rng, tok, "kv", 5, max(1, length // a.fact_every))
                    hay = haystack_slice(source, length - sum(f.overhead for f in fs), rng)
                    doc = make_multi_fact_document(hay, fs, rng)
                    facts += len(fs)
                doc = np.append(doc, tok.eod)
                builder.add_document(doc, [len(doc)])
                counts[str(kinds[j])][0] += 1
                counts[str(kinds[j])][1] += len(doc)
                j += 1
            if i < n_base:
                doc = base[i]
                builder.add_document(doc, [len(doc)])
                counts["prose"][0] += 1
                counts["prose"][1] += len(doc)
    punct = write_punct_table(build_punct_table(tok, "en"), a.output_prefix, tok)
    total = sum(t for _, t in counts.values())
    stats = {"args": vars(a), "tokens": total, "pure_tail_documents": n_tail, "repeated_spans": spans,
             "facts": facts, **{k: {"documents": d, "tokens": t, "share": round(t / total, 4)}
                                for k, (d, t) in counts.items()}}
    with open(a.output_prefix + "_stats.json", "w") as f:
        json.dump(stats, f, indent=1)
    print(f"wrote {a.output_prefix}.bin/.idx ({total} tokens: " + ", ".join(
        f"{k} {d} docs {t / total:.1%}" for k, (d, t) in counts.items()) + f"; {spans} spans, {facts} facts), {punct}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
