"""`selfsup pretrain`: wires config, modality, method, towers and data into a run, then runs the loop.

The orchestration knows no particular modality or method: the modality assembles the batches,
encoder inputs, preprocessing and monitor (`modalities/`), the method declares its towers and hooks
(`methods/__init__.py`), the loop trains (`train/loop.py`), and the run directory's layout and
ownership live in `rundir.py`.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from selfsup.config import HF_TOWER_PREFIX, INIT_KEY, RunConfig, dump_config, load_config, to_dict
from selfsup.encoders import describe_encoder
from selfsup.encoders.hf import hf_description, lm_head_kind
from selfsup.errors import SelfsupError
from selfsup.export.encoder import load_encoder, save_encoder
from selfsup.files import read_marker, update_marker, write_atomic
from selfsup.methods import MethodSpec, build_method, method_spec
from selfsup.modalities import load_splits, run_modality  # noqa: F401 (load_splits: re-exported)
from selfsup.modalities.base import Assembly
from selfsup.rundir import (CONFIG_FILE, STARTING, TRAINING, claim_run_dir, clear_run_dir, release_run_dir,
                            resolve_tower, starting_towers, tower_dir)
from selfsup.train import checkpoint, sharded
from selfsup.train.loop import FitResult, fit, steps_for_budget
from selfsup.train.runtime import Runtime, init_runtime
from selfsup.train.stop import Interrupted, StopSignal

log = logging.getLogger("selfsup")


@dataclass
class PretrainResult:
    run_dir: Path
    fit: FitResult
    train: Any  # the split that was pretrained on (the modality's dataset)
    holdout: Any  # the split kept for probes
    preprocess: dict[str, Any]  # the first tower's: how its inputs must be prepared


def tower_sections(cfg: RunConfig) -> dict[str, tuple[dict[str, Any], str]]:
    """role -> (its encoder section, its modality), in the method's order."""
    spec = method_spec(cfg.method["name"])
    if spec.towers is None:
        return {"encoder": (cfg.encoder, cfg.data.modality)}
    return {role: (cfg.encoders[role], spec.tower_modalities.get(role, cfg.data.modality)) for role in spec.towers}


def build_towers(cfg: RunConfig, inputs: dict[str, dict[str, int]]) -> tuple[dict[str, nn.Module], dict[str, dict]]:
    """The run's towers, seeded once and built in the method's order, and the descriptions that
    rebuild them; `inputs` are each tower modality's encoder inputs (from the modality's assembly)."""
    descriptions = {}
    spec = method_spec(cfg.method["name"])
    for role, (section, modality) in tower_sections(cfg).items():
        knobs = {k: v for k, v in section.items() if k not in ("name", INIT_KEY)}
        if section["name"].startswith(HF_TOWER_PREFIX):  # a local Hugging Face model, its weights included
            # an objective on the text encoder's own outputs (MLM, next-token) takes the model with its LM head
            head = lm_head_kind(spec.causal) if spec.towers is None else None
            descriptions[role] = hf_description(Path(section["name"].removeprefix(HF_TOWER_PREFIX)).expanduser(), head)
        else:
            descriptions[role] = describe_encoder(section["name"], **inputs[modality], **knobs)
        if section.get(INIT_KEY):  # starts from another run's tower (rundir.starting_towers loads it)
            descriptions[role][INIT_KEY] = section[INIT_KEY]
    return untrained_towers(cfg, descriptions), descriptions


def untrained_towers(cfg: RunConfig, descriptions: dict[str, dict]) -> dict[str, nn.Module]:
    """The weights pretraining began from: the same seed, the same order of construction, and the
    weights of the runs or folders towers start from (`encoder.init`, `hf:DIR`)."""
    return starting_towers(cfg.seed, descriptions)


def untrained_tower(run: Path, cfg: RunConfig, role: str) -> nn.Module:
    """The tower `role` of the run as pretraining began: every tower rebuilt from its encoder.json in
    the method's order under the run's seed (towers are built in one seeded sequence)."""
    roles = method_spec(cfg.method["name"]).roles
    descriptions = {r: load_encoder_description(tower_dir(run, r, roles)) for r in roles}
    return untrained_towers(cfg, descriptions)[role]


def load_encoder_description(folder: Path) -> dict[str, Any]:
    """The `encoder` section of a tower's encoder.json (how to rebuild its architecture)."""
    return load_encoder(folder)[1]["encoder"]


def build_encoder_from(cfg: RunConfig, **inputs: int) -> tuple[nn.Module, dict[str, Any]]:
    """A single-tower run's untrained encoder and its description; `inputs` are the text encoder's
    vocab_size and max_len (image encoders take theirs from the config)."""
    if not inputs:
        inputs = {"in_channels": cfg.data.channels, "image_size": cfg.data.image_size}
    towers, descriptions = build_towers(cfg, {cfg.data.modality: inputs})
    return towers["encoder"], descriptions["encoder"]


def config_for_resume(out: Path, given: RunConfig | None) -> RunConfig:
    """The run's saved config; a differing config passed on resume is refused, naming the keys."""
    saved = load_config(out / CONFIG_FILE)
    if given is not None:
        if saved.train.minutes is not None and given.train.minutes == saved.train.minutes:
            given.train.steps = saved.train.steps  # the count the budget fixed at the start
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


def pretrain(cfg: RunConfig | None, out: Path, *, resume: bool = False, overwrite: bool = False,
             stop_after: int | None = None, show_progress: bool = True, report: bool = True) -> PretrainResult:
    """Runs (or resumes) a pretraining run into `out`; returns what the caller needs for probes.

    The outputs come in order — checkpoints, then each tower's encoder files, previews, then
    `report.html` — and a resume of a finished run writes whichever of them is missing. A
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
            lock = claim_run_dir(out, resume=resume, overwrite=overwrite)
        try:
            return _pretrain(cfg, out, resume, stop_after, show_progress, report, stop)
        finally:
            if lock is not None:
                release_run_dir(out, lock, created)


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
    spec = method_spec(cfg.method["name"])
    modality = run_modality(cfg)
    try:
        runtime = init_runtime(cfg.train.device, cfg.train.precision)
        runtime.barrier()  # rank 0 has checked (and with --overwrite emptied) the run directory
        if cfg.train.threads is not None:
            torch.set_num_threads(cfg.train.threads)
        # a shards folder's training split is streamed, not loaded (modalities.load_splits)
        train, holdout = load_splits(cfg, progress=show_progress and runtime.is_main, stream=True)
        parts = modality.assemble(cfg, out, runtime, train, holdout, spec, progress=show_progress)
        towers, descriptions = build_towers(cfg, parts.encoder_inputs)
        method = build_method(parts.method_section, **towers).to(runtime.device)
        if getattr(method, "fits_targets", False):
            _fit_targets(method, parts, cfg, out, runtime, resume)
    except SelfsupError:
        if is_main and not resume:
            clear_run_dir(out)  # a start that failed on its inputs leaves nothing behind (the run never began)
        raise
    _check_stop(stop, "during start-up, before the first step")
    _warn_accumulation(cfg, spec, method, runtime.world_size)
    log.info("pretraining %s on %s: %d %s (%d held out), %s (%.2fM parameters), %s on %s x%d",
             cfg.method["name"], train.source, len(train), modality.unit, len(holdout),
             ", ".join(f"{role} {d['name']}" if len(towers) > 1 else d["name"] for role, d in descriptions.items()),
             sum(p.numel() for t in towers.values() for p in t.parameters()) / 1e6, runtime.precision,
             runtime.device, runtime.world_size)
    if runtime.is_main and (read_marker(out) or {}).get("state") == STARTING:
        update_marker(out, state=TRAINING)
    # the tower the monitor watches: the first that reads the data's modality (a pair modality: the first)
    first_role = next((role for role, (_, m) in tower_sections(cfg).items() if m == modality.name), spec.roles[0])
    monitor = parts.monitor(runtime, lambda m: getattr(m, first_role))
    if cfg.train.minutes is not None and not _has_checkpoint(out):
        _fix_steps_to_budget(cfg, method, parts, out, runtime, monitor, is_main)
        _check_stop(stop, "while timing the first steps for `train.minutes`, before the first step")
    result = fit(method, parts.batches, cfg.train, out, runtime, seed=cfg.seed, resume=resume,
                 monitor=monitor, stop_after=stop_after, stop=stop)
    first = tower_sections(cfg)[spec.roles[0]][1]
    finished = result.steps == cfg.train.steps
    # Rank 0 writes the towers from the whole weights: under train.parallel=fsdp every rank sends its shards.
    trained = sharded.whole(method, runtime) if finished else None
    if runtime.is_main and finished:
        _save_towers(out, cfg, spec, trained, descriptions, parts, result.steps, train.source)
        if parts.after_training is not None:
            parts.after_training(trained, runtime, out)
        _check_stop(stop, f"after the final checkpoint (step {result.steps}) and the encoder export, "
                          "before the report")
        if report:
            from selfsup.report.html import write_report

            write_report(out, f"selfsup pretrain: {out}")
    runtime.barrier()
    return PretrainResult(out, result, train, holdout, parts.preprocess[first])


def _has_checkpoint(out: Path) -> bool:
    return checkpoint.latest_valid(out / "checkpoints", quiet=True) is not None


def _fix_steps_to_budget(cfg: RunConfig, method: nn.Module, parts: Assembly, out: Path, runtime: Runtime,
                         monitor: Any, is_main: bool) -> None:
    """`train.minutes`: time a few steps, fix `train.steps` to what fits and write it to config.yaml
    before step 1, so that the schedule is fixed and a resume repeats it (it never re-measures once
    a checkpoint exists)."""
    log.info("train.minutes=%g: timing a few steps to fix train.steps", cfg.train.minutes)
    budget = steps_for_budget(method, parts.batches, cfg.train, out, runtime, seed=cfg.seed, monitor=monitor)
    cfg.train.steps = budget.steps
    log.info("%s (%.0f s of the budget spent measuring); written to %s", budget.describe(cfg.train.minutes),
             budget.calibration_seconds, out / CONFIG_FILE)
    if is_main:
        write_atomic(out / CONFIG_FILE, dump_config(cfg))
    runtime.barrier()


def _save_towers(out: Path, cfg: RunConfig, spec: MethodSpec, method: nn.Module, descriptions: dict[str, dict],
                 parts: Assembly, steps: int, source: str) -> None:
    """Each tower's encoder.safetensors + encoder.json (+ the files its modality needs beside it)."""
    sections = tower_sections(cfg)
    for role in spec.roles:
        modality = sections[role][1]
        folder = tower_dir(out, role, spec.roles)
        meta = {"encoder": descriptions[role], "preprocess": parts.preprocess[modality], "method": cfg.method,
                "steps": steps, "data": source}
        if len(spec.roles) > 1:
            meta["tower"] = role
        save_encoder(folder, getattr(method, role), meta)
        if folder != out:  # the run's own copy is at the top already (written during assembly)
            for name, write in parts.tower_files.get(modality, {}).items():
                write(folder)
    save = getattr(method, "save_artifacts", None)
    if save is not None and not getattr(method, "fits_targets", False):
        save(out)  # trained artifacts (CLIP's projections); fitted ones (BEiT's tokens) were written before step 1


def _fit_targets(method: nn.Module, parts: Assembly, cfg: RunConfig, out: Path, runtime: Runtime,
                 resume: bool) -> None:
    """Targets made from the data (BEiT's visual tokens, colourisation's colour bins), fitted on the
    training split before the first step. A resumed run skips this: the checkpoint holds them."""
    if resume and checkpoint.latest_valid(out / "checkpoints", quiet=True) is not None:
        return
    if parts.fit_data is None:
        raise SelfsupError(f"method `{cfg.method['name']}` fits its targets on the data, which "
                           f"`data.modality={cfg.data.modality}` does not offer")
    parts.fit_data.load_run = _load_tower
    generator = torch.Generator(device=runtime.device).manual_seed(cfg.seed)
    log.info("fitting %s's targets on the training data", cfg.method["name"])
    stats = method.fit_targets(parts.fit_data, generator)
    log.info("targets fitted: %s", {k: round(v, 4) for k, v in stats.items()})
    save = getattr(method, "save_artifacts", None)
    if runtime.is_main and save is not None:
        save(out)


def _load_tower(name: str) -> tuple[nn.Module, dict[str, Any]]:
    """`RUN` or `RUN:TOWER` -> (encoder, its description), for targets that come from another run."""
    run, _, tower = name.partition(":")
    folder, _ = resolve_tower(Path(run), tower or None)
    return load_encoder(folder)


def _warn_accumulation(cfg: RunConfig, spec: MethodSpec, method: nn.Module, world_size: int) -> None:
    """With gradient accumulation, whatever couples a batch's samples sees one micro-batch, not the
    step's `train.batch_size`: say so, naming it (the gradients of per-sample losses are unaffected)."""
    if cfg.train.accum_steps <= 1:
        return
    coupled = [spec.batch_coupling] if spec.batch_coupling else []
    if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in method.modules()):
        coupled.append("BatchNorm statistics")
    if coupled:
        micro = cfg.train.batch_size // (cfg.train.accum_steps * world_size)
        log.warning("train.accum_steps=%d: %s span one micro-batch of %d samples per rank, not train.batch_size=%d; "
                    "the objective is the one of a batch of %d (see README, gradient accumulation)",
                    cfg.train.accum_steps, " and ".join(coupled), micro, cfg.train.batch_size, micro)
