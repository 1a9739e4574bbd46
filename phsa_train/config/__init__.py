from pathlib import Path

from phsa_train.config.schema import register_configs
from phsa_train.config.validate import ConfigError, validate

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"


def compose(overrides: list[str] | None = None):
    """The training config exactly as ``python -m phsa_train.train [overrides]`` composes it (for tools/tests)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=overrides or [])


__all__ = ["CONF_DIR", "ConfigError", "compose", "register_configs", "validate"]
