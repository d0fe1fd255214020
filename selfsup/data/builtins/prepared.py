"""What the prepared built-in datasets (glyphs, emoji, man pages, klettres, espeak) share: their cache
stamps and the test of whether a previous build is still fresh (`previous_stamp`, `is_fresh`), the
versions of the Debian packages they are built from (which decide whether a cache is stale), the build
into a temporary folder and its atomic swap into place (`build_into_place`), the progress bar of a long
preparation, the loading of a prepared image dataset (`load_prepared`), and for the audio ones the
16-bit WAV writer (`write_wav`) and the loading (`load_prepared_audio`)."""

from __future__ import annotations

import csv
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from selfsup.errors import SelfsupError

log = logging.getLogger("selfsup")


def read_stamp(path: Path) -> dict | None:
    """A cache stamp's JSON mapping; None when it is missing or unreadable (the cache is then rebuilt)."""
    try:
        stamp = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return stamp if isinstance(stamp, dict) else None


def previous_stamp(out: Path, stamp_name: str, what: str) -> dict | None:
    """The stamp of a previous build in `out`, None when there is none (`out` missing, or an empty folder).

    Anything else in `out` without a stamp is not ours: an error naming it `what` ("a glyphs dataset")."""
    if not out.exists():
        return None
    stamp = read_stamp(out / stamp_name)
    if stamp is None and (not out.is_dir() or any(out.iterdir())):
        raise SelfsupError(f"{out}: exists and is not {what} (no {stamp_name}); choose another "
                           f"--out or remove it yourself")
    return stamp


def is_fresh(stamp: dict | None, settings: dict, inputs: dict, force: bool, complete: Callable[[dict], bool]) -> bool:
    """Whether a previous build (its stamp) can be reused: not forced, made with the same settings
    from the same inputs, and `complete(stamp)` (its files are all there)."""
    return (stamp is not None and not force and stamp.get("settings") == settings
            and stamp.get("inputs") == inputs and complete(stamp))


def build_into_place(out: Path, stamp_name: str, write: Callable[[Path], object], started: float,
                     stamp_of: Callable[[float], dict], *, ensure_ascii: bool = True) -> float:
    """Build a dataset folder under a temporary name beside `out` and rename it into place, so a
    reader never sees half a dataset and an interrupted run leaves the previous one intact.

    `write(folder)` writes the dataset; `stamp_of(seconds)` is then its stamp (`seconds` since
    `started`), written last as `stamp_name`. A failure removes the half-built folder. Returns the seconds."""
    out.parent.mkdir(parents=True, exist_ok=True)
    building = Path(tempfile.mkdtemp(prefix=f".{out.name}.building-", dir=out.parent))
    try:
        chmod_like_mkdir(building)
        write(building)
        seconds = time.perf_counter() - started
        stamp = stamp_of(seconds)
        (building / stamp_name).write_text(json.dumps(stamp, indent=1, ensure_ascii=ensure_ascii) + "\n",
                                           encoding="utf-8")
        swap_into_place(building, out)
    except BaseException:
        shutil.rmtree(building, ignore_errors=True)
        raise
    return seconds


def debian_package_versions(packages: Iterable[str]) -> dict[str, str | None]:
    """Installed versions (None when missing, or when dpkg-query is unavailable)."""
    versions: dict[str, str | None] = {}
    for package in packages:
        try:
            done = subprocess.run(["dpkg-query", "-W", "-f", "${db:Status-Status} ${Version}", package],
                                  capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.SubprocessError):
            versions[package] = None
            continue
        status, _, version = done.stdout.strip().partition(" ")
        versions[package] = version if done.returncode == 0 and status == "installed" else None
    return versions


def chmod_like_mkdir(folder: Path) -> None:
    """mkdtemp makes a private (0700) folder; the dataset should be as readable as any other folder."""
    umask = os.umask(0o022)
    os.umask(umask)
    os.chmod(folder, 0o777 & ~umask)


def _manifest_folders(manifest: Path) -> set[str]:
    """The top-level folders of the `path` column of a prepared dataset's manifest (empty if unreadable)."""
    try:
        with open(manifest, newline="", encoding="utf-8") as fh:
            return {row["path"].split("/", 1)[0] for row in csv.DictReader(fh) if "/" in (row.get("path") or "")}
    except (OSError, ValueError, KeyError, csv.Error):
        return set()


def swap_into_place(building: Path, out: Path) -> None:
    """Rename the finished folder to `out`, moving a previous build aside first and deleting it after.

    The previous build may hold only what a build writes — the new build's names, and the image
    folders its own manifest.csv lists: anything else was put there by someone else, and is never
    deleted (`--force` included)."""
    old = None
    if out.exists():
        listed = _manifest_folders(out / "manifest.csv")
        foreign = sorted(p.name for p in out.iterdir()
                         if not (building / p.name).exists() and not p.name.startswith(".") and p.name not in listed)
        if foreign:
            raise SelfsupError(f"{out}: holds files a selfsup build does not write ({', '.join(foreign[:8])}); "
                               "refusing to replace it. Move them out, or choose another --out")
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.rename(out, old)
    try:
        os.rename(building, out)
    except OSError:
        if old is not None:
            os.rename(old, out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


class ProgressBar:
    """A rich progress bar on a terminal, else one log line per phase, else nothing."""

    def __init__(self, enabled: bool, title: str, total: int):
        self._bar = None
        if enabled and sys.stderr.isatty():
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self._bar = Progress(TextColumn(title), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                                 TextColumn("{task.fields[note]}"), console=Console(stderr=True), transient=True)
            self._task = self._bar.add_task(title, total=total, note="")
            self._bar.start()
        elif enabled:
            log.info("%s: %d", title, total)

    def update(self, completed: int | None = None, note: str | None = None) -> None:
        if self._bar is not None:
            fields = {} if note is None else {"note": note}
            self._bar.update(self._task, completed=completed, **fields)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()


def load_prepared(folder: Path, manifest: str, pixels: str, group_columns: list[str], image_size: int, channels: int,
                  name: str, not_prepared: str) -> Any:
    """A prepared image dataset (an ImageSet) read back from `folder`: labels, classes, ids and groups
    exactly as `load_image_source` makes them of the manifest; the pixels from the `pixels` .npz when
    it matches the manifest row for row, else decoded from the PNGs (a manifest edited by hand).
    `not_prepared` says what to run when the manifest is missing."""
    # sources imports images, which imports builtins, which imports the dataset modules only lazily
    from selfsup.data.decode import _BadFilePolicy
    from selfsup.data.images import ImageSet, images_from_array
    from selfsup.data.sources import _cell, _load_manifest, _read_manifest_rows, _sorted_classes

    path = folder / manifest
    if not path.is_file():
        raise SelfsupError(f"the {name} dataset is not prepared ({path} does not exist): {not_prepared}")
    rows, columns = _read_manifest_rows(path)
    names = [_cell(row, "label") for _, row in rows]
    x = _read_pixels(folder / pixels, [_cell(row, "path") for _, row in rows], manifest)
    if x is None or not all(names) or not set(group_columns) <= set(columns):
        data = _load_manifest(path, image_size, channels, _BadFilePolicy("error", 0.0), "label", group_columns,
                              progress=False)
        return replace(data, source=f"builtin:{name}")
    classes = _sorted_classes(set(names))
    class_index = {label: i for i, label in enumerate(classes)}
    images = x[:, None] if x.ndim == 3 else x.transpose(0, 3, 1, 2)  # [N, C, S, S] from grey [N, S, S] or RGB [N, S, S, 3]
    return ImageSet(images=images_from_array(np.ascontiguousarray(images), image_size, channels),
                    ids=[_cell(row, "path") for _, row in rows],
                    labels=torch.tensor([class_index[label] for label in names], dtype=torch.long),
                    classes=classes, groups={c: [_cell(row, c) for _, row in rows] for c in group_columns},
                    source=f"builtin:{name}")


def _read_pixels(path: Path, manifest_paths: list[str], manifest: str) -> np.ndarray | None:
    """uint8 [N, S, S] or [N, S, S, 3] in manifest order, or None when absent, unreadable or out of step with it."""
    try:
        with np.load(path, allow_pickle=False) as archive:
            x, paths = archive["x"], archive["path"]
    except Exception as err:  # missing, truncated, wrong keys: all mean "decode the PNGs instead"
        log.info("not using %s (%s); decoding the PNGs instead", path, err)
        return None
    if x.dtype != np.uint8 or not (x.ndim == 3 or (x.ndim == 4 and x.shape[3] == 3)) or paths.tolist() != manifest_paths:
        log.info("%s does not match %s row for row; decoding the PNGs instead", path, manifest)
        return None
    return x


# ---------------------------------------------------------------------------------------------
# Prepared audio (klettres, espeak)


def write_wav(path: Path, wave: np.ndarray, sample_rate: int) -> bool:
    """float32 [T] -> a 16-bit PCM WAV file. A clip whose peak exceeds full scale (lossy decoders and
    resampling can overshoot 1.0) is scaled down to fit rather than clipped; returns whether it was.
    (Training normalises every clip, so its level carries no information.)"""
    import soundfile

    peak = float(np.abs(wave).max(initial=0.0))
    scaled = peak > 1.0
    if scaled:
        wave = wave / peak
    pcm = np.clip(np.round(wave * 32767.0), -32768, 32767).astype(np.int16)
    soundfile.write(path, pcm, sample_rate, format="WAV", subtype="PCM_16")
    return scaled


def load_prepared_audio(folder: Path, manifest: str, stamp: str, group_columns: list[str], sample_rate: int,
                        name: str, not_prepared: str, label_column: str = "label",
                        label_columns: tuple[str, ...] = ("label",)) -> Any:
    """A prepared audio dataset (an AudioSet) read back from `folder`'s manifest exactly as
    `load_audio_source` reads any manifest (labels from `label_column`, which must be one of
    `label_columns`; the `group_columns` as subgroups), resampled when `sample_rate` differs from the
    prepared one. `not_prepared` says what to run when the manifest or the stamp is missing."""
    from selfsup.data.audio import load_audio_source  # audio imports builtins (lazily), which import this module

    if label_column not in label_columns:
        raise SelfsupError(f"data.label_column={label_column}: the {name} dataset has no such column; its labels "
                           f"can be: {', '.join(label_columns)}")
    path = folder / manifest
    if read_stamp(folder / stamp) is None or not path.is_file():
        raise SelfsupError(f"the {name} dataset is not prepared ({path} is missing or incomplete): {not_prepared}")
    data = load_audio_source(path, sample_rate=sample_rate, label_column=label_column, group_columns=group_columns)
    return replace(data, source=f"builtin:{name}")
