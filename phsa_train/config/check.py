"""``python -m phsa_train.config.check [--world-size N] [overrides]``: compose and validate the training config
exactly as every rank will, in one light process, before the launcher starts any rank.

Exit 0 when the config is valid; otherwise one line ``error: ...`` on stderr and exit status 2, so a bad value
never reaches torchrun (whose failure report would bury the line under its own traceback).
"""
from __future__ import annotations

import argparse
import sys


def _one_line(e: BaseException) -> str:
    """Hydra's composition errors span several lines (override, reason, full_key, object_type): keep the
    override and the reason."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    cause = e.__cause__ or e.__context__
    reason = [ln.strip() for ln in str(cause).splitlines() if ln.strip()][:1] if cause else []
    keep = [ln for ln in lines if not ln.startswith(("full_key", "object_type", "reference_type"))][:2]
    return "; ".join(dict.fromkeys(keep + reason))


def _unknown_key(e: BaseException) -> str | None:
    """Hydra's "Could not override 'a.b'" (a key the schema lacks) in this project's words; Hydra's own
    advice, to add it with '+', would only move the error to the schema check."""
    import re

    found = re.search(r"Could not override '([^']+)'", str(e))
    if not found or "not in" not in str(e.__cause__ or e):
        return None
    key = found.group(1)
    parent = key.rpartition(".")[0]
    from phsa_train.config import compose
    from phsa_train.config.validate import unknown_knob

    node = compose([])
    for part in parent.split(".") if parent else []:
        node = node.get(part) if hasattr(node, "get") else None
    return unknown_knob(key, [str(k) for k in node.keys()] if hasattr(node, "keys") else [])


def check(overrides: list[str], world_size: int) -> str | None:
    """The error line for these overrides, or None when the config is valid."""
    from phsa_train.config import ConfigError, compose, validate

    try:
        cfg = compose([o for o in overrides if not o.startswith("hydra.")])
    except Exception as e:  # noqa: BLE001 - Hydra/OmegaConf raise several types for a bad override
        return _unknown_key(e) or _one_line(e)
    try:
        validate(cfg, world_size)
    except ConfigError as e:
        return str(e)
    return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m phsa_train.config.check", description=__doc__.split("\n\n")[0])
    ap.add_argument("--world-size", type=int, default=1, help="ranks of the job (divisibility checks)")
    args, overrides = ap.parse_known_args(sys.argv[1:] if argv is None else argv)
    if any(o.startswith("-") for o in overrides):  # Hydra's own flags (--cfg, --help, ...): let the run handle them
        return 0
    error = check(overrides, args.world_size)
    if error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
