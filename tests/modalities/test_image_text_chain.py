"""The rest of the chain on one CLIP run, either tower picked with `--tower`: probe (with the
untrained start), adapt the text tower then evaluate and report it, select and leverage the image
tower, and export the text tower as selfsup's own encoder files.

Each image's first caption (what a text tower reads of a row) names only its shape while the label is
its colour, so the towers differ visibly: the image tower's features find the colour, the text
tower's cannot. One 4-step run through the CLI is shared by the whole file."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from selfsup.cli import EXIT_BAD_INPUT, main
from tests.evaluate.test_zeroshot import clip_overrides, write_manifest


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("chain")
    manifest = write_manifest(root / "data", colourless_first=True)
    out = root / "run"
    assert main(["pretrain", *clip_overrides(manifest), "--out", str(out)]) == 0
    return out


def probe(run: Path, tower: str, out: Path) -> dict[tuple[str, str], float]:
    assert main(["probe", str(run), "--tower", tower, "--fractions", "1.0", "--compare-untrained",
                 "--out", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert {r["label_fraction"] for r in rows} == {1.0} and all(r["num_labels"] == 28 for r in rows)
    return {(r["features"], r["probe"]): r["accuracy"] for r in rows}


def test_probe_reads_the_tower_it_is_given(run, tmp_path):
    image = probe(run, "image", tmp_path / "image.json")
    text = probe(run, "text", tmp_path / "text.json")
    assert set(image) == set(text) == {(f, p) for f in ("clip", "untrained") for p in ("linear", "knn")}
    # the colour is in every picture and in no first caption: at most 3 of the 8 held-out rows
    # (one colour per shape) can be right from the shape alone
    assert image[("clip", "linear")] >= 0.75 and image[("untrained", "linear")] >= 0.75
    assert all(text[key] <= 3 / 8 for key in text), text


def test_probe_of_a_tower_the_run_lacks_is_bad_input(run, capsys):
    capsys.readouterr()
    assert main(["probe", str(run), "--tower", "audio", "--fractions", "1.0"]) == EXIT_BAD_INPUT
    assert "no tower 'audio'; its towers are image, text" in capsys.readouterr().err


@pytest.fixture(scope="module")
def text_task(run, tmp_path_factory) -> Path:
    task = tmp_path_factory.mktemp("task") / "text"
    assert main(["adapt", str(run), "--tower", "text", "--out", str(task), "--epochs", "1"]) == 0
    return task


def test_adapt_evaluate_and_report_the_text_tower(run, text_task, capsys):
    task = json.loads((text_task / "task.json").read_text())
    assert task["tower"] == "text" and task["base"] == str(run)
    assert task["preprocess"]["modality"] == "text" and task["classes"] == ["blue", "green", "red", "yellow"]
    assert task["encoder"]["name"] == "clip_text"
    assert (text_task / "tokenizer.json").read_bytes() == (run / "towers" / "text" / "tokenizer.json").read_bytes()
    capsys.readouterr()
    assert main(["evaluate", str(text_task), "--groups", "site", "--bootstrap", "50"]) == 0
    assert "north" in capsys.readouterr().out
    evaluation = json.loads((text_task / "evaluation" / "evaluation.json").read_text())
    assert list(evaluation["subgroups"]["columns"]) == ["site"] and evaluation["num_labelled"] == 8
    assert (text_task / "evaluation" / "predictions.csv").is_file()
    assert main(["report", str(text_task)]) == 0
    assert (text_task / "report.html").stat().st_size > 0
    card = (text_task / "MODEL_CARD.md").read_text()
    assert "type: text-classification" in card and "clip_text" in card


def test_select_scores_the_tower_it_is_given(run, tmp_path):
    scores = {}
    for tower in ("image", "text"):
        out = tmp_path / tower
        assert main(["select", "--bases", str(run), "--tower", tower, "--out", str(out), "--scores", "knn",
                     "linear_cv"]) == 0
        result = json.loads((out / "select.json").read_text())
        assert result["modality"] == tower and result["num_samples"] == 28
        scores[tower] = result["ranking"][0]["scores"]
    assert scores["image"]["linear_cv"] >= 0.75 and scores["text"]["linear_cv"] <= 0.5, scores


@pytest.mark.parametrize(("tower", "encoder"), [("image", "clip_vit"), ("text", "clip_text")])
def test_leverage_adapts_the_tower_it_is_given_on_both_sides(run, tmp_path, tower, encoder):
    # image is also the default tower: text is the case that fails if --tower is dropped on the way
    out = tmp_path / "leverage"
    assert main(["leverage", str(run), "--tower", tower, "--out", str(out), "--ladder", "8", "--seeds", "1",
                 "--epochs", "1", "--keep"]) == 0
    result = json.loads((out / "leverage.json").read_text())
    assert result["ladder"] == [8] and (out / "leverage.png").stat().st_size > 0
    # the rung's 8 labels are the adapt run's training and validation labels together
    assert [(r["side"], r["num_train_labels"] + r["num_val"]) for r in result["runs"]] == [("pretrained", 8),
                                                                                           ("scratch", 8)]
    for side, base in (("pretrained", str(run)), ("scratch", f"random:{run}")):
        task = json.loads((out / "runs" / f"{side}-n8-s0" / "task.json").read_text())
        assert task["tower"] == tower and task["base"] == base and task["encoder"]["name"] == encoder, side


def test_export_encoder_of_the_text_tower(run, tmp_path, capsys, caplog):
    from selfsup.data.pairs import load_pair_source
    from selfsup.export.encoder import load_encoder
    from selfsup.modalities import load_reader

    out = tmp_path / "text"
    assert main(["export", str(run), "--format", "encoder", "--tower", "text", "--out", str(out)]) == 0
    tower = run / "towers" / "text"
    for name in ("encoder.safetensors", "tokenizer.json"):
        assert (out / name).read_bytes() == (tower / name).read_bytes(), name
    encoder, meta = load_encoder(out)
    assert meta["preprocess"]["modality"] == "text" and meta["encoder"]["name"] == "clip_text"
    # read back on its own, it embeds captions as the run's tower does
    data = load_pair_source(_source(run), 16)
    rows = torch.arange(6)
    runtime = _cpu()
    ours = load_reader(meta, out).features(encoder, data, rows, runtime, chunks=1)
    original, original_meta = load_encoder(tower)
    theirs = load_reader(original_meta, tower).features(original, data, rows, runtime, chunks=1)
    assert torch.equal(ours, theirs) and ours.shape == (6, 32)
    # without --tower: the first tower (image), and the command says which
    capsys.readouterr()
    with caplog.at_level(logging.INFO, logger="selfsup"):
        assert main(["export", str(run), "--format", "encoder", "--out", str(tmp_path / "default")]) == 0
    assert "has the towers image, text; using image (choose with --tower)" in caplog.text + capsys.readouterr().err
    _, default = load_encoder(tmp_path / "default")
    assert default["preprocess"]["modality"] == "image" and default["encoder"]["name"] == "clip_vit"


def _source(run: Path) -> str:
    from selfsup.config import load_config

    return load_config(run / "config.yaml").data.source


def _cpu():
    from selfsup.train.runtime import Runtime

    return Runtime(device=torch.device("cpu"), autocast_dtype=None)
