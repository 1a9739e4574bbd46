from phsa_train.config.schema import register_configs
from phsa_train.config.validate import ConfigError, validate

__all__ = ["ConfigError", "register_configs", "validate"]
