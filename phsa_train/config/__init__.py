from pathlib import Path

from phsa_train.config.schema import register_configs
from phsa_train.config.validate import ConfigError, validate

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"


def config_groups() -> str:
    """The user's config groups and their options, one line per group (``--help``): the YAML files under
    ``conf/``, without the typed schema nodes (``base_model``, ...) that Hydra would list too."""
    lines = []
    for group in sorted(d for d in CONF_DIR.iterdir() if d.is_dir() and d.name != "hydra"):
        options = sorted(f.stem for f in group.glob("*.yaml"))
        prefix = "+" if group.name == "experiment" else ""
        lines.append(f"{prefix}{group.name}={'|'.join(options)}")
    return "\n".join(lines)


def _register_help_resolver() -> None:
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver("phsa_config_groups"):
        OmegaConf.register_new_resolver("phsa_config_groups", config_groups)


_register_help_resolver()


def compose(overrides: list[str] | None = None):
    """The training config exactly as ``python -m phsa_train.train [overrides]`` composes it (for tools/tests)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=overrides or [])


__all__ = ["CONF_DIR", "ConfigError", "compose", "config_groups", "register_configs", "validate"]
