"""A CLIP text tower that starts from a local Hugging Face model (`encoders.text.name=hf:DIR`):
it reads with the folder's own tokenizer, a locked one stays bit-identical to the folder's weights,
and the run's "untrained" tower is the folder's model (where pretraining began)."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from PIL import Image

from selfsup.cli import EXIT_BAD_INPUT, main
from selfsup.config import load_config
from selfsup.data.tokenizer import train_tokenizer
from selfsup.export.encoder import load_encoder
from selfsup.pretrain import untrained_tower

WORDS = ["red circle", "blue square", "green triangle", "red square", "blue circle", "green square",
         "red triangle", "blue triangle", "green circle", "yellow star", "yellow circle", "yellow square"]


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> Path:
    """A manifest of 24 tiny coloured images with captions."""
    root = tmp_path_factory.mktemp("pairs")
    rng = np.random.default_rng(0)
    with open(root / "pairs.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["image", "caption", "label"])
        for i in range(24):
            pixels = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / f"{i}.png")
            writer.writerow([f"{i}.png", WORDS[i % len(WORDS)], WORDS[i % len(WORDS)].split()[0]])
    return root / "pairs.csv"


@pytest.fixture(scope="module")
def bert(tmp_path_factory) -> Path:
    """A tiny BERT folder as transformers writes one, with a WordPiece tokenizer.json."""
    folder = tmp_path_factory.mktemp("bert")
    tokenizer = train_tokenizer(WORDS * 5, "wordpiece", 120)
    tokenizer.save(folder / "tokenizer.json")
    torch.manual_seed(1)
    config = transformers.BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=16, num_hidden_layers=1,
                                      num_attention_heads=2, intermediate_size=32, max_position_embeddings=32)
    transformers.BertModel(config).save_pretrained(folder)
    return folder


def _run(pairs: Path, bert: Path, *extra: str) -> list[str]:
    return ["method.name=clip", f"data.source={pairs}", "data.image_size=16", "data.holdout_fraction=0.25",
            f"encoders.text.name=hf:{bert}", "encoders.image.dim=16", "encoders.image.depth=1",
            "encoders.image.heads=2", "method.embed_dim=8", "train.steps=3", "train.batch_size=8",
            "train.precision=fp32", "train.log_every=1", *extra]


def test_a_locked_hf_text_tower_keeps_the_folders_weights(tmp_path, pairs, bert):
    run = tmp_path / "run"
    assert main(["pretrain", "--out", str(run), *_run(pairs, bert, "method.lock_text=true")]) == 0
    tower, meta = load_encoder(run / "towers" / "text")
    assert meta["encoder"]["name"] == "hf" and meta["encoder"]["source"] == str(bert)
    reference = transformers.BertModel.from_pretrained(bert).state_dict()
    trained = tower.model.state_dict()
    assert trained and all(torch.equal(trained[k], reference[k]) for k in trained)
    # the run reads captions with the folder's tokenizer, saved beside the tower
    assert (run / "towers" / "text" / "tokenizer.json").read_text() == (run / "tokenizer.json").read_text()
    # where pretraining began: the folder's model, not a random one
    start = untrained_tower(run, load_config(run / "config.yaml"), "text").model.state_dict()
    assert all(torch.equal(start[k], reference[k]) for k in start)
    image_start = untrained_tower(run, load_config(run / "config.yaml"), "image").state_dict()
    image_now, _ = load_encoder(run / "towers" / "image")
    assert any(not torch.equal(image_start[k], v) for k, v in image_now.state_dict().items()), "the image tower trained"


def test_an_unlocked_hf_text_tower_trains(tmp_path, pairs, bert):
    run = tmp_path / "run"
    assert main(["pretrain", "--out", str(run), *_run(pairs, bert)]) == 0
    tower, _ = load_encoder(run / "towers" / "text")
    reference = transformers.BertModel.from_pretrained(bert).state_dict()
    assert any(not torch.equal(v, reference[k]) for k, v in tower.model.state_dict().items())


@pytest.mark.parametrize("override, message", [
    ("encoders.text.name=hf:/nonexistent/folder", "config.json not found"),
    ("encoders.text.dim=32", "a Hugging Face tower's architecture is its config.json"),
])
def test_hf_tower_errors_name_the_key(tmp_path, pairs, bert, capsys, override, message):
    assert main(["pretrain", "--out", str(tmp_path / "r"), *_run(pairs, bert, override)]) == EXIT_BAD_INPUT
    assert message in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
