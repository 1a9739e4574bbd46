"""Pretraining entry point: ``python -m phsa_train.train [hydra overrides]`` (or ``launch/pretrain.sh``).

Only the Hydra face; the loop is :func:`phsa_train.training.loop.train`. Nothing imports this module.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from phsa_train.config import ConfigError, register_configs
from phsa_train.training.checkpoint import CheckpointError
from phsa_train.training.errors import TrainingError
from phsa_train.training.hf_qwen3 import ConversionError
from phsa_train.training.lifetime import die_with_parent
from phsa_train.training.loop import train
from phsa_train.training.metrics import log_console_to

register_configs()


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    if "TORCHELASTIC_RUN_ID" in os.environ:  # a torchrun worker: no orphan rank trains on after a kill -9 of it
        die_with_parent()
    run_dir = Path(cfg.run_dir or HydraConfig.get().runtime.output_dir)
    if int(os.environ.get("RANK", 0)) == 0:
        log_console_to(run_dir / f"{HydraConfig.get().job.name}.log")  # train.log: the console, not just Hydra's
    try:
        train(cfg, run_dir)
    except (ConfigError, ConversionError, FileNotFoundError, TrainingError) as e:  # one clear line, no traceback
        if int(os.environ.get("RANK", 0)) == 0 or isinstance(e, CheckpointError):  # a save fails on its rank
            sys.stdout.write(f"error: {e}\n")  # one write: two ranks' lines never interleave (unbuffered stdout)
            sys.stdout.flush()
        raise SystemExit(2)


if __name__ == "__main__":
    main()
