"""`selfsup zeroshot` (`evaluate/zeroshot.py`): identity towers score 100 % (prompt ensembling and
`--describe` worked out by hand, the CSV written from the trained model), `--describe` parsing, and
whole CLIP runs through the CLI: predict's CSV layout audited by `evaluate --predictions`, `--data`,
bad inputs, a non-CLIP run, `pretrain --overwrite` over a run with zeroshot/, and `untrained` as the
run's real starting point (its seed, another run's tower under `encoders.image.init`)."""

from __future__ import annotations

import csv
import json
import math
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

import selfsup.evaluate.zeroshot as zs
from selfsup.cli import EXIT_BAD_INPUT, main
from selfsup.data.pairs import PairSet
from selfsup.errors import SelfsupError
from selfsup.evaluate.zeroshot import PairModel, class_embeddings, parse_descriptions, zero_shot
from selfsup.train.runtime import Runtime, init_runtime
from tests.conftest import TINY_RUN

CPU = Runtime(device=torch.device("cpu"), autocast_dtype=None)

# -- identity towers -----------------------------------------------------------------------------

CLASSES = ["blue", "green", "red"]
E = 5  # dims 0-2: the classes; 3: what templates add; 4: what descriptions add
WORD_VECTORS = {
    "blue": [1, 0, 0, 0, 0], "green": [0, 1, 0, 0, 0], "red": [0, 0, 1, 0, 0],
    "a": [0, 0, 0, 0, 0], "photo": [0, 0, 0, 0.5, 0], "of": [0, 0, 0, 0, 0],
    # red described in other words, asymmetric, so including "red" itself would move the average
    "crimson": [0, 0, 1, 0, 0.4], "scarlet": [0, 0, 1, 0, 1.2], "sky": [1, 0, 0, 0, -0.3],
}
PAD, EOS = 0, 1
VOCAB = {word: i + 2 for i, word in enumerate(WORD_VECTORS)}


class WordTokenizer:
    """What `caption_ids` asks of a tokenizer: one id per known word (an unknown word is a KeyError)."""

    packing_bounds = (None, EOS)
    pad_id = PAD

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [[VOCAB[word] for word in text.split()] for text in texts]


def pixel_of(k: int) -> int:
    return 40 * (k + 1)


class IdentityTowers(nn.Module):
    """embed_images: the one-hot of the class written in pixel (0, 0, 0) (`pixel_of`), shifted by
    `shift` classes; embed_texts: the normalised sum of the caption's word vectors."""

    def __init__(self, scale: float = 10.0, shift: int = 0):
        super().__init__()
        self.logit_scale = nn.Parameter(torch.tensor(math.log(scale)))
        self.shift = shift
        table = torch.zeros(len(VOCAB) + 2, E)
        for word, i in VOCAB.items():
            table[i] = torch.tensor(WORD_VECTORS[word], dtype=torch.float)
        self.register_buffer("table", table)

    def embed_images(self, x: torch.Tensor) -> torch.Tensor:
        k = (x[:, 0, 0, 0] * 255 / 40).round().long() - 1
        return F.one_hot((k + self.shift) % len(CLASSES), E).float()

    def embed_texts(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        ends = ids[torch.arange(len(ids)), mask.sum(dim=1) - 1]
        assert (ends == EOS).all() and (ids[~mask] == PAD).all(), "captions as caption_ids writes them"
        return F.normalize((self.table[ids] * mask[..., None]).sum(dim=1), dim=-1)


def identity_model(**knobs) -> PairModel:
    pre = {"mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0], "image_size": 4}
    cfg = SimpleNamespace(data=SimpleNamespace(source="stub"))
    return PairModel(IdentityTowers(**knobs).eval(), cfg, pre, WordTokenizer(), seq_len=8)


def expected_class(texts: list[str]) -> torch.Tensor:
    """The paper's ensembling from the word table: each text's unit vector, averaged, normalised."""
    units = [F.normalize(torch.tensor([WORD_VECTORS[w] for w in t.split()], dtype=torch.float).sum(0), dim=0)
             for t in texts]
    return F.normalize(torch.stack(units).mean(0), dim=0)


def pair_set(kinds: list[int], labels: list[int] | None) -> PairSet:
    """A 4x4 image of each kind with its class in pixel (0, 0, 0), captioned with its class's name."""
    n = len(kinds)
    images = torch.zeros(n, 3, 4, 4, dtype=torch.uint8)
    images[:, 0, 0, 0] = torch.tensor([pixel_of(k) for k in kinds], dtype=torch.uint8)
    return PairSet(images, [(CLASSES[k],) for k in kinds], [f"im{i}" for i in range(n)],
                   None if labels is None else torch.tensor(labels), None if labels is None else list(CLASSES),
                   {"site": ["north" if i % 2 else "south" for i in range(n)]}, "stub")


TEMPLATES = ["{}", "a photo of {}"]


def test_class_embeddings_average_templates_and_descriptions():
    model = identity_model()
    plain = class_embeddings(model, CLASSES, ["{}"], CPU)
    assert torch.allclose(plain, torch.eye(E)[:3]), "one template, the class's own name: its word vector"
    both = class_embeddings(model, CLASSES, TEMPLATES, CPU)
    assert both.shape == (3, E) and torch.allclose(both.norm(dim=1), torch.ones(3))
    for k, name in enumerate(CLASSES):
        expected = expected_class([t.replace("{}", name) for t in TEMPLATES])
        torch.testing.assert_close(both[k], expected)
    assert not torch.allclose(both, plain, atol=1e-3), "the second template counts"
    named = class_embeddings(model, CLASSES, TEMPLATES, CPU, names={"red": ["crimson", "scarlet"], "blue": ["sky"]})
    red = expected_class([t.replace("{}", w) for w in ("crimson", "scarlet") for t in TEMPLATES])
    torch.testing.assert_close(named[2], red)
    assert not torch.allclose(red, expected_class([t.replace("{}", w) for w in ("red", "crimson", "scarlet")
                                                   for t in TEMPLATES]), atol=1e-3), "the test tells names apart"
    torch.testing.assert_close(named[0], expected_class([t.replace("{}", "sky") for t in TEMPLATES]))
    assert torch.allclose(named[1], both[1]), "an undescribed class keeps its name"


def test_unknown_class_and_template_without_a_slot_are_errors():
    model = identity_model()
    with pytest.raises(SelfsupError, match=r"--describe 'purple'.*no such class.*blue, green, red"):
        class_embeddings(model, CLASSES, TEMPLATES, CPU, names={"purple": ["violet"]})
    with pytest.raises(SelfsupError, match=r"--template 'a photo' has no \{\}"):
        class_embeddings(model, CLASSES, ["{}", "a photo"], CPU)


@pytest.fixture
def stubbed(monkeypatch):
    """zero_shot over identity towers (pretrained) and towers off by one class (untrained) on `data`."""
    data = {"split": pair_set([0, 0, 0, 1, 2, 2], [0, 0, 0, 1, 2, 2])}
    monkeypatch.setattr(zs, "load_pair_model",
                        lambda run, untrained=False: identity_model(shift=1 if untrained else 0))
    monkeypatch.setattr(zs, "load_splits", lambda cfg: (data["split"], data["split"]))
    return data


def test_identity_towers_classify_every_image(stubbed, tmp_path):
    result = zero_shot(tmp_path / "run", templates=TEMPLATES, out=tmp_path / "zs", compare_untrained=True, runtime=CPU)
    assert result["pretrained"]["accuracy"] == 1.0 and result["pretrained"]["num_scored"] == 6
    assert result["untrained"]["accuracy"] == 0.0
    # retrieval against each image's own caption (its class's name): a caption of the same class ties,
    # and a tie is a miss, so only the one green image finds its caption first
    assert result["pretrained"]["retrieval"] == {"i2t_r1": pytest.approx(1 / 6), "t2i_r1": pytest.approx(1 / 6),
                                                 "i2t_r5": 1.0, "t2i_r5": 1.0, "i2t_r10": 1.0, "t2i_r10": 1.0}
    assert result["chance"] == {"uniform": pytest.approx(1 / 3), "majority": 0.5}
    assert result["retrieval_chance"] == {"r1": pytest.approx(1 / 6), "r5": pytest.approx(5 / 6), "r10": 1.0}
    assert json.loads((tmp_path / "zs" / "zeroshot.json").read_text())["pretrained"]["accuracy"] == 1.0
    with open(tmp_path / "zs" / "predictions.csv", newline="") as fh:
        rows = list(csv.reader(fh))
    assert rows[0] == ["id", "label", "prediction", "confidence", "site", "p_blue", "p_green", "p_red"]
    classes = class_embeddings(identity_model(), CLASSES, TEMPLATES, CPU)
    for row, k in zip(rows[1:], [0, 0, 0, 1, 2, 2]):
        assert row[1] == row[2] == CLASSES[k], "written from the pretrained towers, every one right"
        probs = (10.0 * torch.eye(E)[k] @ classes.T).softmax(0)  # the run's logit scale (exp of the parameter)
        assert [float(p) for p in row[5:]] == pytest.approx(probs.tolist(), abs=2e-6)
        assert float(row[3]) == pytest.approx(float(probs.max()), abs=2e-6)
    assert [r[4] for r in rows[1:]] == ["south", "north"] * 3


def test_rows_without_labels_are_an_error(stubbed, tmp_path):
    for labels in (None, [-1, -1, -1, -1]):
        stubbed["split"] = pair_set([0, 1, 2, 1], labels)
        with pytest.raises(SelfsupError, match="carry no labels"):
            zero_shot(tmp_path / "run", out=tmp_path / "zs", runtime=CPU)
    assert not (tmp_path / "zs").exists()
    # a partly labelled set: the unlabelled rows are predicted, not scored
    stubbed["split"] = pair_set([0, 1, 2, 1], [0, -1, 2, 1])
    result = zero_shot(tmp_path / "run", out=tmp_path / "zs", runtime=CPU)
    assert result["pretrained"]["accuracy"] == 1.0 and result["pretrained"]["num_scored"] == 3
    with open(tmp_path / "zs" / "predictions.csv", newline="") as fh:
        assert [(r["label"], r["prediction"]) for r in csv.DictReader(fh)][1] == ("", "green")


def test_parse_descriptions():
    assert parse_descriptions([]) == {}
    assert parse_descriptions(["A=x|y"]) == {"A": ["x", "y"]}
    assert parse_descriptions([" People & Body = person | |hand ", "A=x"]) == {"People & Body": ["person", "hand"],
                                                                               "A": ["x"]}
    assert parse_descriptions(["A=x", "B=z", "A=y|w"]) == {"A": ["x", "y", "w"], "B": ["z"]}, "a repeat adds"
    assert parse_descriptions(["A=x=y"]) == {"A": ["x=y"]}
    for bad in ("A", "=x", " =x", "A=", "A=|", "A= | "):
        with pytest.raises(SelfsupError, match=re.escape(f"--describe {bad!r}: write CLASS=TEXT")):
            parse_descriptions(["B=ok", bad])


# -- whole runs through the CLI -------------------------------------------------------------------

COLOURS = {"blue": (30, 40, 220), "green": (30, 200, 40), "red": (220, 30, 30), "yellow": (230, 220, 30)}
SHAPES = {"square": np.s_[3:9, 3:9], "stripe": np.s_[:, 5:7], "dot": np.s_[5:7, 5:7]}


def write_manifest(folder: Path, copies: int = 3, *, seed: int = 0, labels: bool = True,
                   unlabelled: int = 0, colourless_first: bool = False) -> Path:
    """Small pictures of coloured shapes, two captions each, labelled by colour, with a `site` column;
    the first `unlabelled` images have an empty label; `colourless_first`: an image's first caption
    (what a text tower reads of it) names only its shape."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "img").mkdir(exist_ok=True)
    rows, n = [], 0
    for colour, rgb in COLOURS.items():
        for shape, where in SHAPES.items():
            for k in range(copies):
                pixels = np.full((12, 12, 3), 255, np.uint8)
                pixels[where] = rgb
                pixels = np.clip(pixels + rng.integers(-10, 10, pixels.shape), 0, 255).astype(np.uint8)
                path = f"img/{colour}-{shape}-{k}.png"
                Image.fromarray(pixels).save(folder / path)
                label = "" if n < unlabelled else colour
                site = ("north", "south")[n % 2]
                first = f"a {shape}" if colourless_first else f"a {colour} {shape}"
                for caption in (first, f"{shape} in {colour}"):
                    rows.append((path, caption, label, site) if labels else (path, caption, site))
                n += 1
    header = ("image", "caption", "label", "site") if labels else ("image", "caption", "site")
    with open(folder / "pairs.csv", "w", newline="") as fh:
        csv.writer(fh).writerows([header, *rows])
    return folder / "pairs.csv"


def clip_overrides(manifest: Path, *extra: str) -> list[str]:
    return ["method.name=clip", f"data.source={manifest}", "data.group_columns=[site]", "data.holdout_fraction=0.25",
            "method.embed_dim=16", "encoders.image.dim=32", "encoders.image.depth=1", "encoders.image.heads=2",
            "encoders.text.dim=32", "encoders.text.depth=1", "encoders.text.heads=2", "data.image_size=16",
            "data.seq_len=12", "tokenizer.vocab_size=300", "train.steps=4", "train.batch_size=16",
            "train.checkpoint_every=4", "train.log_every=1", "train.precision=fp32", "train.device=cpu", *extra]


def read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        return list(reader.fieldnames or []), list(reader)


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> Path:
    return write_manifest(tmp_path_factory.mktemp("pairs"))


@pytest.fixture(scope="module")
def run(manifest, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("clip") / "run"
    assert main(["pretrain", *clip_overrides(manifest), "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def scored(run) -> Path:
    assert main(["zeroshot", str(run), "--template", "{}", "a {}", "--compare-untrained"]) == 0
    return run / "zeroshot"


def manifest_rows(manifest: Path) -> dict[str, dict[str, str]]:
    """The first row of each image, by id (its path)."""
    _, rows = read_csv(manifest)
    out: dict[str, dict[str, str]] = {}
    for row in rows:
        out.setdefault(row["image"], row)
    return out


def test_zeroshot_writes_predicts_layout_and_its_scores(run, scored, manifest):
    from selfsup.config import load_config
    from selfsup.modalities import load_splits

    header, rows = read_csv(scored / "predictions.csv")
    assert header == ["id", "label", "prediction", "confidence", "site", *(f"p_{c}" for c in COLOURS)]
    _, holdout = load_splits(load_config(run / "config.yaml"))
    assert [r["id"] for r in rows] == holdout.ids and len(rows) >= 8, "the held-out rows, in order"
    truth = manifest_rows(manifest)
    for row in rows:
        assert row["label"] == truth[row["id"]]["label"] and row["site"] == truth[row["id"]]["site"]
        probs = [float(row[f"p_{c}"]) for c in COLOURS]
        assert sum(probs) == pytest.approx(1.0, abs=1e-5)
        assert row["prediction"] == list(COLOURS)[int(np.argmax(probs))] and float(row["confidence"]) == max(probs)
    result = json.loads((scored / "zeroshot.json").read_text())
    assert result["templates"] == ["{}", "a {}"] and result["classes"] == list(COLOURS)
    assert result["rows"] == "held-out rows" and result["num_classes"] == 4
    recall_keys = {f"{way}_r{k}" for way in ("i2t", "t2i") for k in (1, 5, 10)}
    for name in ("pretrained", "untrained"):
        assert set(result[name]) == {"accuracy", "num_scored", "retrieval"}, name
        assert set(result[name]["retrieval"]) == recall_keys
        assert result[name]["num_scored"] == len(rows)
        assert all(0.0 <= v <= 1.0 for v in result[name]["retrieval"].values())
    right = sum(r["label"] == r["prediction"] for r in rows) / len(rows)
    assert result["pretrained"]["accuracy"] == pytest.approx(right)


def score_by_hand(method: nn.Module, split: PairSet, run: Path, templates: list[str]) -> tuple[torch.Tensor, dict]:
    """Zero-shot probabilities [N, K] and recall of `method`, written out from the run's files."""
    from selfsup.data.tokenizer import TextTokenizer
    from selfsup.data.views import normalise
    from selfsup.modalities.image_text import caption_ids, retrieval_recall

    image_pre = json.loads((run / "towers" / "image" / "encoder.json").read_text())["preprocess"]
    text_pre = json.loads((run / "towers" / "text" / "encoder.json").read_text())["preprocess"]
    tokenizer = TextTokenizer.load(run / "towers" / "text" / "tokenizer.json")
    runtime = init_runtime("auto", "auto")  # what `selfsup zeroshot` runs under (bf16 where the CPU is fast at it)
    method.eval().to(runtime.device)

    def texts(words: list[str]) -> torch.Tensor:
        ids, mask = caption_ids(tokenizer, words, text_pre["seq_len"])
        with runtime.autocast():
            unit = method.embed_texts(ids.to(runtime.device), mask.to(runtime.device))
        return F.normalize(unit.float().cpu(), dim=-1)  # unit in float32 (under bf16 autocast they are bf16-unit)

    with torch.no_grad():
        pixels = normalise(split.images.to(runtime.device), image_pre["mean"], image_pre["std"], 16)
        with runtime.autocast():
            images = F.normalize(method.embed_images(pixels).float().cpu(), dim=-1)
        classes = F.normalize(torch.stack([texts([t.replace("{}", c) for t in templates]).mean(0)
                                           for c in split.classes]), dim=-1)
        probs = (method.logit_scale.detach().exp().cpu() * images @ classes.T).softmax(dim=1)
        recall = retrieval_recall(images @ texts(split.texts).T)
    method.cpu()
    return probs, recall


def test_pretrained_and_untrained_are_the_runs_end_and_start(run, scored):
    from selfsup.config import load_config
    from selfsup.encoders import build_encoder
    from selfsup.methods import build_method
    from selfsup.modalities import load_splits
    from selfsup.rundir import starting_towers

    cfg = load_config(run / "config.yaml")
    _, holdout = load_splits(cfg)
    describe = {r: json.loads((run / "towers" / r / "encoder.json").read_text())["encoder"] for r in ("image", "text")}
    # the end: the saved towers and the head file
    towers = {}
    for role, description in describe.items():
        towers[role] = build_encoder(**description)
        towers[role].load_state_dict(load_file(str(run / "towers" / role / "encoder.safetensors")))
    trained = build_method(dict(cfg.method), **towers)
    missing, unexpected = trained.load_state_dict(load_file(str(run / "clip_head.safetensors")), strict=False)
    assert not unexpected and all(k.startswith(("image.", "text.")) for k in missing)
    probs, recall = score_by_hand(trained, holdout, run, ["{}", "a {}"])
    _, rows = read_csv(scored / "predictions.csv")
    written = torch.tensor([[float(r[f"p_{c}"]) for c in COLOURS] for r in rows])
    torch.testing.assert_close(written, probs, atol=2e-6, rtol=0)
    result = json.loads((scored / "zeroshot.json").read_text())
    assert result["pretrained"]["retrieval"] == pytest.approx(recall)
    # the start: the towers built in order under the run's seed, then the method's heads
    start = build_method(dict(cfg.method), **starting_towers(cfg.seed, describe))
    assert start.logit_scale.item() == pytest.approx(math.log(1 / 0.07))
    start_probs, start_recall = score_by_hand(start, holdout, run, ["{}", "a {}"])
    right = float((start_probs.argmax(1) == holdout.labels).float().mean())
    assert result["untrained"]["accuracy"] == pytest.approx(right)
    assert result["untrained"]["retrieval"] == pytest.approx(start_recall)
    loaded = zs.load_pair_model(run, untrained=True).method
    for key, value in start.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    assert not torch.allclose(start_probs, probs, atol=1e-3), "the two are told apart"
    assert not torch.equal(loaded.image_proj.weight, trained.image_proj.weight)


def test_evaluate_audits_the_zero_shot_predictions_per_site(scored, capsys):
    capsys.readouterr()
    assert main(["evaluate", "--predictions", str(scored / "predictions.csv"), "--groups", "site",
                 "--bootstrap", "50"]) == 0
    out = capsys.readouterr().out
    assert "north" in out and "south" in out
    assert main(["evaluate", "--predictions", str(scored / "predictions.csv"), "--groups", "scanner"]) == EXIT_BAD_INPUT


def test_data_classifies_every_row_of_another_manifest(run, tmp_path):
    other = write_manifest(tmp_path / "other", copies=1, seed=5, unlabelled=2)
    out = tmp_path / "zs"
    assert main(["zeroshot", str(run), "--data", str(other), "--out", str(out), "--describe", "red=crimson|scarlet",
                 "blue=navy"]) == 0
    header, rows = read_csv(out / "predictions.csv")
    truth = manifest_rows(other)
    assert sorted(r["id"] for r in rows) == sorted(truth) and len(rows) == 12
    assert all(r["label"] == truth[r["id"]]["label"] and r["site"] == truth[r["id"]]["site"] for r in rows)
    assert sum(r["label"] == "" for r in rows) == 2
    result = json.loads((out / "zeroshot.json").read_text())
    assert result["rows"] == f"every row of {other}" and result["data"] == str(other)
    assert result["pretrained"]["num_scored"] == 10 and "untrained" not in result
    assert result["descriptions"] == {"red": ["crimson", "scarlet"], "blue": ["navy"]}
    labelled = [r for r in rows if r["label"]]
    assert result["pretrained"]["accuracy"] == pytest.approx(sum(r["label"] == r["prediction"] for r in labelled) / 10)


def test_bad_inputs_are_bad_input(run, tmp_path, capsys):
    unlabelled = write_manifest(tmp_path / "unlabelled", copies=1, labels=False)
    out = tmp_path / "zs"
    capsys.readouterr()
    assert main(["zeroshot", str(run), "--data", str(unlabelled), "--out", str(out)]) == EXIT_BAD_INPUT
    assert "carry no labels" in capsys.readouterr().err
    assert main(["zeroshot", str(run), "--out", str(out), "--describe", "purple=violet"]) == EXIT_BAD_INPUT
    assert "no such class" in capsys.readouterr().err
    assert main(["zeroshot", str(run), "--out", str(out), "--describe", "purple"]) == EXIT_BAD_INPUT
    assert "write CLASS=TEXT" in capsys.readouterr().err
    assert main(["zeroshot", str(run), "--out", str(out), "--template", "a photo"]) == EXIT_BAD_INPUT
    assert "has no {}" in capsys.readouterr().err
    assert main(["zeroshot", str(tmp_path / "nowhere")]) == EXIT_BAD_INPUT
    assert "not a pretraining run" in capsys.readouterr().err
    (tmp_path / "a-file").write_text("mine")
    assert main(["zeroshot", str(run), "--out", str(tmp_path / "a-file")]) == EXIT_BAD_INPUT
    assert "a-file: exists and is not a directory" in capsys.readouterr().err
    assert (tmp_path / "a-file").read_text() == "mine"
    assert not out.exists(), "nothing written on bad input"


def test_a_run_without_image_and_text_towers_is_refused(tmp_path, capsys):
    simclr = tmp_path / "simclr"
    assert main(["pretrain", *TINY_RUN, "train.steps=1", "--out", str(simclr)]) == 0
    capsys.readouterr()
    assert main(["zeroshot", str(simclr)]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert "simclr run has the towers encoder" in err and "an image and a text tower" in err
    assert not (simclr / "zeroshot").exists()


def test_no_held_out_rows_is_named_and_a_run_with_zeroshot_can_be_overwritten(manifest, tmp_path, capsys):
    run = tmp_path / "run"
    overrides = clip_overrides(manifest, "data.holdout_fraction=0", "train.steps=1")
    assert main(["pretrain", *overrides, "--out", str(run)]) == 0
    capsys.readouterr()
    assert main(["zeroshot", str(run)]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert "no held-out rows" in err and "--data" in err
    assert main(["zeroshot", str(run), "--data", str(manifest)]) == 0
    assert (run / "zeroshot" / "predictions.csv").is_file() and (run / "zeroshot" / "zeroshot.json").is_file()
    assert main(["pretrain", *overrides, "--out", str(run), "--overwrite"]) == 0
    assert not (run / "zeroshot").exists() and (run / "clip_head.safetensors").is_file()
    # the rule is by name: a folder selfsup does not write is still refused
    (run / "notes").mkdir()
    assert main(["pretrain", *overrides, "--out", str(run), "--overwrite"]) == EXIT_BAD_INPUT
    assert "notes" in capsys.readouterr().err


def test_untrained_starts_from_the_run_a_tower_was_initialised_from(run, manifest, tmp_path):
    lit = tmp_path / "lit"
    overrides = clip_overrides(manifest, f"encoders.image.init={run}:image", "method.lock_image=true",
                               "train.steps=2", "seed=3")
    assert main(["pretrain", *overrides, "--out", str(lit)]) == 0
    start = zs.load_pair_model(lit, untrained=True).method
    theirs = load_file(str(run / "towers" / "image" / "encoder.safetensors"))
    mine = start.image.state_dict()
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in theirs)
    # the text tower and the head: seed 3's, not the base run's (seed 0)
    base_start = zs.load_pair_model(run, untrained=True).method
    assert not torch.equal(start.text_proj.weight, base_start.text_proj.weight)
    assert main(["zeroshot", str(lit), "--compare-untrained"]) == 0
    result = json.loads((lit / "zeroshot" / "zeroshot.json").read_text())
    assert result["untrained"]["num_scored"] == result["pretrained"]["num_scored"] > 0
