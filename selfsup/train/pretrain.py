"""`selfsup pretrain`: assembles data, encoder and method from a RunConfig and runs the loop.

Each modality assembles its own part — images: splits, channel statistics, batched views, the kNN
monitor; text: splits, the run's tokenizer, packed blocks, the held-out perplexity monitor — and the
rest (encoder, method, loop, export) is shared.

The run directory is the unit users handle: `config.yaml` (resolved), `metrics.jsonl`,
`checkpoints/step-N/`, `tokenizer.json` (text), and at the end `encoder.safetensors` +
`encoder.json` and `report.html`.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from selfsup.adapt.frozen import prepare_images
from selfsup.adapt.probes import extract_features, knn_accuracy
from selfsup.config import RunConfig, dump_config, from_dict, load_config, to_dict
from selfsup.data.images import ImageSet, load_image_source, split_holdout
from selfsup.data.packing import PackedBlocks, pack_documents
from selfsup.data.pipeline import ImageBatches, TextBatches, channel_stats
from selfsup.data.text import TextSet, load_text_source, split_holdout_text
from selfsup.data.tokenizer import TextTokenizer, load_or_train_tokenizer
from selfsup.data.views import ImageViews, ViewsConfig, normalise
from selfsup.encoders import build_encoder, describe_encoder
from selfsup.errors import SelfsupError
from selfsup.export.encoder import save_encoder
from selfsup.files import LOCK, MARKER, DirLock, check_owned, mark, names_in, read_marker, update_marker, write_atomic
from selfsup.methods import build_method, method_spec
from selfsup.nn.targets import KMeansTokenizer
from selfsup.report.previews import PREVIEWS_FILE, save_previews
from selfsup.train import checkpoint
from selfsup.train.loop import Batches, FitResult, fit
from selfsup.train.runtime import Runtime, init_runtime
from selfsup.train.stop import Interrupted, StopSignal

log = logging.getLogger("selfsup")

CONFIG_FILE = "config.yaml"
TOKENIZER_FILE = "tokenizer.json"  # text runs: the tokenizer the weights were trained with
VISUAL_TOKENS_FILE = "visual_tokens.safetensors"  # BEiT runs: the k-means codebook of patch tokens


@dataclass
class PretrainResult:
    run_dir: Path
    fit: FitResult
    train: ImageSet | TextSet  # the split that was pretrained on
    holdout: ImageSet | TextSet  # the split kept for probes
    preprocess: dict[str, Any]  # images: image_size, channels, mean, std; text: tokenizer file, seq_len


@dataclass
class _Assembly:
    """What a modality hands the shared part of `pretrain`."""

    train: ImageSet | TextSet
    holdout: ImageSet | TextSet
    batches: Batches
    encoder_inputs: dict[str, int]  # in_channels + image_size, or vocab_size + max_len
    preprocess: dict[str, Any]  # written to encoder.json: how inputs must be prepared
    method_section: dict[str, Any]  # the method config, with fields filled from the tokenizer
    monitor: Callable[[Runtime], Callable[[nn.Module], dict[str, float]] | None]


# Everything a run directory may hold: selfsup's own files, written by pretrain, probe, demo and report.
RUN_FILES = names_in(CONFIG_FILE, "metrics.jsonl", "checkpoints", "encoder.safetensors", "encoder.json", "report.html",
                     "report.png", "results.json", "probe.json", "tensorboard", TOKENIZER_FILE, VISUAL_TOKENS_FILE,
                     PREVIEWS_FILE)
STARTING, TRAINING = "starting", "training"  # the marker's `state`: a run that never began training is replaceable


def prepare_run_dir(out: Path, *, resume: bool, overwrite: bool) -> bool:
    """Checks `out` before anything is written; returns True when the run starts afresh.

    A non-empty directory is refused unless resuming or overwriting, and then only when it is a
    selfsup run (its marker, and nothing but run files): `--overwrite` never deletes what selfsup
    did not write. A run whose start failed (it never reached step 1, e.g. bad data) is replaced
    without `--overwrite`, so the corrected command just works.
    """
    if resume and overwrite:
        raise SelfsupError("--resume and --overwrite contradict each other; pick one")
    if out.exists() and not out.is_dir():
        raise SelfsupError(f"{out}: exists and is not a directory")
    entries = {p.name for p in out.iterdir()} - {MARKER, LOCK} if out.is_dir() else set()
    marker = read_marker(out) if out.is_dir() else None
    if not entries:
        if resume:
            raise SelfsupError(f"{out}: nothing to resume (the directory is empty or missing); drop --resume")
        return True
    if marker is None and resume and (out / CONFIG_FILE).is_file() and all(RUN_FILES(n) for n in entries):
        return False  # a run written before selfsup marked its runs: resumable, and marked from now on
    if resume:
        if marker is None or marker["kind"] != "run" or not (out / CONFIG_FILE).is_file():
            raise SelfsupError(f"{out}: not a selfsup run to resume (no {MARKER} marker or no {CONFIG_FILE}); "
                               "check --out")
        return False
    failed_start = marker is not None and marker.get("state") == STARTING
    if not overwrite and not failed_start:
        raise SelfsupError(f"{out}: directory is not empty; pass --resume to continue that run, "
                           f"--overwrite to replace it, or choose another --out")
    check_owned(out, "run", RUN_FILES, flag="--overwrite" if overwrite else "a new run")
    if failed_start and not overwrite:
        log.info("%s: replacing a run that failed to start (it never trained a step)", out)
    return True


def _clear_run_dir(out: Path) -> None:
    """Deletes what a run wrote into `out` (already checked to be a selfsup run), keeping `out` itself."""
    for path in out.iterdir():
        if path.name != LOCK:
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()


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


def load_splits(cfg: RunConfig, progress: bool = True) -> tuple[ImageSet, ImageSet] | tuple[TextSet, TextSet]:
    """(train, holdout) for the run's data: the same split for pretraining and for probes."""
    d = cfg.data
    if method_spec(cfg.method["name"]).modality == "text":
        data = load_text_source(d.source, text_field=d.text_field, label_column=d.label_column,
                                group_columns=d.group_columns, unit=d.text_unit, errors=d.text_errors,
                                max_line_chars=d.max_line_chars)
        return split_holdout_text(data, d.holdout_fraction, cfg.seed)
    data = load_image_source(d.source, d.image_size, d.channels, on_bad=d.on_bad_file, max_bad_fraction=d.max_bad_fraction,
                             label_column=d.label_column, group_columns=d.group_columns, progress=progress)
    return split_holdout(data, d.holdout_fraction, cfg.seed)


def build_encoder_from(cfg: RunConfig, **inputs: int) -> tuple[nn.Module, dict[str, Any]]:
    """The run's encoder (seeded) and the description that rebuilds it; `inputs` are the text
    encoder's vocab_size and max_len (image encoders take theirs from the config)."""
    knobs = {k: v for k, v in cfg.encoder.items() if k != "name"}
    if not inputs:
        inputs = {"in_channels": cfg.data.channels, "image_size": cfg.data.image_size}
    spec = describe_encoder(cfg.encoder["name"], **inputs, **knobs)
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
    prep = lambda x: prepare_images(x, preprocess)  # noqa: E731

    def monitor(method: nn.Module) -> dict[str, float]:
        embed = method.encoder.embed
        fx = extract_features(embed, train.images[bank], device=runtime.device, autocast_dtype=runtime.autocast_dtype, preprocess=prep)
        fq = extract_features(embed, holdout.images[queries], device=runtime.device, autocast_dtype=runtime.autocast_dtype, preprocess=prep)
        return {"knn_acc": knn_accuracy(fx, train.labels[bank], fq, holdout.labels[queries], k=k)}

    return monitor


def heldout_monitor(holdout: TextBatches, runtime: Runtime, max_blocks: int, batch_size: int, seed: int):
    """Held-out loss of the method's own objective, its perplexity exp(loss), and the method's
    accuracy (masked-token or next-token), on the first `max_blocks` held-out blocks.

    The held-out randomness (which tokens MLM masks) comes from a generator seeded the same way at
    every evaluation, so the curve moves only because the weights do. Batches are weighted by their
    number of blocks; a partial final block counts as a whole one.
    """
    num_blocks = min(holdout.num_items, max_blocks)
    if num_blocks == 0:
        return None

    def monitor(method: nn.Module) -> dict[str, float]:
        generator = torch.Generator(device=runtime.device).manual_seed(seed)
        sums: dict[str, float] = {}
        for start in range(0, num_blocks, batch_size):
            indices = torch.arange(start, min(start + batch_size, num_blocks))
            with runtime.autocast():
                out = method(holdout(indices, generator), 1.0)
            for key, value in out.items():
                sums[key] = sums.get(key, 0.0) + float(value) * len(indices)
        means = {f"heldout_{key}": value / num_blocks for key, value in sums.items()}
        means["heldout_ppl"] = math.exp(min(means["heldout_loss"], 50.0))  # capped: a diverged run still logs a number
        return means

    return monitor


def _assemble_images(cfg: RunConfig, runtime: Runtime, show_progress: bool) -> _Assembly:
    train, holdout = load_splits(cfg, progress=show_progress and runtime.is_main)
    mean, std = channel_stats(train.images)
    preprocess = {"image_size": cfg.data.image_size, "channels": cfg.data.channels, "mean": mean, "std": std}
    transform = method_spec(cfg.method["name"]).input_transform
    if transform is not None:
        preprocess["input_transform"] = transform
    views = ImageViews(from_dict(ViewsConfig, cfg.views, prefix="views."), cfg.data.image_size, mean, std)
    return _Assembly(
        train, holdout, ImageBatches(train, views, runtime.device),
        {"in_channels": cfg.data.channels, "image_size": cfg.data.image_size}, preprocess, dict(cfg.method),
        lambda rt: knn_monitor(train, holdout, preprocess, rt, cfg.train.knn_max_bank, cfg.probe.knn_k, cfg.seed),
    )


def run_tokenizer(cfg: RunConfig, out: Path, train: TextSet, runtime: Runtime) -> TextTokenizer:
    """The run's tokenizer.json: kept from an earlier start of this run (resume), else copied from
    `tokenizer.path`, else trained on the training split. Rank 0 writes it; the others read it."""
    kind = method_spec(cfg.method["name"]).tokenizer
    assert kind is not None
    path = out / TOKENIZER_FILE
    tokenizer = None
    if runtime.is_main:
        if not path.exists() and cfg.tokenizer.path is not None:
            given = TextTokenizer.load(Path(cfg.tokenizer.path))
            if given.kind != kind:
                raise SelfsupError(f"{cfg.tokenizer.path}: a {given.kind} tokenizer, but method `{cfg.method['name']}` "
                                   f"needs {kind}; train one with `selfsup tokenizer train --kind {kind}`")
            given.save(path)
        elif not path.exists():
            log.info("training a %s tokenizer (vocab %d) on %d documents", kind, cfg.tokenizer.vocab_size, len(train))
        tokenizer = load_or_train_tokenizer(path, lambda: train.texts, kind, cfg.tokenizer.vocab_size,
                                            cfg.tokenizer.min_frequency)
    runtime.barrier()
    return tokenizer if tokenizer is not None else TextTokenizer.load(path)


def pack_split(data: TextSet, tokenizer: TextTokenizer, seq_len: int, *, drop_last: bool) -> PackedBlocks:
    """The split's documents tokenized, wrapped with the tokenizer's bounds and packed into blocks."""
    bos, eos = tokenizer.packing_bounds
    return pack_documents(tokenizer.encode_batch(data.texts), seq_len, bos_id=bos, eos_id=eos,
                          pad_id=tokenizer.pad_id, drop_last=drop_last)


def _assemble_text(cfg: RunConfig, out: Path, runtime: Runtime) -> _Assembly:
    d = cfg.data
    train, holdout = load_splits(cfg)
    tokenizer = run_tokenizer(cfg, out, train, runtime)
    # Training blocks are all full (the tail is dropped, so no step pays for padding); held-out
    # blocks keep the tail, padded.
    train_blocks = pack_split(train, tokenizer, d.seq_len, drop_last=True)
    if train_blocks.num_blocks == 0:
        raise SelfsupError(f"{train.source}: the training split holds fewer than data.seq_len={d.seq_len} tokens; "
                           "add documents or lower data.seq_len")
    holdout_blocks = pack_split(holdout, tokenizer, d.seq_len, drop_last=False)
    log.info("text: %d training blocks of %d tokens (%d documents), %d held-out blocks; vocabulary %d",
             train_blocks.num_blocks, d.seq_len, len(train), holdout_blocks.num_blocks, tokenizer.vocab_size)
    spec = method_spec(cfg.method["name"])
    section = dict(cfg.method)
    filled = {"mask_id": tokenizer.mask_id, "special_ids": sorted(tokenizer.special_ids)}
    for key in spec.tokenizer_fields:
        section.setdefault(key, filled[key])
    preprocess = {"modality": "text", "tokenizer": TOKENIZER_FILE, "tokenizer_kind": tokenizer.kind, "seq_len": d.seq_len}
    batches = TextBatches(train_blocks, train.ids, runtime.device, d.document_masks)
    heldout = TextBatches(holdout_blocks, holdout.ids, runtime.device, d.document_masks)
    micro_batch = max(1, cfg.train.batch_size // (cfg.train.accum_steps * runtime.world_size))
    return _Assembly(
        train, holdout, batches, {"vocab_size": tokenizer.vocab_size, "max_len": d.seq_len}, preprocess, section,
        lambda rt: heldout_monitor(heldout, rt, cfg.train.eval_max_blocks, micro_batch, cfg.seed),
    )


def _fit_targets(method: nn.Module, parts: _Assembly, cfg: RunConfig, out: Path, runtime: Runtime,
                 resume: bool) -> None:
    """Targets made from the data (BEiT's visual tokens, colourisation's colour bins), fitted on the
    training split before the first step. A resumed run skips this: the checkpoint holds them."""
    if resume and checkpoint.latest_valid(out / "checkpoints") is not None:
        return
    assert isinstance(parts.train, ImageSet)
    pre = parts.preprocess
    prep = lambda x: normalise(x, pre["mean"], pre["std"], pre["image_size"])  # noqa: E731
    generator = torch.Generator(device=runtime.device).manual_seed(cfg.seed)
    log.info("fitting %s's targets on the training images", cfg.method["name"])
    stats = method.fit_targets(parts.train.images, prep, generator)
    log.info("targets fitted: %s", {k: round(v, 4) for k, v in stats.items()})
    tokenizer = getattr(method, "tokenizer", None)
    if runtime.is_main and isinstance(tokenizer, KMeansTokenizer):
        tokenizer.save(out / VISUAL_TOKENS_FILE)


def pretrain(cfg: RunConfig | None, out: Path, *, resume: bool = False, overwrite: bool = False,
             stop_after: int | None = None, show_progress: bool = True, report: bool = True) -> PretrainResult:
    """Runs (or resumes) a pretraining run into `out`; returns what the caller needs for probes.

    The outputs come in order — checkpoints, then `encoder.safetensors` + `encoder.json`, previews,
    then `report.html` — and a resume of a finished run writes whichever of them is missing. A
    SIGINT/SIGTERM anywhere (start-up included) stops at the next safe point with `Interrupted`.
    """
    out = Path(out)
    if int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0 and (out / CONFIG_FILE).is_file():
        # torchrun --max-restarts restarted the workers: continue the run the first attempt began.
        log.info("torchrun restart %s: resuming %s", os.environ["TORCHELASTIC_RESTART_COUNT"], out)
        resume, overwrite = True, False
    created = not out.exists()
    with StopSignal() as stop:
        lock = None
        # torchrun sets RANK; the process group itself waits for the config (it names the device).
        if int(os.environ.get("RANK", "0")) == 0:
            lock = _claim_run_dir(out, resume=resume, overwrite=overwrite)
        try:
            return _pretrain(cfg, out, resume, stop_after, show_progress, report, stop)
        finally:
            if lock is not None:
                lock.release()
                if out.is_dir() and [p.name for p in out.iterdir()] == [LOCK]:  # a failed start leaves nothing
                    (out / LOCK).unlink()
                    if created:
                        out.rmdir()


def _claim_run_dir(out: Path, *, resume: bool, overwrite: bool) -> DirLock:
    """Checks `out`, locks it against a second writer, and (for a new run) empties and marks it."""
    prepare_run_dir(out, resume=resume, overwrite=overwrite)
    out.mkdir(parents=True, exist_ok=True)
    lock = DirLock(out, "run")
    try:
        prepare_run_dir(out, resume=resume, overwrite=overwrite)  # again, now that no other process can change it
        if not resume:
            _clear_run_dir(out)
            mark(out, "run", state=STARTING)
        elif read_marker(out) is None:
            mark(out, "run", state=TRAINING)  # a run from before markers: marked now that it is resumed
    except BaseException:
        lock.release()
        raise
    return lock


def _check_stop(stop: StopSignal, where: str) -> None:
    if stop.received is not None:
        raise Interrupted(f"interrupted {where}; continue with --resume")


def _pretrain(cfg: RunConfig | None, out: Path, resume: bool, stop_after: int | None, show_progress: bool,
              report: bool, stop: StopSignal) -> PretrainResult:
    if resume:
        cfg = config_for_resume(out, cfg)
    assert cfg is not None
    is_main = int(os.environ.get("RANK", "0")) == 0
    if is_main and not resume:
        write_atomic(out / CONFIG_FILE, dump_config(cfg))
    try:
        runtime = init_runtime(cfg.train.device, cfg.train.precision)
        runtime.barrier()  # rank 0 has checked (and with --overwrite emptied) the run directory
        if cfg.train.threads is not None:
            torch.set_num_threads(cfg.train.threads)
        if method_spec(cfg.method["name"]).modality == "text":
            parts = _assemble_text(cfg, out, runtime)
        else:
            parts = _assemble_images(cfg, runtime, show_progress)
        encoder, encoder_spec = build_encoder_from(cfg, **parts.encoder_inputs)
        method = build_method(parts.method_section, encoder).to(runtime.device)
        if getattr(method, "fits_targets", False):
            _fit_targets(method, parts, cfg, out, runtime, resume)
    except SelfsupError:
        if is_main and not resume:
            _clear_run_dir(out)  # a start that failed on its inputs leaves nothing behind (the run never began)
        raise
    _check_stop(stop, "during start-up, before the first step")
    _warn_accumulation(cfg, method, runtime.world_size)
    log.info("pretraining %s on %s: %d %s (%d held out), encoder %s (%.2fM parameters), %s on %s x%d",
             cfg.method["name"], parts.train.source, len(parts.train),
             "documents" if isinstance(parts.train, TextSet) else "images", len(parts.holdout), cfg.encoder["name"],
             sum(p.numel() for p in encoder.parameters()) / 1e6, runtime.precision, runtime.device, runtime.world_size)
    if runtime.is_main and (read_marker(out) or {}).get("state") == STARTING:
        update_marker(out, state=TRAINING)
    result = fit(method, parts.batches, cfg.train, out, runtime, seed=cfg.seed, resume=resume,
                 monitor=parts.monitor(runtime), stop_after=stop_after, stop=stop)
    if runtime.is_main and result.steps == cfg.train.steps:
        save_encoder(out, method.encoder, {"encoder": encoder_spec, "preprocess": parts.preprocess, "method": cfg.method,
                                           "steps": result.steps, "data": parts.train.source})
        if isinstance(parts.holdout, ImageSet) and len(parts.holdout):
            save_previews(method, parts.holdout, parts.preprocess, runtime, out / PREVIEWS_FILE, cfg.seed)
        _check_stop(stop, f"after the final checkpoint (step {result.steps}) and the encoder export, "
                          "before the report")
        if report:
            from selfsup.report.html import write_report

            write_report(out, f"selfsup pretrain: {out}")
    runtime.barrier()
    return PretrainResult(out, result, parts.train, parts.holdout, parts.preprocess)


def _warn_accumulation(cfg: RunConfig, method: nn.Module, world_size: int) -> None:
    """With gradient accumulation, whatever couples a batch's samples sees one micro-batch, not the
    step's `train.batch_size`: say so, naming it (the gradients of per-sample losses are unaffected)."""
    if cfg.train.accum_steps <= 1:
        return
    coupled = []
    spec = method_spec(cfg.method["name"])
    if spec.batch_coupling:
        coupled.append(spec.batch_coupling)
    if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in method.modules()):
        coupled.append("BatchNorm statistics")
    if coupled:
        micro = cfg.train.batch_size // (cfg.train.accum_steps * world_size)
        log.warning("train.accum_steps=%d: %s span one micro-batch of %d samples per rank, not train.batch_size=%d; "
                    "the objective is the one of a batch of %d (see README, gradient accumulation)",
                    cfg.train.accum_steps, " and ".join(coupled), micro, cfg.train.batch_size, micro)
