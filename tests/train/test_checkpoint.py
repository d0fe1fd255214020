import errno
import hashlib
import json
import logging
import os
import stat
import struct
from pathlib import Path

import pytest
import torch
from torch import nn

from selfsup.errors import SelfsupError
from selfsup.train import checkpoint


def _model_and_opt(seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(5, 4)).sum().backward()
    opt.step()
    return model, opt


def _save(root: Path, step: int, keep_last: int = 5) -> Path:
    model, opt = _model_and_opt(step)
    return checkpoint.save_checkpoint(root, step, model, opt, {"data_order": {"epoch": 1, "batch": step}}, keep_last)


def test_round_trip_restores_weights_and_optimizer(tmp_path):
    model, opt = _model_and_opt(3)
    path = checkpoint.save_checkpoint(tmp_path, 3, model, opt, {"data_order": {"epoch": 0, "batch": 3}}, keep_last=2)
    fresh, fresh_opt = _model_and_opt(99)
    state = checkpoint.load_checkpoint(path, fresh, fresh_opt)
    assert state["step"] == 3 and state["data_order"]["batch"] == 3
    for (name, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), name
    assert torch.equal(opt.state_dict()["state"][0]["exp_avg"], fresh_opt.state_dict()["state"][0]["exp_avg"])
    # Everything but the weights loads without pickle.
    torch.load(path / "optimizer.pt", weights_only=True)
    torch.load(path / "state.pt", weights_only=True)
    assert sorted(json.loads((path / "manifest.json").read_text())["files"]) == ["model.safetensors", "optimizer.pt", "state.pt"]


def test_truncated_file_is_refused_and_previous_is_taken(tmp_path):
    _save(tmp_path, 2)
    newest = _save(tmp_path, 4)
    weights = newest / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])
    with pytest.raises(SelfsupError, match="model.safetensors.*truncated or corrupted"):
        checkpoint.verify(newest)
    assert checkpoint.latest_valid(tmp_path) == tmp_path / "step-2"


def test_missing_manifest_is_not_a_checkpoint(tmp_path):
    _save(tmp_path, 2)
    newest = _save(tmp_path, 4)
    (newest / "manifest.json").unlink()
    with pytest.raises(SelfsupError, match="no manifest.json"):
        checkpoint.verify(newest)
    assert checkpoint.latest_valid(tmp_path) == tmp_path / "step-2"
    with pytest.raises(SelfsupError):
        model, opt = _model_and_opt()
        checkpoint.load_checkpoint(newest, model, opt)


def test_interrupted_write_leaves_only_a_temporary(tmp_path):
    _save(tmp_path, 2)
    (tmp_path / ".step-4.tmp-123").mkdir()  # what a crash mid-write leaves
    assert checkpoint.latest_valid(tmp_path) == tmp_path / "step-2"
    _save(tmp_path, 6)
    assert not list(tmp_path.glob(".step-*")), "stale temporaries are cleaned up on the next save"


def test_keep_last_retention(tmp_path):
    for step in (1, 2, 3, 4):
        _save(tmp_path, step, keep_last=2)
    assert [p.name for _, p in checkpoint.list_checkpoints(tmp_path)] == ["step-4", "step-3"]


def test_weights_of_another_model_are_refused(tmp_path):
    path = _save(tmp_path, 1)
    other = nn.Sequential(nn.Linear(4, 3))
    with pytest.raises(SelfsupError, match="do not match"):
        checkpoint.load_checkpoint(path, other, None)


# ---- manifests that do not vouch for every file ---------------------------------------------------


def _manifest(path: Path) -> dict:
    return json.loads((path / "manifest.json").read_text())


def _write_manifest(path: Path, manifest: dict) -> None:
    (path / "manifest.json").write_text(json.dumps(manifest))


def _rehash(path: Path, name: str) -> None:
    """Makes the manifest match `name` as it is now: a file that is whole on disk but will not load."""
    manifest = _manifest(path)
    data = (path / name).read_bytes()
    manifest["files"][name] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    _write_manifest(path, manifest)


def test_manifest_listing_no_files_is_refused(tmp_path):
    _save(tmp_path, 2)
    newest = _save(tmp_path, 4)
    manifest = _manifest(newest)
    manifest["files"] = {}
    _write_manifest(newest, manifest)
    weights = newest / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5:] = b"\xff" * 5  # same size, different bytes
    weights.write_bytes(bytes(data))
    with pytest.raises(SelfsupError, match=r"manifest.json.*model\.safetensors, optimizer\.pt, state\.pt"):
        checkpoint.verify(newest)
    assert checkpoint.latest_valid(tmp_path) == tmp_path / "step-2"


@pytest.mark.parametrize("change, message", [
    (lambda m: m["files"].pop("state.pt"), r"does not list state\.pt"),
    (lambda m: m.update(format=99), r"format 99"),
    (lambda m: m.update(step=3), r"step 3.*step-4"),
    (lambda m: m.pop("step"), r"step"),
    (lambda m: m["files"]["optimizer.pt"].update(bytes="12"), r"optimizer\.pt.*bytes"),
    (lambda m: m["files"]["optimizer.pt"].update(sha256="abc"), r"optimizer\.pt.*sha256"),
    (lambda m: m["files"].update({"../x": {"bytes": 1, "sha256": "0" * 64}}), r"\.\./x"),
    (lambda m: m.update(files=[]), r"files"),
])
def test_manifest_fields_are_checked(tmp_path, change, message):
    _save(tmp_path, 2)
    newest = _save(tmp_path, 4)
    manifest = _manifest(newest)
    change(manifest)
    _write_manifest(newest, manifest)
    with pytest.raises(SelfsupError, match=rf"{newest / 'manifest.json'}: .*{message}"):
        checkpoint.verify(newest)
    assert checkpoint.latest_valid(tmp_path) == tmp_path / "step-2"


def test_manifest_that_is_not_an_object_is_refused(tmp_path):
    path = _save(tmp_path, 2)
    (path / "manifest.json").write_text("[]")
    with pytest.raises(SelfsupError, match="manifest.json"):
        checkpoint.verify(path)


# ---- files that match their manifest but will not load ---------------------------------------------


class NotAllowed:
    """Any class outside torch's weights-only allowlist: unpickling it would run arbitrary code."""

    def __init__(self) -> None:
        self.step = 4


def _assert_weights(model: nn.Module, step: int) -> None:
    expected, _ = _model_and_opt(step)
    for (name, a), b in zip(expected.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), name


def _warnings(caplog) -> str:
    return "\n".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)


def test_resume_latest_takes_the_newest_checkpoint(tmp_path):
    _save(tmp_path, 2)
    _save(tmp_path, 4)
    model, opt = _model_and_opt(99)
    path, state = checkpoint.resume_latest(tmp_path, model, opt)
    assert path == tmp_path / "step-4" and state["step"] == 4 and state["data_order"]["batch"] == 4
    _assert_weights(model, 4)


def test_pickled_state_with_a_matching_manifest_falls_back_to_the_previous(tmp_path, caplog):
    _save(tmp_path, 2)
    newest = _save(tmp_path, 4)
    torch.save({"step": 4, "payload": NotAllowed()}, newest / "state.pt")
    _rehash(newest, "state.pt")
    checkpoint.verify(newest)  # whole on disk: only loading can tell
    model, opt = _model_and_opt(99)
    with caplog.at_level(logging.WARNING, logger="selfsup"):
        path, state = checkpoint.resume_latest(tmp_path, model, opt)
    assert path == tmp_path / "step-2" and state["step"] == 2
    _assert_weights(model, 2)
    warnings = _warnings(caplog)
    assert str(newest / "state.pt") in warnings and "NotAllowed" in warnings
    assert "trust" not in warnings, "never advise loading a checkpoint with weights_only=False"


def test_garbage_safetensors_header_with_a_matching_manifest_falls_back(tmp_path, caplog):
    _save(tmp_path, 2)
    newest = _save(tmp_path, 4)
    header = b"this is not JSON"
    (newest / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 64)
    _rehash(newest, "model.safetensors")
    model, opt = _model_and_opt(99)
    with caplog.at_level(logging.WARNING, logger="selfsup"):
        path, _ = checkpoint.resume_latest(tmp_path, model, opt)
    assert path == tmp_path / "step-2"
    _assert_weights(model, 2)
    assert str(newest / "model.safetensors") in _warnings(caplog)


def test_state_without_a_matching_step_falls_back(tmp_path, caplog):
    _save(tmp_path, 2)
    newest = _save(tmp_path, 4)
    torch.save({"step": 7, "data_order": {}}, newest / "state.pt")
    _rehash(newest, "state.pt")
    model, opt = _model_and_opt(99)
    with caplog.at_level(logging.WARNING, logger="selfsup"):
        path, _ = checkpoint.resume_latest(tmp_path, model, opt)
    assert path == tmp_path / "step-2"
    assert str(newest / "state.pt") in _warnings(caplog)


def test_optimizer_state_that_does_not_fit_never_half_loads(tmp_path, caplog):
    only = _save(tmp_path, 4)
    other = torch.optim.AdamW([nn.Parameter(torch.ones(3))], lr=0.1)  # one group of one parameter
    other.param_groups[0]["params"][0].grad = torch.ones(3)
    other.step()
    torch.save(other.state_dict(), only / "optimizer.pt")
    _rehash(only, "optimizer.pt")
    model, opt = _model_and_opt(99)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt_before = opt.state_dict()["state"][0]["exp_avg"].clone()
    with caplog.at_level(logging.WARNING, logger="selfsup"):
        assert checkpoint.resume_latest(tmp_path, model, opt) is None
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), f"{name} was loaded from a checkpoint that failed"
    assert torch.equal(opt.state_dict()["state"][0]["exp_avg"], opt_before)
    warnings = _warnings(caplog)
    assert str(only / "optimizer.pt") in warnings and "no checkpoint" in warnings and "step 0" in warnings


def test_optimizer_state_of_the_wrong_shape_falls_back(tmp_path, caplog):
    _save(tmp_path, 2)
    newest = _save(tmp_path, 4)
    state = torch.load(newest / "optimizer.pt", weights_only=True)
    state["state"][0]["exp_avg"] = torch.zeros(3)  # the parameter is 8x4
    torch.save(state, newest / "optimizer.pt")
    _rehash(newest, "optimizer.pt")
    model, opt = _model_and_opt(99)
    with caplog.at_level(logging.WARNING, logger="selfsup"):
        path, _ = checkpoint.resume_latest(tmp_path, model, opt)
    assert path == tmp_path / "step-2"
    assert str(newest / "optimizer.pt") in _warnings(caplog)


def test_weights_of_another_model_stay_a_hard_error_on_resume(tmp_path):
    _save(tmp_path, 2)
    other = nn.Sequential(nn.Linear(4, 3))
    with pytest.raises(SelfsupError, match="do not match this model.*config"):
        checkpoint.resume_latest(tmp_path, other, torch.optim.AdamW(other.parameters()))
    wider = nn.Sequential(nn.Linear(4, 9), nn.BatchNorm1d(9), nn.Linear(9, 2))
    before = {k: v.clone() for k, v in wider.state_dict().items()}
    with pytest.raises(SelfsupError, match="do not match this model.*shape"):
        checkpoint.resume_latest(tmp_path, wider, None)
    for name, value in wider.state_dict().items():
        assert torch.equal(value, before[name]), f"{name} was half-loaded"


def test_resume_latest_without_checkpoints_is_none(tmp_path):
    model, opt = _model_and_opt()
    assert checkpoint.resume_latest(tmp_path / "checkpoints", model, opt) is None


# ---- a full disk while writing ----------------------------------------------------------------------


def _no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("target", ["save_model", "torch.save", "os.fsync"])
def test_no_space_while_saving_leaves_the_previous_checkpoint(tmp_path, monkeypatch, target):
    _save(tmp_path, 2)
    if target == "save_model":
        monkeypatch.setattr(checkpoint, "save_model", _no_space)
    elif target == "torch.save":
        monkeypatch.setattr(checkpoint.torch, "save", _no_space)
    else:  # network and thin-provisioned file systems report a full disk when the data is flushed
        monkeypatch.setattr(checkpoint.os, "fsync", _no_space)
    with pytest.raises(SelfsupError, match=r"step-4.*No space left on device.*step-2.*intact"):
        _save(tmp_path, 4)
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == ["step-2"], "no temporary and no partial step-4 is left"
    model, opt = _model_and_opt(99)
    path, state = checkpoint.resume_latest(tmp_path, model, opt)
    assert path == tmp_path / "step-2" and state["step"] == 2


def test_no_space_for_the_first_checkpoint_says_there_is_none(tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoint, "save_model", _no_space)
    with pytest.raises(SelfsupError, match=r"step-2.*No space left on device.*no earlier checkpoint"):
        _save(tmp_path, 2)
    assert list(tmp_path.iterdir()) == []


def test_no_space_while_rewriting_a_step_keeps_the_old_copy(tmp_path, monkeypatch):
    _save(tmp_path, 2)
    before = (tmp_path / "step-2" / "model.safetensors").read_bytes()
    monkeypatch.setattr(checkpoint.torch, "save", _no_space)
    with pytest.raises(SelfsupError, match=r"step-2.*intact"):
        _save(tmp_path, 2)
    monkeypatch.undo()
    assert (tmp_path / "step-2" / "model.safetensors").read_bytes() == before
    assert checkpoint.latest_valid(tmp_path) == tmp_path / "step-2"


@pytest.mark.parametrize("umask, file_mode, dir_mode", [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700)])
def test_checkpoint_files_follow_the_umask(tmp_path, umask, file_mode, dir_mode):
    previous = os.umask(umask)
    try:
        path = _save(tmp_path / "checkpoints", 2)
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "checkpoints").stat().st_mode) == dir_mode
    assert stat.S_IMODE(path.stat().st_mode) == dir_mode
    names = sorted(p.name for p in path.iterdir())
    assert names == ["manifest.json", "model.safetensors", "optimizer.pt", "state.pt"]
    for name in names:
        assert stat.S_IMODE((path / name).stat().st_mode) == file_mode, name


def test_checkpoints_after_a_passed_over_one_are_not_pruned(tmp_path):
    """After falling back from an unloadable step-6 to step-2, the run's new step-4 must survive
    keep_last=1: counting step-6 (it verifies) would delete every checkpoint the run writes."""
    _save(tmp_path, 2)
    newest = _save(tmp_path, 6)
    torch.save({"step": 6, "payload": NotAllowed()}, newest / "state.pt")
    _rehash(newest, "state.pt")
    model, opt = _model_and_opt(99)
    assert checkpoint.resume_latest(tmp_path, model, opt)[0] == tmp_path / "step-2"
    _save(tmp_path, 4, keep_last=1)
    assert checkpoint.resume_latest(tmp_path, model, opt)[0] == tmp_path / "step-4"
    assert not (tmp_path / "step-2").exists(), "older checkpoints are still pruned"
    _save(tmp_path, 6, keep_last=1)  # the run reaches the passed-over step and replaces it
    assert [p.name for _, p in checkpoint.list_checkpoints(tmp_path)] == ["step-6"]
    assert checkpoint.resume_latest(tmp_path, model, opt)[0] == tmp_path / "step-6"


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full (Linux)")
@pytest.mark.parametrize("numel", [10, 1_000_000])
def test_torch_save_reports_a_full_disk_as_the_os_error(tmp_path, numel):
    """torch.save's own writer would say only "unexpected pos ..."; the user needs ENOSPC."""
    full = tmp_path / "optimizer.pt"
    full.symlink_to("/dev/full")  # every write fails with ENOSPC
    with pytest.raises(OSError) as info:
        checkpoint._torch_save({"state": {0: {"exp_avg": torch.zeros(numel)}}}, full)
    assert info.value.errno == errno.ENOSPC


def test_torch_save_unwraps_the_os_error_under_its_archive_error(tmp_path, monkeypatch):
    """On a real full disk, closing torch's archive after the failed write raises a RuntimeError on top."""

    def archive_error(obj, f):
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 91520 vs 91424")

    monkeypatch.setattr(checkpoint.torch, "save", archive_error)
    with pytest.raises(OSError) as info:
        checkpoint._torch_save({}, tmp_path / "optimizer.pt")
    assert info.value.errno == errno.ENOSPC
    with pytest.raises(SelfsupError, match=r"step-2.*No space left on device.*no earlier checkpoint"):
        _save(tmp_path / "checkpoints", 2)
