"""SimCLR pretraining throughput: ResNet-18 (CIFAR stem) at 32x32, batch 256, fp32 vs bf16 autocast.

Each precision runs the real training loop (`selfsup.train.loop.fit`, views made batched on the
device, AdamW, clipping) in its own subprocess on the same data (MNIST digits at 32 px, RGB) with
the same steps and threads, one after the other. Throughput is the median of the per-step
samples/s after `--warmup` steps; a sample is one image (two views of it are encoded).

    .venv/bin/python bench/vision.py [--steps 8] [--warmup 2] [--threads 2]

Prints one JSON line. The side-by-side with lightly joins this file with the BYOL/DINO work
(issue 3), in a separate environment, since lightly needs torchvision.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import median, peak_rss_mb, run_worker  # noqa: E402


def worker(precision: str, steps: int, warmup: int, threads: int, encoder: str, batch: int, size: int,
           channels: int = 3) -> dict:
    import torch

    torch.set_num_threads(threads)
    from selfsup.config import TrainConfig
    from selfsup.data.builtin import load_builtin
    from selfsup.data.pipeline import ImageBatches, channel_stats
    from selfsup.data.views import ImageViews, ViewsConfig
    from selfsup.encoders import build_encoder
    from selfsup.methods import build_method
    from selfsup.train.loop import fit
    from selfsup.train.runtime import Runtime

    data = load_builtin("mnist", size, channels)
    mean, std = channel_stats(data.images)
    torch.manual_seed(0)
    method = build_method({"name": "simclr"}, build_encoder(encoder, in_channels=channels, image_size=size))
    runtime = Runtime(device=torch.device("cpu"), autocast_dtype=torch.bfloat16 if precision == "bf16" else None)
    cfg = TrainConfig(steps=steps, batch_size=batch, checkpoint_every=10**9, log_every=10**9, precision=precision, device="cpu")
    with tempfile.TemporaryDirectory() as run_dir:
        fit(method, ImageBatches(data, ImageViews(ViewsConfig(), size, mean, std), runtime.device), cfg, Path(run_dir), runtime, seed=0)
        rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return {"samples_per_s": median([r["samples_per_s"] for r in rows[warmup:]]), "peak_rss_mb": peak_rss_mb(),
            "final_loss": rows[-1]["loss"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--precision", default="fp32", help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--encoder", default="resnet18")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--channels", type=int, default=3)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.precision, args.steps, args.warmup, args.threads, args.encoder, args.batch, args.size,
                                args.channels)))
        return
    common = ["--steps", str(args.steps), "--warmup", str(args.warmup), "--threads", str(args.threads),
              "--encoder", args.encoder, "--batch", str(args.batch), "--size", str(args.size),
              "--channels", str(args.channels)]
    env = {"OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
    fp32 = run_worker(Path(__file__), ["--precision", "fp32", *common], env)
    bf16 = run_worker(Path(__file__), ["--precision", "bf16", *common], env)
    print(json.dumps({
        "bench": "vision", "task": f"simclr {args.encoder} {args.size}px b{args.batch}", "metric": "samples_per_s",
        "selfsup": round(bf16["samples_per_s"], 2), "selfsup_setting": "bf16 autocast",
        "baseline": "selfsup fp32", "baseline_value": round(fp32["samples_per_s"], 2),
        "ratio": round(bf16["samples_per_s"] / fp32["samples_per_s"], 3),
        "peak_rss_mb": {"bf16": round(bf16["peak_rss_mb"]), "fp32": round(fp32["peak_rss_mb"])},
        "final_loss": {"bf16": round(bf16["final_loss"], 4), "fp32": round(fp32["final_loss"], 4)},
        "peer": None, "steps": args.steps, "warmup": args.warmup, "threads": args.threads,
        "omp_wait_policy": env["OMP_WAIT_POLICY"],
    }))


if __name__ == "__main__":
    main()
