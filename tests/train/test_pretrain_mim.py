"""Reconstruction objectives end to end: MAE and BEiT on built-in digits, colourisation on a tiny
colour .npz — each learns, writes its artefacts, and resumes bit-identically."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import selfsup.methods.beit as beit_module
import selfsup.methods.colorize as colorize_module
from selfsup.config import load_config
from selfsup.errors import SelfsupError
from selfsup.nn.targets import KMeansTokenizer
from selfsup.methods.beit import VISUAL_TOKENS_FILE
from selfsup.modalities.image import PREVIEWS_FILE
from selfsup.pretrain import pretrain

COMMON = {"data.image_size": 16, "train.precision": "fp32", "train.device": "cpu", "train.batch_size": 16,
          "train.checkpoint_every": 2, "train.keep_last": 10, "train.eval_every": 0, "train.log_every": 100}
TINY_VIT = {"encoder.dim": 32, "encoder.depth": 2, "encoder.heads": 2}


def write_shapes(path: Path, num: int = 96, seed: int = 0) -> Path:
    """Coloured squares and discs on a light background, x uint8 [N, 16, 16, 3], class = shape and colour."""
    rng = np.random.default_rng(seed)
    palette = np.array([[220, 40, 40], [40, 180, 60], [50, 70, 220], [230, 200, 40]], dtype=np.uint8)
    x = np.full((num, 16, 16, 3), 235, dtype=np.uint8)
    y = np.arange(num) % 4
    rows, cols = np.mgrid[:16, :16]
    for i in range(num):
        cy, cx = rng.integers(5, 11, 2)
        r = rng.integers(3, 6)
        if y[i] % 2 == 0:
            shape = (np.abs(rows - cy) <= r) & (np.abs(cols - cx) <= r)
        else:
            shape = (rows - cy) ** 2 + (cols - cx) ** 2 <= r * r
        x[i][shape] = palette[y[i]]
    np.savez(path, x=x, y=y)
    return path


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    return write_shapes(tmp_path_factory.mktemp("data") / "shapes.npz")


def overrides(method: str, shapes: Path, **extra: object) -> list[str]:
    settings = {"method.name": method, **COMMON}
    if method == "colorize":
        settings.update({"data.source": str(shapes), "encoder.name": "resnet10", "encoder.width": 8})
    else:
        settings.update({"data.source": "digits", **TINY_VIT})
    if method == "beit":
        settings.update({"method.num_tokens": 32, "train.lr": 3e-3})
    settings.update(extra)
    return [f"{k}={v}" for k, v in settings.items()]


def rows(run: Path) -> list[dict]:
    out = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for row in out:
        row.pop("samples_per_s", None)
        row.pop("tokens_per_s", None)
    return out


@pytest.mark.parametrize("method", ["mae", "beit", "colorize"])
def test_run_learns_and_writes_its_artefacts(tmp_path, shapes, method):
    run = tmp_path / "run"
    result = pretrain(load_config(None, overrides(method, shapes, **{"train.steps": 20})), run, show_progress=False)
    assert result.fit.steps == 20
    losses = [r["loss"] for r in rows(run) if "loss" in r]
    assert len(losses) == 20 and all(np.isfinite(losses))
    first, last = np.mean(losses[:3]), np.mean(losses[-3:])
    # Measured falls: mae 1.69 -> 0.91, beit (ln 32 = 3.47 at chance) 3.44 -> 3.28, colorize 1.56 -> 1.04.
    assert last < first - (0.1 if method == "beit" else 0.2), f"{method}: loss must fall: {losses}"
    meta = json.loads((run / "encoder.json").read_text())
    if method == "beit":
        assert (run / VISUAL_TOKENS_FILE).is_file() and not (run / PREVIEWS_FILE).exists()
        tokens = KMeansTokenizer.load(run / VISUAL_TOKENS_FILE)
        assert (tokens.num_tokens, tokens.dim) == (32, 4 * 4 * 3)
        assert "token_acc" in rows(run)[-1]
    else:
        assert not (run / VISUAL_TOKENS_FILE).exists()
        with Image.open(run / PREVIEWS_FILE) as image:
            assert image.height == 3 * (16 * 3 + 2), "rows: the method's two previews and the originals"
    assert meta["preprocess"].get("input_transform") == ("grey" if method == "colorize" else None)


@pytest.mark.parametrize("method", ["mae", "beit", "colorize"])
def test_resume_is_bit_identical_and_does_not_refit_targets(tmp_path, shapes, method, monkeypatch):
    extra = {"train.steps": 6}
    pretrain(load_config(None, overrides(method, shapes, **extra)), tmp_path / "whole", show_progress=False)
    pretrain(load_config(None, overrides(method, shapes, **extra)), tmp_path / "cut", show_progress=False, stop_after=3)
    if method == "beit":
        tokens_bytes = (tmp_path / "cut" / VISUAL_TOKENS_FILE).read_bytes()
        # Tensors, not bytes: safetensors writes its metadata dict in no fixed order.
        cut_tokens, whole_tokens = (load_file(tmp_path / run / VISUAL_TOKENS_FILE) for run in ("cut", "whole"))
        assert torch.equal(cut_tokens["centroids"], whole_tokens["centroids"]), "the k-means fit is seeded"

    def refuse(*_args, **_kwargs):
        raise AssertionError("a resumed run must take its targets from the checkpoint, not fit them again")

    monkeypatch.setattr(beit_module.BEiT, "fit_targets", refuse)
    monkeypatch.setattr(colorize_module.Colorize, "fit_targets", refuse)
    pretrain(None, tmp_path / "cut", resume=True, show_progress=False)
    whole, cut = load_file(tmp_path / "whole" / "encoder.safetensors"), load_file(tmp_path / "cut" / "encoder.safetensors")
    assert whole.keys() == cut.keys() and all(torch.equal(whole[k], cut[k]) for k in whole)
    assert rows(tmp_path / "whole") == rows(tmp_path / "cut")
    if method == "beit":
        assert (tmp_path / "cut" / VISUAL_TOKENS_FILE).read_bytes() == tokens_bytes, "resume keeps the run's codebook file"


@pytest.mark.parametrize("extra", [{"data.source": "digits"}, {"data.channels": 1}])
def test_colorize_on_greyscale_data_is_refused(tmp_path, shapes, extra):
    cfg = load_config(None, overrides("colorize", shapes, **{"train.steps": 2, **extra}))
    with pytest.raises(SelfsupError, match="colour"):
        pretrain(cfg, tmp_path / "run", show_progress=False)
