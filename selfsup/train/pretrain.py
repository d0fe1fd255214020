"""`selfsup pretrain`: assembles data, views, encoder and method from a RunConfig and runs the loop.

The run directory is the unit users handle: `config.yaml` (resolved), `metrics.jsonl`,
`checkpoints/step-N/`, and at the end `encoder.safetensors` + `encoder.json` and `report.html`.
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from selfsup.adapt.probes import extract_features, knn_accuracy
from selfsup.config import RunConfig, dump_config, from_dict, load_config, to_dict
from selfsup.data.images import ImageSet, load_image_source, split_holdout
from selfsup.data.pipeline import ImageBatches, channel_stats
from selfsup.data.views import ImageViews, ViewsConfig, normalise
from selfsup.encoders import build_encoder, describe_encoder
from selfsup.errors import SelfsupError
from selfsup.export.encoder import save_encoder
from selfsup.methods import build_method
from selfsup.train.loop import FitResult, fit
from selfsup.train.runtime import Runtime, init_runtime

log = logging.getLogger("selfsup")

CONFIG_FILE = "config.yaml"


@dataclass
class PretrainResult:
    run_dir: Path
    fit: FitResult
    train: ImageSet  # the split that was pretrained on
    holdout: ImageSet  # the split kept for probes
    preprocess: dict[str, Any]  # image_size, channels, mean, std


def prepare_run_dir(out: Path, *, resume: bool, overwrite: bool) -> None:
    """Refuses a non-empty directory unless resuming or overwriting — and then only a selfsup run."""
    if resume and overwrite:
        raise SelfsupError("--resume and --overwrite contradict each other; pick one")
    if out.exists() and not out.is_dir():
        raise SelfsupError(f"{out}: exists and is not a directory")
    if not out.exists() or not any(out.iterdir()):
        if resume:
            raise SelfsupError(f"{out}: nothing to resume (the directory is empty or missing); drop --resume")
        return
    if resume:
        if not (out / CONFIG_FILE).is_file():
            raise SelfsupError(f"{out}: no {CONFIG_FILE}, so not a selfsup run to resume")
        return
    if not overwrite:
        raise SelfsupError(f"{out}: directory is not empty; pass --resume to continue that run, "
                           f"--overwrite to replace it, or choose another --out")
    if not (out / CONFIG_FILE).is_file():
        raise SelfsupError(f"{out}: not a selfsup run directory (no {CONFIG_FILE}); refusing to delete it with --overwrite")
    shutil.rmtree(out)


def config_for_resume(out: Path, given: RunConfig | None) -> RunConfig:
    """The run's saved config; a differing config passed on resume is refused, naming the keys."""
    saved = load_config(out / CONFIG_FILE)
    if given is not None:
        differ = _diff(to_dict(saved), to_dict(given))
        if differ:
            raise SelfsupError(
                f"{out / CONFIG_FILE}: resuming needs the run's own config, but these keys differ: "
                f"{', '.join(differ[:8])}. Resume without a config/overrides, or start a new --out."
            )
    return saved


def _diff(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b)) for d in _diff(a.get(k), b.get(k), f"{prefix}{k}.")]
    return [] if a == b else [prefix.rstrip(".")]


def load_splits(cfg: RunConfig, progress: bool = True) -> tuple[ImageSet, ImageSet]:
    """(train, holdout) for the run's data: the same split for pretraining and for probes."""
    d = cfg.data
    data = load_image_source(d.source, d.image_size, d.channels, on_bad=d.on_bad_file, max_bad_fraction=d.max_bad_fraction,
                             label_column=d.label_column, group_columns=d.group_columns, progress=progress)
    return split_holdout(data, d.holdout_fraction, cfg.seed)


def build_encoder_from(cfg: RunConfig) -> tuple[nn.Module, dict[str, Any]]:
    """The run's encoder (seeded) and the description that rebuilds it."""
    knobs = {k: v for k, v in cfg.encoder.items() if k != "name"}
    spec = describe_encoder(cfg.encoder["name"], in_channels=cfg.data.channels, image_size=cfg.data.image_size, **knobs)
    torch.manual_seed(cfg.seed)
    return build_encoder(**spec), spec


def knn_monitor(train: ImageSet, holdout: ImageSet, preprocess: dict[str, Any], runtime: Runtime,
                max_bank: int, k: int, seed: int):
    """kNN accuracy of the current encoder on the held-out split (None when the data have no labels)."""
    if train.labels is None or holdout.labels is None or len(holdout) == 0:
        return None
    labelled = torch.nonzero(train.labels >= 0).flatten()
    gen = torch.Generator().manual_seed(seed)
    bank = labelled[torch.randperm(len(labelled), generator=gen)[:max_bank]]
    queries = torch.nonzero(holdout.labels >= 0).flatten()
    if len(bank) == 0 or len(queries) == 0:
        return None
    prep = lambda x: normalise(x, preprocess["mean"], preprocess["std"], preprocess["image_size"])  # noqa: E731

    def monitor(method: nn.Module) -> dict[str, float]:
        embed = method.encoder.embed
        fx = extract_features(embed, train.images[bank], device=runtime.device, autocast_dtype=runtime.autocast_dtype, preprocess=prep)
        fq = extract_features(embed, holdout.images[queries], device=runtime.device, autocast_dtype=runtime.autocast_dtype, preprocess=prep)
        return {"knn_acc": knn_accuracy(fx, train.labels[bank], fq, holdout.labels[queries], k=k)}

    return monitor


def pretrain(cfg: RunConfig | None, out: Path, *, resume: bool = False, overwrite: bool = False,
             stop_after: int | None = None, show_progress: bool = True) -> PretrainResult:
    """Runs (or resumes) a pretraining run into `out`; returns what the caller needs for probes."""
    out = Path(out)
    # torchrun sets RANK; the process group itself waits for the config (it names the device).
    if int(os.environ.get("RANK", "0")) == 0:
        prepare_run_dir(out, resume=resume, overwrite=overwrite)
    if resume:
        cfg = config_for_resume(out, cfg)
    assert cfg is not None
    runtime = init_runtime(cfg.train.device, cfg.train.precision)
    runtime.barrier()  # rank 0 has checked (and with --overwrite emptied) the run directory
    if cfg.train.threads is not None:
        torch.set_num_threads(cfg.train.threads)
    if runtime.is_main and not resume:
        out.mkdir(parents=True, exist_ok=True)
        (out / CONFIG_FILE).write_text(dump_config(cfg))

    train, holdout = load_splits(cfg, progress=show_progress and runtime.is_main)
    mean, std = channel_stats(train.images)
    preprocess = {"image_size": cfg.data.image_size, "channels": cfg.data.channels, "mean": mean, "std": std}
    views = ImageViews(from_dict(ViewsConfig, cfg.views, prefix="views."), cfg.data.image_size, mean, std)
    encoder, encoder_spec = build_encoder_from(cfg)
    method = build_method(cfg.method, encoder)
    log.info("pretraining %s on %s: %d images (%d held out), encoder %s (%.2fM parameters), %s on %s x%d",
             cfg.method["name"], train.source, len(train), len(holdout), cfg.encoder["name"],
             sum(p.numel() for p in encoder.parameters()) / 1e6, runtime.precision, runtime.device, runtime.world_size)
    monitor = knn_monitor(train, holdout, preprocess, runtime, cfg.train.knn_max_bank, cfg.probe.knn_k, cfg.seed)
    result = fit(method, ImageBatches(train, views, runtime.device), cfg.train, out, runtime, seed=cfg.seed,
                 resume=resume, monitor=monitor, stop_after=stop_after)
    if runtime.is_main and result.steps == cfg.train.steps:
        save_encoder(out, method.encoder, {"encoder": encoder_spec, "preprocess": preprocess, "method": cfg.method,
                                           "steps": result.steps, "data": train.source})
    runtime.barrier()
    return PretrainResult(out, result, train, holdout, preprocess)

