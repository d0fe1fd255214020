"""What the prepared built-in datasets (glyphs, emoji, man pages) share: their cache stamps, the
versions of the Debian packages they are built from (which decide whether a cache is stale), the
atomic swap of a finished build into place, and the progress bar of a long preparation."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path

log = logging.getLogger("selfsup")


def read_stamp(path: Path) -> dict | None:
    """A cache stamp's JSON mapping; None when it is missing or unreadable (the cache is then rebuilt)."""
    try:
        stamp = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return stamp if isinstance(stamp, dict) else None


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


def swap_into_place(building: Path, out: Path) -> None:
    """Rename the finished folder to `out`, moving a previous build aside first and deleting it after."""
    old = None
    if out.exists():
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
