#!/usr/bin/env bash
# phsa_train launcher.
#   Local (no Slurm):  bash launch/pretrain.sh [hydra overrides]        -> torchrun on this machine
#   Slurm:             sbatch launch/pretrain.sh [hydra overrides]      -> see the Slurm section below
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
export PHSA_RUN_DIR="${PHSA_RUN_DIR:-$REPO/runs/$(run_name "$@")}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" PYTHONFAULTHANDLER=1 PYTHONUNBUFFERED=1
mkdir -p "$PHSA_RUN_DIR"

if [ -z "${SLURM_JOB_ID:-}" ]; then
  if [ -z "${NPROC:-}" ]; then
    NGPU="$("$PYTHON" -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)"
    if [ "$NGPU" -gt 0 ]; then NPROC="$NGPU"; else NPROC=2; fi
  fi
  echo "[pretrain.sh] local run: $NPROC processes, run dir $PHSA_RUN_DIR"
  exec "$PYTHON" -m torch.distributed.run --standalone --nproc-per-node="$NPROC" \
    --signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1 \
    -m phsa_train.train hydra.run.dir="$PHSA_RUN_DIR" "$@"
fi
echo "Slurm mode is not implemented yet" >&2
exit 1
