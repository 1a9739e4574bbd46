#!/usr/bin/env bash
# Quality comparison at the same model, data, steps, seed and curriculum: dense vs PHSA (lam 0.5) vs
# mean pooling (lam 1) held at >= 97% sparsity. One GPU (or CPU for a dry run). Usage:
#   bash bench/quality/run.sh OUT_DIR            env: SEQ=8192 STEPS=600 MODEL=small CORPUS_MB=20 NPROC=1
#                                                     VARIANTS="dense phsa meanpool" WORK_DIR=/tmp/phsa_quality
# Writes OUT_DIR/quality.tar.gz (runs' metrics.jsonl, eval results.json and PNGs), OUT_DIR/summary.json and
# OUT_DIR/data.tar.gz (the prepared data), all refreshed after every variant, so the comparison can be split
# over several sessions: unpack data.tar.gz and quality.tar.gz into WORK_DIR and run the missing VARIANTS.
set -euo pipefail
OUT="$(mkdir -p "$1" && cd "$1" && pwd)"; shift  # the rest: extra Hydra overrides for every run
SEQ="${SEQ:-8192}" STEPS="${STEPS:-600}" MODEL="${MODEL:-small}" CORPUS_MB="${CORPUS_MB:-20}"
export NPROC="${NPROC:-1}" PYTHONUNBUFFERED=1
W="${WORK_DIR:-/tmp/phsa_quality}"
mkdir -p "$W/runs"
PY="${PYTHON:-python3}"

[ -f "$W/rmix.idx" ] || {
  "$PY" bench/quality/site_docs_corpus.py "$W/docs.jsonl" --max-mb "$CORPUS_MB"
  "$PY" -m data_prep --input "$W/docs.jsonl" --tokenizer train --vocab-size 16384 --output-prefix "$W/corpus" \
      --workers 8 --no-progress
  "$PY" -m data_prep retrieval-mix --base-prefix "$W/corpus" --output-prefix "$W/rmix" --share 0.05 \
      --seq-len "$SEQ" --seed 1234 --tokenizer "$W/corpus_tokenizer.json"
}
DATA=(data=megatron_bin "data.prefixes=[$W/rmix]" "data.tokenizer=$W/corpus_tokenizer.json")
COMMON=(model="$MODEL" data.seq_len="$SEQ" train.steps="$STEPS" train.global_batch_size=4
        train.micro_batch_size=1 train.warmup_steps=50 train.lr=1e-3 train.min_lr=1e-4 train.seed=1234
        train.eval_interval=$((STEPS / 4)) train.eval_iters=4 train.log_interval=25 checkpoint.interval="$STEPS"
        logging=stdout)
# The curriculum: dense warm-up (1/6), linear ramp (1/3), hold at k=2 for the rest; evaluated at k=4.
# At 8192 tokens: (16 + 128 + 2*16) / 8192 = 2.1% active = 97.9% sparsity during the hold (k=4: 97.5%).
SPARSE=(attention.block_size=16 attention.n_init=16 attention.local_window=128 attention.query_block=64 curriculum=linear
        curriculum.warmup_steps=$((STEPS / 6)) curriculum.ramp_steps=$((STEPS / 3)) curriculum.target_activation=null
        curriculum.target_topk=2 attention.eval_topk=4 curriculum.stats_interval=$((STEPS / 6)))
summarize() {
"$PY" - "$W" "$OUT" <<'PYEOF'
import json, sys, pathlib
w, out = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
summary = {}
for v in ("dense", "phsa", "meanpool"):
    if not (w / "runs" / v / "eval" / "results.json").exists():
        continue
    res = json.loads((w / "runs" / v / "eval" / "results.json").read_text())
    rows = [json.loads(l) for l in (w / "runs" / v / "metrics.jsonl").read_text().splitlines() if l.strip()]
    tps = [r["perf/tokens_per_sec"] for r in rows if "perf/tokens_per_sec" in r]
    summary[v] = {"final_valid_loss": [r["valid/loss"] for r in rows if "valid/loss" in r][-1],
                  "median_tokens_per_s": sorted(tps)[len(tps) // 2] if tps else None,
                  "perplexity": res.get("perplexity"), "recall": res.get("recall"),
                  "retrieval": res.get("retrieval")}
(out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
print(json.dumps({v: {"valid": s["final_valid_loss"], "tok/s": s["median_tokens_per_s"]} for v, s in summary.items()}))
PYEOF
tar -czf "$OUT/quality.tar.gz" -C "$W" --exclude='checkpoints' --exclude='*.jsonl.idx' runs
}
tar -czf "$OUT/data.tar.gz" -C "$W" corpus_tokenizer.json $(cd "$W" && ls rmix*)
for v in ${VARIANTS:-dense phsa meanpool}; do
  extra=()
  [ "$v" != dense ] && extra=("${SPARSE[@]}")
  start=$(date +%s)
  PHSA_RUN_DIR="$W/runs/$v" bash launch/pretrain.sh "${COMMON[@]}" "${DATA[@]}" attention="$v" "${extra[@]}" "$@" \
      2>&1 | grep -v -i "warn" | tee "$W/runs/$v.log" | grep -E "step .*(valid|/$STEPS)|saved|error" || true
  echo "[quality] $v trained in $(( $(date +%s) - start )) s"
  "$PY" -m phsa_train.eval eval.checkpoint="$W/runs/$v/checkpoints" eval.topks=[1,2,4,8] \
      eval.retrieval.samples="${RETRIEVAL_SAMPLES:-8}" eval.output_dir="$W/runs/$v/eval" 2>&1 \
      | grep -v -i "warn" | tail -4
  summarize
done
