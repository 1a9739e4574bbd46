"""Quality evaluation entry point: ``python -m phsa_train.eval eval.checkpoint=RUN_DIR/checkpoints [eval.*=...]``.

Only the Hydra face; the evaluation is :func:`phsa_train.evaluation.evaluate.run_eval`. Nothing imports this module.
"""
from __future__ import annotations

import hydra
from omegaconf import DictConfig

from phsa_train.config import ConfigError
from phsa_train.evaluation.evaluate import register_eval_configs, run_eval

register_eval_configs()


@hydra.main(version_base="1.3", config_path="../conf", config_name="eval")
def main(cfg: DictConfig) -> None:
    from omegaconf.errors import MissingMandatoryValue

    try:
        run_eval(cfg)
    except MissingMandatoryValue as err:
        print(f"error: {err.full_key} is required (e.g. eval.checkpoint=RUN_DIR/checkpoints)", flush=True)
        raise SystemExit(2)
    except (ConfigError, FileNotFoundError) as err:  # bad input: one clear line, no traceback
        print(f"error: {err}", flush=True)
        raise SystemExit(2)


if __name__ == "__main__":
    main()
