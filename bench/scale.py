"""Scale: pretraining from shards on a corpus larger than the memory the run is allowed (issue 18).

What runs, in order, each in its own process:

1. **the corpus**: `--items` PNG images of `--size` px in ten class folders, made from the built-in
   MNIST digits (each digit scaled, placed at a random offset, in a random colour on a random
   background; deterministic from `--seed`), written once into `WORK/corpus` (reused when present).
   Decoded at `--size` px they take items x 3 x size^2 bytes: the default 400,000 at 64 px is 4.9 GB.
2. `selfsup data shard WORK/corpus --out WORK/shards`: items/s and the shards' bytes on disk.
3. **streaming** pretraining from the shards (`data.source=WORK/shards`) inside a memory cgroup capped at
   `--cap-mb` (default 1280 MB, a quarter of the decoded corpus): samples/s and the cgroup's peak.
4. **in memory**: the same run with `data.source=WORK/corpus` (the folder, decoded into memory before
   step 1), first under the same cap — expected to be killed, since the corpus does not fit — then
   without a cap: the time to its first step, samples/s and peak memory.
5. **1 vs 2 processes**: the streaming run under `torchrun --nproc_per_node 2` (gloo, one thread per
   rank) against one process with two threads: samples/s per rank and in all.

Every run is SimCLR on a ResNet-10 of width 16 (`--batch` 64, `--steps` 40) at `--size` px, with
`data.holdout_fraction=0.005` (a small in-memory held-out split) and `data.workers` data-loader
workers for the streams. samples/s is the median of metrics.jsonl's per-step values after `--warmup`
steps. Memory: `cgroup_peak_mb` is the cgroup's memory.max_usage_in_bytes (resident memory and
page cache of every process in it, workers included) and `rss_peak_mb` the largest process's peak
resident set (ru_maxrss of the run's children). The cap needs a writable memory cgroup (v1
`/sys/fs/cgroup/memory`, or v2 with the memory controller, as root); without one the runs go
uncapped and the JSON says `"cap_mb": null`.

    .venv/bin/python bench/scale.py [--items 400000] [--size 64] [--cap-mb 1280] [--work /tmp/selfsup-scale]

Prints one JSON line (DESIGN.md, "Benchmarks") with a `rows` table and a short text table to stderr.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, cpu_model, median  # noqa: E402

BIN = Path(sys.executable).parent
CGROUP_V1 = Path("/sys/fs/cgroup/memory")
CGROUP_V2 = Path("/sys/fs/cgroup")


# ---------------------------------------------------------------------------------------------
# The corpus


def _write_part(args: tuple[Path, int, int, int, int]) -> int:
    """Writes items [start, stop) of the corpus; returns their bytes."""
    folder, start, stop, size, seed = args
    import numpy as np
    from PIL import Image

    from selfsup.data.images import load_image_source

    digits = load_image_source("mnist", 28, 1)
    total = 0
    for i in range(start, stop):
        rng = np.random.default_rng([seed, i])
        k = i % len(digits)
        label = int(digits.labels[k])
        s = int(rng.integers(size * 7 // 16, size * 7 // 8 + 1))
        glyph = np.asarray(Image.fromarray(digits.images[k][0].numpy()).resize((s, s), Image.BILINEAR), np.float32)
        canvas = np.empty((size, size, 3), np.float32)
        canvas[:] = rng.integers(0, 256, 3)
        y, x = rng.integers(0, size - s + 1, 2)
        alpha = glyph[..., None] / 255.0
        canvas[y:y + s, x:x + s] = canvas[y:y + s, x:x + s] * (1 - alpha) + rng.integers(0, 256, 3) * alpha
        buf = io.BytesIO()
        Image.fromarray(canvas.astype(np.uint8)).save(buf, format="PNG", compress_level=1)
        path = folder / str(label) / f"{i:07d}.png"
        path.write_bytes(buf.getvalue())
        total += buf.tell()
    return total


def make_corpus(folder: Path, items: int, size: int, seed: int, jobs: int) -> dict:
    done = folder / ".complete.json"
    if done.exists():
        info = json.loads(done.read_text())
        if info.get("items") == items and info.get("size") == size and info.get("seed") == seed:
            return {**info, "reused": True}
        shutil.rmtree(folder)
    tic = time.perf_counter()
    for label in range(10):
        (folder / str(label)).mkdir(parents=True, exist_ok=True)
    chunk = 5000
    parts = [(folder, a, min(a + chunk, items), size, seed) for a in range(0, items, chunk)]
    with ProcessPoolExecutor(jobs) as pool:
        total = sum(pool.map(_write_part, parts))
    info = {"items": items, "size": size, "seed": seed, "png_mb": round(total / 2**20, 1),
            "decoded_mb": round(items * 3 * size * size / 2**20, 1), "make_s": round(time.perf_counter() - tic, 1)}
    done.write_text(json.dumps(info))
    return {**info, "reused": False}


# ---------------------------------------------------------------------------------------------
# Memory caps


class Cap:
    """A memory cgroup (v1 or v2) that a child process joins before it executes; None = no cap here."""

    def __init__(self, name: str, cap_mb: int | None):
        self.path: Path | None = None
        self.version = 0
        if cap_mb is None:
            return
        limit = str(cap_mb * 2**20)
        try:
            if (CGROUP_V1 / "memory.limit_in_bytes").exists():
                self.path, self.version = CGROUP_V1 / name, 1
                self.path.mkdir(exist_ok=True)
                swap = self.path / "memory.memsw.limit_in_bytes"
                if swap.exists():  # a left-over lower memsw limit makes a higher limit_in_bytes EINVAL
                    swap.write_text("-1")
                (self.path / "memory.limit_in_bytes").write_text(limit)
                if swap.exists():  # no swapping around the cap
                    swap.write_text(limit)
            elif "memory" in (CGROUP_V2 / "cgroup.controllers").read_text().split():
                self.path, self.version = CGROUP_V2 / name, 2
                self.path.mkdir(exist_ok=True)
                (self.path / "memory.max").write_text(limit)
                (self.path / "memory.swap.max").write_text("0")
        except OSError as err:
            print(f"bench/scale.py: no memory cgroup ({err}); running uncapped", file=sys.stderr)
            self.path = None

    def reset_peak(self) -> None:
        if self.path is not None and self.version == 1:
            (self.path / "memory.max_usage_in_bytes").write_text("0")

    def peak_mb(self) -> float | None:
        if self.path is None:
            return None
        name = "memory.max_usage_in_bytes" if self.version == 1 else "memory.peak"
        try:
            return round(int((self.path / name).read_text()) / 2**20, 1)
        except OSError:
            return None

    def join(self) -> None:
        """Runs in the child between fork and exec."""
        if self.path is not None:
            (self.path / "cgroup.procs").write_text(str(os.getpid()))

    def remove(self) -> None:
        if self.path is not None:
            try:
                self.path.rmdir()
            except OSError:
                pass


# ---------------------------------------------------------------------------------------------
# Runs


def run(cmd: list[str], cap: Cap | None, log: Path, timeout: int) -> dict:
    """Runs `cmd` (in `cap`'s cgroup); returns rc, wall seconds and the peaks. Output goes to `log`."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(OMP_WAIT_POLICY="PASSIVE", PYTHONPATH=str(REPO))
    if cap is not None:
        cap.reset_peak()
    # ru_maxrss of RUSAGE_CHILDREN is the largest waited-for descendant so far: a wrapper process per run.
    wrapper = ("import json, resource, subprocess, sys; rc = subprocess.call(sys.argv[1:]); "
               "print(json.dumps({'rc': rc, 'rss': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))")
    tic = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.run([sys.executable, "-c", wrapper, *cmd], env=env, stdout=subprocess.PIPE,
                              stderr=out, text=True, timeout=timeout,
                              preexec_fn=cap.join if cap is not None else None)
    wall = time.perf_counter() - tic
    try:
        info = json.loads(proc.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        info = {"rc": proc.returncode, "rss": 0}
    return {"rc": info["rc"], "wall_s": round(wall, 1), "rss_peak_mb": round(info["rss"] / 1024, 1),
            "cgroup_peak_mb": cap.peak_mb() if cap is not None else None}


def pretrain_cmd(out: Path, source: Path, args: argparse.Namespace, threads: int, ranks: int = 1) -> list[str]:
    overrides = [
        "method.name=simclr", "encoder.name=resnet10", "encoder.width=16", f"data.source={source}",
        f"data.image_size={args.size}", "data.holdout_fraction=0.005", f"data.workers={args.workers}",
        f"train.steps={args.steps}", f"train.batch_size={args.batch}", f"train.threads={threads}",
        "train.precision=fp32", "train.log_every=10", f"train.checkpoint_every={args.steps}",
        "train.diagnostics_every=0", "train.knn_max_bank=1000",
    ]
    head = [str(BIN / "selfsup")] if ranks == 1 else [
        str(BIN / "torchrun"), "--standalone", f"--nproc_per_node={ranks}", "--no-python", str(BIN / "selfsup")]
    return [*head, "pretrain", "--out", str(out), "--overwrite", *overrides]


def step_speed(run_dir: Path, warmup: int) -> dict:
    """samples/s (median after warm-up) and when step 1 ended, from metrics.jsonl."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return {"samples_per_s": None}
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    speeds = [r["samples_per_s"] for r in rows[warmup:]] or [r["samples_per_s"] for r in rows]
    return {"samples_per_s": round(median(speeds), 1) if speeds else None, "steps": len(rows)}


def shard(work: Path, shards: Path, shard_items: int, timeout: int) -> float:
    """`selfsup data shard` of the corpus; returns its wall seconds (also kept in WORK/shard-time.json)."""
    tic = time.perf_counter()
    result = run([str(BIN / "selfsup"), "data", "shard", str(work / "corpus"), "--out", str(shards), "--overwrite",
                  "--modality", "image", f"--shard-items={shard_items}", "data.holdout_fraction=0.005"],
                 None, work / "shard.log", timeout)
    if result["rc"] != 0:
        raise SystemExit(f"bench/scale.py: data shard failed; see {work / 'shard.log'}")
    shard_s = time.perf_counter() - tic
    (work / "shard-time.json").write_text(json.dumps({"shard_s": shard_s}))
    return shard_s


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, default=400_000)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--cap-mb", type=int, default=1280, help="memory cap of the capped runs; 0 = none")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2, help="data.workers of the streaming runs")
    parser.add_argument("--shard-items", type=int, default=2000)
    parser.add_argument("--work", type=Path, default=Path("/tmp/selfsup-scale"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip", nargs="*", default=[], choices=["shard", "memory", "ranks"],
                        help="parts to leave out (shard: reuse WORK/shards from an earlier run)")
    args = parser.parse_args(argv)
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    timeout = 3600

    corpus = make_corpus(work / "corpus", args.items, args.size, args.seed, jobs=os.cpu_count() or 2)
    print(f"bench/scale.py: corpus {corpus}", file=sys.stderr)

    shards = work / "shards"
    if "shard" in args.skip and (shards / "shards.json").exists():  # the shards of an earlier run of the same corpus
        shard_s = json.loads((work / "shard-time.json").read_text())["shard_s"]
    else:
        shard_s = shard(work, shards, args.shard_items, timeout)
    shard_mb = sum(p.stat().st_size for p in shards.glob("*.tar")) / 2**20
    print(f"bench/scale.py: sharded in {shard_s:.0f} s ({shard_mb:.0f} MB)", file=sys.stderr)

    cap = Cap("selfsup-scale", args.cap_mb or None)
    rows = []

    def pretrain(name: str, source: Path, capped: bool, threads: int = 2, ranks: int = 1) -> dict:
        out = work / "runs" / name
        result = run(pretrain_cmd(out, source, args, threads, ranks), cap if capped else None,
                     work / f"{name}.log", timeout)
        row = {"run": name, "source": "shards" if source == shards else "folder (in memory)",
               "cap_mb": args.cap_mb if capped and cap.path is not None else None, "ranks": ranks,
               "threads_per_rank": threads, **result, **step_speed(out, args.warmup)}
        if result["rc"] != 0:
            row["note"] = "killed at the memory cap" if result["rc"] in (-9, 137) else f"failed; see {work / (name + '.log')}"
        rows.append(row)
        print(f"bench/scale.py: {row}", file=sys.stderr)
        return row

    try:
        pretrain("stream-capped", shards, capped=True)
        if "memory" not in args.skip:
            pretrain("memory-capped", work / "corpus", capped=True)
            pretrain("memory", work / "corpus", capped=False)
        if "ranks" not in args.skip:
            pretrain("stream-2-ranks", shards, capped=True, threads=1, ranks=2)
    finally:
        cap.remove()

    line = {
        "bench": "scale", "task": f"simclr resnet10-w16 {args.size}px b{args.batch}, {args.items} images",
        "metric": "samples_per_s", "corpus": corpus, "shard_s": round(shard_s, 1),
        "shard_items_per_s": round(args.items / shard_s, 1), "shards_mb": round(shard_mb, 1),
        "cap_mb": args.cap_mb if cap.path is not None else None, "rows": rows,
        "cpu": cpu_model(), "threads": 2, "workers": args.workers,
    }
    print(json.dumps(line))
    head = f"{'run':<16} {'source':<20} {'cap MB':>7} {'ranks':>5} {'samples/s':>9} {'cgroup peak MB':>14} {'RSS peak MB':>11} {'wall s':>7}"
    print(head, file=sys.stderr)
    for r in rows:
        print(f"{r['run']:<16} {r['source']:<20} {str(r['cap_mb']):>7} {r['ranks']:>5} {str(r['samples_per_s']):>9} "
              f"{str(r['cgroup_peak_mb']):>14} {r['rss_peak_mb']:>11} {r['wall_s']:>7}  {r.get('note', '')}",
              file=sys.stderr)


if __name__ == "__main__":
    main()
