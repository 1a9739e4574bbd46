import os

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    """One embedded-corpus build shared by every test in the session (PHSA_CACHE_DIR)."""
    path = os.environ.get("PHSA_TEST_CACHE_DIR") or str(tmp_path_factory.mktemp("phsa_cache"))
    os.environ["PHSA_CACHE_DIR"] = path
    return path
