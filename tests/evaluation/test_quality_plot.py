"""bench/quality/plot.py draws the three runs' loss curves from their metrics.jsonl (CPU, no training)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_quality_plot(tmp_path):
    for name, offset in (("dense", 0.0), ("phsa", -0.05), ("meanpool", -0.06)):
        d = tmp_path / name
        d.mkdir()
        rows = []
        for step in range(0, 31):
            r = {"step": step}
            if step:
                r["train/loss"] = 8.0 - 0.1 * step + offset
            if step % 10 == 0:
                r["valid/loss"] = 8.1 - 0.1 * step + offset
            if name != "dense" and step:
                r["phsa/phase"] = "dense" if step <= 5 else "ramp" if step <= 15 else "hold"
            rows.append(r)
        (d / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = tmp_path / "plots" / "loss.png"
    res = subprocess.run([sys.executable, str(REPO / "bench/quality/plot.py"), str(tmp_path), str(out)],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert out.exists() and out.read_bytes()[:4] == b"\x89PNG"
    usage = subprocess.run([sys.executable, str(REPO / "bench/quality/plot.py")], capture_output=True, text=True)
    assert usage.returncode == 2 and "Usage" in usage.stdout
