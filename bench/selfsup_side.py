"""The selfsup side of bench/vision.py (and the step bench/threads.py times): one run of selfsup's own loop.

`selfsup.train.loop.fit` with `ImageBatches` + `ImageViews` (views made batched, in the loop's
step), `build_method({"name": METHOD}, build_encoder(ENCODER))`, AdamW, clipping, bf16 autocast or
fp32 — exactly what `selfsup pretrain` runs, minus the files it writes. The views are the method's
own recipe (`METHODS[name].views`, e.g. BYOL's asymmetric blur/solarize, DINO's multi-crop, MAE's
one crop + flip view without colour jitter) with DINO's local crops set to `--n-local` of
`--local-size` px so that both sides make the same views. MAE (`--method mae --encoder vit_tiny`)
draws its 75 % patch mask from the step's generator inside the step, as `selfsup pretrain` does.

Throughput is the median of the loop's per-step samples/s (batch / wall time from drawing the batch
to the end of the optimizer and EMA step) after `--warmup` steps. With `--features-out`, the trained
encoder (eval mode, no augmentation, normalised) embeds the bank and test images of the .npz with
`_common.encoder_features` (selfsup's image preparation), under the run's precision as selfsup's kNN monitor does.

`--device cuda` (or `cuda:N`; default `cpu`) runs the same loop on the GPU: `Runtime(device=...)`,
the images on the device and the views made there (selfsup's own CUDA path: deferred host reads,
fused AdamW with the device-side non-finite guard). The loop then reads its logged values every
step (`log_every=1`) and calls `torch.cuda.synchronize()` before it reads the clock, so each step's
time covers its kernels, not just their launch. TF32 is switched off for matmuls and cuDNN
(`torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False`), so fp32 is
plain fp32 (lightly_side.py does the same); the features are computed on the GPU and returned to
the CPU. Without CUDA, `--device cuda` stops with a message before anything is built.

    .venv/bin/python bench/selfsup_side.py --method simclr --encoder resnet18 --data DATA.npz \\
        [--precision bf16] [--device cuda] [--features-out DIR] [--steps 8 --warmup 2 --batch 256 --threads 2]
    .venv/bin/python bench/selfsup_side.py --encoder resnet10 --size 28 --channels 1   # builtin MNIST

Without `--data` it trains on the builtin MNIST at `--size` px and `--channels`. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import gemm_record, median, peak_rss_mb  # noqa: E402


def view_overrides(method: str, n_local: int, local_size: int) -> dict:
    """The method's own view recipe, with DINO's multi-crop pinned to the bench's n_local / local_size."""
    from selfsup.methods import METHODS

    views = dict(getattr(METHODS[method], "views", {}) or {})
    if method == "dino":
        views.update(num_local=n_local, local_size=local_size)
    return views


def check_device(name: str, who: str):
    """torch.device(name), or SystemExit with the reason when CUDA is asked for and not usable here."""
    import torch

    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit(f"{who}: --device {name} asks for CUDA, but torch.cuda.is_available() is False here "
                             f"(torch {torch.__version__}, built with CUDA {torch.version.cuda}); use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise SystemExit(f"{who}: --device {name}, but this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def device_name(name: str) -> str:
    """argparse type for --device: cpu, cuda or cuda:N."""
    import re

    if not re.fullmatch(r"cpu|cuda(:\d+)?", name):
        raise argparse.ArgumentTypeError(f"{name!r} is not cpu, cuda or cuda:N")
    return name


def load_data(data_path: Path | None, size: int, channels: int):
    """(train ImageSet, npz or None): the bench's shared .npz, or the builtin MNIST."""
    import numpy as np
    import torch

    from selfsup.data.builtins import load_builtin
    from selfsup.data.images import ImageSet

    if data_path is None:
        return load_builtin("mnist", size, channels), None
    npz = np.load(data_path)
    images = torch.from_numpy(npz["x"])
    labels = torch.from_numpy(npz["y"].astype(np.int64))
    train = ImageSet(images=images, ids=[f"bench:{i}" for i in range(len(images))], labels=labels,
                     classes=[str(c) for c in range(int(labels.max()) + 1)], source=str(data_path))
    return train, npz


def run(args: argparse.Namespace) -> dict:
    import torch

    if args.threads > 0:  # 0: leave torch's default (one thread per core)
        torch.set_num_threads(args.threads)
    device = check_device(args.device, "selfsup_side")
    cuda = device.type == "cuda"
    if cuda:
        if device.index is not None:  # set_device refuses a bare torch.device("cuda")
            torch.cuda.set_device(device.index)
        torch.backends.cuda.matmul.allow_tf32 = False  # plain fp32, the same setting as lightly_side.py
        torch.backends.cudnn.allow_tf32 = False
    import numpy as np

    from _common import encoder_features
    from selfsup.config import TrainConfig, from_dict
    from selfsup.data.pipeline import ImageBatches, channel_stats
    from selfsup.data.views import ImageViews, ViewsConfig
    from selfsup.encoders import build_encoder
    from selfsup.methods import METHODS, build_method
    from selfsup.train.loop import fit
    from selfsup.train.runtime import Runtime

    if args.method not in METHODS:
        raise SystemExit(f"selfsup_side: selfsup has no method {args.method!r} yet (has: {', '.join(METHODS)})")
    train, npz = load_data(args.data, args.size, args.channels)
    size = int(train.images.shape[-1])
    channels = int(train.images.shape[1])
    if npz is not None:
        mean, std = [float(v) for v in npz["mean"]], [float(v) for v in npz["std"]]
    else:
        mean, std = channel_stats(train.images)
    views_cfg = from_dict(ViewsConfig, view_overrides(args.method, args.n_local, args.local_size), prefix="views.")
    torch.manual_seed(args.seed)
    knobs = {"width": args.width} if args.width else {}
    method = build_method({"name": args.method}, build_encoder(args.encoder, in_channels=channels, image_size=size, **knobs))
    runtime = Runtime(device=device, autocast_dtype=torch.bfloat16 if args.precision == "bf16" else None)
    # On CUDA the loop reads the device once per log_every steps; 1 makes it read and synchronize every
    # step before the clock, so each step is timed on its own (on the CPU it reads every step anyway).
    cfg = TrainConfig(steps=args.steps, batch_size=args.batch, checkpoint_every=10**9,
                      log_every=1 if cuda else 10**9, precision=args.precision, device=args.device,
                      cpu_gemm=args.cpu_gemm)
    preprocess = {"image_size": size, "channels": channels, "mean": mean, "std": std}

    def embed(folder: Path) -> None:
        """bank.npy / test.npy: the encoder's features of the un-augmented, normalised images."""
        folder.mkdir(parents=True, exist_ok=True)
        for name in ("bank", "test"):
            features = encoder_features(method.encoder, torch.from_numpy(npz[f"x_{name}"]), preprocess, runtime.device,
                                        runtime.autocast_dtype)
            np.save(folder / f"{name}.npy", features.numpy())
        method.train()

    if args.init_features_out is not None and npz is not None:  # the random-init baseline, before any step
        embed(args.init_features_out)
    with tempfile.TemporaryDirectory() as run_dir:
        fit(method, ImageBatches(train, ImageViews(views_cfg, size, mean, std), runtime.device), cfg, Path(run_dir),
            runtime, seed=args.seed)
        rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    speeds = [r["samples_per_s"] for r in rows]
    out = {
        "side": "selfsup", "method": args.method, "encoder": args.encoder, "precision": args.precision,
        "samples_per_s": median(speeds[args.warmup:] or speeds),
        "step_s": [round(args.batch / s, 3) for s in speeds], "final_loss": rows[-1]["loss"],
        "threads": args.threads, "batch": args.batch,
        "views": views_cfg.num_views + getattr(views_cfg, "num_local", 0), "device": args.device,
        **gemm_record(method, args.device),  # where fp32 Linear products ran (selfsup/nn/gemm.py; conv layers: oneDNN)
    }
    if cuda:
        out["device_name"] = torch.cuda.get_device_name(device)
        out["tf32"] = torch.backends.cuda.matmul.allow_tf32 or torch.backends.cudnn.allow_tf32
        out["peak_gpu_mb"] = torch.cuda.max_memory_allocated(device) / 2**20  # training (and the init embedding)
    if args.features_out is not None and npz is not None:
        tic = time.perf_counter()
        embed(args.features_out)
        out["embed_s"] = round(time.perf_counter() - tic, 2)
    out["peak_rss_mb"] = peak_rss_mb()
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--method", default="simclr")
    parser.add_argument("--encoder", default="resnet18")
    parser.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    parser.add_argument("--device", type=device_name, default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    parser.add_argument("--data", type=Path, help=".npz from bench/vision.py; omitted = builtin MNIST")
    parser.add_argument("--size", type=int, default=32, help="image side for the builtin MNIST")
    parser.add_argument("--channels", type=int, default=3, help="channels for the builtin MNIST")
    parser.add_argument("--features-out", type=Path, help="folder for bank.npy / test.npy (needs --data)")
    parser.add_argument("--init-features-out", type=Path, help="folder for the random-init features (needs --data)")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2, help="torch threads; 0 = torch's own default")
    parser.add_argument("--width", type=int, default=None, help="the ResNet's width (default: the preset's)")
    parser.add_argument("--n-local", type=int, default=2, help="DINO local crops per image")
    parser.add_argument("--local-size", type=int, default=16, help="DINO local crop side, px")
    parser.add_argument("--cpu-gemm", choices=["auto", "torch", "openblas"], default="auto",
                        help="train.cpu_gemm: where fp32 Linear products run (auto: OpenBLAS on AMD CPUs, selfsup/nn/gemm.py)")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


if __name__ == "__main__":
    print(json.dumps(run(parse_args())))
