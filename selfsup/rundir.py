"""The run directory: its layout and file names, and who may write or replace it.

```
RUN/
  .selfsup.json          marker: {"kind": "run", "state": "starting" | "training"} (selfsup/files.py)
  .selfsup.lock          advisory lock while a process writes the run
  config.yaml            the resolved config (a resume must match it)
  metrics.jsonl          one JSON object per step
  checkpoints/step-N/    model.safetensors, optimizer.pt, state.pt, manifest.json (train/checkpoint.py;
                         train.parallel=fsdp: DCP shards + state.pt + manifest.json, train/sharded.py)
  encoder.safetensors    single-tower runs: the encoder, and encoder.json to rebuild it
  encoder.json             (preprocess.modality always written)
  towers/ROLE/           multi-tower runs: each tower's encoder.safetensors + encoder.json (+ its tokenizer)
  tokenizer.json         text: the tokenizer the weights were trained with
  <method artifacts>     e.g. BEiT's visual_tokens.safetensors (MethodSpec.artifacts)
  previews.png           reconstruction objectives on images
  report.html, report.png, results.json (demo), probe.json (probe), tensorboard/
```
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from selfsup.encoders import build_seeded
from selfsup.errors import SelfsupError
from selfsup.export.encoder import META, WEIGHTS, load_encoder
from selfsup.files import LOCK, MARKER, DirLock, check_owned, mark, names_in, read_marker

log = logging.getLogger("selfsup")

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
CHECKPOINTS_DIR = "checkpoints"
TOWERS_DIR = "towers"
REPORT_FILE = "report.html"
STARTING, TRAINING = "starting", "training"  # the marker's `state`: a run that never began training is replaceable
SINGLE = "encoder"  # the role of a single-tower method's encoder


ZEROSHOT_DIR = "zeroshot"  # `selfsup zeroshot`'s output inside a run (predictions.csv, zeroshot.json)


def starting_towers(seed: int, descriptions: dict[str, dict]) -> dict[str, nn.Module]:
    """A run's towers as pretraining began: built in order under `seed` (`build_seeded`, which also
    gives a Hugging Face tower its folder's weights), then each tower whose description names an
    `init` ("RUN" or "RUN:TOWER", from `encoder.init` / `encoders.ROLE.init`) given that tower's weights."""
    towers = build_seeded(seed, descriptions)
    for role, description in descriptions.items():
        if description.get("init"):
            load_init(towers[role], str(description["init"]), role)
    return towers


def load_init(tower: nn.Module, init: str, role: str) -> None:
    """Copies the weights of the run tower `init` names into `tower`; a different architecture is an
    error naming the first parameter that differs."""
    run, _, which = init.partition(":")
    key = "encoder" if role == SINGLE else f"encoders.{role}"
    if not Path(run).is_dir():
        raise SelfsupError(f"{key}.init={init}: {run} is not found; this tower started from that run, which has "
                           "to be there to rebuild where pretraining began")
    folder, _ = resolve_tower(Path(run), which or None)
    base, _ = load_encoder(folder)
    mine, theirs = tower.state_dict(), base.state_dict()
    differ = [k for k in mine if k not in theirs or theirs[k].shape != mine[k].shape]
    differ += sorted(set(theirs) - set(mine))
    if differ:
        raise SelfsupError(f"{key}.init={init}: its encoder is not this tower's architecture (first difference: "
                           f"{differ[0]}); set {key}.* to that run's encoder (see its encoder.json), and for a "
                           f"text tower its tokenizer: tokenizer.path={folder / 'tokenizer.json'}")
    with torch.no_grad():
        tower.load_state_dict(theirs)


def run_files() -> Callable[[str], bool]:
    """What a run directory may hold: selfsup's own files, written by pretrain, probe, demo and report."""
    from selfsup.methods import METHODS
    from selfsup.modalities.image import PREVIEWS_FILE
    from selfsup.modalities.text import TOKENIZER_FILE

    artifacts = [name for spec in METHODS.values() for name in spec.artifacts]
    return names_in(CONFIG_FILE, METRICS_FILE, CHECKPOINTS_DIR, TOWERS_DIR, WEIGHTS, META, REPORT_FILE, "report.png",
                    "results.json", "probe.json", "tensorboard", TOKENIZER_FILE, PREVIEWS_FILE, ZEROSHOT_DIR, *artifacts)


def tower_dir(run: Path, role: str, roles: tuple[str, ...]) -> Path:
    """Where a tower is saved: the run itself for a single-tower method, else `towers/ROLE/`."""
    return Path(run) if roles == (SINGLE,) else Path(run) / TOWERS_DIR / role


def resolve_tower(path: Path, tower: str | None) -> tuple[Path, str]:
    """(folder holding the tower's encoder.json, its role) of a run directory (or a plain encoder folder).

    A single-tower run has one tower, `encoder`; a multi-tower run's default is the method's first
    tower (CLIP: image), and the caller is told which it got.
    """
    path = Path(path)
    towers = path / TOWERS_DIR
    if not towers.is_dir():
        if tower not in (None, SINGLE):
            raise SelfsupError(f"{path}: a single-encoder run has no tower {tower!r}; drop --tower")
        return path, SINGLE
    roles = _roles(path) or tuple(sorted(p.name for p in towers.iterdir() if (p / META).is_file()))
    if tower is None:
        if not roles:
            raise SelfsupError(f"{towers}: holds no tower (no */{META}); was the run finished?")
        tower = roles[0]
        log.info("%s has the towers %s; using %s (choose with --tower)", path, ", ".join(roles), tower)
    if tower not in roles:
        raise SelfsupError(f"{path}: no tower {tower!r}; its towers are {', '.join(roles)}")
    return towers / tower, tower


def _roles(run: Path) -> tuple[str, ...]:
    """The method's towers in its declared order, from the run's config (empty when there is none)."""
    if not (run / CONFIG_FILE).is_file():
        return ()
    from selfsup.config import read_yaml
    from selfsup.methods import METHODS

    name = (read_yaml(run / CONFIG_FILE).get("method") or {}).get("name")
    return METHODS[name].roles if name in METHODS else ()


# ---- claiming the directory --------------------------------------------------------------------


def prepare_run_dir(out: Path, *, resume: bool, overwrite: bool) -> None:
    """Checks `out` before anything is written into it.

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
    known = run_files()
    if not entries:
        if resume:
            raise SelfsupError(f"{out}: nothing to resume (the directory is empty or missing); drop --resume")
        return
    if marker is None and resume and (out / CONFIG_FILE).is_file() and all(known(n) for n in entries):
        return  # a run written before selfsup marked its runs: resumable, and marked from now on
    if resume:
        if marker is None or marker["kind"] != "run" or not (out / CONFIG_FILE).is_file():
            raise SelfsupError(f"{out}: not a selfsup run to resume (no {MARKER} marker or no {CONFIG_FILE}); "
                               "check --out")
        return
    failed_start = marker is not None and marker.get("state") == STARTING
    if not overwrite and not failed_start:
        raise SelfsupError(f"{out}: directory is not empty; pass --resume to continue that run, "
                           f"--overwrite to replace it, or choose another --out")
    check_owned(out, "run", known, flag="--overwrite" if overwrite else "a new run")
    if failed_start and not overwrite:
        log.info("%s: replacing a run that failed to start (it never trained a step)", out)


def clear_run_dir(out: Path) -> None:
    """Deletes what a run wrote into `out` (already checked to be a selfsup run), keeping `out` itself."""
    for path in out.iterdir():
        if path.name != LOCK:
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()


def claim_run_dir(out: Path, *, resume: bool, overwrite: bool) -> DirLock:
    """Checks `out`, locks it against a second writer, and (for a new run) empties and marks it."""
    prepare_run_dir(out, resume=resume, overwrite=overwrite)
    out.mkdir(parents=True, exist_ok=True)
    lock = DirLock(out, "run")
    try:
        prepare_run_dir(out, resume=resume, overwrite=overwrite)  # again, now that no other process can change it
        if not resume:
            clear_run_dir(out)
            mark(out, "run", state=STARTING)
        elif read_marker(out) is None:
            mark(out, "run", state=TRAINING)  # a run from before markers: marked now that it is resumed
    except BaseException:
        lock.release()
        raise
    return lock


def release_run_dir(out: Path, lock: DirLock, created: bool) -> None:
    """Releases the lock; a start that failed and left only the lock leaves nothing at all."""
    lock.release()
    if out.is_dir() and [p.name for p in out.iterdir()] == [LOCK]:
        (out / LOCK).unlink()
        if created:
            out.rmdir()
