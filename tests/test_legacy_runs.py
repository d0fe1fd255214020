"""Run directories written before the modality contract (tests/fixtures/legacy_runs, made by commit
be568da) keep working: the image run's encoder.json records no modality, and neither run has the
ownership marker."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from selfsup.cli import main
from selfsup.export.encoder import load_encoder
from selfsup.files import read_marker
from selfsup.modalities import modality_of

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "legacy_runs"


@pytest.fixture
def legacy(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "legacy"
    shutil.copytree(FIXTURES, root)
    monkeypatch.chdir(root)  # the text run's config names its corpus relatively
    return root


def test_the_image_run_records_no_modality_and_is_read_as_images(legacy):
    meta = json.loads((legacy / "image_run" / "encoder.json").read_text())
    assert "modality" not in meta["preprocess"], "the fixture is a run from before modalities were recorded"
    assert modality_of(meta).name == "image"


def test_legacy_runs_probe_adapt_and_export(legacy, tmp_path):
    assert main(["probe", "image_run", "--fractions", "1.0", "--compare-untrained"]) == 0
    assert main(["probe", "text_run", "--fractions", "1.0", "--max-chunks", "1"]) == 0
    for run in ("image_run", "text_run"):
        assert main(["adapt", run, "--out", str(tmp_path / f"{run}-task"), "--epochs", "1"]) == 0
        task = json.loads((tmp_path / f"{run}-task" / "task.json").read_text())
        assert task["preprocess"]["modality"] == run.split("_")[0], "a task records its modality explicitly"
    assert main(["export", "image_run", "--format", "encoder", "--out", str(tmp_path / "enc")]) == 0
    assert main(["export", "text_run", "--out", str(tmp_path / "hf")]) == 0
    assert (tmp_path / "hf" / "config.json").is_file()


def test_a_legacy_run_resumes_and_is_marked(legacy):
    before = (legacy / "image_run" / "encoder.safetensors").read_bytes()
    assert read_marker(legacy / "image_run") is None
    assert main(["pretrain", "--out", "image_run", "--resume"]) == 0
    assert read_marker(legacy / "image_run")["kind"] == "run"
    assert (legacy / "image_run" / "encoder.safetensors").read_bytes() == before, "the finished run is unchanged"
    _, meta = load_encoder(legacy / "image_run")
    assert meta["preprocess"]["modality"] == "image", "rewritten with the modality recorded"
