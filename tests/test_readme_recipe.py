"""The README's own-data recipe, run verbatim: text files -> data_prep -> launch/pretrain.sh -> eval.

The commands are read from README.md (the fenced block under "Training your own model") together with the toy
sizes that the README itself says to append on a CPU, and run in a scratch copy of the repository, so the
relative paths of the recipe (corpus/, data/, runs/) are the ones a user gets.
"""
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO, subprocess_env

SECTION = "## Training your own model"


def readme_recipe() -> tuple[list[str], str, str]:
    """(the three commands, the toy overrides for step 2, the toy overrides for step 3)."""
    text = (REPO / "README.md").read_text()
    section = text[text.index(SECTION):]
    block = section.split("```bash\n", 1)[1].split("```", 1)[0]
    commands = [c.strip() for c in block.replace("\\\n", " ").splitlines() if c.strip() and not c.startswith("#")]
    toy = re.search(r"append to step 2\s+`([^`]+)`\s+and to step 3 `([^`]+)`", section)
    assert len(commands) == 3 and toy, "README's own-data recipe changed shape: update this test"
    return commands, toy.group(1), toy.group(2)


@pytest.mark.slow
def test_readme_own_data_recipe_runs_verbatim(tmp_path, cache_dir):
    (prep, train, evaluate), toy_train, toy_eval = readme_recipe()
    clone = tmp_path / "clone"
    for name in ("launch", "conf", "phsa_train", "data_prep"):
        shutil.copytree(REPO / name, clone / name, ignore=shutil.ignore_patterns("__pycache__"))
    # the user's corpus: one .txt file per paragraph of this repository's own documentation (real prose)
    corpus = clone / "corpus"
    corpus.mkdir()
    paragraphs = [p for f in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
                  for p in f.read_text().split("\n\n") if len(p) > 200]
    for i, p in enumerate(paragraphs):
        (corpus / f"doc{i:04d}.txt").write_text(p)
    env = subprocess_env(PHSA_CACHE_DIR=cache_dir, NPROC=2)
    # the README's commands run in the project's venv, as after `source .venv/bin/activate`
    venv_bin = str(Path(sys.executable).parent)
    env["PATH"] = venv_bin + os.pathsep + env.get("PATH", "")

    def sh(command: str, timeout: int) -> str:
        p = subprocess.run(["bash", "-c", command], cwd=clone, env=env, capture_output=True, text=True,
                           timeout=timeout)
        assert p.returncode == 0, f"{command}\n{p.stdout[-4000:]}\n{p.stderr[-4000:]}"
        return p.stdout + p.stderr

    sh(prep, 300)
    assert {f.name for f in (clone / "data").iterdir()} >= {
        "mycorpus.bin", "mycorpus.idx", "mycorpus_punct.json", "mycorpus_tokenizer.json"}
    out = sh(f"{train} {toy_train}", 600)
    assert "step     20/20" in out, out[-3000:]
    run = clone / "runs" / "mycorpus"
    assert (run / "checkpoints" / "latest_checkpointed_iteration.txt").read_text() == "20"
    out = sh(f"{evaluate} {toy_eval}", 600)
    assert "[eval] wrote" in out, out[-3000:]
    results = json.loads(next((run / "eval").glob("iter_*/results.json")).read_text())
    assert results["step"] == 20 and results["perplexity"]


def test_readme_recipe_is_what_data_prep_and_training_agree_on():
    """Cheap guard beside the slow run: step 2 names exactly the prefix step 1 writes."""
    (prep, train, evaluate), _, _ = readme_recipe()
    prefix = shlex.split(prep)[shlex.split(prep).index("--output-prefix") + 1]
    assert f"data.prefixes=[{prefix}]" in train
    run_dir = re.search(r"PHSA_RUN_DIR=(\S+)", train).group(1)
    assert f"eval.checkpoint={run_dir}" in evaluate
