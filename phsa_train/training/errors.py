"""Faults a run reports in one line (no traceback) before it exits with status 2."""


class TrainingError(RuntimeError):
    """A fault of the run's inputs or surroundings (data, storage, a diverged loss), not a bug: one line says it."""
