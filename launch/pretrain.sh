#!/usr/bin/env bash
# phsa_train launcher. One script, two modes:
#   Local (no Slurm):  bash launch/pretrain.sh [hydra overrides]        -> torchrun on this machine
#   Slurm:             sbatch [sbatch options] launch/pretrain.sh [hydra overrides]   (submit from the repo root)
# The #SBATCH lines below are defaults; sbatch options on the command line override them, e.g.
#   sbatch --nodes=4 --time=24:00:00 launch/pretrain.sh model=small attention=phsa
# Slurm mode: one `torchrun` per node (srun --ntasks-per-node=1), each starting one rank per GPU (NPROC to
# choose, e.g. NPROC=2 gloo ranks on a CPU node). Rendezvous: c10d on the first node of the allocation,
# port derived from the job id. The run dir is runs/<job name>-<job id> (PHSA_RUN_DIR to choose it); a
# requeued job keeps its id, so it finds its run dir and resumes from its latest checkpoint.
# Time limit: 120 s before the end (USR1 to this script, which creates $PHSA_RUN_DIR/STOP, or the ranks' own
# clock, PHSA_WARN_S) every rank saves a checkpoint after the same step and exits, and this script requeues
# the job. docs/slurm.md has the knobs.
#SBATCH --job-name=phsa
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --time=12:00:00
#SBATCH --signal=B:USR1@120
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=logs/%x-%j.out
#SBATCH --error=logs/%x-%j.out
# Local mode: NPROC (default: number of GPUs, or parallel.nproc_per_node=2 processes with gloo on CPU).
# The run directory is fixed per set of overrides (PHSA_RUN_DIR to choose it), so running the same command
# again resumes from its latest checkpoint (checkpoint.resume=auto).
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
[ -n "${SLURM_SUBMIT_DIR:-}" ] && [ -f "$SLURM_SUBMIT_DIR/launch/pretrain.sh" ] && REPO="$SLURM_SUBMIT_DIR"
cd "$REPO"
if [ -z "${VIRTUAL_ENV:-}" ] && [ -x .venv/bin/python ]; then export PATH="$REPO/.venv/bin:$PATH"; fi
PYTHON="${PYTHON:-python}"

run_name() {  # stable, readable name for a set of overrides
  if [ $# -eq 0 ]; then echo default; return; fi
  local joined; joined="$(printf '%s_' "$@" | tr -c 'A-Za-z0-9_.-' '_' | tr -s '_' | sed 's/^_*//' | cut -c1-60)"
  echo "${joined%_}-$(printf '%s\n' "$@" | sha1sum | cut -c1-8)"
}
if [ -n "${SLURM_JOB_ID:-}" ]; then  # keyed by job id: a requeued job keeps it and finds its own run dir
  export PHSA_RUN_DIR="${PHSA_RUN_DIR:-$REPO/runs/$(printf %s "${SLURM_JOB_NAME:-phsa}" | tr -c 'A-Za-z0-9_.=-' '-')-$SLURM_JOB_ID}"
else
  export PHSA_RUN_DIR="${PHSA_RUN_DIR:-$REPO/runs/$(run_name "$@")}"
fi
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" PYTHONFAULTHANDLER=1 PYTHONUNBUFFERED=1
mkdir -p "$PHSA_RUN_DIR"

lock_run_dir() {  # one live run per run dir: a second one would resume from, and then prune, the first's files
  local lock="$PHSA_RUN_DIR/.lock"
  exec 9>>"$lock"  # fd 9 lives as long as this process and what it execs (torchrun); the ranks close it
  if ! flock -n 9; then
    echo "error: run dir $PHSA_RUN_DIR is in use by a live run ($(cat "$lock" 2>/dev/null)); wait for it," \
      "stop it, or choose another PHSA_RUN_DIR" >&2
    exit 2
  fi
  echo "pid $$ on $(hostname)" >"$lock"  # only for the message above; the kernel's lock is what counts
}

if [ -z "${SLURM_JOB_ID:-}" ]; then
  if [ -z "${NPROC:-}" ]; then
    NGPU="$("$PYTHON" -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)"
    if [ "$NGPU" -gt 0 ]; then NPROC="$NGPU"; else NPROC=2; fi
  fi
  # A bad value fails here, as one line and exit status 2, before torchrun starts any rank.
  "$PYTHON" -m phsa_train.config.check --world-size="$NPROC" "$@" || exit $?
  lock_run_dir
  echo "[pretrain.sh] local run: $NPROC processes, run dir $PHSA_RUN_DIR"
  exec "$PYTHON" -m phsa_train.torchrun --standalone --nproc-per-node="$NPROC" \
    --signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1 --shutdown-timeout="${PHSA_SHUTDOWN_TIMEOUT:-300}" \
    -m phsa_train.train hydra.run.dir="$PHSA_RUN_DIR" "$@"
fi

# ---------------------------------------------------------------------------------------------------- Slurm
SIGNALS=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1  # torchrun forwards these to the ranks (USR1 would kill it)
gpus_here() { "$PYTHON" -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0; }

if [ "${PHSA_SLURM_NODE:-}" = 1 ]; then
  # Per-node part: srun runs this once on every node (inside the container when PHSA_CONTAINER_IMAGE is set).
  export TRITON_CACHE_DIR="${PHSA_TRITON_CACHE_ROOT:-/tmp}/triton-${USER:-$(id -un)}-$SLURM_JOB_ID-$SLURM_NODEID"
  NPROC="${NPROC:-$(gpus_here)}"
  if [ "$NPROC" -eq 0 ]; then NPROC=2; fi  # CPU node: 2 gloo ranks, as in local mode
  exec "$PYTHON" -m phsa_train.torchrun --nnodes="$SLURM_NNODES" --nproc-per-node="$NPROC" \
    --rdzv-backend=c10d --rdzv-endpoint="$MASTER_ADDR:$MASTER_PORT" --rdzv-id="$SLURM_JOB_ID" \
    --max-restarts=0 --signals-to-handle="$SIGNALS" --shutdown-timeout="${PHSA_SHUTDOWN_TIMEOUT:-300}" \
    -m phsa_train.train hydra.run.dir="$PHSA_RUN_DIR" "$@"
fi

# Batch part: runs once, on the first node of the allocation. A bad config fails here (one line, status 2).
"$PYTHON" -m phsa_train.config.check --world-size="$(( SLURM_NNODES * ${NPROC:-$(gpus_here | sed 's/^0$/2/')} ))" "$@" || exit $?
lock_run_dir
MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"
# Per job, so two jobs on one node never collide; sbatch exports the submitting shell's environment, so an
# inherited MASTER_PORT is ignored (PHSA_MASTER_PORT sets one explicitly).
MASTER_PORT="${PHSA_MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}"
export MASTER_ADDR MASTER_PORT
export NCCL_DEBUG="${NCCL_DEBUG:-WARN}" TORCH_NCCL_ASYNC_ERROR_HANDLING="${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}"
STEP_CPUS="${SLURM_CPUS_PER_TASK:-${SLURM_CPUS_ON_NODE:-1}}"  # Slurm 22.05's srun does not inherit it
REQUEUE_MARK="$PHSA_RUN_DIR/REQUEUE"
export PHSA_STOP_FILE="$PHSA_RUN_DIR/STOP"  # the ranks look for it (phsa_train/training/preemption.py)
rm -f "$REQUEUE_MARK" "$PHSA_STOP_FILE"  # left over from a start that was killed after writing them
# Slurm (22.05) does not reliably send the --signal warning again after a requeue: so the ranks also get
# the job's end time minus PHSA_WARN_S (default 120 s) and stop by themselves when it passes.
JOB_END="$(scontrol show job "$SLURM_JOB_ID" -o 2>/dev/null | grep -o 'EndTime=[^ ]*' | cut -d= -f2 || true)"
if JOB_END_S="$(date -d "$JOB_END" +%s 2>/dev/null)"; then
  export PHSA_STOP_AT="$((JOB_END_S - ${PHSA_WARN_S:-120}))"
fi
CONTAINER=()
if [ -n "${PHSA_CONTAINER_IMAGE:-}" ]; then  # pyxis/enroot; the repo (shared filesystem) is mounted at its path
  CONTAINER=(--container-image="$PHSA_CONTAINER_IMAGE" --container-workdir="$REPO"
             --container-mounts="$REPO:$REPO${PHSA_CONTAINER_MOUNTS:+,$PHSA_CONTAINER_MOUNTS}")
fi
echo "[pretrain.sh] slurm job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $SLURM_JOB_NODELIST:" \
  "$SLURM_NNODES node(s) x ${NPROC:-one rank per GPU} ranks, rendezvous $MASTER_ADDR:$MASTER_PORT, run dir $PHSA_RUN_DIR," \
  "ends ${JOB_END:-?}"
echo "[pretrain.sh] $(env | grep -E '^(NCCL_|TORCH_NCCL_|CUDA_VISIBLE_DEVICES=|PHSA_CONTAINER)' | sort | tr '\n' ' ')"

# The time-limit warning goes to this shell only (--signal=B:USR1@120; by hand: scancel --batch
# --signal=USR1 <job>). It relays it through $PHSA_STOP_FILE, which every node's local rank 0 looks for
# between steps. Signalling the job step instead (--signal=USR1@120, no B:) reaches *every* process of the
# step (torchrun, ranks, and their helpers such as Megatron's checkpoint writer and W&B's monitor, which
# die of it); the ranks handle that too (torchrun forwards USR1), but the relay disturbs nothing.
# srun runs in the background because bash runs traps only between foreground commands. SIGTERM is
# never forwarded: Slurm sends it when it ends the job itself (scancel, scontrol requeue, time limit,
# preemption), and then Slurm decides what happens next.
GOT_TERM=0
on_usr1() {
  echo "[pretrain.sh] $(date +%T) batch shell got SIGUSR1: asking the ranks to checkpoint and stop"
  touch "$PHSA_STOP_FILE"
}
on_term() { GOT_TERM=1; echo "[pretrain.sh] $(date +%T) batch shell got SIGTERM: Slurm is ending the job"; }
trap on_usr1 USR1
trap on_term TERM
PHSA_SLURM_NODE=1 srun --ntasks="$SLURM_NNODES" --ntasks-per-node=1 --cpus-per-task="$STEP_CPUS" \
  --kill-on-bad-exit=1 "${CONTAINER[@]}" bash "$REPO/launch/pretrain.sh" "$@" &
SRUN_PID=$!
set +e
while :; do  # `wait` returns early when a trapped signal arrives; keep waiting until srun itself exits
  wait "$SRUN_PID"; RC=$?
  kill -0 "$SRUN_PID" 2>/dev/null || break
done
set -e
rm -f "$PHSA_STOP_FILE"
if [ -f "$REQUEUE_MARK" ]; then
  # The ranks stopped on a signal (time-limit warning, preemption notice) after saving a checkpoint.
  STEP="$(cat "$REQUEUE_MARK")"; rm -f "$REQUEUE_MARK"
  if [ "$GOT_TERM" = 0 ]; then
    echo "[pretrain.sh] $(date +%T) checkpoint saved at step $STEP; requeueing job $SLURM_JOB_ID"
    scontrol requeue "$SLURM_JOB_ID"
    exit 0
  fi
  echo "[pretrain.sh] $(date +%T) checkpoint saved at step $STEP; not requeueing (Slurm is ending the job)"
fi
echo "[pretrain.sh] $(date +%T) training step exited with $RC"
exit "$RC"
