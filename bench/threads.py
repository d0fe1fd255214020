"""Which thread setting trains fastest here: 1 thread, 2 threads, or 2 threads with OMP_WAIT_POLICY=PASSIVE.

Times the demo's SimCLR step (ResNet-10 width 32, MNIST 28 px greyscale, batch 256, bf16 autocast)
through the real loop, each setting in its own subprocess (OpenMP reads OMP_WAIT_POLICY at start-up).
The winner is what the CLI, the Makefile and .ci/run set.

    .venv/bin/python bench/threads.py [--steps 6]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, run_json  # noqa: E402

SELFSUP_SIDE = Path(__file__).resolve().parent / "selfsup_side.py"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=6)
    args = parser.parse_args()
    task = ["--method", "simclr", "--precision", "bf16", "--encoder", "resnet10", "--size", "28", "--channels", "1",
            "--batch", "256", "--steps", str(args.steps), "--warmup", "2"]
    settings = {"1": ("1", "ACTIVE"), "2": ("2", "ACTIVE"), "2+PASSIVE": ("2", "PASSIVE")}
    speed = {}
    for name, (threads, policy) in settings.items():
        env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_WAIT_POLICY": policy}
        speed[name] = run_json([sys.executable, str(SELFSUP_SIDE), *task, "--threads", threads], env)["samples_per_s"]
    best = max(speed, key=speed.get)
    print(json.dumps({"bench": "threads", "task": "simclr resnet10-w32 28px b256 bf16 train step", "metric": "samples_per_s",
                      "selfsup": round(speed["2+PASSIVE"], 1), "baseline": "2 threads, OMP default",
                      "baseline_value": round(speed["2"], 1), "ratio": round(speed["2+PASSIVE"] / speed["2"], 3),
                      "one_thread": round(speed["1"], 1), "best": best, "steps": args.steps}))


if __name__ == "__main__":
    main()
