#!/usr/bin/env bash
# A quality study (the prose or the code-heavy column) on one 4-GPU machine: every run of PLAN trains and is
# evaluated on its GPU (several runs may share a GPU side by side), each under a deadline, so the whole script ends
# within BUDGET_S seconds and writes whatever finished. Usage (from the repository root):
#   bash bench/quality/gpu_x4.sh DATA_DIR OUT_DIR
#     DATA_DIR: made by bench/quality/prose_data.sh or code_data.sh (rmix.bin/.idx, rmix_punct.json,
#               prose_tokenizer.json)
#     env: BUDGET_S=510 STEPS=240 MODEL=medium SEQ=8192 EVAL_S=150 WORK_DIR=/tmp/phsa_prose PLAN=<file>
#          LENGTHS / DEPTHS / RSAMPLES: the retrieval grid (LENGTHS defaults to [8192,16384,32768] when SEQ >= 16384)
#          EVAL=1: evaluate every run after its training; EVAL=0: train only (an intermediate call, see below)
#          RESUME_ONLY=1: every run must already have a checkpoint in WORK_DIR, else stop at once (a later call
#            that found a fresh machine: the earlier calls' checkpoints are gone, there is nothing to continue)
#          QUALITY_TOY=1: one tiny run on CPU (seconds), to check the pipeline end to end
# OUT_DIR gets runs.tar.gz (per run: metrics.jsonl, train/launch/eval logs, eval JSON + PNGs, refreshed after every
# run), summary.json (bench/quality/summarize.py --json), plan.txt and env.txt.
# A run's training stops gracefully (checkpoint, then evaluation) at the deadline minus EVAL_S even if it has
# not reached STEPS; its metrics then say how far it got.
#
# A study longer than one call: run the same command again with the same WORK_DIR and STEPS (STEPS is the whole
# run's: the learning-rate schedule and the curriculum are those of the whole run). Every run continues from its
# checkpoint (same run dir, same overrides); one that reached STEPS does not train again, and an evaluation that
# exists for the checkpointed step is not repeated. metrics.jsonl, train.log and launch.log run on
# across the calls (metrics.jsonl holds every step once), status.txt gets one line per call.
# Three back-to-back 9-minute calls on one warm 4-GPU machine, one run per GPU (the plans and the commands are in
# bench/README.md, "quality/gpu_x4.sh"): WORK_DIR inside the repository in a git-ignored folder that
# is not carried (runs/quality_prose), so the warm machine keeps it between calls; EVAL=0 in calls 1 and 2, EVAL=1
# and RESUME_ONLY=1 in call 3 (RESUME_ONLY=1 in call 2 too).
set -uo pipefail
TOY="${QUALITY_TOY:-0}" EVAL="${EVAL:-1}" RESUME_ONLY="${RESUME_ONLY:-0}"
case "$EVAL" in 0|1) ;; *) echo "EVAL=$EVAL: must be 1 (evaluate after training) or 0 (train only)"; exit 2 ;; esac
case "$RESUME_ONLY" in 0|1) ;; *) echo "RESUME_ONLY=$RESUME_ONLY: must be 0 or 1 (1: every run must have a checkpoint)"
                                  exit 2 ;; esac
DATA="$(cd "$1" && pwd)"; OUT="$(mkdir -p "$2" && cd "$2" && pwd)"
T0=$(date +%s)
# EVAL_S: the end of the budget kept from training, for the evaluation or (EVAL=0) for the checkpoint and packing.
if [ "$TOY" = 1 ]; then
  : "${BUDGET_S:=900}" "${STEPS:=12}" "${MODEL:=tiny}" "${SEQ:=512}" "${EVAL_S:=$((EVAL ? 300 : 60))}"
  GBS=2 LENGTHS="${LENGTHS:-[256,512]}" DEPTHS="${DEPTHS:-[0.0,0.5,1.0]}" RSAMPLES=${RSAMPLES:-2} TOPKS="[1,2,4]"
  WIN=(16 64)
else
  : "${BUDGET_S:=510}" "${STEPS:=240}" "${MODEL:=medium}" "${SEQ:=8192}" "${EVAL_S:=$((EVAL ? 150 : 40))}"
  # retrieval lengths: up to the training length, and to 4x it (the 16k-32k rows of a SEQ=16384 sitting)
  if [ "$SEQ" -ge 16384 ]; then : "${LENGTHS:=[8192,16384,32768]}"; else : "${LENGTHS:=[2048,4096,8192]}"; fi
  GBS=4 DEPTHS="${DEPTHS:-[0.0,0.1,0.3,0.5,0.7,0.9,1.0]}" RSAMPLES=${RSAMPLES:-8} TOPKS="[1,2,4,8,16]"
  WIN=(16 128)
fi
DEADLINE=$((T0 + BUDGET_S))
W="${WORK_DIR:-/tmp/phsa_prose}"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
mkdir -p "$W/runs" && W="$(cd "$W" && pwd)"  # absolute: the run dirs outlive this call (WORK_DIR=runs/...)

# PLAN: one run per line, "gpu  name  seed  overrides" (qb = attention.query_block; '#' starts a comment line).
# Studies 2 and 3 ran when softmax_group_sum was the shipped score; to repeat them, add
# attention.score=softmax_group_sum to the phsa / meanpool rows. DEFAULT_PLAN: two runs share a GPU; GPU 2 adds
# the lam=0.25 run beside the (cheaper) dense ones and GPU 3 the lam=0 run beside
# query_block 1 (the slowest): those two are best effort, the deadline may cut them (their step count shows it).
DEFAULT_PLAN="
0 phsa-qb64-s1      1234 attention=phsa attention.query_block=64
0 meanpool-qb64-s1  1234 attention=meanpool attention.query_block=64
1 phsa-qb64-s2      2345 attention=phsa attention.query_block=64
1 meanpool-qb64-s2  2345 attention=meanpool attention.query_block=64
2 dense-s1          1234 attention=dense
2 dense-s2          2345 attention=dense
2 lam0.25-qb64-s1   1234 attention=phsa attention.query_block=64 attention.lam=0.25
3 phsa-qb1-s1       1234 attention=phsa attention.query_block=1
3 lam0-qb64-s1      1234 attention=phsa attention.query_block=64 attention.lam=0.0
"
TOY_PLAN="0 phsa-qb64-s1 1234 attention=phsa attention.query_block=64"
if [ -n "${PLAN:-}" ]; then PLAN_TEXT="$(cat "$PLAN")"; elif [ "$TOY" = 1 ]; then PLAN_TEXT="$TOY_PLAN"; else PLAN_TEXT="$DEFAULT_PLAN"; fi

DATA_ARGS=(data=megatron_bin "data.prefixes=[$DATA/rmix]" "data.tokenizer=$DATA/prose_tokenizer.json"
           "data.punct_table=$DATA/rmix_punct.json")
COMMON=(model="$MODEL" data.seq_len="$SEQ" train.steps="$STEPS" train.global_batch_size=$GBS
        train.micro_batch_size=1 train.warmup_steps=$((STEPS / 6)) train.lr=1e-3 train.min_lr=1e-4
        train.eval_interval=$((STEPS / 6)) train.eval_iters=4 train.log_interval=10
        checkpoint.interval="$STEPS" checkpoint.keep_last=1 logging=stdout)
# Curriculum: dense warm-up (1/6 of the steps), linear ramp (1/3), hold at k=2 for the rest, evaluated at k=4.
# At 8192 tokens: (16 + 128 + 2*16) / 8192 = 2.1% active = 97.9% sparsity in the hold (k=4: 97.5%).
# Selection statistics (recall vs mean pooling at the hold's k) every 1/20 of the run, warm-up included.
SPARSE=(attention.block_size=16 attention.n_init=${WIN[0]} attention.local_window=${WIN[1]} curriculum=linear
        curriculum.warmup_steps=$((STEPS / 6)) curriculum.ramp_steps=$((STEPS / 3))
        curriculum.target_activation=null curriculum.target_topk=2 attention.eval_topk=4
        curriculum.stats_interval=$(( STEPS / 20 > 0 ? STEPS / 20 : 1 )))
# Evaluation: the same validation batches and retrieval haystacks for every run (train.seed fixed for the eval).
EVAL_ARGS=(eval.topks="$TOPKS" eval.retrieval.kind=kv eval.retrieval.lengths="$LENGTHS" eval.retrieval.depths="$DEPTHS"
      eval.retrieval.samples=$RSAMPLES eval.retrieval.batch_size=4 eval.retrieval.topks="$TOPKS")

left() { echo $((DEADLINE - $(date +%s))); }
limit() { local s=$(( $1 > 1 ? $1 : 1 )); echo "$s"; }  # timeout 0 would mean "no limit"

pack() {  # runs.tar.gz of everything small; serialized, atomic
  ( flock 9
    tar -czf "$OUT/runs.tar.gz.tmp" -C "$W" --exclude=checkpoints --exclude='cache*' --exclude=wandb \
        --exclude='*.pt' runs 2>/dev/null && mv "$OUT/runs.tar.gz.tmp" "$OUT/runs.tar.gz"
  ) 9>"$W/pack.lock"
}

ckpt_step() {  # the newest complete checkpoint's step in run dir $1 (0: none), as the trainer will resume it
  "$PY" -c 'import sys; from phsa_train.training.checkpoint import latest_step; print(latest_step(sys.argv[1]) or 0)' \
      "$1/checkpoints"
}
evaluated_at() {  # $1/results.json's step: 1 when it is $2 (that checkpoint is evaluated already)
  "$PY" -c 'import json, sys; sys.exit(json.load(open(sys.argv[1])).get("step") != int(sys.argv[2]))' \
      "$1/results.json" "$2" 2>/dev/null && echo 1 || echo 0
}

evaluate() {  # gpu rd subdir step overrides...: phsa_train.eval of the run's checkpoint into rd/subdir, once per step
  local gpu=$1 rd=$2 sub=$3 step=$4 t; shift 4
  if [ "$(evaluated_at "$rd/$sub" "$step")" = 1 ]; then echo "${sub}=done_at_$step" >> "$rd/status.txt"; return; fi
  t=$(date +%s)
  CUDA_VISIBLE_DEVICES=$gpu timeout -k 10 "$(limit $(( $(left) - 10 )))" "$PY" -m phsa_train.eval \
      eval.checkpoint="$rd/checkpoints" eval.output_dir="$rd/$sub" "${EVAL_ARGS[@]}" "$@" > "$rd/$sub.log" 2>&1
  echo "${sub}_rc=$? ${sub}_s=$(( $(date +%s) - t ))" >> "$rd/status.txt"
  pack
}

job() {  # gpu name seed overrides...
  local gpu=$1 name=$2 seed=$3; shift 3
  local rd="$W/runs/$name" extra=() sparse=0 lam1=0
  mkdir -p "$rd"
  case " $* " in *" attention=dense "*) ;; *) sparse=1; extra=("${SPARSE[@]}") ;; esac
  case " $* " in *" attention.lam=1"*|*" attention=meanpool "*) ;; *) [ $sparse = 1 ] && lam1=1 ;; esac
  printf '%s\n' "$@" "${extra[@]}" "train.seed=$seed" > "$rd/overrides.txt"
  # Evaluate sparse models with the sparse kernels at every length: backend=auto runs cuDNN dense at
  # <= 4096 tokens (the measured speed crossover), which is not the function the model was trained with and made
  # the 2026-11-27 sitting's retrieval rows at 2048 / 4096 tokens dense. On CPU (toy) auto is the reference.
  local eo="'train.seed=1234','data.cache_dir=$rd/cache_eval'"
  [ $sparse = 1 ] && [ "$TOY" != 1 ] && eo="$eo,'attention.backend=triton'"
  local stop_at=$((DEADLINE - EVAL_S)) t=$(date +%s) step rc
  step=$(ckpt_step "$rd")
  printf 'call %s from step %s: ' "$(date -u +%FT%TZ)" "$step" >> "$rd/status.txt"
  if [ "$step" -ge "$STEPS" ]; then
    echo "[gpu_x4] $name: at step $step/$STEPS already, not training again"
    echo "train=complete step=$step" >> "$rd/status.txt"
  else
    echo "[gpu_x4] $name: train on GPU $gpu from step $step ($(left) s left)"
    echo "===== [gpu_x4] $(date -u +%FT%TZ): from step $step of $STEPS" >> "$rd/launch.log"
    # The same overrides and run dir as in an earlier call: launch/pretrain.sh resumes from the checkpoint.
    # train.log is the trainer's own console (it appends to it); launch.log gets the launcher's stdout + stderr.
    CUDA_VISIBLE_DEVICES=$gpu NPROC=1 PHSA_RUN_DIR="$rd" PHSA_STOP_AT=$stop_at \
      timeout -k 20 "$(limit $((stop_at - t + 90)))" bash launch/pretrain.sh "${COMMON[@]}" "${DATA_ARGS[@]}" \
        train.seed="$seed" data.cache_dir="$rd/cache" "$@" "${extra[@]}" >> "$rd/launch.log" 2>&1
    rc=$?
    step=$(ckpt_step "$rd")
    echo "train_rc=$rc train_s=$(( $(date +%s) - t )) step=$step" >> "$rd/status.txt"
  fi
  pack
  if [ "$EVAL" = 1 ] && [ "$step" -gt 0 ]; then
    evaluate "$gpu" "$rd" eval "$step" "eval.overrides=[$eo]"
    # The same weights with mean-pooled selection (lam=1) at the same budget: retrieval and perplexity.
    if [ $lam1 = 1 ] && [ "$(left)" -gt 45 ]; then
      evaluate "$gpu" "$rd" eval_lam1 "$step" eval.recall.enabled=false eval.dense_perplexity=false \
          "eval.overrides=[$eo,'attention.lam=1.0']"
    fi
  fi
  echo "[gpu_x4] $name: $(tail -n 1 "$rd/status.txt") ($(left) s left)"
}

{ echo "start $(date -u +%FT%TZ) budget ${BUDGET_S}s steps $STEPS model $MODEL seq $SEQ toy $TOY"
  git rev-parse HEAD 2>/dev/null || true; git status --short 2>/dev/null | head -20
  nvidia-smi --query-gpu=index,name,memory.total --format=csv 2>/dev/null || echo "no GPU"
  "$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" 2>&1
  nproc; } > "$OUT/env.txt"
printf '%s\n' "$PLAN_TEXT" > "$OUT/plan.txt"
cp "$DATA/stats.json" "$OUT/corpus_stats.json" 2>/dev/null || true

if [ "$RESUME_ONLY" = 1 ]; then  # before anything runs: a fresh machine has no checkpoints to continue
  fresh=$(while read -r gpu name seed rest; do
            case "${gpu:-#}" in '#'*) continue ;; esac
            [ "$(ckpt_step "$W/runs/$name")" = 0 ] && printf '%s ' "$name"; done <<< "$PLAN_TEXT")
  if [ -n "$fresh" ]; then
    echo "RESUME_ONLY=1: no checkpoint under $W/runs for ${fresh% } (a fresh machine or another WORK_DIR); nothing ran"
    exit 2
  fi
fi
while read -r gpu name seed rest; do
  case "${gpu:-#}" in '#'*) continue ;; esac  # blank lines and comments
  # shellcheck disable=SC2086
  job "$gpu" "$name" "$seed" $rest &
  sleep 2  # stagger start-up (imports, Megatron index builds)
done <<< "$PLAN_TEXT"
wait
pack
"$PY" bench/quality/summarize.py "$W/runs" --json "$OUT/summary.json" > "$OUT/summary.txt" 2>&1 || true
echo "[gpu_x4] done in $(( $(date +%s) - T0 )) s"; cat "$OUT/summary.txt" 2>/dev/null | head -60
