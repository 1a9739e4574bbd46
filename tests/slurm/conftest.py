"""A real single-node Slurm cluster for the tests in this directory (started once per module).

Without Slurm installed the tests here are deselected and the run ends with one line saying how to enable them;
`.ci/run` installs slurm-wlm + munge, `make test` never installs anything."""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest

from tests.slurm.cluster import HOW_TO_ENABLE, SlurmCluster, missing_binaries

_MISSING = missing_binaries()
_SKIPPED: list[str] = []


def pytest_collection_modifyitems(config, items):
    """Deselect (not skip) the Slurm tests when Slurm is missing: the run then reports them in one line."""
    if not _MISSING:
        return
    here = Path(__file__).parent
    keep = [item for item in items if here not in Path(str(item.fspath)).parents]
    dropped = [item for item in items if here in Path(str(item.fspath)).parents]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = keep
        _SKIPPED.extend(item.nodeid for item in dropped)


def pytest_terminal_summary(terminalreporter):
    if _SKIPPED:
        terminalreporter.write_line(
            f"{len(_SKIPPED)} Slurm tests not run: Slurm is not installed (missing {', '.join(_MISSING)}); "
            f"to run them, {HOW_TO_ENABLE}")


@pytest.fixture(scope="module")
def slurm(cache_dir):
    # A short path of its own: the munge socket path must stay under the 108-byte AF_UNIX limit.
    root = Path(tempfile.mkdtemp(prefix="phsa-slurm-"))
    cluster = SlurmCluster(root)
    try:
        cluster.start()
    except BaseException:
        cluster.stop()
        raise
    try:
        yield cluster
    finally:
        cluster.stop()  # kills the daemons and every job process, whatever the tests did
        shutil.rmtree(root, ignore_errors=True)
