"""The CUDA path, proven on a GPU: every objective trains a few steps on CUDA in bf16, resumes, and is
timed; selfsup is timed against lightly on the same GPU where lightly is installed.

What it checks, per objective (simclr, byol, dino, colorize, mae, beit on MNIST or emoji; mlm and
next_token on the man pages; clip on emoji; wav2vec2 and hubert on espeak), each through
`selfsup.pretrain.pretrain` — exactly what `selfsup pretrain` runs — with `train.device`,
`train.precision` (default `auto`: bf16 where the GPU supports it) and the same small encoders as
the tests:

1. **runs**: `--steps` optimizer steps, every loss finite, the encoder exported;
2. **resume**: the same run stopped after half of the steps (as if killed after its checkpoint) and
   resumed gives the same encoder as the uninterrupted run — bit for bit where CUDA's kernels are
   deterministic, and otherwise the largest difference is reported (`resume_max_abs_diff`; cuDNN's
   convolution backward and atomics-based reductions are not deterministic unless
   `--deterministic` sets `torch.use_deterministic_algorithms`);
3. **speed**: the median samples/s of the steps after the first two (metrics.jsonl's own
   `samples_per_s`; on CUDA the loop reads the device once per `log_every` steps, so each interval's
   time is split over its steps) and the peak GPU memory.

Then, where `--peer-python` names a Python with lightly (`.venv-bench`), `bench/vision.py --device
cuda` times SimCLR, BYOL, DINO and MAE against lightly on the same GPU at the same precision and
its JSON lines are passed through.

A dataset that is not prepared here is prepared first (`selfsup data prepare NAME`); one that cannot
be (its Debian package missing) skips its objectives with the reason, never silently.

    python bench/gpu.py [--device cuda] [--precision auto] [--steps 8] [--methods simclr mae ...]
        [--out runs/gpu-check] [--peer-python .venv-bench/bin/python] [--deterministic]
    make gpu-check        # the same, with the defaults

Prints one JSON line per objective (DESIGN.md, "Benchmarks") and a table on stderr; exit status 1
if any objective failed. `--device cpu` runs the same checks on the CPU (the test suite does, tiny).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # read by OpenMP when torch loads: before any torch import

import argparse  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, median  # noqa: E402

sys.path.insert(0, str(REPO))

# Per objective: its dataset and the overrides that keep a check to seconds (the tests' sizes).
SMALL_RESNET = ["encoder.name=resnet10", "encoder.width=16"]
SMALL_VIT = ["encoder.name=vit_tiny", "encoder.depth=2"]
TEXT = ["data.seq_len=64", "encoder.dim=64", "encoder.depth=2", "encoder.heads=2", "tokenizer.vocab_size=1000"]
AUDIO = ["data.max_seconds=1.0", "encoder.name=wav2vec2_tiny"]
CHECKS: dict[str, tuple[str, list[str]]] = {
    "simclr": ("mnist", SMALL_RESNET),
    "byol": ("mnist", SMALL_RESNET),
    "dino": ("mnist", SMALL_RESNET + ["views.num_local=2", "views.local_size=12"]),
    "colorize": ("emoji", SMALL_RESNET),
    "mae": ("mnist", SMALL_VIT),
    "beit": ("mnist", SMALL_VIT),
    "mlm": ("manpages", TEXT),
    "next_token": ("manpages", TEXT),
    "clip": ("emoji", ["encoders.image.depth=2", "encoders.text.depth=2"]),
    "wav2vec2": ("espeak", AUDIO),
    "hubert": ("espeak", AUDIO),
}
LIGHTLY_TASKS = ["simclr-resnet18", "byol-resnet18", "dino-resnet18", "mae-vit_tiny"]

log = logging.getLogger("selfsup")


def ensure_data(name: str) -> str | None:
    """None when `name` loads here (preparing it if needed), else why not."""
    from selfsup.data.builtins import builtin_available

    ok, why = builtin_available(name)
    if ok:
        return None
    proc = subprocess.run([sys.executable, "-m", "selfsup.cli", "data", "prepare", name],
                          capture_output=True, text=True)
    ok, why = builtin_available(name)
    return None if ok else f"{name}: {why} ({proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else 'prepare failed'})"


def check(method: str, args: argparse.Namespace) -> dict:
    import torch

    from selfsup.config import load_config
    from selfsup.pretrain import pretrain
    from selfsup.train.progress import read_metrics
    from selfsup.train.runtime import resolve_precision

    source, extra = CHECKS[method]
    row: dict = {"bench": "gpu-check", "method": method, "data": source, "device": args.device,
                 "torch": torch.__version__}
    why = ensure_data(source)
    if why is not None:
        return {**row, "status": "skipped", "why": why}
    overrides = [f"method.name={method}", f"data.source={source}", f"train.steps={args.steps}",
                 f"train.batch_size={args.batch}", f"train.device={args.device}", f"train.precision={args.precision}",
                 f"train.checkpoint_every={max(1, args.steps // 2)}", "train.log_every=2", "train.eval_every=0",
                 *extra]
    root = Path(args.out) / method
    shutil.rmtree(root, ignore_errors=True)
    cuda = args.device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    tic = time.perf_counter()
    pretrain(load_config(None, overrides), root / "whole", show_progress=False, report=False)
    row["wall_s"] = round(time.perf_counter() - tic, 1)
    if cuda:
        row["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2**20)
    metrics = read_metrics(root / "whole" / "metrics.jsonl")
    losses = [m["loss"] for m in metrics]
    row["precision"] = "bf16" if resolve_precision(args.precision, torch.device(args.device)) else "fp32"
    row["steps"], row["loss_first"], row["loss_last"] = len(metrics), losses[0], losses[-1]
    row["finite"] = all(map(lambda v: v == v and abs(v) != float("inf"), losses))
    speeds = [m["samples_per_s"] for m in metrics[2:]] or [m["samples_per_s"] for m in metrics]
    row["samples_per_s"] = round(median(speeds), 1)

    half = max(1, args.steps // 2)
    tokenizer = root / "whole" / "tokenizer.json"
    if tokenizer.is_file():  # the same vocabulary (WordPiece training is not deterministic run to run)
        overrides.append(f"tokenizer.path={tokenizer}")
    pretrain(load_config(None, overrides), root / "resumed", stop_after=half, show_progress=False, report=False)
    pretrain(None, root / "resumed", resume=True, show_progress=False, report=False)
    row["resume_max_abs_diff"] = encoder_diff(root / "whole", root / "resumed")
    row["resume_bit_identical"] = row["resume_max_abs_diff"] == 0.0
    row["status"] = "ok" if row["finite"] and len(metrics) == args.steps else "failed"
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)
    return row


def encoder_diff(a: Path, b: Path) -> float:
    """The largest absolute difference between two runs' exported weights (every tower)."""
    from safetensors.torch import load_file

    worst = 0.0
    for file in sorted(a.rglob("encoder.safetensors")):
        left, right = load_file(file), load_file(b / file.relative_to(a))
        for key, value in left.items():
            worst = max(worst, float((value.double() - right[key].double()).abs().max()) if value.numel() else 0.0)
    return worst


def lightly_rows(args: argparse.Namespace) -> list[dict]:
    """bench/vision.py on the same device against lightly, passed through (its own JSON lines)."""
    cmd = [sys.executable, str(REPO / "bench" / "vision.py"), "--peer-python", args.peer_python,
           "--device", args.device, "--tasks", *LIGHTLY_TASKS]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        return [{"bench": "gpu-check", "method": "lightly side by side", "status": "failed",
                 "why": proc.stderr.strip()[-2000:]}]
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--methods", nargs="+", default=list(CHECKS), choices=list(CHECKS))
    parser.add_argument("--out", default=str(REPO / "runs" / "gpu-check"))
    parser.add_argument("--peer-python", default=None, help="a Python with lightly, for the side-by-side timing")
    parser.add_argument("--deterministic", action="store_true", help="torch.use_deterministic_algorithms(True)")
    parser.add_argument("--keep", action="store_true", help="keep the run folders")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")

    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("bench/gpu.py: no CUDA device here (torch.cuda.is_available() is False); "
                         "run it on a GPU machine, or pass --device cpu to run the same checks on the CPU")
    if args.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    gpu = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "cpu"
    rows = []
    for method in args.methods:
        try:
            row = check(method, args)
        except Exception as err:  # noqa: BLE001 (a failed objective is reported, the others still run)
            row = {"bench": "gpu-check", "method": method, "status": "failed", "why": f"{type(err).__name__}: {err}"}
        row["gpu"] = gpu
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.peer_python:
        for row in lightly_rows(args):
            print(json.dumps(row), flush=True)

    print(f"\n{'method':<11} {'status':<8} {'samples/s':>10} {'loss first -> last':>20} {'resume':>14}  ({gpu})",
          file=sys.stderr)
    for r in rows:
        if r["status"] == "ok":
            resume = "bit-identical" if r["resume_bit_identical"] else f"diff {r['resume_max_abs_diff']:.1e}"
            print(f"{r['method']:<11} {r['status']:<8} {r['samples_per_s']:>10} "
                  f"{r['loss_first']:>9.3f} -> {r['loss_last']:<8.3f} {resume:>14}", file=sys.stderr)
        else:
            print(f"{r['method']:<11} {r['status']:<8} {r.get('why', '')[:100]}", file=sys.stderr)
    sys.exit(1 if any(r["status"] == "failed" for r in rows) else 0)


if __name__ == "__main__":
    main()
