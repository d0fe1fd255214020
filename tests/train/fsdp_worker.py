"""FSDP2 runs for tests/train/test_fsdp.py: the same few steps under DDP and FSDP on 2 gloo ranks
(torchrun), checkpoints written and resumed at another world size, and a pretrain whose encoder is
exported from the shards. Imported by the test too, which runs the one-process halves.

Every run is tiny (a ViT of width 32 and depth 2 on 16-px images) and the views are fixed functions
of the item (`FixedViews`), so that DINO's only randomness is none: 2 ranks then train on exactly what
one process trains on, and their weights agree within float rounding. MAE draws its masks from each
rank's generator, so its 2-rank runs are compared with each other (DDP against FSDP).
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from selfsup.config import TrainConfig
from selfsup.train.runtime import Runtime

S = 16  # image size
ITEMS = 40  # dataset: 5 global batches of 8 per epoch


class FixedViews:
    """Batches whose two views are fixed functions of the items (no augmentation randomness);
    `poisoned` items are NaN."""

    num_items = ITEMS

    def __init__(self, device: torch.device, poisoned: tuple[int, ...] = ()):
        gen = torch.Generator().manual_seed(7)
        self.images = torch.randn(ITEMS, 3, S, S, generator=gen).to(device)
        self.images[list(poisoned)] = float("nan")

    def __call__(self, indices: Tensor, generator: torch.Generator) -> dict[str, Any]:
        x = self.images[indices.to(self.images.device)]
        return {"views": [x, x.flip(-1) * 0.9], "index": indices, "id": indices.tolist(), "generator": generator}


def build(name: str) -> nn.Module:
    """The method with its seeded tiny ViT (the same weights on every rank and in every process)."""
    from selfsup.encoders import build_encoder
    from selfsup.methods import build_method

    torch.manual_seed(0)
    encoder = build_encoder("vit_tiny", in_channels=3, image_size=S, dim=32, depth=2, heads=2)
    if name == "dino":  # no BatchNorm in the head: per-rank batch statistics would differ from one process's
        knobs = {"out_dim": 32, "hidden_dim": 16, "bottleneck_dim": 8, "momentum_start": 0.9, "head_batchnorm": False,
                 "freeze_last_layer": 0.0}
    else:
        knobs = {"decoder_dim": 16, "decoder_depth": 1, "decoder_heads": 2}
    return build_method({"name": name, **knobs}, encoder)


def train_config(parallel: str, **overrides: Any) -> TrainConfig:
    base = dict(steps=6, batch_size=8, checkpoint_every=3, keep_last=5, log_every=1, precision="fp32", device="cpu",
                lr=3e-3, warmup_fraction=0.2, cpu_gemm="torch", diagnostics_every=0, parallel=parallel)
    base.update(overrides)
    return TrainConfig(**base)


def run(name: str, parallel: str, out: Path, runtime: Runtime, **kwargs: Any) -> nn.Module | None:
    """Trains `name` into `out`; returns the final weights whole on rank 0 (None elsewhere)."""
    from selfsup.train import sharded
    from selfsup.train.loop import fit

    method = build(name)
    fit(method, FixedViews(runtime.device), train_config(parallel, **kwargs.pop("cfg", {})), out, runtime,
        seed=0, **kwargs)
    return sharded.whole(method, runtime)


def copy_run(src: Path, dst: Path, drop_steps: tuple[int, ...]) -> None:
    """A copy of a run directory without the checkpoints of `drop_steps` (as if it had died before them)."""
    shutil.copytree(src, dst)
    for step in drop_steps:
        shutil.rmtree(dst / "checkpoints" / f"step-{step}")


def save_weights(method: nn.Module | None, path: Path) -> None:
    if method is not None:
        torch.save({k: v.detach().clone() for k, v in method.state_dict().items()}, path)


def pretrain_overrides(out: Path, parallel: str) -> list[str]:
    """A pretrain on digits with a width-8 ResNet (BatchNorm buffers; its stages are the FSDP units)."""
    return ["data.source=digits", "data.image_size=16", "encoder.name=resnet10", "encoder.width=8",
            "train.batch_size=32", "train.steps=4", "train.checkpoint_every=2", "train.log_every=1",
            "train.precision=fp32", "train.device=cpu", "train.cpu_gemm=torch", f"train.parallel={parallel}"]


def main(out: str) -> None:
    import json
    import logging

    import torch.distributed as dist

    from selfsup.config import load_config
    from selfsup.errors import NonFiniteError
    from selfsup.pretrain import pretrain
    from selfsup.train.loop import fit, steps_for_budget
    from selfsup.train.runtime import init_runtime

    torch.set_num_threads(1)
    root = Path(out)
    runtime = init_runtime("cpu", "fp32")
    assert runtime.world_size == 2
    handler = logging.FileHandler(root / f"log.{runtime.rank}")  # the test reads which checkpoints were resumed
    logging.getLogger("selfsup").addHandler(handler)
    logging.getLogger("selfsup").setLevel(logging.INFO)
    found: dict[str, Any] = {}
    for name in ("dino", "mae"):
        for parallel in ("ddp", "fsdp"):
            save_weights(run(name, parallel, root / f"{name}_{parallel}", runtime), root / f"{name}_{parallel}.pt")
    # Resumed on 2 ranks from the 2-rank FSDP run's checkpoint at step 3.
    if runtime.is_main:
        copy_run(root / "dino_fsdp", root / "dino_resumed2", drop_steps=(6,))
    runtime.barrier()
    save_weights(run("dino", "fsdp", root / "dino_resumed2", runtime, resume=True), root / "dino_resumed2.pt")
    # Resumed on 2 ranks from a checkpoint one process wrote (the test wrote it before launching us).
    save_weights(run("dino", "fsdp", root / "dino_from1", runtime, resume=True), root / "dino_from1.pt")
    # The deferred reads (CUDA's path, forced here): fused AdamW skips on a device-side flag, over DTensors.
    save_weights(run("dino", "fsdp", root / "dino_deferred", runtime, defer_reads=True), root / "dino_deferred.pt")
    # A NaN in rank 1's rows stops both ranks before the optimizer moves.
    method = build("dino")
    try:
        fit(method, FixedViews(runtime.device, poisoned=(int(torch.randperm(ITEMS, generator=torch.Generator()
            .manual_seed(0))[7]),)), train_config("fsdp"), root / "nan", runtime, seed=0)
    except NonFiniteError as err:
        found["nonfinite"] = str(err)
    # train.minutes: the timing copy is sharded too, and every rank gets the same count.
    budget = steps_for_budget(build("dino"), FixedViews(runtime.device), train_config("fsdp", minutes=0.05), root,
                              runtime, seed=0)
    found["budget_steps"] = budget.steps
    (root / f"found.{runtime.rank}.json").write_text(json.dumps(found))
    # A whole pretrain under FSDP and under DDP: the encoder files are exported from the shards.
    for parallel in ("ddp", "fsdp"):
        cfg = load_config(None, pretrain_overrides(root, parallel))
        pretrain(cfg, root / f"pretrain_{parallel}", show_progress=False, report=False)
    dist.destroy_process_group()


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    main(sys.argv[1])
