#!/bin/bash
# One device call: GPU tests, the selection sweep, the attention benchmark (config (a) with the shipped knobs and
# query_block 64, plus the opt-in dot score, cuDNN in the same run) and the 0.6B training step. Results -> $OUT.
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu --format=csv > "$OUT/gpu.txt" 2>&1
timeout 150 python3 -m pytest -q tests/gpu -p no:cacheprovider 2>&1 | tail -25 | tee "$OUT/gpu_tests.txt"
timeout 60 python3 bench/tune.py --T 65536 --stages select --out "$OUT/tune.jsonl" > "$OUT/tune.txt" 2>&1
timeout 200 python3 bench/attention.py --configs a,a_dot --T 8192,32768,65536,131072 --no-flex --baselines cudnn \
    --out "$OUT/bench_a.json" 2>&1 | grep -v "^{" | tee "$OUT/bench_a.txt"
timeout 170 python3 bench/train_step.py --variants dense,phsa,phsa_dot --phsa attention.query_block=64 \
    --out "$OUT/train_step.json" 2>&1 | tail -4 | tee "$OUT/train_step.txt"
