"""Shared by the benchmarks: run one measurement in a fresh subprocess and read its JSON back.

A fresh process per measurement gives each its own peak memory (ru_maxrss) and lets environment
variables that OpenMP reads at start-up (OMP_WAIT_POLICY) differ between measurements.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def run_worker(script: Path, args: list[str], env: dict[str, str] | None = None, timeout: int = 1800) -> dict[str, Any]:
    """Runs `python script --worker args...` and returns the JSON object it prints last."""
    full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    proc = subprocess.run([sys.executable, str(script), "--worker", *args], env=full_env, capture_output=True,
                          text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{script.name} {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def median(values: list[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2
