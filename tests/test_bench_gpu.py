"""bench/gpu.py, the CUDA check, runs its own checks on the CPU here (no GPU in CI): an objective
trains, resumes bit-identically and reports; a missing GPU is a clear message, not a traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "gpu.py"


def _run(*args: str, tmp_path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path / "gpu"), *args],
                          capture_output=True, text=True, env=env, timeout=600)


def test_gpu_check_runs_an_objective_and_its_resume_on_the_cpu(tmp_path):
    proc = _run("--device", "cpu", "--steps", "4", "--batch", "16", "--methods", "simclr", "mae", tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r["method"] for r in rows] == ["simclr", "mae"]
    for row in rows:
        assert row["status"] == "ok" and row["finite"] and row["steps"] == 4
        assert row["resume_bit_identical"], row
        assert row["samples_per_s"] > 0 and row["precision"] in ("fp32", "bf16")
    assert "simclr" in proc.stderr and "bit-identical" in proc.stderr


def test_gpu_check_without_a_gpu_says_so(tmp_path):
    import torch

    if torch.cuda.is_available():  # pragma: no cover (a GPU machine runs the real check instead)
        return
    proc = _run("--device", "cuda", "--methods", "simclr", tmp_path=tmp_path)
    assert proc.returncode != 0
    assert "no CUDA device here" in proc.stderr and "Traceback" not in proc.stderr
