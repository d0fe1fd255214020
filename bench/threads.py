"""Which thread setting trains fastest here: the library default, 1 thread, or 2 threads with OMP_WAIT_POLICY=PASSIVE.

Times the demo's SimCLR step (ResNet-10 width 16, MNIST 28 px greyscale, batch 256, at the precision
`precision=auto` picks on this CPU: bf16 only with bf16 units) through the real loop, each setting in
its own subprocess (OpenMP reads OMP_WAIT_POLICY at start-up). The baseline is what a user gets
without selfsup's setting: torch's default thread count (one per core) and OMP_WAIT_POLICY unset
(OpenMP's own default). The winner is what the CLI, the Makefile and .ci/run set.

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
    import torch

    from selfsup.train.runtime import cpu_has_fast_bf16

    precision = "bf16" if cpu_has_fast_bf16() else "fp32"
    task = ["--method", "simclr", "--precision", precision, "--encoder", "resnet10", "--width", "16", "--size", "28",
            "--channels", "1", "--batch", "256", "--steps", str(args.steps), "--warmup", "2"]
    # name -> (threads, OMP_WAIT_POLICY); threads "0" = torch's default, policy None = unset
    settings = {"default": ("0", None), "1": ("1", None), "2+PASSIVE": ("2", "PASSIVE")}
    speed = {}
    for name, (threads, policy) in settings.items():
        env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
        env["PYTHONPATH"] = str(REPO)
        if policy is not None:
            env["OMP_WAIT_POLICY"] = policy
        speed[name] = run_json([sys.executable, str(SELFSUP_SIDE), *task, "--threads", threads], env)["samples_per_s"]
    best = max(speed, key=speed.get)
    print(json.dumps({"bench": "threads", "task": f"simclr resnet10-w16 28px b256 {precision} train step",
                      "metric": "samples_per_s", "selfsup": round(speed["2+PASSIVE"], 1),
                      "baseline": f"torch default threads ({torch.get_num_threads()}), OMP_WAIT_POLICY unset",
                      "baseline_value": round(speed["default"], 1), "ratio": round(speed["2+PASSIVE"] / speed["default"], 3),
                      "one_thread": round(speed["1"], 1), "best": best, "steps": args.steps, "precision": precision,
                      "cpu_bf16": precision == "bf16", "torch": torch.__version__}))


if __name__ == "__main__":
    main()
