"""Checkpoints that are either whole or not there.

A checkpoint is a directory `checkpoints/step-N/` holding
- `model.safetensors`  the method's weights (encoder, heads, any teacher), no pickle;
- `optimizer.pt`       the optimizer state (tensors and numbers: `torch.load(weights_only=True)` reads it);
- `state.pt`           step, data-order position and what identifies the run (also weights_only);
- `manifest.json`      sha256 and size of each file above, written last.

It is written into a hidden temporary directory, every file fsynced, the manifest last, then renamed
into place: a crash leaves either the previous checkpoints or a complete new one. A directory whose
manifest is missing or does not match its files is never resumed from.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_model, save_model
from torch import nn

from selfsup.errors import SelfsupError

log = logging.getLogger("selfsup")

MANIFEST = "manifest.json"
FORMAT = 1
_STEP_DIR = re.compile(r"^step-(\d+)$")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(root: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                    state: dict[str, Any], keep_last: int) -> Path:
    """Writes `root/step-<step>` atomically, then deletes all but the newest `keep_last` checkpoints."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step}"
    tmp = root / f".step-{step}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_model(model, str(tmp / "model.safetensors"))
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save({**state, "step": step, "format": FORMAT}, tmp / "state.pt")
    files = {}
    for name in ("model.safetensors", "optimizer.pt", "state.pt"):
        _fsync(tmp / name)
        files[name] = {"sha256": _sha256(tmp / name), "bytes": (tmp / name).stat().st_size}
    manifest = tmp / MANIFEST
    manifest.write_text(json.dumps({"format": FORMAT, "step": step, "files": files}, indent=1))
    _fsync(manifest)
    if final.exists():  # the same step written again after a resume: replace it whole
        old = root / f".step-{step}.old-{os.getpid()}"
        final.rename(old)
        shutil.rmtree(old)
    tmp.rename(final)
    _fsync(root)
    prune(root, keep_last)
    return final


def verify(path: Path) -> dict[str, Any]:
    """The manifest of a complete, uncorrupted checkpoint; SelfsupError saying what is wrong otherwise."""
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise SelfsupError(f"{path}: no {MANIFEST} (the checkpoint was not finished)")
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
    except (ValueError, KeyError, TypeError):
        raise SelfsupError(f"{manifest_path}: unreadable manifest") from None
    for name, entry in files.items():
        file = path / name
        if not file.is_file():
            raise SelfsupError(f"{file}: listed in the manifest but missing")
        if file.stat().st_size != entry["bytes"] or _sha256(file) != entry["sha256"]:
            raise SelfsupError(f"{file}: size or sha256 differs from the manifest (truncated or corrupted)")
    return manifest


def list_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """(step, path) of every `step-N` directory, newest first (valid or not)."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return sorted(found, reverse=True)


def latest_valid(root: Path) -> Path | None:
    """The newest checkpoint that verifies; invalid newer ones are reported and passed over."""
    for _, path in list_checkpoints(root):
        try:
            verify(path)
            return path
        except SelfsupError as err:
            log.warning("skipping invalid checkpoint: %s", err)
    return None


def prune(root: Path, keep_last: int) -> None:
    """Deletes all but the newest `keep_last` valid checkpoints, plus stale temporaries and invalid older ones."""
    kept = 0
    for _, path in list_checkpoints(root):
        if kept < keep_last:
            try:
                verify(path)
                kept += 1
                continue
            except SelfsupError:
                pass
        if kept >= keep_last:
            shutil.rmtree(path, ignore_errors=True)
    for stale in root.glob(".step-*"):
        shutil.rmtree(stale, ignore_errors=True)


def load_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> dict[str, Any]:
    """Restores weights (and optimizer) from a verified checkpoint; returns its state dict."""
    verify(path)
    weights = path / "model.safetensors"
    try:
        missing, unexpected = load_model(model, str(weights), strict=False)
    except RuntimeError as err:  # shape mismatches
        raise SelfsupError(f"{weights}: weights do not match this model ({str(err).splitlines()[-1].strip()}); "
                           f"was the config changed?") from None
    if missing or unexpected:
        raise SelfsupError(
            f"{weights}: weights do not match this model "
            f"(missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}); was the config changed?"
        )
    if optimizer is not None:
        optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True, map_location="cpu"))
    return torch.load(path / "state.pt", weights_only=True, map_location="cpu")
