"""Shared by the benchmarks: run one measurement in a fresh subprocess and read its JSON back.

A fresh process per measurement gives each its own peak memory (ru_maxrss) and lets environment
variables that OpenMP reads at start-up (OMP_WAIT_POLICY) differ between measurements.
"""

from __future__ import annotations

import json
import resource
import subprocess
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def run_json(cmd: list[str], env: dict[str, str], timeout: int = 3600) -> dict[str, Any]:
    """Runs `cmd` with exactly `env` and returns the JSON object it prints last on stdout."""
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    what = " ".join([Path(cmd[1]).name, *cmd[2:6]])
    if proc.returncode != 0:
        raise RuntimeError(f"{what} ... failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    lines = proc.stdout.strip().splitlines()
    if not lines:
        raise RuntimeError(f"{what} ... printed nothing:\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1])


def gemm_record(method: Any, device: str) -> dict[str, Any]:
    """Where selfsup's fp32 Linear products ran (`train.cpu_gemm`, selfsup/nn/gemm.py) and, on the CPU,
    this machine's time for one Linear step's three products on MKL and on OpenBLAS."""
    from selfsup.nn.gemm import BlasLinear, measure_gemm

    record: dict[str, Any] = {"cpu_gemm": "openblas" if any(type(m) is BlasLinear for m in method.modules())
                              else "torch"}
    if device == "cpu":
        mkl_s, blas_s = measure_gemm()
        record["gemm_probe_ms"] = {"mkl": round(mkl_s * 1e3, 1), "openblas": round(blas_s * 1e3, 1)}
    return record


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (what a benchmark's figures were measured on)."""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "unknown"


def median(values: list[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def encoder_features(encoder: Any, images: Any, preprocess: dict[str, Any], device: Any, autocast_dtype: Any) -> Any:
    """Frozen features [N, D] (float32, CPU) of uint8 images [N, C, H, W], prepared as `preprocess`
    says (`selfsup.modalities.image.prepare_images`), in batches of 256, under the run's precision as
    selfsup's own readers embed them."""
    import torch

    from selfsup.modalities.image import prepare_images

    encoder.eval().to(device)
    out = []
    with torch.no_grad():
        for start in range(0, len(images), 256):
            x = prepare_images(images[start : start + 256].to(device), preprocess)
            with torch.autocast(device.type, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
                out.append(encoder.embed(x).float().cpu())
    return torch.cat(out)
