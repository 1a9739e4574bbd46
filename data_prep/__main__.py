"""CLI for phsa_train.data: ``python -m data_prep --help``.

Heavy imports (megatron, torch) happen after argument parsing so ``--help`` and usage errors are instant.
"""
from __future__ import annotations

import argparse
import os
import sys

PROG = "python -m data_prep"
EPILOG = f"""\
other commands:
  {PROG} punct --tokenizer PATH --output-prefix P [--punct-charset en|en_zh] [--include-newline]
      write only the punctuation table P_punct.json (+ P_punct.tsv for review)
  {PROG} embedded --cache-dir DIR [--vocab-size 4096]
      build the embedded default corpus (stdlib docs) + tokenizer + punct table into DIR
  {PROG} retrieval-mix --base-prefix P --output-prefix Q --share 0.05 --seq-len 8192 [--tokenizer PATH]
      copy P to Q with planted-fact retrieval documents (phsa_train/evaluation/retrieval.py) mixed in

examples:
  {PROG} --input a.txt b.txt --output-prefix data/mix --tokenizer train --vocab-size 8192
  {PROG} --input shard.jsonl --json-key text --output-prefix data/shard --tokenizer tok/tokenizer.json
  {PROG} --hf-dataset wikitext --hf-split train --output-prefix data/wt --tokenizer gpt2   (needs network)

outputs: P.bin, P.idx (megatron-core IndexedDataset, EOD after every document), P_punct.json/.tsv,
and P_tokenizer.json when --tokenizer train.
"""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2 (argparse prints the whole usage block otherwise)
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _main_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description="Tokenize local files or a Hugging Face dataset into megatron-core .bin/.idx plus a punctuation table.", epilog=EPILOG,
                formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--input", nargs="+", metavar="FILE", help=".txt (one doc per file) or .jsonl (one doc per line), .gz ok")
    src.add_argument("--hf-dataset", metavar="NAME", help="Hugging Face dataset name (needs `datasets` and network)")
    p.add_argument("--hf-split", default="train", help="split of --hf-dataset (default: train)")
    p.add_argument("--output-prefix", required=True, metavar="P", help="writes P.bin, P.idx, P_punct.json")
    p.add_argument("--tokenizer", required=True, metavar="PATH|HUBNAME|train",
                   help="tokenizer.json, a directory with one, a hub name, or `train` (byte-level BPE on the input)")
    p.add_argument("--vocab-size", type=int, default=4096, help="vocab size for --tokenizer train (default: 4096)")
    p.add_argument("--json-key", default="text", help="text field of .jsonl rows / dataset rows (default: text)")
    p.add_argument("--split-docs", choices=["file", "paragraph", "line"], default=None,
                   help=".txt documents: whole file (default), blank-line paragraphs, or lines")
    p.add_argument("--no-eod", action="store_true", help="do not append EOD after each document")
    p.add_argument("--punct-charset", choices=["en", "en_zh"], default="en", help="punctuation table charset")
    p.add_argument("--workers", type=int, default=1, help="tokenizer processes (default: 1)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _punct_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=f"{PROG} punct", description="Write only the punctuation-id table for a tokenizer.")
    p.add_argument("--tokenizer", required=True, metavar="PATH|HUBNAME")
    p.add_argument("--output-prefix", required=True, metavar="P", help="writes P_punct.json and P_punct.tsv")
    p.add_argument("--punct-charset", choices=["en", "en_zh"], default="en")
    p.add_argument("--include-newline", action="store_true", help="also mark newline-only tokens")
    return p


def _embedded_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=f"{PROG} embedded", description="Build the embedded default corpus into a cache dir.")
    p.add_argument("--cache-dir", required=True)
    p.add_argument("--vocab-size", type=int, default=4096)
    return p


def _mix_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=f"{PROG} retrieval-mix", description="Copy a prepared dataset with a share of synthetic "
                "retrieval documents (real corpus text, a fact planted at a random depth, the query at the end).")
    p.add_argument("--base-prefix", required=True, metavar="P", help="prepared dataset P.bin/P.idx")
    p.add_argument("--output-prefix", required=True, metavar="Q", help="writes Q.bin, Q.idx, Q_punct.json")
    p.add_argument("--tokenizer", metavar="PATH", help="the tokenizer of P (default: P_tokenizer.json, else "
                   "tokenizer.json beside P)")
    p.add_argument("--share", type=float, default=0.05, help="share of output tokens in retrieval documents")
    p.add_argument("--seq-len", type=int, default=8192, help="training sequence length (sets the default lengths)")
    p.add_argument("--min-len", type=int, default=None, help="shortest retrieval document (default: max(seq-len/16, 128))")
    p.add_argument("--max-len", type=int, default=None, help="longest retrieval document (default: seq-len/2)")
    p.add_argument("--kind", choices=["passkey", "kv"], default="passkey")
    p.add_argument("--value-digits", type=int, default=5)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--drop-haystack-eod", action="store_true",
                   help="no EOD inside a retrieval document (for data.reset_attention_mask=true training)")
    p.add_argument("--punct-charset", choices=["en", "en_zh"], default="en")
    p.add_argument("--fact-every", type=int, default=0, metavar="T", help="one fact per T tokens of a retrieval "
                   "document, all asked at its end (default 0: one fact per document)")
    p.add_argument("--pure-tail", type=float, default=0.0, metavar="F", help="keep the last F of the output's "
                   "documents pure base text (no retrieval document, no haystack source), so a data.split with "
                   "valid + test <= F validates on unseen text (default 0)")
    return p


def _check_writable(prefix: str) -> None:
    """The output directory exists (or can be made) and takes new files: probe with a real file, since
    permission bits alone do not say it (root, read-only mounts, ACLs)."""
    import tempfile

    out_dir = os.path.dirname(os.path.abspath(prefix))
    try:
        os.makedirs(out_dir, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out_dir, prefix=".write-test-"):
            pass
    except OSError as e:
        raise ValueError(f"--output-prefix {prefix}: cannot write to {out_dir} ({e.strerror})") from e


def _run(argv: list[str]) -> None:
    if argv[:1] == ["retrieval-mix"]:
        args = _mix_parser().parse_args(argv[1:])
        from phsa_train.evaluation.retrieval import write_retrieval_mix

        from phsa_train.config.data_files import tokenizer_beside

        tok = args.tokenizer or tokenizer_beside(args.base_prefix)
        if tok is None:
            raise FileNotFoundError(f"--tokenizer: none given and no tokenizer beside {args.base_prefix}")
        r = write_retrieval_mix(args.base_prefix, args.output_prefix, tok, share=args.share, seq_len=args.seq_len,
                                min_len=args.min_len, max_len=args.max_len, kind=args.kind,
                                value_digits=args.value_digits, seed=args.seed,
                                drop_haystack_eod=args.drop_haystack_eod, punct_charset=args.punct_charset,
                                fact_every=args.fact_every, pure_tail=args.pure_tail)
        print(f"wrote {r.prefix}.bin/.idx: {r.base_docs} base + {r.planted_docs} retrieval documents, {r.tokens} "
              f"tokens ({r.planted_tokens / r.tokens:.1%} retrieval); {r.punct_path}; train with "
              f"data.prefixes=[{r.prefix}] data.tokenizer={os.path.abspath(tok)}")
        return

    if argv[:1] == ["punct"]:
        args = _punct_parser().parse_args(argv[1:])
        from phsa_train.data import MegatronTokenizer, build_punct_table, write_punct_table

        tok = MegatronTokenizer(args.tokenizer)
        table = build_punct_table(tok, args.punct_charset, args.include_newline)
        path = write_punct_table(table, args.output_prefix, tok)
        print(f"wrote {path}: {len(table['ids'])} punctuation ids of {table['vocab_size']}")
        return
    if argv[:1] == ["embedded"]:
        args = _embedded_parser().parse_args(argv[1:])
        from phsa_train.data import prepare_default_corpus

        r = prepare_default_corpus(args.cache_dir, args.vocab_size, progress=True)
        print(f"prefix={r.prefix} tokenizer={r.tokenizer_path} punct={r.punct_path}")
        return
    args = _main_parser().parse_args(argv)
    if args.workers < 1:
        raise ValueError(f"--workers={args.workers}: must be >= 1")
    from phsa_train.data import MegatronTokenizer, hf_documents, prepare, read_documents, train_bpe_tokenizer

    _check_writable(args.output_prefix)  # before minutes of tokenizer training, not after
    if args.tokenizer == "train":
        if args.input:
            for path in args.input:
                if not os.path.isfile(path):
                    raise FileNotFoundError(f"--input: no such file: {path}")
            docs = read_documents(args.input, args.json_key, args.split_docs)
        else:
            docs = hf_documents(args.hf_dataset, args.hf_split, args.json_key)
        tok = MegatronTokenizer(train_bpe_tokenizer(docs, args.vocab_size, progress=not args.no_progress))
        os.makedirs(os.path.dirname(os.path.abspath(args.output_prefix)), exist_ok=True)
        from phsa_train.config.data_files import tokenizer_file

        tok.save(tokenizer_file(args.output_prefix))
    else:
        tok = MegatronTokenizer(args.tokenizer)
    r = prepare(args.input or [], args.output_prefix, tok, json_key=args.json_key, append_eod=not args.no_eod,
                split_docs=args.split_docs, workers=args.workers, progress=not args.no_progress,
                hf_dataset=args.hf_dataset, hf_split=args.hf_split, punct_charset=args.punct_charset)
    print(f"wrote {r.prefix}.bin/.idx: {r.docs} documents, {r.tokens} tokens; {r.punct_path}")


def main(argv: list[str] | None = None) -> int:
    try:
        _run(sys.argv[1:] if argv is None else argv)
    except (ValueError, FileNotFoundError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # e.g. the disk filled up mid-write: the file and the reason, no traceback
        print(f"{PROG}: error: {e.filename or ''}: {e.strerror or e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
