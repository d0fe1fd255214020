"""SimCLR view augmentation on the CPU: selfsup's ImageViews against the same pipeline in kornia.

Both pipelines get the same uint8 batch (256 x 3 x 32 x 32) and make two views of it:
random resized crop (scale 0.2-1), horizontal flip, colour jitter (0.4, 0.4, 0.4, 0.1, p=0.8),
greyscale (p=0.2) and normalisation; the uint8 -> float conversion is timed in both. The metric is
augmented views per second (img_per_s counts each of the two views of an image once).

The OpenMP wait policy only takes effect if it is set before torch loads (see MACHINE.md), so each
thread setting runs in its own subprocess: 1 thread, 2 threads, and 2 threads with
OMP_WAIT_POLICY=PASSIVE. The settings run one after the other, never concurrently.

    python bench/augment.py            # prints one JSON line per thread setting
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = {"1": (1, None), "2": (2, None), "2+PASSIVE": (2, "PASSIVE")}  # name -> (threads, OMP_WAIT_POLICY)
BATCH, SIZE, NUM_VIEWS = 256, 32, 2
MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)  # CIFAR-10 statistics


def time_interleaved(pipelines: list, min_reps: int = 5, max_reps: int = 30, budget_s: float = 20.0) -> list[float]:
    """Median views/s of each pipeline, timed in alternation so that both see the same machine state
    (these machines share cores; a neighbour's burst then slows both, not one), after a warm-up."""
    for make_views in pipelines:
        for _ in range(2):
            make_views()
    durations: list[list[float]] = [[] for _ in pipelines]
    start = time.perf_counter()
    while len(durations[0]) < max_reps and (len(durations[0]) < min_reps or time.perf_counter() - start < budget_s):
        for make_views, spent in zip(pipelines, durations):
            t0 = time.perf_counter()
            make_views()
            spent.append(time.perf_counter() - t0)
    return [BATCH * NUM_VIEWS / statistics.median(spent) for spent in durations]


def child(setting: str) -> None:
    """Times both pipelines under one thread setting (torch is imported only here)."""
    import kornia
    import kornia.augmentation as K
    import torch

    from selfsup.data.views import ImageViews, ViewsConfig

    threads, _ = SETTINGS[setting]
    torch.set_num_threads(threads)
    images = torch.randint(0, 256, (BATCH, 3, SIZE, SIZE), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)

    views = ImageViews(ViewsConfig(num_views=NUM_VIEWS), SIZE, MEAN, STD)
    generator = torch.Generator().manual_seed(0)

    peer = torch.nn.Sequential(
        K.RandomResizedCrop((SIZE, SIZE), scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3)),
        K.RandomHorizontalFlip(p=0.5),
        K.ColorJitter(0.4, 0.4, 0.4, 0.1, p=0.8),
        K.RandomGrayscale(p=0.2),
        K.Normalize(mean=torch.tensor(MEAN), std=torch.tensor(STD)),
    )

    def selfsup_views() -> list[torch.Tensor]:
        return views(images, generator)

    def kornia_views() -> list[torch.Tensor]:
        x = images.float().div_(255.0)
        return [peer(x) for _ in range(NUM_VIEWS)]

    with torch.no_grad():
        ours = selfsup_views()
        theirs = kornia_views()
        assert [v.shape for v in ours] == [v.shape for v in theirs], "the pipelines must make the same views"
        ours_value, peer_value = time_interleaved([selfsup_views, kornia_views])
    print(json.dumps({
        "bench": "augment", "task": f"simclr views {SIZE}px b{BATCH}", "metric": "img_per_s",
        "selfsup": round(ours_value, 1), "peer": f"kornia {kornia.__version__}", "peer_value": round(peer_value, 1),
        "ratio": round(ours_value / peer_value, 2), "threads": setting,
    }), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--child", choices=sorted(SETTINGS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child)
        return
    for setting, (_, wait_policy) in SETTINGS.items():
        env = dict(os.environ)
        env.pop("OMP_WAIT_POLICY", None)
        if wait_policy:
            env["OMP_WAIT_POLICY"] = wait_policy
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
        done = subprocess.run([sys.executable, __file__, "--child", setting], env=env, stdout=subprocess.PIPE, text=True)
        sys.stdout.write(done.stdout)
        sys.stdout.flush()
        if done.returncode:
            raise SystemExit(f"bench/augment.py: the {setting!r} thread setting failed (exit {done.returncode})")


if __name__ == "__main__":
    main()
