"""`selfsup data shard` per modality (issue 18): every item, label, group and id survives the shards, the
held-out split equals the one a run makes of the source in memory, bad files follow `data.on_bad_file`,
the refusals, and pretraining streamed from a shards folder for images, text, audio and image–text pairs."""

from __future__ import annotations

import csv
import io
import json
import random
import re
import tarfile
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
from PIL import Image

from selfsup.cli import SHARD_MODALITIES, main
from selfsup.config import load_config
from selfsup.data.pairs import DecodePairs
from selfsup.data.pipeline import channel_stats, token_ids
from selfsup.data.shards import SPLITS, ShardSplit, load_index, read_shard
from selfsup.data.tokenizer import TextTokenizer, train_tokenizer
from selfsup.errors import SelfsupError
from selfsup.modalities import MODALITIES, load_splits
from selfsup.pretrain import pretrain
from tests.data.test_pairs import prepared_emoji  # noqa: F401 (a fixture)

IMAGE_RUN = ["data.image_size=16", "encoder.name=resnet10", "encoder.width=8", "train.batch_size=4", "train.steps=4",
             "train.checkpoint_every=2", "train.log_every=1", "train.precision=fp32", "train.device=cpu",
             "data.shuffle_buffer=4"]
AUDIO_RUN = ["encoder.conv_channels=16", "encoder.dim=32", "encoder.depth=2", "encoder.heads=2",
             "encoder.pos_conv_kernel=8", "encoder.pos_conv_groups=2", "data.max_seconds=0.5", "train.batch_size=4",
             "train.precision=fp32", "train.device=cpu", "train.checkpoint_every=2", "train.log_every=1"]
TEXT_RUN = ["method.name=mlm", "encoder.dim=32", "encoder.depth=1", "encoder.heads=2", "data.seq_len=16",
            "train.batch_size=4", "train.steps=3", "train.precision=fp32", "train.device=cpu", "train.log_every=1",
            "train.eval_max_blocks=8"]
# how `data shard` reads the pair manifest (`write_pairs`), and a tiny CLIP run on its shards
PAIR_SHARD = ["--modality", "image_text", "--shard-items", "3", "data.label_column=kind", "data.group_columns=[site]",
              "data.holdout_fraction=0.25", "data.image_size=8", "tokenizer.vocab_size=300", "tokenizer.min_frequency=1"]
CLIP_RUN = ["method.name=clip", "method.embed_dim=16", "encoders.image.dim=32", "encoders.image.depth=1",
            "encoders.image.heads=2", "encoders.text.dim=32", "encoders.text.depth=1", "encoders.text.heads=2",
            "data.image_size=8", "data.seq_len=12", "train.batch_size=4", "train.steps=4", "train.checkpoint_every=2",
            "train.log_every=1", "train.precision=fp32", "train.device=cpu", "data.shuffle_buffer=4"]


# ------------------------------------------------------------------ tiny sources


def write_pairs(folder: Path) -> Path:
    """A pair manifest of 16 small pictures (one JPEG), every third named twice (two captions), labelled by
    `kind` (one unlabelled) with a `site` group: 12 training and 4 held-out pairs under PAIR_SHARD."""
    rng = np.random.default_rng(1)
    (folder / "img").mkdir(parents=True)
    with open(folder / "pairs.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["image", "caption", "kind", "site"])
        for i in range(16):
            name = f"img/{i}.jpg" if i == 4 else f"img/{i}.png"
            kind = "" if i == 7 else ("warm", "cool")[i % 2]
            base = 200 if kind == "warm" else 60
            pixels = np.clip(base + rng.integers(-40, 40, (10, 12, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / name)
            writer.writerow([name, f"a {kind or 'plain'} picture number {i}", kind, f"site{i % 3}"])
            if i % 3 == 0:
                writer.writerow([name, f"picture {i} once more", kind, f"site{i % 3}"])
    return folder / "pairs.csv"


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sources")
    rng = np.random.default_rng(0)
    # images: two class folders of mixed sizes (non-square too), PNG and JPEG
    for c, base in (("cat", 40), ("dog", 190)):
        (root / "pets" / c).mkdir(parents=True)
        for i in range(10):
            h, w = (20, 24) if i % 2 else (18, 18)
            pixels = np.clip(base + rng.integers(-30, 30, (h, w, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / "pets" / c / (f"{i}.jpg" if i == 3 else f"{i}.png"))
    # a manifest with a label column, an unlabelled row, two group columns and one corrupt file
    (root / "shots").mkdir()
    with open(root / "shots" / "list.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "species", "site", "camera"])
        for i in range(16):
            name = f"s{i}.png"
            if i == 5:
                (root / "shots" / name).write_bytes(b"\x89PNG\r\n\x1a\n not really")
            else:
                Image.fromarray(rng.integers(0, 255, (12, 12), dtype=np.uint8)).save(root / "shots" / name)
            writer.writerow([name, "" if i == 7 else ["owl", "hawk", "wren"][i % 3], f"site{i % 2}", f"c{i % 4}"])
    # an .npz with labels and a group array
    np.savez(root / "arrays.npz", x=rng.integers(0, 255, (20, 10, 10, 3), dtype=np.uint8), y=np.arange(20) % 4,
             group=np.array(["a", "b"] * 10))
    # text: labelled and unlabelled documents, a group column missing from some rows
    words = "alpha beta gamma delta epsilon zeta theta kappa lambda sigma omega".split()
    rand = random.Random(0)
    with open(root / "docs.jsonl", "w") as fh:
        for i in range(40):
            row = {"id": f"d{i}", "text": " ".join(rand.choice(words) for _ in range(rand.randint(4, 30))),
                   "topic": ["net", "file", "proc"][i % 3], "author": f"a{i % 2}"}
            if i % 9 == 0:
                row.pop("topic")
            if i % 11 == 0:
                row.pop("author")
            fh.write(json.dumps(row) + "\n")
    # audio: two class folders of short tones at two sample rates
    for c, freq in (("low", 220.0), ("high", 880.0)):
        (root / "tones" / c).mkdir(parents=True)
        for i in range(8):
            rate = 8000 if i % 2 else 16000
            t = np.arange(int(rate * (0.3 + 0.05 * i))) / rate
            wave = 0.3 * np.sin(2 * np.pi * freq * t) + 0.01 * rng.standard_normal(len(t))
            soundfile.write(root / "tones" / c / f"{i}.wav", wave.astype(np.float32), rate, subtype="PCM_16")
    write_pairs(root / "pairs")
    return root


def shard(source: Path | str, out: Path, *args: str) -> None:
    assert main(["data", "shard", str(source), "--out", str(out), *args]) == 0


def splits(source: Path | str, *overrides: str, stream: bool = False):
    return load_splits(load_config(None, [f"data.source={source}", *overrides]), progress=False, stream=stream)


def by_id(data) -> dict[str, int]:
    return {id: i for i, id in enumerate(data.ids)}


def assert_same_rows(shards, memory, values: str) -> None:
    """The same rows (ids, labels, classes, groups, decoded values) in any order."""
    assert sorted(shards.ids) == sorted(memory.ids) and shards.classes == memory.classes
    assert set(shards.groups) == set(memory.groups)
    where = by_id(memory)
    for i, id in enumerate(shards.ids):
        j = where[id]
        if memory.labels is None:
            assert shards.labels is None
        else:
            assert int(shards.labels[i]) == int(memory.labels[j])
        for column in memory.groups:
            assert shards.groups[column][i] == memory.groups[column][j]
        mine, theirs = getattr(shards, values)[i], getattr(memory, values)[j]
        assert torch.equal(mine, theirs) if isinstance(mine, torch.Tensor) else mine == theirs


# ------------------------------------------------------------------ round trips


def test_an_image_folder_round_trips_and_splits_as_in_memory(sources, tmp_path):
    out = tmp_path / "pets"
    shard(sources / "pets", out, "--shard-items", "4", "data.image_size=16")
    index = load_index(out)
    assert index.modality == "image" and index.classes == ["cat", "dog"] and index.items("train") == 16
    assert {p.name for p, _ in index.shards("train")} == {f"train-00000{i}.tar" for i in range(4)}
    train, holdout = splits(out, "data.image_size=16")
    mem_train, mem_holdout = splits(sources / "pets", "data.image_size=16")
    # the held-out split: the same rows in the same (source) order, decoded alike
    assert holdout.ids == mem_holdout.ids and torch.equal(holdout.labels, mem_holdout.labels)
    assert torch.equal(holdout.images, mem_holdout.images)
    assert_same_rows(train, mem_train, "images")
    assert train.ids != mem_train.ids  # the training shards are written in a seeded random order
    # the original bytes were kept: a run at another size decodes them at that size
    big, _ = splits(out, "data.image_size=20", "data.channels=1")
    mem_big, _ = splits(sources / "pets", "data.image_size=20", "data.channels=1")
    assert_same_rows(big, mem_big, "images")
    stats = index.settings["stats"]
    mean, std = channel_stats(mem_train.images)
    assert np.allclose(stats["rgb"]["mean"], mean, atol=1e-6) and np.allclose(stats["rgb"]["std"], std, atol=1e-6)
    grey_mean, _ = channel_stats(mem_big.images)  # at 20 px: close, not equal
    assert abs(stats["grey"]["mean"][0] - grey_mean[0]) < 0.02
    streamed, _ = splits(out, "data.image_size=16", stream=True)
    assert isinstance(streamed, ShardSplit) and len(streamed) == 16 and streamed.source == str(out)
    whole = MODALITIES["image"].load(load_config(None, [f"data.source={out}", "data.image_size=16"]))
    assert whole.ids == train.ids + holdout.ids  # `load` of a shards folder: every row, in memory


def test_an_unlabelled_folder_round_trips(sources, tmp_path):
    shard(sources / "pets" / "cat", tmp_path / "flat", "data.image_size=8", "data.holdout_fraction=0.3")
    assert load_index(tmp_path / "flat").classes is None
    train, holdout = splits(tmp_path / "flat", "data.image_size=8")
    mem_train, mem_holdout = splits(sources / "pets" / "cat", "data.image_size=8", "data.holdout_fraction=0.3")
    assert train.labels is None and holdout.ids == mem_holdout.ids and len(holdout) == 3
    assert_same_rows(train, mem_train, "images")


def test_a_manifest_with_groups_and_a_bad_file(sources, tmp_path):
    manifest = sources / "shots" / "list.csv"
    settings = ["data.label_column=species", "data.group_columns=[site, camera]", "data.image_size=8"]
    assert main(["data", "shard", str(manifest), "--out", str(tmp_path / "no"), *settings]) == 2
    assert not (tmp_path / "no").exists()  # nothing left behind by a refused source
    skip = ["data.on_bad_file=skip", "data.max_bad_fraction=0.1"]
    shard(manifest, tmp_path / "shots", *settings, *skip)
    index = load_index(tmp_path / "shots")
    assert index.meta["num_skipped"] == 1 and index.group_columns == ["site", "camera"]
    assert index.classes == ["hawk", "owl", "wren"] and index.meta["label_column"] == "species"
    train, holdout = splits(tmp_path / "shots", "data.image_size=8")
    mem_train, mem_holdout = splits(manifest, *settings, *skip)
    assert holdout.ids == mem_holdout.ids and torch.equal(holdout.images, mem_holdout.images)
    assert holdout.groups == mem_holdout.groups
    assert_same_rows(train, mem_train, "images")
    assert "s5.png" not in train.ids + holdout.ids and -1 in train.labels.tolist() + holdout.labels.tolist()


def test_arrays_and_builtins_are_stored_as_png(sources, tmp_path):
    shard(sources / "arrays.npz", tmp_path / "arrays", "data.image_size=10")
    train, holdout = splits(tmp_path / "arrays", "data.image_size=10")
    mem_train, mem_holdout = splits(sources / "arrays.npz", "data.image_size=10")
    assert holdout.ids == mem_holdout.ids and torch.equal(holdout.images, mem_holdout.images)
    assert holdout.groups == mem_holdout.groups == {"group": mem_holdout.groups["group"]}
    assert_same_rows(train, mem_train, "images")
    shard("digits", tmp_path / "digits", "data.image_size=8", "data.channels=1", "data.holdout_fraction=0.1")
    train, holdout = splits(tmp_path / "digits", "data.image_size=8", "data.channels=1")
    mem_train, mem_holdout = splits("digits", "data.image_size=8", "data.channels=1", "data.holdout_fraction=0.1")
    assert holdout.ids == mem_holdout.ids and torch.equal(holdout.images, mem_holdout.images)
    assert_same_rows(train, mem_train, "images")
    names = {n for p, _ in load_index(tmp_path / "digits").shards("train") for n in __import__("tarfile").open(p).getnames()}
    assert {n.split(".", 1)[1] for n in names} == {"png", "json"}


def test_a_text_source_round_trips_with_its_token_ids(sources, tmp_path):
    settings = ["data.label_column=topic", "data.group_columns=[author]", "tokenizer.vocab_size=300",
                "tokenizer.min_frequency=1"]
    out = tmp_path / "docs"
    shard(sources / "docs.jsonl", out, "--modality", "text", "--tokenizer-kind", "bpe", "--shard-items", "7", *settings)
    index = load_index(out)
    assert index.modality == "text" and index.settings["tokenizer_kind"] == "bpe"
    assert index.classes == ["file", "net", "proc"] and index.group_columns == ["author"]
    overrides = ["method.name=next_token", "data.label_column=topic", "data.group_columns=[author]"]
    train, holdout = splits(out, "method.name=next_token")
    mem_train, mem_holdout = splits(sources / "docs.jsonl", *overrides)
    assert holdout.ids == mem_holdout.ids and holdout.texts == mem_holdout.texts
    assert torch.equal(holdout.labels, mem_holdout.labels) and holdout.groups == mem_holdout.groups
    assert_same_rows(train, mem_train, "texts")
    assert train.ids == mem_train.ids  # text is written in source order
    # the token ids are the shard tokenizer's, made from the training documents (BPE trains reproducibly)
    tokenizer = TextTokenizer.load(out / "tokenizer.json")
    from selfsup.data.tokenizer import train_tokenizer

    again = train_tokenizer(mem_train.texts, "bpe", 300, 1)
    assert again.encode_batch(mem_holdout.texts) == tokenizer.encode_batch(mem_holdout.texts)
    documents = [(json.loads(f["json"])["id"], token_ids(f)) for _, f in index.samples("train")]
    assert [id for id, _ in documents] == mem_train.ids
    assert [ids.tolist() for _, ids in documents] == tokenizer.encode_batch(mem_train.texts)
    assert documents[0][1].dtype == np.uint16
    assert sum(index.shards_tokens("train")) == sum(len(ids) for _, ids in documents)


def test_an_audio_folder_round_trips(sources, tmp_path):
    shard(sources / "tones", tmp_path / "tones", "--modality", "audio", "--shard-items", "5")
    index = load_index(tmp_path / "tones")
    assert index.modality == "audio" and index.classes == ["high", "low"]
    train, holdout = splits(tmp_path / "tones", "method.name=wav2vec2")
    mem_train, mem_holdout = splits(sources / "tones", "method.name=wav2vec2")
    assert holdout.ids == mem_holdout.ids and all(torch.equal(a, b) for a, b in zip(holdout.waves, mem_holdout.waves))
    assert_same_rows(train, mem_train, "waves")
    tar_names = {n for p, _ in index.shards("train") for n in __import__("tarfile").open(p).getnames()}
    assert {n.split(".", 1)[1] for n in tar_names} == {"wav", "json"}  # the files' own bytes


def test_an_image_text_manifest_round_trips_with_all_its_captions(sources, tmp_path):
    manifest = sources / "pairs" / "pairs.csv"
    out = tmp_path / "pairs"
    shard(manifest, out, *PAIR_SHARD)
    index = load_index(out)
    assert index.modality == "image_text" and index.classes == ["cool", "warm"] and index.group_columns == ["site"]
    assert index.items("train") == 12 and [n for _, n in index.shards("train")] == [3, 3, 3, 3]
    train, holdout = splits(out, "method.name=clip", "data.image_size=8")
    mem_train, mem_holdout = splits(manifest, "method.name=clip", *PAIR_SHARD[4:])
    # the held-out split: the same pairs in the same (source) order, decoded alike, every caption kept
    assert holdout.ids == mem_holdout.ids and holdout.captions == mem_holdout.captions
    assert torch.equal(holdout.images, mem_holdout.images) and torch.equal(holdout.labels, mem_holdout.labels)
    assert holdout.groups == mem_holdout.groups
    for values in ("images", "captions"):
        assert_same_rows(train, mem_train, values)
    assert sorted(len(c) for c in train.captions + holdout.captions) == [1] * 10 + [2] * 6
    assert -1 in train.labels.tolist() + holdout.labels.tolist()
    # the captions' tokenizer is the one an in-memory run trains on its training captions
    tokenizer = TextTokenizer.load(out / "tokenizer.json")
    again = train_tokenizer([c for cs in mem_train.captions for c in cs], "bpe", 300, 1)
    texts = [c for cs in mem_holdout.captions + mem_train.captions for c in cs]
    assert tokenizer.kind == "bpe" and again.encode_batch(texts) == tokenizer.encode_batch(texts)
    assert index.settings["captions"] == sum(len(c) for c in mem_train.captions)
    mean, std = channel_stats(mem_train.images)
    stats = index.settings["stats"]["rgb"]
    assert np.allclose(stats["mean"], mean, atol=1e-6) and np.allclose(stats["std"], std, atol=1e-6)
    # the files' own bytes (PNG and JPEG) beside the captions and the metadata
    names = {n for split in SPLITS for p, _ in index.shards(split) for n in tarfile.open(p).getnames()}
    assert {n.split(".", 1)[1] for n in names} == {"png", "jpg", "captions.json", "json"}
    whole = MODALITIES["image_text"].load(load_config(None, [f"data.source={out}", "method.name=clip",
                                                              "data.image_size=8"]))
    assert whole.ids == train.ids + holdout.ids and whole.captions == train.captions + holdout.captions


def test_the_emoji_builtin_is_stored_as_png_with_its_names(prepared_emoji, tmp_path):  # noqa: F811 (the fixture)
    settings = ["data.image_size=8", "data.holdout_fraction=0.3"]
    shard("emoji", tmp_path / "emoji", "--modality", "image_text", *settings, "tokenizer.vocab_size=300",
          "tokenizer.min_frequency=1")
    train, holdout = splits(tmp_path / "emoji", "method.name=clip", "data.image_size=8")
    mem_train, mem_holdout = splits("emoji", "method.name=clip", *settings)
    assert holdout.ids == mem_holdout.ids and holdout.captions == mem_holdout.captions
    assert torch.equal(holdout.images, mem_holdout.images) and holdout.groups == mem_holdout.groups
    for values in ("images", "captions"):
        assert_same_rows(train, mem_train, values)
    index = load_index(tmp_path / "emoji")
    names = {n for p, _ in index.shards("train") for n in tarfile.open(p).getnames()}
    assert {n.split(".", 1)[1] for n in names} == {"png", "captions.json", "json"}


def _spoil_first_image(shard_path: Path) -> str:
    """Rewrites a shard with its first image member's bytes replaced by garbage; returns that member's name."""
    with tarfile.open(shard_path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    victim = next(m.name for m, _ in members if m.name.endswith((".png", ".jpg")))
    with tarfile.open(shard_path, "w") as tar:
        for member, data in members:
            data = b"\x89PNG\r\n\x1a\n not really" if member.name == victim else data
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
    return victim


def test_a_corrupt_image_member_of_a_pair_is_named_or_skipped_and_counted(sources, tmp_path, capsys):
    out = tmp_path / "pairs"
    shard(sources / "pairs" / "pairs.csv", out, *PAIR_SHARD)  # the CLI logs to this test's stderr from here on
    path = load_index(out).shards("train")[1][0]
    victim = _spoil_first_image(path)
    where = re.escape(f"{path.name}:{victim}")
    with pytest.raises(SelfsupError, match=rf"{where}: .*data.on_bad_file=skip"):
        splits(out, "method.name=clip", "data.image_size=8")  # both splits read into memory
    with pytest.raises(SelfsupError, match=rf"{where}: .*data.on_bad_file=skip"):
        list(DecodePairs(8, 3)(read_shard(path)))  # a stream's worker
    skip = ["data.on_bad_file=skip", "data.max_bad_fraction=0.5"]
    capsys.readouterr()
    train, _ = splits(out, "method.name=clip", "data.image_size=8", *skip)
    logged = capsys.readouterr().err
    assert len(train) == 11 and "skipped 1 of 12 image files" in logged and victim in logged
    items = list(DecodePairs(8, 3, "skip", 0.5)(read_shard(path)))
    assert len(items) == 2 and f"skipped {path}:{victim}" in capsys.readouterr().err
    assert all(len(captions) >= 1 and isinstance(captions[0], str) for _, _, _, captions in items)


# ------------------------------------------------------------------ refusals


def test_refusals(sources, tmp_path, capsys):
    def fails(*args: str) -> str:
        assert main(["data", "shard", *args]) == 2
        return capsys.readouterr().err

    assert "is a folder; give a built-in (emoji) or a .csv/.jsonl manifest" in fails(
        str(sources / "pets"), "--out", str(tmp_path / "a"), "--modality", "image_text")
    assert "--tokenizer-kind is for text" in fails(str(sources / "pairs" / "pairs.csv"), "--out", str(tmp_path / "f"),
                                                   "--modality", "image_text", "--tokenizer-kind", "bpe")
    assert "give the others to `selfsup pretrain`" in fails(str(sources / "pets"), "--out", str(tmp_path / "b"),
                                                            "train.steps=3")
    assert "as the SOURCE argument" in fails(str(sources / "pets"), "--out", str(tmp_path / "c"), "data.source=x")
    assert "--tokenizer-kind is for text" in fails(str(sources / "pets"), "--out", str(tmp_path / "d"),
                                                   "--tokenizer-kind", "bpe")
    shard(sources / "pets", tmp_path / "pets", "data.image_size=8")
    assert "already a shards folder" in fails(str(tmp_path / "pets"), "--out", str(tmp_path / "e"))
    with pytest.raises(SelfsupError, match="holds image shards, but this run reads text"):
        splits(tmp_path / "pets", "method.name=mlm")
    assert set(SHARD_MODALITIES) <= set(MODALITIES) and {"image", "text", "audio", "image_text"} <= set(SHARD_MODALITIES)


def test_text_runs_read_with_the_shards_tokenizer_only(sources, tmp_path):
    out = tmp_path / "docs"
    shard(sources / "docs.jsonl", out, "--modality", "text", "tokenizer.vocab_size=200", "tokenizer.min_frequency=1")
    with pytest.raises(SelfsupError, match="drop tokenizer.path"):
        pretrain(load_config(None, [f"data.source={out}", *TEXT_RUN, f"tokenizer.path={out / 'tokenizer.json'}"]),
                 tmp_path / "r1", show_progress=False, report=False)
    with pytest.raises(SelfsupError, match="--tokenizer-kind bpe"):
        pretrain(load_config(None, [f"data.source={out}", *TEXT_RUN, "method.name=next_token"]), tmp_path / "r2",
                 show_progress=False, report=False)


# ------------------------------------------------------------------ pretraining streamed


def test_image_pretraining_streams_resumes_and_probes(sources, tmp_path):
    out = tmp_path / "pets"
    shard(sources / "pets", out, "--shard-items", "4", "data.image_size=16")
    assert main(["pretrain", f"data.source={out}", *IMAGE_RUN, "data.workers=2", "train.eval_every=2",
                 "--out", str(tmp_path / "run")]) == 0
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and "knn_acc" in rows[-1]
    assert main(["probe", str(tmp_path / "run"), "--fractions", "1.0"]) == 0  # both splits loaded in memory
    # a streamed run interrupted and resumed ends where an uninterrupted one does
    cfg = [f"data.source={out}", *IMAGE_RUN, "data.workers=0"]
    whole = pretrain(load_config(None, cfg), tmp_path / "whole", show_progress=False, report=False)
    pretrain(load_config(None, cfg), tmp_path / "parts", stop_after=2, show_progress=False, report=False)
    resumed = pretrain(None, tmp_path / "parts", resume=True, show_progress=False, report=False)
    assert resumed.fit.last_row["loss"] == whole.fit.last_row["loss"]


def test_fitted_targets_come_from_the_first_training_images(sources, tmp_path):
    out = tmp_path / "pets"
    shard(sources / "pets", out, "--shard-items", "4", "data.image_size=16")
    run = pretrain(load_config(None, [f"data.source={out}", *IMAGE_RUN, "method.name=colorize", "train.steps=2",
                                      "data.workers=0", "method.fit_max_images=64"]),
                   tmp_path / "run", show_progress=False, report=False)
    assert run.fit.steps == 2 and (tmp_path / "run" / "encoder.json").is_file()


def test_text_pretraining_streams(sources, tmp_path):
    out = tmp_path / "docs"
    shard(sources / "docs.jsonl", out, "--modality", "text", "--shard-items", "8", "tokenizer.vocab_size=200",
          "tokenizer.min_frequency=1")
    run = tmp_path / "run"
    assert main(["pretrain", f"data.source={out}", *TEXT_RUN, "data.workers=2", "--out", str(run)]) == 0
    assert (run / "tokenizer.json").read_text() == TextTokenizer.load(out / "tokenizer.json")._tokenizer.to_str(pretty=True)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and "heldout_ppl" in rows[-1]


def test_audio_pretraining_streams(sources, tmp_path):
    out = tmp_path / "tones"
    shard(sources / "tones", out, "--modality", "audio", "--shard-items", "4")
    run = tmp_path / "run"
    assert main(["pretrain", "method.name=wav2vec2", f"data.source={out}", *AUDIO_RUN, "train.steps=2",
                 "data.workers=2", "--out", str(run)]) == 0
    meta = json.loads((run / "encoder.json").read_text())
    assert meta["preprocess"]["modality"] == "audio" and meta["data"] == str(out)
    hubert = pretrain(load_config(None, ["method.name=hubert", f"data.source={out}", *AUDIO_RUN, "train.steps=1",
                                         "data.workers=0", "method.fit_max_frames=500"]),
                      tmp_path / "hubert", show_progress=False, report=False)
    assert hubert.fit.steps == 1


def test_clip_pretraining_streams_image_text_shards_resumes_and_probes(sources, tmp_path):
    out = tmp_path / "pairs"
    shard(sources / "pairs" / "pairs.csv", out, *PAIR_SHARD)
    run = tmp_path / "run"
    assert main(["pretrain", f"data.source={out}", *CLIP_RUN, "data.workers=2", "train.eval_every=2",
                 "--out", str(run)]) == 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and "heldout_i2t_r1" in rows[-1]  # the retrieval monitor on the held-out pairs
    shard_tokenizer = TextTokenizer.load(out / "tokenizer.json")._tokenizer.to_str(pretty=True)
    assert (run / "tokenizer.json").read_text() == (run / "towers" / "text" / "tokenizer.json").read_text() \
        == shard_tokenizer
    assert main(["probe", str(run), "--tower", "image", "--fractions", "1.0"]) == 0  # both splits loaded in memory
    # a streamed run interrupted mid-epoch (2 steps per epoch) and resumed ends where an uninterrupted one does
    cfg = [f"data.source={out}", *CLIP_RUN, "data.workers=0", "train.checkpoint_every=1"]
    whole = pretrain(load_config(None, cfg), tmp_path / "whole", show_progress=False, report=False)
    pretrain(load_config(None, cfg), tmp_path / "parts", stop_after=3, show_progress=False, report=False)
    resumed = pretrain(None, tmp_path / "parts", resume=True, show_progress=False, report=False)
    assert resumed.fit.last_row["loss"] == whole.fit.last_row["loss"]
    # captions are text: a run may read them with its own tokenizer.path instead of the folder's
    own = train_tokenizer(["a warm picture", "a cool picture"] * 4, "bpe", 280, 1)
    own.save(tmp_path / "own.json")
    pretrain(load_config(None, [*cfg, f"tokenizer.path={tmp_path / 'own.json'}", "train.steps=1"]), tmp_path / "own",
             show_progress=False, report=False)
    assert TextTokenizer.load(tmp_path / "own" / "tokenizer.json").vocab_size == own.vocab_size != \
        TextTokenizer.load(out / "tokenizer.json").vocab_size


def test_streamed_pair_batches_are_the_in_memory_ones(sources, tmp_path):
    """A collated micro-batch from the shards and the same rows held in memory give the same batch
    (views, drawn captions, token ids, masks, labels) under the same step generator."""
    from selfsup.data.stream import stream_from_parts
    from selfsup.methods import method_spec
    from selfsup.modalities.image_text import PairBatches
    from selfsup.train.runtime import Runtime

    out = tmp_path / "pairs"
    shard(sources / "pairs" / "pairs.csv", out, *PAIR_SHARD)
    cfg = load_config(None, [f"data.source={out}", *CLIP_RUN, "data.workers=0"])
    train, holdout = load_splits(cfg, progress=False, stream=True)
    (tmp_path / "run").mkdir()
    cpu = Runtime(torch.device("cpu"), None)
    streamed = MODALITIES["image_text"].assemble(cfg, tmp_path / "run", cpu, train, holdout, method_spec("clip")).batches
    memory = MODALITIES["image_text"].load_shards(cfg, load_index(out), "train", progress=False)
    in_memory = PairBatches(memory, streamed.views, streamed.tokenizer, streamed.seq_len, cpu.device)
    stream = stream_from_parts(streamed.stream_parts, seed=0, rank=0, world_size=1, micro_batch=4, accum_steps=1)
    for step in range(3):
        collated = stream.next()
        rows = torch.tensor([memory.ids.index(id) for id in collated[1]])
        a = streamed(collated, torch.Generator().manual_seed(step))
        b = in_memory(rows, torch.Generator().manual_seed(step))
        assert a["id"] == b["id"] and torch.equal(a["views"][0], b["views"][0]) and torch.equal(a["caption"], b["caption"])
        for key in ("input_ids", "attention_mask", "label"):
            assert torch.equal(a[key], b[key]), key
        assert "index" not in a and torch.equal(b["index"], rows)
