#!/bin/bash
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."
timeout 190 python3 -m pytest -x -q tests/gpu/test_triton_gpu.py -p no:cacheprovider 2>&1 | tail -15 | tee $OUT/gpu_tests.txt
timeout 110 python3 bench/tune.py 2>&1 | tee $OUT/tune.txt
timeout 170 python3 bench/attention.py --configs a --T 8192,32768,65536,131072 --out $OUT/bench2a.json 2>&1 | grep -v "^{" | tee $OUT/bench2a.txt
timeout 105 python3 bench/attention.py --configs b --T 8192,32768,65536 --out $OUT/bench2b.json 2>&1 | grep -v "^{" | tee $OUT/bench2b.txt
