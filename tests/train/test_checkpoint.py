import json
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
