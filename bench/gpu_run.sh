#!/bin/bash
# One-GPU device work in one call: the GPU tests, the selection sweep, the operator benchmark (config (a) as shipped
# and the opt-in softmax score, cuDNN in the same run) and the 0.6B training step (dense vs PHSA as shipped, 8k and 32k).
# GPUS picks the cards (physical ids, default 0): with two ids the training steps run on the second card beside
# the operator benchmark on the first. Results -> $OUT: bench_a.txt (cards, GPU tests, the table), bench_a.json,
# tune.jsonl, train_step.jsonl.
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."
OUT=${OUT:?set OUT to a directory}
GPUS=${GPUS:-0}
G1=${GPUS%%,*}
G2=${GPUS#*,}
PY=${PYTHON:-python3}
TMPD=$(mktemp -d /tmp/gpu_run.XXXX)
nvidia-smi --query-gpu=index,name,clocks.sm,clocks.mem,temperature.gpu --format=csv > "$TMPD/gpu.txt" 2>&1

operator() {
  export CUDA_VISIBLE_DEVICES=$G1
  timeout 150 "$PY" -m pytest -q -p no:cacheprovider tests/gpu 2>&1 | tail -25 > "$TMPD/gpu_tests.txt"
  timeout 60 "$PY" bench/tune.py --T 65536 --stages select --out "$OUT/tune.jsonl" > /dev/null 2>&1
  timeout 220 "$PY" bench/attention.py --configs a,a_softmax --T 8192,32768,65536,131072 --no-flex --baselines cudnn \
      --out "$OUT/bench_a.json" 2>&1 | grep -v "^{" > "$TMPD/bench_a.txt"
}

train_steps() {  # whole training steps: the dense-fallback threshold (8k) and the 1.9x bar (32k), shipped defaults
  export CUDA_VISIBLE_DEVICES=$G2
  local port=29711 L
  for L in 8192 32768; do
    timeout 200 "$PY" -m torch.distributed.run --nproc-per-node=1 --master-port=$((port += 3)) bench/train_step.py \
        --seq-len $L --variants dense,phsa,phsa_softmax --out "$TMPD/ts_$L.json" >> "$TMPD/train_step.txt" 2>&1
    [ -f "$TMPD/ts_$L.json" ] && { cat "$TMPD/ts_$L.json"; echo; } >> "$OUT/train_step.jsonl"
  done
}

if [ "$G1" != "$G2" ]; then
  operator & train_steps & wait
else
  operator; G2=$G1 train_steps
fi
cat "$TMPD/gpu.txt" "$TMPD/gpu_tests.txt" "$TMPD/bench_a.txt" > "$OUT/bench_a.txt"
grep -vE '^\{|[Ww]arn' "$TMPD/train_step.txt" | tail -15
cat "$OUT/bench_a.txt"
