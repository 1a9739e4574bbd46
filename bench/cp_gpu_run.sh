#!/bin/bash
# Context parallelism on real GPUs, one device call: exactness tests, layer scaling, training-step benchmark and the
# user's path killed and resumed. Needs N >= 2 GPUs (CP=4 and CP=2 x DP=2 parts run when N >= 4). Results under
# $OUT (at most 8 files):
#   cp_run.txt               everything printed, stage by stage, with each stage's exit status and seconds
#   exactness.jsonl          (a) CP=N vs CP=1, both modes: o / dq / selected blocks equal, dk / dv rel. error
#   context_parallel.jsonl   (b) layer fwd+bwd, CP=1 vs CP=N in the same process, dense baseline, stage profile
#   train_step.jsonl         (c) whole training steps, dense vs PHSA in the same run, per layout and length
#   pretrain_resume.txt      (d) launch/pretrain.sh parallel=cp2 through the curriculum, SIGKILLed, resumed;
#                            (f) short ulysses and packed-document (data.reset_attention_mask=true) runs
#   max_seq.jsonl            (e) longest sequence that trains (only with STAGES containing e)
#   gpu.txt                  nvidia-smi
# D_MODES="allgather ulysses" runs stage d (kill and resume) for each CP mode (two GPUs; default allgather).
# E_VARIANTS="phsa" limits stage e (two GPUs) to those variants (default "dense phsa").
# CP_PAIR=2,3 with CP_NGPU=2 runs on those two cards (two instances side by side on a 4-GPU machine).
# TS_LENS="65536 131072" (default) sets the lengths of stage c, PRE_SEQ=65536 that of stages d and f. STAGES (default "abcd") picks stages; e (longest sequence) takes ~5 min on its own: run it in a second call.
# With >= 4 GPUs, stages run as two 2-GPU groups side by side (GPUs 0,1: b then c; GPUs 2,3: a then d per D_MODES),
# then the 4-GPU parts, then e dense on 0,1 beside e phsa on 2,3; QUAD_ONLY=1 skips the 2-GPU parts of a-d. CPU logic check (gloo, tiny shapes): CP_GPU_RUN_CPU=1 OUT=/tmp/x bash bench/cp_gpu_run.sh
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:?set OUT to a directory}
mkdir -p "$OUT"
TMPD=${TMPD:-$(mktemp -d /tmp/cp_gpu_run.XXXX)}  # run dirs, checkpoints, scratch: never under $OUT (8 files max)
mkdir -p "$TMPD"
STAGES=${STAGES:-abcd}
CPU=${CP_GPU_RUN_CPU:-0}
PY=${PYTHON:-$(command -v python3 || command -v python)}
export PY
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-4} WANDB_MODE=offline PHSA_CACHE_DIR=${PHSA_CACHE_DIR:-/tmp/phsa_cache}
LOG=$TMPD/log  # stage logs $LOG.<stage>, concatenated into $OUT/cp_run.txt
START=$SECONDS
if [ "$CPU" = 1 ]; then NGPU=2; else NGPU=${CP_NGPU:-$("$PY" -c 'import torch; print(torch.cuda.device_count())')}; fi  # CP_NGPU=2: GPUs 0,1 only
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv > "$OUT/gpu.txt" 2>&1 || echo cpu > "$OUT/gpu.txt"
echo "cp_gpu_run: $NGPU devices, stages $STAGES, cpu=$CPU, $(date -u), scratch $TMPD" | tee -a "$OUT/cp_run.txt"
SHIPPED_QB=$("$PY" -c 'from phsa_train.config import compose; print(compose(["attention=phsa"]).attention.query_block)')
QB=${QB:-$SHIPPED_QB}  # QB=64 measures that query_block everywhere (labelled in every record) instead of the shipped one
echo "shipped attention.query_block=$SHIPPED_QB, measured: $QB" | tee -a "$OUT/cp_run.txt"

port=${CP_PORT:-29600}  # a second instance side by side needs its own (CP_PORT=31600)
DEADLINE=${DEADLINE:-530}  # seconds from the start; no stage starts or runs past it
left() { echo $((DEADLINE - (SECONDS - START))); }
run() {  # run NAME GPUS TIMEOUT CMD...: one stage, output appended to the log with its exit status and seconds
  local name=$1 gpus=$2 limit=$3; shift 3
  local t0=$SECONDS rc
  [ "$(left)" -lt "$limit" ] && limit=$(left)
  if [ "$limit" -lt 20 ]; then echo "=== [$name] skipped: ${limit}s left before the deadline" >> "$LOG.$name"; return 0; fi
  port=$((port + 7))
  { echo "=== [$name] GPUs $gpus, limit ${limit}s: $*"; } >> "$LOG.$name"
  if [ "$CPU" = 1 ]; then
    timeout -k 10 "$limit" env MASTER_PORT=$port "$@" >> "$LOG.$name" 2>&1; rc=$?
  else
    timeout -k 10 "$limit" env CUDA_VISIBLE_DEVICES="$gpus" MASTER_PORT=$port "$@" >> "$LOG.$name" 2>&1; rc=$?
  fi
  echo "=== [$name] exit $rc after $((SECONDS - t0)) s" >> "$LOG.$name"
  return 0
}
torchrun_() { local n=$1; shift; "$PY" -m torch.distributed.run --nproc-per-node="$n" --master-port="$MASTER_PORT" "$@"; }
export -f torchrun_ 2>/dev/null
flush() { for f in "$LOG".*; do [ -f "$f" ] && { cat "$f" >> "$OUT/cp_run.txt"; rm -f "$f"; }; done; }

if [ "$CPU" = 1 ]; then
  QB_OVR=(); EX_ARGS=(--tiny); CPB_ARGS=(--cpu --seq-lens 256 --reps 2); TS_LENS=(256); TS_ARGS=(--cpu --model tiny --vocab 512 --recompute none --steps 1 --warmup 1)
  TS_PHSA=(attention.n_init=16 attention.local_window=32 attention.backend=reference attention.query_block=4)
  PRE=(model=tiny data.seq_len=256 train.micro_batch_size=1 train.global_batch_size=1 attention.n_init=16
       attention.local_window=32 curriculum.target_activation=null curriculum.target_topk=2)
  TS_BIG=256
else
  QB_OVR=(); [ "$QB" != "$SHIPPED_QB" ] && QB_OVR=(attention.query_block=$QB)
  EX_ARGS=(--seq-len 32768 --query-block "$QB"); CPB_ARGS=(--seq-lens 65536 131072 --reps 5 --attention "${QB_OVR[@]}")
  read -r -a TS_LENS <<< "${TS_LENS:-65536 131072}"; TS_ARGS=(--model qwen3_0.6b --recompute full --steps 2 --warmup 1); TS_PHSA=("${QB_OVR[@]}")
  PRE=(model=qwen3_0.6b data.seq_len=${PRE_SEQ:-65536} train.recompute=full train.micro_batch_size=1 train.global_batch_size=1
       "${QB_OVR[@]}")
  TS_BIG=131072
fi
if [ "$CPU" != 1 ] && [ "$QB" = 1 ]; then  # also the measured-fast setting, labelled, in the same run
  TS_VARIANTS="dense,phsa_qb64,phsa"
else
  TS_VARIANTS="dense,phsa"
fi

stage_a() {  # exactness, CP=2, both modes: the GPU test itself (CPU mode: its worker at tiny shapes)
  if [ "$CPU" = 1 ]; then
    run exactness_cp2 "$1" 240 bash -c "torchrun_ 2 tests/workers/cp_exactness.py --out $TMPD/ex2 ${EX_ARGS[*]} --modes allgather ulysses"
    cat "$TMPD"/ex2.* >> "$OUT/exactness.jsonl" 2>/dev/null; rm -f "$TMPD"/ex2.*
  else
    run exactness_cp2 "$1" 240 "$PY" -m pytest -q -s -p no:cacheprovider tests/gpu/test_context_parallel_gpu.py -k cp2
    grep -h '^{"mode"' "$LOG.exactness_cp2" >> "$OUT/exactness.jsonl"
  fi
}
collect_bench() {  # collect_bench FILE STAGE: the bench's JSON rows, or (cut short) the rows it printed
  if [ -f "$TMPD/$1.json" ]; then
    "$PY" -c "import json,sys; [print(json.dumps(r)) for r in json.load(open(sys.argv[1]))['rows']]" "$TMPD/$1.json" >> "$OUT/context_parallel.jsonl"
    rm -f "$TMPD/$1.json"
  else
    grep -h '^{"L"' "$LOG.$2" >> "$OUT/context_parallel.jsonl"
  fi
}
stage_b() {  # layer scaling CP=1 vs CP=2 (same process), both modes, dense baseline, profile
  run cp_bench_cp2 "$1" 300 bash -c "torchrun_ 2 bench/context_parallel.py ${CPB_ARGS[*]} --modes allgather allgather_chunks ulysses --out $TMPD/cpb2.json"
  collect_bench cpb2 cp_bench_cp2
}
train_step() {  # train_step NAME GPUS NPROC LIMIT ARGS...
  local name=$1 gpus=$2 n=$3 limit=$4; shift 4
  run "$name" "$gpus" "$limit" bash -c "torchrun_ $n bench/train_step.py ${TS_ARGS[*]} --variants $TS_VARIANTS $* --phsa ${TS_PHSA[*]} --out $TMPD/ts_$name.json"
  if [ -f "$TMPD/ts_$name.json" ]; then
    "$PY" -c "import json,sys; print(json.dumps(json.load(open(sys.argv[1]))))" "$TMPD/ts_$name.json" >> "$OUT/train_step.jsonl"
    rm -f "$TMPD/ts_$name.json"
  else  # cut short (deadline, OOM hang): keep the variants that finished
    grep -h '^{"variant"' "$LOG.$name" | sed "s/^/{\"partial\": \"$name\", \"result\": /; s/\$/}/" >> "$OUT/train_step.jsonl"
  fi
}
stage_c() {
  for L in "${TS_LENS[@]}"; do train_step "train_cp2_$L" "$1" 2 200 --cp 2 --seq-len "$L"; done
}
stage_d() {  # stage_d GPUS [MODE]: the user's path (curriculum: dense warm-up, ramp, hold), SIGKILL after step 5,
  # resume from step 4; MODE = parallel.cp_mode (default allgather)
  local gpus=$1 mode=${2:-allgather} t0=$SECONDS
  local rd="$TMPD/run_cp2_$mode"
  local args=("${PRE[@]}" attention=phsa parallel=cp2 parallel.cp_mode="$mode" logging=stdout curriculum=dense_warmup_to_97
              curriculum.warmup_steps=1 curriculum.ramp_steps=2 curriculum.stats_interval=0 train.steps=8
              train.log_interval=1 train.eval_interval=0 checkpoint.interval=2)
  local f="$LOG.pretrain" pid
  echo "=== [pretrain] launch/pretrain.sh ${args[*]}" >> "$f"
  if [ "$CPU" = 1 ]; then
    setsid env PHSA_RUN_DIR="$rd" NPROC=2 bash launch/pretrain.sh "${args[@]}" > "$rd.log1" 2>&1 &
  else
    setsid env PHSA_RUN_DIR="$rd" NPROC=2 CUDA_VISIBLE_DEVICES="$gpus" bash launch/pretrain.sh "${args[@]}" > "$rd.log1" 2>&1 &
  fi
  pid=$!
  local wait_s=240; [ "$(left)" -lt $((2 * wait_s)) ] && wait_s=$(( $(left) / 2 > 20 ? $(left) / 2 : 20 ))  # both runs fit the deadline
  while kill -0 "$pid" 2>/dev/null && ! grep -q "step      5/" "$rd.log1" 2>/dev/null && [ $((SECONDS - t0)) -lt $wait_s ]; do sleep 0.2; done
  # SIGKILL the launcher's whole tree (torchrun puts its workers in their own sessions): a crash, no clean save
  local tree=$pid kids
  kids=$(pgrep -P "$pid"); while [ -n "$kids" ]; do tree="$tree $kids"; kids=$(for k in $kids; do pgrep -P "$k"; done); done
  kill -KILL $tree 2>/dev/null; wait "$pid" 2>/dev/null
  echo "=== [pretrain] killed after $((SECONDS - t0)) s; first run's log:" >> "$f"
  grep -E "step +[0-9]+/|saved checkpoint|phsa_train\]|rror" "$rd.log1" >> "$f"
  echo "=== [pretrain] resumed (same command):" >> "$f"
  if [ "$CPU" = 1 ]; then
    timeout -k 10 240 env PHSA_RUN_DIR="$rd" NPROC=2 bash launch/pretrain.sh "${args[@]}" > "$rd.log2" 2>&1
  else
    timeout -k 10 "$(( $(left) > 20 ? $(left) : 20 ))" env PHSA_RUN_DIR="$rd" NPROC=2 CUDA_VISIBLE_DEVICES="$gpus" bash launch/pretrain.sh "${args[@]}" > "$rd.log2" 2>&1
  fi
  echo "=== [pretrain] resume exit $?" >> "$f"
  grep -E "step +[0-9]+/|saved checkpoint|resum|phsa_train\]|rror" "$rd.log2" >> "$f"
  tail -30 "$rd.log2" | grep -iE "error|Traceback" -A5 >> "$f"
  cat "$f" >> "$OUT/pretrain_resume.txt"; rm -f "$f"
}
stage_e() {  # stage_e GPUS VARIANT: longest sequence that trains one step at CP=2, recompute full then none
  local gpus=$1 v=$2 rc L log="$TMPD/ms_$2.log" js="$TMPD/ms_$2.json"
  for rec in full none; do for L in 131072 262144 524288 1048576; do
    [ "$(left)" -lt 60 ] && return
    local lim=150; [ "$(left)" -lt $lim ] && lim=$(left)
    timeout -k 10 "$lim" env CUDA_VISIBLE_DEVICES="$gpus" MASTER_PORT=$((port += 7)) bash -c "torchrun_ 2 bench/train_step.py --model qwen3_0.6b --cp 2 --seq-len $L --recompute $rec --steps 1 --warmup 0 --variants $v --out $js" > "$log" 2>&1
    rc=$?
    if [ $rc = 0 ] && [ -f "$js" ] && ! grep -q OOM "$js"; then
      "$PY" -c "import json,sys; r=json.load(open(sys.argv[1]))['results'][0]; r['fits']=True; print(json.dumps(r))" "$js" >> "$OUT/max_seq.jsonl"
      rm -f "$js"
    else
      local why; why=$(grep -m1 -oE 'OutOfMemoryError|CUDA out of memory' "$log" || { [ $rc = 124 ] && echo "timed out after ${lim}s (one step slower than that)"; } || echo "exit $rc")
      echo "{\"variant\": \"$v\", \"recompute\": \"$rec\", \"seq_len\": $L, \"layout\": \"cp2\", \"fits\": false, \"exit\": $rc, \"why\": \"$why\"}" >> "$OUT/max_seq.jsonl"
      rm -f "$js"; break
    fi
  done; done
}
stage_f() {  # stage_f GPUS NAME OVERRIDES...: a short user-path run (curriculum dense -> ramp -> hold, 5 steps)
  local gpus=$1 name=$2; shift 2
  local args=("${PRE[@]}" attention=phsa parallel=cp2 logging=stdout curriculum=dense_warmup_to_97
              curriculum.warmup_steps=1 curriculum.ramp_steps=2 curriculum.stats_interval=0 train.steps=5
              train.log_interval=1 train.eval_interval=0 checkpoint.interval=100 "$@")
  local f="$LOG.f_$name" lim=200
  [ "$(left)" -lt $lim ] && lim=$(left)
  echo "=== [$name] launch/pretrain.sh ${args[*]}" >> "$f"
  timeout -k 10 "$lim" env PHSA_RUN_DIR="$TMPD/run_$name" NPROC=2 CUDA_VISIBLE_DEVICES="$gpus" bash launch/pretrain.sh "${args[@]}" > "$TMPD/run_$name.log" 2>&1
  echo "=== [$name] exit $?" >> "$f"
  grep -E "step +[0-9]+/|phsa_train\]|rror" "$TMPD/run_$name.log" >> "$f"
  cat "$f" >> "$OUT/pretrain_resume.txt"; rm -f "$f"
}

has() { [[ "$STAGES" == *"$1"* ]]; }
any_of() { [[ "$STAGES" =~ [$1] ]]; }
if [ "$NGPU" -ge 4 ] && [ "$CPU" != 1 ]; then
  if any_of abcd && [ "${QUAD_ONLY:-0}" != 1 ]; then  # QUAD_ONLY=1: only the 4-GPU parts of a-d
    ( port=31000; has b && stage_b 0,1; has c && stage_c 0,1 ) &
    ( port=32000; has a && stage_a 2,3; for m in ${D_MODES:-allgather}; do has d && stage_d 2,3 "$m"; done ) &
    wait; flush
  fi
  if any_of abc; then
    if has a; then
      run exactness_cp4 0,1,2,3 200 "$PY" -m pytest -q -s -p no:cacheprovider tests/gpu/test_context_parallel_gpu.py -k cp4
      grep -h '^{"mode"' "$LOG.exactness_cp4" >> "$OUT/exactness.jsonl"
    fi
    if has b; then
      run cp_bench_cp4 0,1,2,3 200 bash -c "torchrun_ 4 bench/context_parallel.py --seq-lens $TS_BIG --reps 5 --attention ${QB_OVR[*]} --modes allgather ulysses --out $TMPD/cpb4.json"
      collect_bench cpb4 cp_bench_cp4
    fi
    if has c; then
      train_step train_cp4 0,1,2,3 4 200 --cp 4 --seq-len "$TS_BIG"
      train_step train_cp2dp2 0,1,2,3 4 200 --cp 2 --seq-len "$TS_BIG"
    fi
    flush
  fi
  if any_of ef; then
    ( port=33000; has f && stage_f 0,1 ulysses parallel.cp_mode=ulysses; has e && stage_e 0,1 dense ) &
    ( port=34000; has f && stage_f 2,3 packed_docs data.reset_attention_mask=true; has e && stage_e 2,3 phsa ) &
    wait; flush
  fi
else  # two GPUs: CP_PAIR (default 0,1) picks which, so a second instance can run on 2,3
  PAIR=${CP_PAIR:-0,1}
  has a && stage_a "$PAIR"
  has b && stage_b "$PAIR"
  has c && stage_c "$PAIR"
  for m in ${D_MODES:-allgather}; do has d && stage_d "$PAIR" "$m"; done
  if [ "$CPU" = 1 ] && has c; then  # the 4-rank layouts' logic (gloo)
    train_step train_cp2dp2 "" 4 200 --cp 2 --seq-len "$TS_BIG"
  fi
  has f && stage_f "$PAIR" ulysses parallel.cp_mode=ulysses
  has f && stage_f "$PAIR" packed_docs data.reset_attention_mask=true
  for v in ${E_VARIANTS:-dense phsa}; do has e && stage_e "$PAIR" "$v"; done
fi
flush
echo "cp_gpu_run: done in $((SECONDS - START)) s" | tee -a "$OUT/cp_run.txt"
ls -la "$OUT" >> "$OUT/cp_run.txt"
