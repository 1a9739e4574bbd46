"""Context parallelism on real GPUs (NCCL): CP=N against CP=1 for both modes, selections compared exactly.

Runs ``tests/workers/cp_exactness.py`` under torchrun with one process per GPU (CP=2, and CP=4 when four GPUs
are visible) at the 0.6B attention shape, bf16, Triton kernels, shipped query_block and score. Skipped without two CUDA
devices. Each case checks o, dq and the selected blocks for equality with the CP=1 run and dk/dv within bf16
rounding (see the worker).
"""
import json

import pytest
import torch

from tests.helpers import subprocess_env, torchrun

N_GPU = torch.cuda.device_count() if torch.cuda.is_available() else 0
pytestmark = pytest.mark.skipif(N_GPU < 2, reason="needs >= 2 CUDA devices")


def _shipped() -> tuple[int, str]:
    """The shipped attention.query_block and attention.score: what the exactness must hold for."""
    from phsa_train.config import compose

    a = compose(["attention=phsa"]).attention
    return int(a.query_block), str(a.score)


@pytest.mark.parametrize("cp", [2, 4], ids=["cp2", "cp4"])
def test_cp_matches_cp1_on_gpu(tmp_path, cp, seq_len=32768):
    if cp > N_GPU:
        pytest.skip(f"CP={cp} needs {cp} GPUs, {N_GPU} visible")
    out = tmp_path / "res"
    query_block, score = _shipped()
    proc = torchrun(cp, ["tests/workers/cp_exactness.py", "--out", str(out), "--seq-len", str(seq_len),
                         "--query-block", str(query_block), "--score", score, "--modes", "allgather", "ulysses"],
                    env=subprocess_env(), check=False, timeout=600)
    lines = [json.loads(x) for r in range(cp) if (tmp_path / f"res.{r}").exists()
             for x in (tmp_path / f"res.{r}").read_text().splitlines()]
    print("\n" + "\n".join(json.dumps(x) for x in lines), flush=True)  # one JSON record a line (cp_gpu_run.sh)
    assert proc.returncode == 0 and len(lines) == 2 * cp, proc.stdout[-3000:] + proc.stderr[-5000:]
    for x in lines:
        assert x["ok"] is not False, x
