"""Vision pretraining side by side: selfsup against lightly, same data, model, batch, steps and threads.

For each task (method x encoder) three runs go one after the other, each in its own subprocess:

1. selfsup at what `precision=auto` picks on this CPU (bf16 autocast where the CPU has bf16 units,
   `cpu_has_fast_bf16`; fp32 elsewhere, where bf16 is emulated and slower) — its real loop
   (`bench/selfsup_side.py`: `fit`, `ImageBatches`, `ImageViews`, the method's own view recipe);
2. on a CPU with bf16 units, selfsup again in fp32 — throughput only, so that the headline ratio
   compares the same precision on both sides (the bf16 gain is its own row: `ratio_bf16`);
3. lightly, fp32 (its default), in `.venv-bench` (`bench/peers/lightly_side.py`: torchvision
   backbone, lightly transforms in a DataLoader, lightly heads/losses/momentum helpers, written the
   way lightly's examples are).

Both sides read one .npz written here once: MNIST (selfsup's builtin 5,000 digits) at 32 px RGB,
split with `split_holdout` (20 %, stratified). The training part is pretrained on; a bank of
training images and the held-out test images are embedded by each side's trained encoder and by
its random init (the baseline: a run this short can score below it), and kNN accuracy (k=20,
`selfsup.adapt.probes.knn_accuracy`) is computed here for both. The recipe numbers the peer uses
(lr, weight decay, warm-up, crop scale, temperatures, head widths, EMA momentum, DINO teacher
schedule) are read from selfsup's own defaults, so the two sides differ in implementation, not in
knobs. DINO uses `--n-local` local crops of 16 px on both sides (selfsup's default is 6; 2 keeps
the bench short).

MAE (`mae-vit_tiny`): ViT-Tiny at 32 px (patch 4, 192-d, 12 blocks, 3 heads) on both sides, 75 % of
the patches dropped before the encoder, a decoder of width 128, depth 2, 4 heads (selfsup's MAE
defaults, handed to lightly's `MAEDecoder`), MSE on the masked patches against the norm-pix target;
one view per image, random-resized crop (0.2, 1) + flip (selfsup's MAE view recipe; lightly's
`MAETransform`). lightly's side follows its torchvision MAE example (its current one needs timm).
Both embed with the encoder's [CLS] token (selfsup's `ViT.embed`; lightly's backbone forward), on
all 64 patches — evaluation embeds 4x the tokens a training step encodes. Known differences that
are the libraries' own defaults, kept: selfsup's encoder has learned positions, lightly's
`MaskedVisionTransformerTorchvision` fixed sine-cosine ones; selfsup's crop is bilinear, lightly's
bicubic.

Throughput is samples/s (images per second, however many views of each) of the median step after
`--warmup` steps, a step timed from fetching the batch to the end of the optimizer (and EMA)
step. `ratio` = selfsup (fp32) / lightly (fp32), the same precision on both sides; `ratio_bf16` =
selfsup (bf16 autocast) / lightly (fp32), recorded only where the CPU has bf16 units. OMP_WAIT_POLICY=PASSIVE and `--threads` threads
on both sides; nothing else should run meanwhile (see shared/MACHINE.md).

On a GPU (`--device cuda` or `cuda:N`; default `cpu`, where all of the above holds unchanged) both
sides get `--device`: each moves its model and batches to the GPU — selfsup makes its views there
(its own CUDA path), lightly's transforms stay in its DataLoader on the CPU (that is how lightly
works) and each batch is moved to the GPU inside the timed step. Every timed step is closed by
`torch.cuda.synchronize()` before the clock is read, on both sides (selfsup's loop reads its
values every step, `log_every=1`, and synchronizes). TF32 is off on both sides
(`torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False`, recorded as
`tf32`), so fp32 is plain fp32. Four runs per task:

1. selfsup at what `precision=auto` picks on this GPU (bf16 autocast where
   `torch.cuda.is_bf16_supported()`, `gpu_bf16`), with the kNN features;
2. lightly at the same precision (its forward and loss under `torch.autocast("cuda",
   torch.bfloat16)` too), with the kNN features — quality is compared at one precision on both sides;
3. and 4. where that is bf16, selfsup and lightly again in fp32, throughput only (skipped by `--no-fp32`).

`ratio` = selfsup (fp32) / lightly (fp32); `ratio_bf16` = selfsup (bf16) / lightly (bf16, `peer_bf16`),
both sides under the same autocast. The features are computed on the GPU and returned to the CPU;
`peak_gpu_mb` is each side's `torch.cuda.max_memory_allocated()` up to the end of its training
steps. lightly's DataLoader gets `--peer-workers` worker processes, by default 0 on the CPU (why:
the note at DEFAULT_PEER_WORKERS) and, on a GPU, min(8, CPU cores) — its examples use workers there, and with none the GPU would wait on
single-process PIL transforms. selfsup's optimizer on CUDA is its fused AdamW, lightly's is
PyTorch's default AdamW: each library's own. Every line records `device` and, on CUDA, `gpu`
(`torch.cuda.get_device_name()`).

    .venv/bin/python bench/vision.py [--tasks simclr-resnet18 dino-vit_tiny] [--steps 8] [--warmup 2] [--device cuda]

Prints one JSON line per task (DESIGN.md, "Benchmarks"). The peer environment is built by
`make .venv-bench/.stamp` (part of `make bench`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, run_json  # noqa: E402
from selfsup.train.runtime import cpu_has_fast_bf16  # noqa: E402

BF16_UNITS = cpu_has_fast_bf16()  # AMX or AVX512-BF16: where precision=auto picks bf16

BENCH = Path(__file__).resolve().parent
SELFSUP_SIDE = BENCH / "selfsup_side.py"
PEER_SIDE = BENCH / "peers" / "lightly_side.py"
PEER_PYTHON = REPO / ".venv-bench" / "bin" / "python"
TASKS = ["simclr-resnet18", "byol-resnet18", "dino-resnet18", "dino-vit_tiny", "mae-vit_tiny"]


def task_name(name: str) -> str:
    """A --tasks entry, with the encoder's '-' read as '_' (mae-vit-tiny = mae-vit_tiny, as bench/gpu.py spells it)."""
    method, _, encoder = name.partition("-")
    return f"{method}-{encoder.replace('-', '_')}" if encoder else name


# lightly's DataLoader workers: 0 or 2 were tied here (2 vCPUs; SimCLR and DINO ResNet-18 b256,
# alternating runs, medians within the +-10 % noise of a shared machine), and 2 workers cost ~600 MB
# more memory and compete with torch's two threads for the same cores, so the peer runs with 0
# (its transforms run in the timed step). Re-check on an idle machine with --peer-workers 2.
DEFAULT_PEER_WORKERS = 0
# On a GPU the step itself is short and lightly's examples load with workers; with none the GPU would
# wait on single-process PIL transforms, and the comparison would time those.
DEFAULT_PEER_WORKERS_CUDA = min(8, os.cpu_count() or 1)


def device_arg(name: str) -> str:
    """argparse type for --device: cpu, cuda or cuda:N."""
    import re

    if not re.fullmatch(r"cpu|cuda(:\d+)?", name):
        raise argparse.ArgumentTypeError(f"{name!r} is not cpu, cuda or cuda:N")
    return name


def cuda_info(name: str) -> dict:
    """The GPU `name` names: {"gpu": its name, "gpu_bf16": bool}, or SystemExit saying why it is not usable here."""
    import torch

    if not torch.cuda.is_available():
        raise SystemExit(f"bench/vision.py: --device {name} asks for CUDA, but torch.cuda.is_available() is False "
                         f"here (torch {torch.__version__}, built with CUDA {torch.version.cuda}); run it on a GPU "
                         "machine, or leave --device at cpu")
    device = torch.device(name)
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise SystemExit(f"bench/vision.py: --device {name}, but this machine has {torch.cuda.device_count()} "
                         "CUDA device(s)")
    index = device.index if device.index is not None else torch.cuda.current_device()
    with torch.cuda.device(index):
        return {"gpu": torch.cuda.get_device_name(index), "gpu_bf16": torch.cuda.is_bf16_supported()}


def build_data(path: Path, dataset: str, size: int, bank: int, test: int, seed: int) -> dict:
    """Writes the shared .npz: x/y (train), x_bank/y_bank, x_test/y_test (uint8 [N, 3, S, S]), mean/std."""
    import numpy as np
    import torch

    from selfsup.data.images import load_image_source
    from selfsup.data.split import split_holdout
    from selfsup.data.pipeline import channel_stats

    data = load_image_source(dataset, size, 3)
    if data.labels is None:
        raise SystemExit(f"bench/vision.py: dataset {dataset!r} has no labels, so kNN cannot be scored")
    train, held = split_holdout(data, 0.2, seed)
    gen = torch.Generator().manual_seed(seed)
    bank_index = torch.randperm(len(train), generator=gen)[:bank]
    test_index = torch.randperm(len(held), generator=gen)[:test]
    mean, std = channel_stats(train.images)
    np.savez(path, x=train.images.numpy(), y=train.labels.numpy(),
             x_bank=train.images[bank_index].numpy(), y_bank=train.labels[bank_index].numpy(),
             x_test=held.images[test_index].numpy(), y_test=held.labels[test_index].numpy(),
             mean=np.array(mean), std=np.array(std))
    return {"dataset": dataset, "train": len(train), "bank": len(bank_index), "test": len(test_index)}


def peer_recipe(method: str, n_local: int, local_size: int) -> dict:
    """selfsup's default knobs for `method`, under the neutral names lightly_side.py reads."""
    from selfsup.config import TrainConfig, from_dict
    from selfsup.data.views import ViewsConfig
    from selfsup.methods import method_config

    from selfsup_side import view_overrides

    train = TrainConfig()
    views = from_dict(ViewsConfig, view_overrides(method, n_local, local_size), prefix="views.")
    cfg = method_config({"name": method})
    recipe = {"lr": train.lr, "weight_decay": train.weight_decay, "warmup_fraction": train.warmup_fraction,
              "min_scale": views.crop_scale[0]}
    names = {  # lightly_side name -> selfsup method Config field
        "simclr": {"temperature": "temperature"},
        "byol": {"proj_hidden": "proj_hidden", "proj_dim": "proj_dim", "byol_momentum": "momentum_start"},
        "dino": {"dino_out_dim": "out_dim", "dino_hidden_dim": "hidden_dim", "dino_bottleneck_dim": "bottleneck_dim",
                 "dino_momentum": "momentum_start", "student_temp": "student_temp", "teacher_temp": "teacher_temp",
                 "warmup_teacher_temp": "warmup_teacher_temp", "teacher_temp_warmup": "teacher_temp_warmup",
                 "center_momentum": "center_momentum", "freeze_last_layer": "freeze_last_layer",
                 "dino_head_batchnorm": "head_batchnorm"},
        "mae": {"mask_ratio": "mask_ratio", "decoder_dim": "decoder_dim", "decoder_depth": "decoder_depth",
                "decoder_heads": "decoder_heads", "norm_pix_loss": "norm_pix_loss"},
    }[method]
    recipe.update({ours: getattr(cfg, theirs) for ours, theirs in names.items() if hasattr(cfg, theirs)})
    if method == "dino":
        recipe["global_crop_scale"] = list(views.crop_scale)
        if hasattr(views, "local_crop_scale"):
            recipe["local_crop_scale"] = list(views.local_crop_scale)
    return recipe


def knn(features: Path, npz) -> float:
    import numpy as np
    import torch

    from selfsup.adapt.probes import knn_accuracy

    bank = torch.from_numpy(np.load(features / "bank.npy"))
    test = torch.from_numpy(np.load(features / "test.npy"))
    return knn_accuracy(bank, torch.from_numpy(npz["y_bank"]), test, torch.from_numpy(npz["y_test"]), k=20)


def attempt(what: str, errors: dict, fn, wall: dict | None = None):
    """fn() or None; a failure is recorded under `what` (one task's failure never stops the others),
    the seconds it took under wall[what]."""
    tic = time.perf_counter()
    try:
        return fn()
    except Exception as err:  # noqa: BLE001 - reported in the JSON line
        errors[what] = str(err).strip().splitlines()[-1][:400] if str(err).strip() else repr(err)
        print(f"bench/vision.py: {what} failed: {err}", file=sys.stderr)
        return None
    finally:
        if wall is not None:
            wall[what] = round(time.perf_counter() - tic, 1)


def run_task(task: str, args: argparse.Namespace, data_path: Path, work: Path) -> dict:
    import numpy as np

    method, encoder = task.split("-", 1)
    npz = np.load(data_path)
    size = int(npz["x"].shape[-1])
    common = ["--method", method, "--encoder", encoder, "--data", str(data_path), "--batch", str(args.batch),
              "--steps", str(args.steps), "--warmup", str(args.warmup), "--threads", str(args.threads),
              "--n-local", str(args.n_local), "--local-size", str(args.local_size), "--device", args.device]
    cuda = args.device != "cpu"
    base_env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    base_env["OMP_WAIT_POLICY"] = "PASSIVE"
    base_env["OPENBLAS_THREAD_TIMEOUT"] = "4"  # as the selfsup command sets it (selfsup/cli.py); lightly never calls OpenBLAS
    ours_env = {**base_env, "PYTHONPATH": str(REPO)}
    feats = {side: work / task / side for side in ("selfsup", "peer")}
    init = {side: work / task / f"{side}-init" for side in ("selfsup", "peer")}
    errors: dict[str, str] = {}
    wall: dict[str, float] = {}  # seconds per subprocess: start-up, steps, embedding

    def side_args(side: str) -> list[str]:
        out = ["--features-out", str(feats[side])]
        return out + (["--init-features-out", str(init[side])] if args.init_knn else [])

    # selfsup's own run at what precision=auto picks here; where that is bf16, an fp32 run too, so the
    # headline ratio compares fp32 with lightly's fp32.
    auto = "bf16" if (args.gpu_bf16 if cuda else BF16_UNITS) else "fp32"
    ours = attempt("selfsup", errors, lambda: run_json(
        [sys.executable, str(SELFSUP_SIDE), *common, "--precision", auto, *side_args("selfsup")], ours_env), wall)
    ours32 = ours if auto == "fp32" else None
    if auto == "bf16" and not args.no_fp32 and ours is not None:
        ours32 = attempt("selfsup_fp32", errors, lambda: run_json(
            [sys.executable, str(SELFSUP_SIDE), *common, "--precision", "fp32"], ours_env), wall)
    recipe = attempt("recipe", errors, lambda: peer_recipe(method, args.n_local, args.local_size)) or {}
    peer_cmd = [str(args.peer_python), str(PEER_SIDE), *common, "--workers", str(args.peer_workers),
                "--recipe", json.dumps(recipe)]
    # On the CPU lightly runs in fp32 (its default) only. On a GPU it runs at selfsup's auto precision
    # (bf16 autocast on both sides for ratio_bf16 and the kNN features), and in fp32 for the headline ratio.
    peer_precision = auto if cuda else "fp32"
    peer = attempt("peer", errors, lambda: run_json(
        [*peer_cmd, *(["--precision", peer_precision] if cuda else []), *side_args("peer")], base_env), wall)
    peer32 = peer if peer_precision == "fp32" else None
    if peer_precision == "bf16" and not args.no_fp32 and peer is not None:
        peer32 = attempt("peer_fp32", errors, lambda: run_json([*peer_cmd, "--precision", "fp32"], base_env), wall)

    knn_acc = {"selfsup": None, "peer": None}
    knn_init = {"selfsup": None, "peer": None}
    for side, result in (("selfsup", ours), ("peer", peer)):
        if result is not None:
            knn_acc[side] = attempt(f"knn_{side}", errors, lambda: round(knn(feats[side], npz), 4))
            if args.init_knn:
                knn_init[side] = attempt(f"knn_init_{side}", errors, lambda: round(knn(init[side], npz), 4))

    value = lambda r: None if r is None else round(r["samples_per_s"], 2)  # noqa: E731
    views = f"{size}px" + (f"+{args.n_local}x{args.local_size}px" if method == "dino" and args.n_local else "")
    version = (peer or peer32 or {}).get("version")
    line = {
        "bench": "vision", "task": f"{method} {encoder} {views} b{args.batch}", "metric": "samples_per_s",
        "selfsup": value(ours32), "selfsup_setting": "fp32", "precision": "fp32",
        "peer": f"lightly {version}" if version else "lightly", "peer_value": value(peer32),
        "peer_setting": f"fp32, DataLoader num_workers={args.peer_workers}",
        "ratio": round(ours32["samples_per_s"] / peer32["samples_per_s"], 3) if ours32 and peer32 else None,
        "selfsup_bf16": value(ours) if auto == "bf16" else None,
        # `peer` ran at peer_precision: fp32 on the CPU, the same bf16 autocast as selfsup on a GPU
        "ratio_bf16": round(ours["samples_per_s"] / peer["samples_per_s"], 3) if auto == "bf16" and ours and peer
        else None,
        "cpu_bf16": BF16_UNITS, "quality_precision": auto, "selfsup_cpu_gemm": (ours32 or {}).get("cpu_gemm"),
        "peak_rss_mb": {"selfsup": round(ours["peak_rss_mb"]) if ours else None,
                        "peer": round(peer["peak_rss_mb"]) if peer else None},
        "quality": {"knn_acc": knn_acc},
        "steps": args.steps, "warmup": args.warmup, "threads": args.threads, "omp_wait_policy": "PASSIVE",
    }
    if cuda:
        line["peer_setting"] += ", transforms on the CPU, batches moved to the GPU in the step"
        line["peer_bf16"] = value(peer) if peer_precision == "bf16" else None
        line["peer_bf16_setting"] = "bf16 autocast (forward and loss), as selfsup" if peer_precision == "bf16" else None
        line["gpu_bf16"] = args.gpu_bf16
        line["quality_precision"] = f"{auto} (both sides)"
        line["tf32"] = {side: r.get("tf32") if r else None for side, r in (("selfsup", ours32 or ours), ("peer", peer32 or peer))}
        gpu_mb = lambda r: None if r is None or "peak_gpu_mb" not in r else round(r["peak_gpu_mb"])  # noqa: E731
        line["peak_gpu_mb"] = {"selfsup": gpu_mb(ours32), "peer": gpu_mb(peer32)}
        if auto == "bf16":
            line["peak_gpu_mb"].update(selfsup_bf16=gpu_mb(ours), peer_bf16=gpu_mb(peer))
        line["timing"] = "each step closed by torch.cuda.synchronize() before the clock, both sides"
    line["device"] = args.device
    if cuda:
        line["gpu"] = args.gpu
    if args.init_knn:
        line["quality"]["knn_acc_random_init"] = knn_init
    if peer and peer.get("peak_rss_workers_mb"):
        line["peak_rss_mb"]["peer_workers"] = round(peer["peak_rss_workers_mb"])
    line["final_loss"] = {"selfsup": ours and round(ours["final_loss"], 4), "peer": peer and round(peer["final_loss"], 4)}
    for side, result in (("selfsup", ours), ("peer", peer)):
        if result is not None and "embed_s" in result:
            wall[f"{side}_embed"] = result["embed_s"]  # the trained encoder's features (part of wall[side])
    line["wall_s"] = wall
    if errors:
        line["errors"] = errors
    return line


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", nargs="+", type=task_name, choices=TASKS, default=TASKS, metavar="TASK",
                        help=f"method-encoder pairs (default: all of {' '.join(TASKS)})")
    parser.add_argument("--steps", type=int, default=8, help="optimizer steps per run, warm-up included")
    parser.add_argument("--warmup", type=int, default=2, help="steps left out of the median")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--n-local", type=int, default=2, help="DINO local crops per image (both sides)")
    parser.add_argument("--local-size", type=int, default=16, help="DINO local crop side, px")
    parser.add_argument("--dataset", default="mnist", help="a selfsup image source with labels (default: builtin mnist)")
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--bank", type=int, default=1000, help="training images in the kNN bank")
    parser.add_argument("--test", type=int, default=1000, help="held-out images scored by kNN (at most the holdout)")
    parser.add_argument("--no-init-knn", dest="init_knn", action="store_false",
                        help="skip scoring both sides' random-init encoders (the baseline beside the trained one)")
    parser.add_argument("--no-fp32", action="store_true", help="on a CPU with bf16 units, skip selfsup's fp32 run; on "
                        "a GPU with bf16, both sides' fp32 runs (the headline fp32 ratio is then not measured)")
    parser.add_argument("--device", type=device_arg, default="cpu",
                        help="cpu (default), cuda or cuda:N: where both sides train and embed")
    parser.add_argument("--peer-workers", type=int, default=None,
                        help=f"lightly DataLoader workers (default {DEFAULT_PEER_WORKERS} on the CPU, "
                             f"min(8, CPU cores) = {DEFAULT_PEER_WORKERS_CUDA} here on a GPU)")
    parser.add_argument("--peer-python", type=Path, default=PEER_PYTHON, help="python of the lightly environment")
    parser.add_argument("--keep", type=Path, help="keep the data and features in this folder")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.warmup >= args.steps:
        parser.error("--warmup must be smaller than --steps")
    args.gpu, args.gpu_bf16 = None, False
    if args.device != "cpu":
        info = cuda_info(args.device)
        args.gpu, args.gpu_bf16 = info["gpu"], info["gpu_bf16"]
    if args.peer_workers is None:
        args.peer_workers = DEFAULT_PEER_WORKERS if args.device == "cpu" else DEFAULT_PEER_WORKERS_CUDA
    if not args.peer_python.exists():
        raise SystemExit(f"bench/vision.py: no lightly environment at {args.peer_python}; "
                         "build it with `make .venv-bench/.stamp` (or pass --peer-python)")

    with tempfile.TemporaryDirectory() as tmp:
        work = args.keep or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        data_path = work / "data.npz"
        tic = time.perf_counter()
        info = build_data(data_path, args.dataset, args.size, args.bank, args.test, args.seed)
        print(f"bench/vision.py: data {info} in {time.perf_counter() - tic:.1f}s", file=sys.stderr)
        for task in args.tasks:
            tic = time.perf_counter()
            line = run_task(task, args, data_path, work)
            line["data"] = info
            print(json.dumps(line), flush=True)
            print(f"bench/vision.py: {task} took {time.perf_counter() - tic:.0f}s", file=sys.stderr)


if __name__ == "__main__":
    main()
