#!/usr/bin/env bash
# The mechanism test on a model that copies, in one sitting: per GPU (one seed each, side by side)
#   1. train a dense model on the copy curriculum (bench/quality/copy_data.py: prose + exact-repeat documents +
#      key-value facts written into prose), stopped gracefully by the deadline; with STAGE1_STEPS > 0 in two
#      stages (length extension): first STAGE1_STEPS at STAGE1_SEQ on STAGE1_DATA (run dir dense1-s<seed>), then
#      STEPS at SEQ on DATA from those weights (fresh optimizer and schedule, peak lr STAGE2_LR);
#   2. (a) training-free: retrieval of a fact planted in held-out prose and the induction probe
#      (bench/quality/copy_probe.py), dense, then the same weights with PHSA
#      selection at lam=0.5 and at lam=1 (mean pooling), at k in TOPKS; the three evaluations run side by side;
#   3. (b) if time is left: a short sparse fine-tune from the dense weights with each lam (the curriculum ramps
#      the top-k down from dense), then the same retrieval evaluation.
# Usage (from the repository root):
#   bash bench/quality/copy_test.sh DATA_DIR OUT_DIR
#     DATA_DIR: cmix.bin/.idx, cmix_punct.json, prose_tokenizer.json (bench/quality/copy_data.py)
#     env: GPUS="0 1" SEEDS="1234 2345" BUDGET_S=490 MODEL=small SEQ=2048 STEPS=1000 GBS=16 FT_STEPS=160
#          RESERVE_S=230 (seconds kept after dense training for steps 2-3) FT_EVAL_S=60 WORK_DIR=/tmp/phsa_copy
#          COPY_TOY=1: the whole pipeline on CPU at toy scale (tiny model, seq 512), to check it end to end
#     length extension (off unless STAGE1_STEPS > 0): STAGE1_DATA (a copy_data.py dir with the same tokenizer,
#          e.g. shorter documents) STAGE1_SEQ=2048 STAGE1_GBS=16 STAGE1_STEPS=0 STAGE2_LR=1e-3 (toy: 256, 8, 1.5e-3)
#          STAGE1_STOP_S (stage 1 stops this many seconds after the start; default: its share of
#          BUDGET_S - RESERVE_S in proportion to its tokens, STAGE1_STEPS*STAGE1_GBS*STAGE1_SEQ vs STEPS*GBS*SEQ)
#     e.g. 8k by extension from 2k: STAGE1_DATA=.gpu_quality_data_c STAGE1_STEPS=1600 SEQ=8192 GBS=4 STEPS=600 \
#          bash bench/quality/copy_test.sh .gpu_quality_data_c8k OUT
# OUT_DIR gets three files: runs.tar.gz (env.txt, data_stats.json, and per run its logs, metrics.jsonl, eval
# results.json and probe JSON; no checkpoints), summary.json and summary.md (bench/quality/copy_summary.py).
# Every stage is bounded by the deadline; a stage that would start with too little time left is skipped, and
# what finished is written.
set -uo pipefail
DATA="$(cd "$1" && pwd)"; OUT="$(mkdir -p "$2" && cd "$2" && pwd)"
T0=$(date +%s)
TOY="${COPY_TOY:-0}"
if [ "$TOY" = 1 ]; then
  : "${BUDGET_S:=900}" "${MODEL:=tiny}" "${SEQ:=512}" "${STEPS:=600}" "${GBS:=8}" "${FT_STEPS:=20}" \
    "${RESERVE_S:=330}" "${FT_EVAL_S:=110}" "${GPUS:=cpu}" "${SEEDS:=1234}"
  LR=3e-3 MIN_LR=3e-4 LENGTHS="[512]" RSAMPLES=16 INIT=16 WIN=128 BACKEND=reference PROBE_D="16 256"
  : "${STAGE1_SEQ:=256}" "${STAGE1_GBS:=8}" "${STAGE2_LR:=1.5e-3}"
else
  : "${BUDGET_S:=490}" "${MODEL:=small}" "${SEQ:=2048}" "${STEPS:=1000}" "${GBS:=16}" "${FT_STEPS:=160}" \
    "${RESERVE_S:=230}" "${FT_EVAL_S:=60}" "${GPUS:=0 1}" "${SEEDS:=1234 2345}"
  LR=2e-3 MIN_LR=2e-4 LENGTHS="[$SEQ]" RSAMPLES=32 INIT=16 WIN=128 BACKEND=triton PROBE_D="16 256 1024"
  : "${STAGE1_SEQ:=2048}" "${STAGE1_GBS:=16}" "${STAGE2_LR:=1e-3}"
fi
STAGE1_STEPS="${STAGE1_STEPS:-0}"
[[ "$STAGE1_STEPS" =~ ^[0-9]+$ ]] || { echo "copy_test.sh: STAGE1_STEPS=$STAGE1_STEPS: must be an integer >= 0 (0: no stage 1)"; exit 2; }
if [ "$STAGE1_STEPS" -gt 0 ]; then
  [ -f "${STAGE1_DATA:-}/cmix.idx" ] || { echo "copy_test.sh: STAGE1_DATA=${STAGE1_DATA:-}: must be a copy_data.py dir (cmix.bin/.idx) when STAGE1_STEPS > 0"; exit 2; }
  STAGE1_DATA="$(cd "$STAGE1_DATA" && pwd)"
  cmp -s "$DATA/prose_tokenizer.json" "$STAGE1_DATA/prose_tokenizer.json" || {
    echo "copy_test.sh: STAGE1_DATA=$STAGE1_DATA: its prose_tokenizer.json must be the one of DATA_DIR ($DATA)"; exit 2; }
  T1=$((STAGE1_STEPS * STAGE1_GBS * STAGE1_SEQ)) T2=$((STEPS * GBS * SEQ))
  : "${STAGE1_STOP_S:=$(( (BUDGET_S - RESERVE_S) * T1 / (T1 + T2) ))}"
fi
TOPKS="${TOPKS:-[1,2,4,8,16]}"
# Depths 0 (fact in INIT) and 1 (fact in the local window) are the controls; 0.1-0.9 put the fact beyond
# INIT + window (>= ~200 tokens before the question at 2048), where only the selected blocks can reach it.
DEPTHS="${DEPTHS:-[0.0,0.1,0.3,0.5,0.7,0.9,1.0]}"
DEADLINE=$((T0 + BUDGET_S))
W="${WORK_DIR:-/tmp/phsa_copy}"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
mkdir -p "$W/runs"
read -r -a GPU_LIST <<< "$GPUS"; read -r -a SEED_LIST <<< "$SEEDS"

DATA_ARGS=(data=megatron_bin "data.prefixes=[$DATA/cmix]" "data.tokenizer=$DATA/prose_tokenizer.json"
           "data.punct_table=$DATA/cmix_punct.json" data.seq_len="$SEQ")
TRAIN=(model="$MODEL" train.global_batch_size="$GBS" train.micro_batch_size="$GBS"
       train.eval_iters=2 train.log_interval=25 checkpoint.keep_last=1 logging=stdout)
# The PHSA geometry of the quality recipe (block 16, INIT 16, local window 128); query_block and score as shipped.
GEOM=(attention.block_size=16 attention.n_init=$INIT attention.local_window=$WIN)
EVAL=(eval.topks="$TOPKS" eval.retrieval.topks="$TOPKS" eval.retrieval.kind=kv eval.retrieval.lengths="$LENGTHS" eval.retrieval.depths="$DEPTHS"
      eval.retrieval.samples=$RSAMPLES eval.retrieval.batch_size=8 eval.recall.enabled=false eval.valid_iters=4)

left() { echo $((DEADLINE - $(date +%s))); }
limit() { local s=$(( $1 > 1 ? $1 : 1 )); echo "$s"; }  # timeout 0 would mean "no limit"
dev() { [ "$1" = cpu ] && echo "" || echo "$1"; }

pack() {  # runs.tar.gz of everything small; serialized, atomic
  ( flock 9
    tar -czf "$OUT/runs.tar.gz.tmp" -C "$W" --exclude=checkpoints --exclude='cache*' --exclude=wandb \
        --exclude='*.pt' runs 2>/dev/null && mv "$OUT/runs.tar.gz.tmp" "$OUT/runs.tar.gz"
  ) 9>"$W/pack.lock"
}

train() {  # gpu run_dir stop_at overrides...  (records train_rc / train_s in run_dir/status.txt)
  local gpu=$1 rd=$2 stop_at=$3 t; shift 3; t=$(date +%s)
  mkdir -p "$rd"; printf '%s\n' "$@" > "$rd/overrides.txt"
  CUDA_VISIBLE_DEVICES=$(dev "$gpu") NPROC=1 PHSA_RUN_DIR="$rd" PHSA_STOP_AT=$stop_at \
    timeout -k 20 "$(limit $((stop_at - t + 60)))" bash launch/pretrain.sh "${TRAIN[@]}" "${DATA_ARGS[@]}" \
      data.cache_dir="$rd/cache" "$@" > "$rd/launch.log" 2>&1  # (train.log is the trainer's own: it writes it)
  echo "train_rc=$? train_s=$(( $(date +%s) - t ))" >> "$rd/status.txt"
}

evaluate() {  # gpu run_dir out_name extra_overrides(comma-separated, quoted)...
  local gpu=$1 rd=$2 name=$3 ov=$4 t; t=$(date +%s)
  CUDA_VISIBLE_DEVICES=$(dev "$gpu") timeout -k 10 "$(limit $(( $(left) - 5 )))" "$PY" -m phsa_train.eval \
      eval.checkpoint="$rd/checkpoints" eval.output_dir="$rd/$name" "${EVAL[@]}" \
      "eval.overrides=['train.seed=1234','data.cache_dir=$rd/cache_eval'$ov]" > "$rd/$name.log" 2>&1
  echo "${name}_rc=$? ${name}_s=$(( $(date +%s) - t ))" >> "$rd/status.txt"
}

probe() {  # gpu run_dir out_name probe_args...  (bench/quality/copy_probe.py -> run_dir/out_name.json)
  local gpu=$1 rd=$2 name=$3 t; shift 3; t=$(date +%s)
  CUDA_VISIBLE_DEVICES=$(dev "$gpu") timeout -k 10 "$(limit $(( $(left) - 5 )))" "$PY" bench/quality/copy_probe.py \
      "$rd/checkpoints" --distances $PROBE_D --samples 32 --json "$rd/$name.json" "$@" > "$rd/$name.log" 2>&1
  echo "${name}_rc=$? ${name}_s=$(( $(date +%s) - t ))" >> "$rd/status.txt"
}

dense_stage1() {  # gpu seed run_dir  (length extension: the short-sequence stage, on STAGE1_DATA)
  echo "[copy_test] GPU $1 seed $2: dense stage 1, seq $STAGE1_SEQ ($(left) s left)"
  # Later overrides win: the data prefix, sequence length and batch of stage 1 replace those of DATA_ARGS / TRAIN.
  train "$1" "$3" $((T0 + STAGE1_STOP_S)) attention=dense train.seed="$2" train.steps="$STAGE1_STEPS" train.lr=$LR \
      train.min_lr=$MIN_LR train.warmup_steps=$((STAGE1_STEPS / 20)) train.eval_interval=$((STAGE1_STEPS / 6)) \
      checkpoint.interval="$STAGE1_STEPS" "data.prefixes=[$STAGE1_DATA/cmix]" data.seq_len="$STAGE1_SEQ" \
      train.global_batch_size="$STAGE1_GBS" train.micro_batch_size="$STAGE1_GBS"
  pack
}

pipeline() {  # gpu seed
  local gpu=$1 seed=$2 d="$W/runs/dense-s$2" lr=$LR ext=()
  if [ "$STAGE1_STEPS" -gt 0 ]; then
    dense_stage1 "$gpu" "$seed" "$W/runs/dense1-s$seed"
    [ -d "$W/runs/dense1-s$seed/checkpoints" ] || { echo "[copy_test] GPU $gpu: no stage-1 checkpoint"; return; }
    lr=$STAGE2_LR ext=(checkpoint.init_from="$W/runs/dense1-s$seed/checkpoints")
  fi
  echo "[copy_test] GPU $gpu seed $seed: dense training ($(left) s left)"
  train "$gpu" "$d" $((DEADLINE - RESERVE_S)) attention=dense train.seed="$seed" train.steps="$STEPS" train.lr=$lr train.min_lr=$MIN_LR \
      train.warmup_steps=$((STEPS / 20)) train.eval_interval=$((STEPS / 6)) checkpoint.interval="$STEPS" ${ext[@]+"${ext[@]}"}
  pack
  [ -d "$d/checkpoints" ] || { echo "[copy_test] GPU $gpu: no dense checkpoint"; return; }
  # (a) the dense weights: dense, then PHSA selection with lam=0.5 and lam=1 (training-free), side by side.
  local sel=",'attention.name=phsa','attention.backend=$BACKEND','curriculum.name=none','attention.train_topk=4'"
  for g in "${GEOM[@]}"; do sel="$sel,'$g'"; done
  echo "[copy_test] GPU $gpu seed $seed: evaluation (a) ($(left) s left)"
  evaluate "$gpu" "$d" eval_dense "" &
  evaluate "$gpu" "$d" eval_a_lam0.5 "$sel,'attention.lam=0.5'" &
  evaluate "$gpu" "$d" eval_a_lam1 "$sel,'attention.lam=1.0'" &
  # The induction probe (random spans copied at a distance), dense and under each selection rule.
  local po=(attention.name=phsa attention.backend=$BACKEND curriculum.name=none "${GEOM[@]}")
  probe "$gpu" "$d" probe_dense &
  probe "$gpu" "$d" probe_a_lam0.5 --override "${po[@]}" attention.lam=0.5 --topks ${TOPKS//[\[\],]/ } &
  probe "$gpu" "$d" probe_a_lam1 --override "${po[@]}" attention.lam=1.0 --topks ${TOPKS//[\[\],]/ } &
  wait; pack
  # (b) sparse fine-tune from the dense weights with each lam: linear ramp from dense to k=2 over half the
  # steps, hold; evaluated at every k of TOPKS.
  if [ "$(left)" -lt $((FT_EVAL_S + 40)) ]; then echo "[copy_test] GPU $gpu: no time for (b)"; return; fi
  echo "[copy_test] GPU $gpu seed $seed: fine-tunes (b) ($(left) s left)"
  for lam in 0.5 1.0; do
    ( local f="$W/runs/ft-lam$lam-s$seed"
      # backend explicit: auto would run cuDNN dense at <= 4096 tokens (the speed crossover), i.e. not sparse.
      train "$gpu" "$f" $((DEADLINE - FT_EVAL_S)) attention=phsa attention.lam=$lam "${GEOM[@]}" attention.backend=$BACKEND \
          attention.eval_topk=4 curriculum=linear curriculum.warmup_steps=0 curriculum.ramp_steps=$((FT_STEPS / 2)) \
          curriculum.target_activation=null curriculum.target_topk=2 checkpoint.init_from="$d/checkpoints" \
          train.seed="$seed" train.steps="$FT_STEPS" train.warmup_steps=10 train.lr=$MIN_LR train.min_lr=$MIN_LR \
          train.lr_decay_style=constant train.eval_interval="$FT_STEPS" checkpoint.interval="$FT_STEPS"
      [ -d "$f/checkpoints" ] && evaluate "$gpu" "$f" eval_b ",'attention.backend=$BACKEND'" ) &
  done
  wait; pack
  echo "[copy_test] GPU $gpu seed $seed: done ($(left) s left)"
}

{ echo "start $(date -u +%FT%TZ) budget ${BUDGET_S}s model $MODEL seq $SEQ steps $STEPS gbs $GBS toy $TOY"
  [ "$STAGE1_STEPS" -gt 0 ] && echo "stage 1: data $STAGE1_DATA seq $STAGE1_SEQ steps $STAGE1_STEPS gbs $STAGE1_GBS" \
    "stop at +${STAGE1_STOP_S}s; stage 2 lr $STAGE2_LR"
  git rev-parse HEAD 2>/dev/null || true; git status --short 2>/dev/null | head -20
  nvidia-smi --query-gpu=index,name,memory.total --format=csv 2>/dev/null || echo "no GPU"
  "$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" 2>&1
  nproc; } > "$W/runs/env.txt"
cp "$DATA/cmix_stats.json" "$W/runs/data_stats.json" 2>/dev/null || true

for i in "${!GPU_LIST[@]}"; do
  pipeline "${GPU_LIST[$i]}" "${SEED_LIST[$i]}" &
  sleep 2
done
wait
pack
"$PY" bench/quality/copy_summary.py "$W/runs" --json "$OUT/summary.json" > "$OUT/summary.md" 2>&1 || true
echo "[copy_test] done in $(( $(date +%s) - T0 )) s"; cat "$OUT/summary.md" 2>/dev/null | head -60
