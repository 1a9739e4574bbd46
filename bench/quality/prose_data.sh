#!/usr/bin/env bash
# Build a quality study's data on any machine (CPU is enough, no network): a local corpus -> byte-level BPE 16384
# -> Megatron .bin/.idx + punctuation table -> a share of key-value retrieval documents (facts written as
# sentences into the text, asked for at the end) -> DATA_DIR/stats.json (size in tokens, punctuation rate, code
# share per source).
#   bash bench/quality/prose_data.sh DATA_DIR
#     env: CORPUS=prose (English prose, bench/quality/prose_corpus.py) | site_docs (the code-heavy column:
#            docstrings of installed packages, bench/quality/site_docs_corpus.py; bench/quality/code_data.sh)
#          MAX_MB=400 SHARE=0.3 SEQ=8192 MIN_LEN=SEQ/16 MAX_LEN=SEQ/4 VOCAB=16384 WORKERS=2
#          FACT_EVERY=0 (>0: one fact per that many tokens of a retrieval document, all asked at its end)
#          PURE_TAIL=0 (>0: that share of documents at the end stays pure prose: the valid/test split)
# The retrieval-learning recipe (a budget where dense learns to retrieve; see docs/results.md):
#   SHARE=0.5 MIN_LEN=1024 MAX_LEN=8192 FACT_EVERY=256 PURE_TAIL=0.06 bash bench/quality/prose_data.sh DIR
# Retrieval documents of 512-2048 tokens: many short ones give a small model more answers to learn from in a
# short run; the evaluation then also asks at 4096 and 8192 tokens (longer distances than trained).
# DATA_DIR then holds everything bench/quality/gpu_x4.sh needs (rmix.bin/.idx, rmix_punct.json,
# prose_tokenizer.json, stats.json); the .jsonl and the base .bin are removed to keep it small. The file names
# are the same for either corpus (gpu_x4.sh and copy_test.sh read prose_tokenizer.json).
set -euo pipefail
PY="${PYTHON:-python3}" CORPUS="${CORPUS:-prose}"
case "$CORPUS" in
  prose) EXTRACT=bench/quality/prose_corpus.py ;;
  site_docs) EXTRACT=bench/quality/site_docs_corpus.py ;;
  *) echo "CORPUS=$CORPUS: must be prose (English prose) or site_docs (docstrings of installed packages)"; exit 2 ;;
esac
D="$(mkdir -p "$1" && cd "$1" && pwd)"
MAX_MB="${MAX_MB:-400}" SHARE="${SHARE:-0.3}" SEQ="${SEQ:-8192}"; MIN_LEN="${MIN_LEN:-$((SEQ / 16))}" MAX_LEN="${MAX_LEN:-$((SEQ / 4))}" VOCAB="${VOCAB:-16384}" WORKERS="${WORKERS:-2}"
FACT_EVERY="${FACT_EVERY:-0}" PURE_TAIL="${PURE_TAIL:-0}"
"$PY" "$EXTRACT" "$D/prose.jsonl" --max-mb "$MAX_MB" --stats "$D/sources.json"
"$PY" -m data_prep --input "$D/prose.jsonl" --tokenizer train --vocab-size "$VOCAB" --output-prefix "$D/prose" \
    --workers "$WORKERS" --no-progress
"$PY" bench/quality/corpus_stats.py "$D/prose" --jsonl "$D/prose.jsonl" --sources "$D/sources.json" \
    --out "$D/stats.json"
"$PY" -m data_prep retrieval-mix --base-prefix "$D/prose" --output-prefix "$D/rmix" --share "$SHARE" \
    --min-len "$MIN_LEN" --max-len "$MAX_LEN" --seq-len "$SEQ" --kind kv --seed 1234 --tokenizer "$D/prose_tokenizer.json" \
    --fact-every "$FACT_EVERY" --pure-tail "$PURE_TAIL"
rm -f "$D/prose.jsonl" "$D/prose.bin" "$D/prose.idx" "$D"/*.tsv
du -sh "$D"
