#!/bin/bash
# final device call: GPU tests + benchmark (config a with the dense-fallback sweep, config b)
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu --format=csv > $OUT/gpu.txt 2>&1
timeout 170 python3 -m pytest -q tests/gpu/test_triton_gpu.py -p no:cacheprovider 2>&1 | tail -25 | tee $OUT/gpu_tests.txt
timeout 250 python3 bench/attention.py --configs a --T 1024,2048,4096,8192,32768,65536,131072 --out $OUT/bench_a.json 2>&1 | grep -v "^{" | tee $OUT/bench_a.txt
timeout 150 python3 bench/attention.py --configs b --T 8192,32768,65536 --out $OUT/bench_b.json 2>&1 | grep -v "^{" | tee $OUT/bench_b.txt
