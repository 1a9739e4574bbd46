#!/bin/bash
# A/B of the CP layer across source trees in one 2-GPU device call: bench/context_parallel.py (allgather) per tree in
# the order given (interleaved, so drift of the card shows as a difference between a tree's two runs), extra runs
# with their own flags, then o / dq / dk / dv of the trees compared bit for bit. Run from the folder that holds the
# trees as .gpu_<tree> (copies of commits, each with this bench/context_parallel.py) and the wheels in .whl:
#   OUT=... bash .gpu_c7/bench/cp_ab.sh "c6base c6 c7 c7 c6 c6base" "c7@cta2:--cp-nccl-max-ctas=2"
# Each A/B run: --seq-lens $SEQ_LENS (65536 131072) --reps $REPS (5), the dense baseline in each tree's first run
# only, --dump for the comparison; each extra run (tree@label:flag,flag...) adds its flags, --no-dense. Every
# bench gets $BENCH_TIMEOUT s (100). Results in $OUT: summary.txt (exit codes; per tree / run / L / cp: fwd+bwd ms
# as launched and host ahead, copy_fill ms, scaling host ahead, card; then the dump comparison), ab.jsonl (every
# row, profiles included), run.txt (everything printed), pytest_gpu_cp2.txt (the GPU exactness test of this
# script's own tree, or $TEST_TREE: o, dq and selections equal to CP=1), gpu.txt.
# CPU logic check (gloo, tiny shapes, no exactness test): COMMON_FLAGS=--cpu SEQ_LENS=256.
set -u
OUT=${OUT:?set OUT to a directory}
ORDER=${1:?trees in run order}
EXTRA=${2:-}
SEQ_LENS=${SEQ_LENS:-65536 131072}
REPS=${REPS:-5}
BENCH_TIMEOUT=${BENCH_TIMEOUT:-100}
COMMON_FLAGS=${COMMON_FLAGS:-}
TMPD=$(mktemp -d /tmp/cp_ab.XXXX)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
  > /dev/null 2>&1
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=4
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv > "$OUT/gpu.txt" 2>&1
own=$(basename "$(cd "$(dirname "$0")/.." && pwd)")
last=${TEST_TREE:-${own#.gpu_}}
(cd ".gpu_$last" && PYTHONPATH=/tmp/site:$PWD timeout 150 python3 -m pytest -q -x -p no:cacheprovider \
  tests/gpu/test_context_parallel_gpu.py -k cp2 > "$OUT/pytest_gpu_cp2.txt" 2>&1
 echo "pytest cp2 ($last) exit $?" >> "$OUT/summary.txt")

bench() {  # tree, run label, extra flags...
  local tree=$1 run=$2
  shift 2
  echo "=== $tree $run $* $(date -u +%T)" >> "$OUT/run.txt"
  (cd ".gpu_$tree" && PYTHONPATH=/tmp/site:$PWD timeout -k 5 "$BENCH_TIMEOUT" python3 -m torch.distributed.run \
    --nproc-per-node=2 --master-port=$((29500 + RANDOM % 1000)) bench/context_parallel.py --seq-lens $SEQ_LENS \
    --reps "$REPS" --modes allgather --out "$TMPD/$tree-$run.json" $COMMON_FLAGS "$@" >> "$OUT/run.txt" 2>&1)
  echo "$tree $run exit $?" >> "$OUT/summary.txt"
}
declare -A seen
for tree in $ORDER; do
  seen[$tree]=$((${seen[$tree]:-0} + 1))
  n=${seen[$tree]}
  dense=$([ "$n" = 1 ] || echo --no-dense)
  bench "$tree" "$n" --dump "$TMPD/dump-$tree-$n" $dense
done
for spec in $EXTRA; do  # tree@label:flag,flag
  tree=${spec%%@*} rest=${spec#*@}
  bench "$tree" "${rest%%:*}" --no-dense $(echo "${rest#*:}" | tr , ' ')
done

python3 - "$TMPD" "$OUT" >> "$OUT/summary.txt" 2>&1 <<'EOF'
import glob, itertools, json, os, sys
import torch
tmp, out = sys.argv[1:]
with open(out + "/ab.jsonl", "w") as f:
    for p in sorted(glob.glob(tmp + "/*.json")):
        tree, run = os.path.basename(p)[:-5].split("-", 1)
        for r in json.load(open(p))["rows"]:
            f.write(json.dumps({"tree": tree, "run": run, **r}) + "\n")
            if r.get("variant") == "phsa" and "fwd_bwd_ms" in r:
                stages = r.get("profile", {}).get("ms_by_stage", {})
                print(tree, run, r["L"], r["cp"], round(r["fwd_bwd_ms"], 3),
                      round(r.get("fwd_bwd_ms_host_ahead", 0), 3), stages.get("copy_fill"),
                      round(r.get("scaling_efficiency_host_ahead", 0), 3), r.get("cp_nccl_max_ctas"), r["device"])
# o and dq are deterministic; dk and dv are fp32 atomic sums rounded to bf16, so a tree's two runs bound the noise
dumps = sorted(glob.glob(tmp + "/dump-*"))
names = sorted({os.path.basename(f) for d in dumps for f in glob.glob(d + "/*.pt")})
for name in names:
    have = {os.path.basename(d)[5:]: torch.load(f"{d}/{name}") for d in dumps if os.path.exists(f"{d}/{name}")}
    for (a, x), (b, y) in itertools.combinations(sorted(have.items()), 2):
        diff = {k: int((x[k] != y[k]).sum()) for k in x}
        print("dump", name, a, "vs", b, "elements differing:", diff, "of", {k: x[k].numel() for k in x})
EOF
rm -rf "$TMPD"
