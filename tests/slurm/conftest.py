"""A real single-node Slurm cluster for the tests in this directory (started once per module)."""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest

from tests.slurm.cluster import SlurmCluster, ensure_installed


@pytest.fixture(scope="module")
def slurm(cache_dir):
    reason = ensure_installed()
    if reason:
        pytest.skip(reason)
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
