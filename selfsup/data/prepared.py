"""What the prepared built-in datasets (glyphs, man pages) share: their cache stamps and the
versions of the Debian packages they are built from, which decide whether a cache is stale."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterable
from pathlib import Path


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
