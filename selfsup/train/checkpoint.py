"""Checkpoints that are either whole or not there.

A checkpoint is a directory `checkpoints/step-N/` holding
- `model.safetensors`  the method's weights (encoder, heads, any teacher), no pickle;
- `optimizer.pt`       the optimizer state (tensors and numbers: `torch.load(weights_only=True)` reads it);
- `state.pt`           step, data-order position and what identifies the run (also weights_only);
- `manifest.json`      `{"format": 1, "step": N, "files": {name: {"sha256": hex, "bytes": size}}}` for
                       exactly the three files above, written last.

Under `train.parallel=fsdp` a checkpoint is of format 2 (`train/sharded.py`): `state.pt`, the files of
`torch.distributed.checkpoint` (`.metadata` and each rank's `__R_0.distcp`) and the manifest listing
them all. `verify`, `latest_valid` and `prune` know both formats; each loader reads its own and calls
the other format a changed config.

It is written into a hidden temporary directory, every file fsynced, the manifest last, then renamed
into place: a crash leaves either the previous checkpoints or a complete new one, and a failed write
(a full disk) removes the temporary and says which earlier checkpoint is still there. Files and
folders get the modes the user's umask gives.

A directory is resumed from only if its manifest is complete (known format, its own step, every
file listed) and matches its files, and every file then loads: `resume_latest` reads all three into
memory before touching the model, and passes over a checkpoint that fails any of this to the one
before it. Weights that load but do not fit the model are an error, not corruption: the config
changed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_model
from torch import nn

from selfsup.errors import SelfsupError
from selfsup.files import follow_umask, fsync_path, swap_dir

log = logging.getLogger("selfsup")

MANIFEST = "manifest.json"
FORMAT = 1
SHARDED_FORMAT = 2  # train.parallel=fsdp: torch.distributed.checkpoint's files (train/sharded.py)
STATE_FILE = "state.pt"
FILES = ("model.safetensors", "optimizer.pt", STATE_FILE)  # what every checkpoint of FORMAT holds
SHARDED_FILES = (".metadata", STATE_FILE)  # ... of SHARDED_FORMAT, besides each rank's __R_I.distcp
_SHARD_FILE = re.compile(r"^__\d+_\d+\.distcp$")
_STEP_DIR = re.compile(r"^step-(\d+)$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class UnusableCheckpoint(SelfsupError):
    """A checkpoint that is unfinished, corrupt or does not load: a resume passes over it to the previous one."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def torch_save(obj: Any, path: Path) -> None:
    # Through a Python file object, so that a full disk surfaces as the OSError(ENOSPC) of f.write;
    # torch.save(path) reports only "unexpected pos ..." from its C++ writer. Closing the archive
    # after a failed write raises that RuntimeError on top: report the OSError underneath instead.
    try:
        with open(path, "wb") as f:
            torch.save(obj, f)
    except RuntimeError as err:
        cause = err.__context__
        while cause is not None and not isinstance(cause, OSError):
            cause = cause.__context__
        if cause is None:
            raise
        raise cause from None


_torch_save = torch_save  # the name tests/train/test_checkpoint.py knows


def _write_files(tmp: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                 state: dict[str, Any]) -> None:
    save_model(model, str(tmp / "model.safetensors"))
    torch_save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch_save({**state, "step": step, "format": FORMAT}, tmp / "state.pt")
    files = {}
    for name in FILES:
        # safetensors writes through a private temporary file (mode 0600): give it the umask's mode.
        follow_umask(tmp / name)
        fsync_path(tmp / name)
        files[name] = {"sha256": sha256_file(tmp / name), "bytes": (tmp / name).stat().st_size}
    write_manifest(tmp, step, FORMAT, files)


def write_manifest(folder: Path, step: int, format: int, files: dict[str, dict[str, Any]]) -> None:
    """The manifest, written last and fsynced with its folder: from now on the folder is a checkpoint."""
    manifest = folder / MANIFEST
    manifest.write_text(json.dumps({"format": format, "step": step, "files": files}, indent=1))
    fsync_path(manifest)
    fsync_path(folder)


def save_checkpoint(root: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                    state: dict[str, Any], keep_last: int) -> Path:
    """Writes `root/step-<step>` atomically, then deletes all but the newest `keep_last` checkpoints.

    A write that fails (a full disk, a quota, an I/O error) leaves no trace of the new checkpoint and
    raises SelfsupError naming the checkpoint, the error and the newest checkpoint that is intact.
    """
    final = root / f"step-{step}"
    tmp = root / f".step-{step}.tmp-{os.getpid()}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        _write_files(tmp, step, model, optimizer, state)
        # The same step written again after a resume replaces the old copy whole; a failed rename
        # puts the old copy back.
        swap_dir(tmp, final)
    except (OSError, SafetensorError) as err:  # safetensors reports I/O errors as its own type
        shutil.rmtree(tmp, ignore_errors=True)
        previous = latest_valid(root, quiet=True)
        kept = f"the previous checkpoint {previous} is intact" if previous else "there is no earlier checkpoint"
        reason = f"{err.strerror} (errno {err.errno})" if isinstance(err, OSError) and err.strerror else str(err)
        raise SelfsupError(f"{final}: could not write the checkpoint: {reason}; nothing of it was kept and "
                           f"{kept}. Free space (or fix the error) and continue with --resume") from None
    fsync_path(root)  # makes the rename itself durable
    prune(root, keep_last, newest=step)
    return final


def verify(path: Path) -> dict[str, Any]:
    """The manifest of a complete, uncorrupted checkpoint; UnusableCheckpoint saying what is wrong otherwise.

    The manifest must be of a known format, carry the step of its directory and list every file of
    a checkpoint with its size and sha256: a manifest that lists less would vouch for files it never
    checked.
    """
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise UnusableCheckpoint(f"{path}: no {MANIFEST} (the checkpoint was not finished)")
    try:
        manifest = json.loads(manifest_path.read_bytes())
    except (OSError, ValueError) as err:
        raise UnusableCheckpoint(f"{manifest_path}: unreadable manifest ({err})") from None
    if not isinstance(manifest, dict):
        raise UnusableCheckpoint(f"{manifest_path}: unreadable manifest (not a JSON object)")
    form = manifest.get("format")
    if form not in (FORMAT, SHARDED_FORMAT) or isinstance(form, bool):
        raise UnusableCheckpoint(f"{manifest_path}: unknown checkpoint format {form!r} "
                                 f"(this version of selfsup reads formats {FORMAT} and {SHARDED_FORMAT})")
    step = manifest.get("step")
    if not _is_count(step):
        raise UnusableCheckpoint(f"{manifest_path}: no valid step (found {step!r})")
    named = _STEP_DIR.match(path.name)
    if named and int(named.group(1)) != step:
        raise UnusableCheckpoint(f"{manifest_path}: records step {step} but lies in {path.name}")
    files = manifest.get("files")
    if not isinstance(files, dict):
        raise UnusableCheckpoint(f"{manifest_path}: no \"files\" table")
    sharded = form == SHARDED_FORMAT
    required = SHARDED_FILES if sharded else FILES
    missing = [name for name in required if name not in files]
    if sharded and not any(_SHARD_FILE.match(name) for name in files):
        missing.append("__0_0.distcp")
    if missing:
        shards = ", and its ranks' __R_I.distcp" if sharded else ""
        raise UnusableCheckpoint(f"{manifest_path}: does not list {', '.join(missing)} (every checkpoint of format "
                                 f"{form} has {', '.join(required)}{shards})")
    unknown = sorted(name for name in files if name not in required and not (sharded and _SHARD_FILE.match(name)))
    if unknown:
        raise UnusableCheckpoint(f"{manifest_path}: lists files a checkpoint does not have: {', '.join(unknown)}")
    for name in files:
        entry = files[name]
        if not isinstance(entry, dict) or not _is_count(entry.get("bytes")):
            raise UnusableCheckpoint(f"{manifest_path}: the entry of {name} has no integer \"bytes\"")
        if not isinstance(entry.get("sha256"), str) or not _SHA256.match(entry["sha256"]):
            raise UnusableCheckpoint(f"{manifest_path}: the entry of {name} has no 64-hex-digit \"sha256\"")
    for name in files:
        file, entry = path / name, files[name]
        if not file.is_file():
            raise UnusableCheckpoint(f"{file}: listed in the manifest but missing")
        if file.stat().st_size != entry["bytes"] or sha256_file(file) != entry["sha256"]:
            raise UnusableCheckpoint(f"{file}: size or sha256 differs from the manifest (truncated or corrupted)")
    return manifest


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def list_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """(step, path) of every `step-N` directory, newest first (valid or not)."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return sorted(found, reverse=True)


def latest_valid(root: Path, *, quiet: bool = False) -> Path | None:
    """The newest checkpoint that verifies; invalid newer ones are reported and passed over.

    Verifying does not load: `resume_latest` also passes over a checkpoint whose files do not load.
    """
    for _, path in list_checkpoints(root):
        try:
            verify(path)
            return path
        except SelfsupError as err:
            if not quiet:
                log.warning("skipping invalid checkpoint: %s", err)
    return None


def prune(root: Path, keep_last: int, newest: int | None = None) -> None:
    """Deletes all but the newest `keep_last` valid checkpoints, plus stale temporaries and invalid older ones.

    Checkpoints after step `newest` (the one just written) are left alone and not counted: they are
    from before a resume that passed over them (they did not load), and counting them would delete
    the good checkpoints the run is writing now. The run replaces them when it reaches their steps.
    """
    kept = 0
    for step, path in list_checkpoints(root):
        if newest is not None and step > newest:
            continue
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


def load_error(file: Path, err: BaseException) -> UnusableCheckpoint:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    if isinstance(err, pickle.UnpicklingError):
        # torch's message opens with how to load the file anyway (weights_only=False): never advise
        # that for a checkpoint, which should hold tensors and numbers only. Keep just what it found.
        found = next((line for line in lines if "Unsupported global" in line), lines[-1] if lines else "")
        found = found.split(" was not an allowed global")[0].removeprefix("WeightsUnpickler error: ")
        detail = f"it holds pickled objects besides tensors and numbers, which are never unpickled: {found}"
    else:
        detail = f"{type(err).__name__}: {lines[0] if lines else ''}"
    return UnusableCheckpoint(f"{file}: cannot be loaded ({detail[:300]})")


def _read(path: Path, manifest: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
    """Weights, optimizer state and run state of a verified checkpoint, all in memory before any is used."""
    weights_file = path / "model.safetensors"
    try:
        weights = load_file(str(weights_file), device="cpu")
    except Exception as err:  # SafetensorError, OSError, ...: whatever the cause, this file does not load
        raise load_error(weights_file, err) from None
    loaded = {}
    for name in ("optimizer.pt", "state.pt"):
        try:
            loaded[name] = torch.load(path / name, weights_only=True, map_location="cpu")
        # UnpicklingError for anything but tensors and numbers, RuntimeError for a bad archive, ...
        except Exception as err:
            raise load_error(path / name, err) from None
    optim_state, state = loaded["optimizer.pt"], loaded["state.pt"]
    if not isinstance(state, dict) or state.get("step") != manifest["step"]:
        raise UnusableCheckpoint(f"{path / 'state.pt'}: does not hold the step of its manifest ({manifest['step']})")
    if not (isinstance(optim_state, dict) and isinstance(optim_state.get("state"), dict)
            and isinstance(optim_state.get("param_groups"), list)):
        raise UnusableCheckpoint(f"{path / 'optimizer.pt'}: not an optimizer state")
    return weights, optim_state, state


def _storage(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage().data_ptr() if tensor.numel() else 0


def _check_weights(file: Path, model: nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """SelfsupError unless `weights` fill `model` exactly. Not a corrupt file but a changed config, so
    the caller does not fall back to an older checkpoint (it would not fit either)."""
    expected = model.state_dict()
    for name, tensor in weights.items():
        if name in expected and tensor.shape != expected[name].shape:
            raise SelfsupError(
                f"{file}: weights do not match this model (size mismatch for {name}: copying a param with shape "
                f"{tensor.shape} from checkpoint, the shape in current model is {expected[name].shape}.); "
                f"was the config changed?"
            )
    # Tied tensors are stored once (safetensors' save_model drops the aliases): a name is missing only
    # if neither it nor anything sharing its storage is in the file.
    loaded = {_storage(expected[name]) for name in weights if name in expected} - {0}
    missing = [name for name, tensor in expected.items() if name not in weights and _storage(tensor) not in loaded]
    unexpected = [name for name in weights if name not in expected]
    if missing or unexpected:
        raise SelfsupError(
            f"{file}: weights do not match this model "
            f"(missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}); was the config changed?"
        )


# The per-parameter state of the optimizers selfsup builds (AdamW) and of SGD: shaped like the parameter.
_PER_PARAMETER = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer")


def _check_optimizer(file: Path, optimizer: torch.optim.Optimizer, saved: dict[str, Any]) -> None:
    """UnusableCheckpoint unless `saved` fits `optimizer`'s parameters (load_state_dict checks only the
    group sizes; a moment of the wrong shape would fail at the first step, after the weights were loaded)."""
    groups, saved_groups = optimizer.param_groups, saved["param_groups"]
    sizes = [len(group["params"]) for group in groups]
    saved_sizes = [len(g["params"]) if isinstance(g, dict) and isinstance(g.get("params"), list) else None
                   for g in saved_groups]
    if saved_sizes != sizes:
        raise UnusableCheckpoint(f"{file}: an optimizer state for parameter groups of sizes {saved_sizes}, "
                                 f"this optimizer's are {sizes}")
    params = {key: param for group, saved_group in zip(groups, saved_groups)
              for key, param in zip(saved_group["params"], group["params"])}
    for key, entry in saved["state"].items():
        if key not in params or not isinstance(entry, dict):
            raise UnusableCheckpoint(f"{file}: optimizer state for an unknown parameter {key!r}")
        for name in _PER_PARAMETER:
            value = entry.get(name)
            if isinstance(value, torch.Tensor) and value.shape != params[key].shape:
                raise UnusableCheckpoint(f"{file}: optimizer state {name!r} of shape {tuple(value.shape)} "
                                         f"for a parameter of shape {tuple(params[key].shape)}")


def load_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> dict[str, Any]:
    """Restores weights (and optimizer) from a checkpoint; returns its state dict.

    Every file is verified, read and checked before the model or optimizer is touched, so a checkpoint
    that fails leaves both as they were. UnusableCheckpoint (naming the file) when the checkpoint is
    unfinished, corrupt or does not load; plain SelfsupError when its weights do not fit the model.
    """
    manifest = verify(path)
    if manifest["format"] == SHARDED_FORMAT:
        raise SelfsupError(f"{path}: written by `train.parallel=fsdp` (sharded); this run has `train.parallel=ddp`. "
                           f"Resume it with the parallelism it was written with")
    weights, optim_state, state = _read(path, manifest)
    weights_file = path / "model.safetensors"
    _check_weights(weights_file, model, weights)
    if optimizer is not None:
        _check_optimizer(path / "optimizer.pt", optimizer, optim_state)
        try:
            # First: it validates everything before changing anything, so a failure here leaves the
            # model untouched too.
            optimizer.load_state_dict(optim_state)
        except Exception as err:  # ValueError/KeyError for a state of another optimizer
            raise load_error(path / "optimizer.pt", err) from None
    try:
        model.load_state_dict(weights, strict=False)
    except RuntimeError as err:  # checked above; a dtype that cannot be cast is all that is left
        raise SelfsupError(f"{weights_file}: weights do not match this model ({str(err).splitlines()[-1].strip()}); "
                           f"was the config changed?") from None
    return state


def resume_latest(root: Path, model: nn.Module,
                  optimizer: torch.optim.Optimizer | None) -> tuple[Path, dict[str, Any]] | None:
    """Loads the newest checkpoint under `root` that verifies and loads; returns (path, state).

    A checkpoint that is unfinished, corrupt or does not load is reported by file and passed over for
    the one before it. None (start from step 0) when there is none or none loads. Weights that do not
    fit the model raise SelfsupError: the config changed, and older checkpoints would not fit either.
    """
    found = list_checkpoints(root)
    for _, path in found:
        try:
            return path, load_checkpoint(path, model, optimizer)
        except UnusableCheckpoint as err:
            log.warning("skipping checkpoint %s: %s", path.name, err)
    if found:
        log.warning("no checkpoint in %s could be loaded (%d passed over, see above): starting from step 0",
                    root, len(found))
    else:
        log.info("no checkpoint in %s: starting from step 0", root)
    return None
