#!/bin/bash
# one device call: GPU tests (subset) + benchmark; everything under $OUT
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv > $OUT/gpu.txt 2>&1
timeout 200 python3 -m pytest -x -q tests/gpu/test_triton_gpu.py -k "gradients or packed" -p no:cacheprovider 2>&1 | tail -15 | tee $OUT/gpu_tests.txt
timeout 330 python3 bench/attention.py --configs a --T 2048,4096,8192,32768,65536 --no-flex --out $OUT/bench1.json 2>&1 | grep -v '^{' | tee $OUT/bench1.txt
