#!/usr/bin/env bash
# Hydra multirun on Slurm: one job per point of the sweep, submitted by hydra-submitit-launcher
# (conf/hydra/launcher/slurm.yaml; needs `pip install -e '.[slurm]'`). Run it from a login node, in tmux or
# with nohup: it submits every job, then waits for all of them and prints each job's result.
#   bash launch/sweep.sh attention=dense,phsa train.lr=1e-3,3e-4                 # 4 jobs
#   bash launch/sweep.sh hydra.launcher.partition=gpu hydra.launcher.nodes=2 attention=dense,phsa
# All jobs log to one W&B group (PHSA_SWEEP_GROUP, default sweep-<date>); each job has its own W&B run and
# run dir $PHSA_SWEEP_DIR/<job num> (checkpoints, metrics.jsonl); submitit's logs are in
# $PHSA_SWEEP_DIR/.submitit/<job id>/.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
if [ -z "${VIRTUAL_ENV:-}" ] && [ -x .venv/bin/python ]; then export PATH="$REPO/.venv/bin:$PATH"; fi
if [ $# -eq 0 ]; then sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'; exit 2; fi
export PHSA_SWEEP_GROUP="${PHSA_SWEEP_GROUP:-sweep-$(date +%Y%m%d-%H%M%S)}"
export PHSA_SWEEP_DIR="${PHSA_SWEEP_DIR:-$REPO/multirun/$PHSA_SWEEP_GROUP}"
export PYTHONUNBUFFERED=1
echo "[sweep.sh] W&B group $PHSA_SWEEP_GROUP, sweep dir $PHSA_SWEEP_DIR"
exec "${PYTHON:-python}" -m phsa_train.train --multirun hydra/launcher="${PHSA_LAUNCHER:-slurm}" \
  logging.wandb.group="$PHSA_SWEEP_GROUP" "$@"
