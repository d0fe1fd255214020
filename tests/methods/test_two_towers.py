"""A method with two encoders, defined in the tests: it trains, checkpoints and resumes
bit-identically, saves each tower with its own description, and each tower can be probed,
adapted and exported with --tower (issue 12)."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import torch
from torch import Tensor, nn

from selfsup.cli import EXIT_BAD_INPUT, main
from selfsup.config import load_config
from selfsup.export.encoder import load_encoder
from selfsup.methods import METHODS, MethodSpec
from selfsup.methods.simclr import nt_xent
from selfsup.pretrain import pretrain
from tests.conftest import TINY_RUN


@dataclass
class Config:
    temperature: float = 0.2  # NT-Xent temperature
    proj_dim: int = 16  # width of each tower's linear projection


class TwoTowers(nn.Module):
    """Tower `a` embeds the first view, tower `b` the second; NT-Xent aligns them (CLIP's shape, on views)."""

    def __init__(self, cfg: Config, a: nn.Module, b: nn.Module):
        super().__init__()
        self.cfg, self.a, self.b = cfg, a, b
        self.proj_a, self.proj_b = nn.Linear(a.dim, cfg.proj_dim), nn.Linear(b.dim, cfg.proj_dim)

    def forward(self, batch: dict, progress: float) -> dict[str, Tensor]:
        view1, view2 = batch["views"][:2]
        loss, top1 = nt_xent(self.proj_a(self.a.embed(view1)), self.proj_b(self.b.embed(view2)), self.cfg.temperature)
        return {"loss": loss, "top1": top1.detach()}


SPEC = MethodSpec(Config, TwoTowers, "views", "toy: two encoders aligned by NT-Xent",
                  towers={"a": "resnet10", "b": "resnet10"})
RUN = [a for a in TINY_RUN if not a.startswith("encoder.")] + [
    "method.name=two_towers", "encoders.a.width=8", "encoders.b.width=4", "train.steps=6", "train.checkpoint_every=2"]


@pytest.fixture(autouse=True)
def registered(monkeypatch):
    monkeypatch.setitem(METHODS, "two_towers", SPEC)


def test_each_tower_is_saved_with_its_own_description(tmp_path):
    run = tmp_path / "run"
    assert main(["pretrain", *RUN, "--out", str(run)]) == 0
    assert not (run / "encoder.json").exists(), "a multi-tower run has no single encoder"
    a, meta_a = load_encoder(run / "towers" / "a")
    b, meta_b = load_encoder(run / "towers" / "b")
    assert meta_a["tower"] == "a" and meta_a["encoder"]["config"]["width"] == 8
    assert meta_b["tower"] == "b" and meta_b["encoder"]["config"]["width"] == 4
    assert meta_a["preprocess"]["modality"] == "image"


def test_resume_is_bit_identical(tmp_path):
    cfg = load_config(None, RUN)
    pretrain(cfg, tmp_path / "whole", show_progress=False)
    pretrain(cfg, tmp_path / "cut", stop_after=3, show_progress=False)  # dies after step 3; last checkpoint: step 2
    assert not (tmp_path / "cut" / "towers").exists()
    pretrain(None, tmp_path / "cut", resume=True, show_progress=False)
    for tower in ("a", "b"):
        whole = (tmp_path / "whole" / "towers" / tower / "encoder.safetensors").read_bytes()
        assert (tmp_path / "cut" / "towers" / tower / "encoder.safetensors").read_bytes() == whole, tower


def test_every_command_takes_a_tower(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["pretrain", *RUN, "--out", str(run)]) == 0
    assert main(["probe", str(run), "--tower", "b", "--fractions", "1.0", "--compare-untrained"]) == 0
    rows = json.loads((run / "probe.json").read_text())
    assert {r["features"] for r in rows} == {"two_towers", "untrained"} and {r["tower"] for r in rows} == {"b"}
    capsys.readouterr()
    assert main(["probe", str(run), "--fractions", "1.0"]) == 0
    assert "using a" in capsys.readouterr().err, "the default tower is named"
    assert main(["adapt", str(run), "--tower", "b", "--out", str(tmp_path / "task"), "--epochs", "1"]) == 0
    assert json.loads((tmp_path / "task" / "task.json").read_text())["tower"] == "b"
    assert main(["export", str(run), "--format", "encoder", "--tower", "a", "--out", str(tmp_path / "a")]) == 0
    exported, _ = load_encoder(tmp_path / "a")
    trained, _ = load_encoder(run / "towers" / "a")
    assert all(torch.equal(x, y) for x, y in zip(exported.state_dict().values(), trained.state_dict().values()))
    assert main(["probe", str(run), "--tower", "c"]) == EXIT_BAD_INPUT
    assert "its towers are a, b" in capsys.readouterr().err


def test_the_untrained_towers_are_where_pretraining_began(tmp_path):
    from selfsup.pretrain import build_towers, untrained_tower

    cfg = load_config(None, RUN)
    towers, _ = build_towers(cfg, {"image": {"in_channels": 3, "image_size": 16}})
    run = tmp_path / "run"
    pretrain(cfg, run, show_progress=False)
    for role in ("a", "b"):
        again = untrained_tower(run, cfg, role)
        assert all(torch.equal(x, y) for x, y in zip(again.state_dict().values(), towers[role].state_dict().values()))


@pytest.mark.parametrize("overrides, message", [
    (["encoder.name=resnet18"], "set each with `encoders.<tower>.*`"),
    (["encoders.c.width=4"], "has no such tower"),
    (["encoders.a.name=text_encoder"], "is a text encoder"),
])
def test_tower_config_errors_name_the_key(tmp_path, capsys, overrides, message):
    assert main(["pretrain", *RUN, *overrides, "--out", str(tmp_path / "r")]) == EXIT_BAD_INPUT
    assert message in capsys.readouterr().err
