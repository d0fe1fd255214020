"""Image–text pair sources (`data/pairs.py`): manifests with one or several captions per image, the
caption column's choice, errors naming file and line, path safety, bad files, and subset/join
keeping each image's captions beside it."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from selfsup.data.pairs import PairSet, load_pair_source
from selfsup.errors import SelfsupError


def write_image(path: Path, value: int, size: int = 6) -> None:
    """A flat RGB image of grey level `value`, so a decoded row says which file it came from."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size, size, 3), value, dtype=np.uint8)).save(path)


def write_csv(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    for i, value in enumerate((10, 60, 110, 160)):
        write_image(tmp_path / "img" / f"{i}.png", value)
    return tmp_path


def grey(data: PairSet) -> list[int]:
    """Each row's grey level (which image file it holds)."""
    return data.images[:, 0, 0, 0].tolist()


def test_repeated_image_rows_become_one_item_with_several_captions(folder):
    manifest = write_csv(folder / "pairs.csv", ["image", "caption", "label"], [
        ["img/0.png", "a dark square", "dark"],
        ["img/1.png", "a grey square", "light"],
        ["img/0.png", "black  tile ", "ignored: the first row labels"],
        ["./img/0.png", "the darkest one", "dark"],  # the same file, written another way
        ["img/2.png", "light grey", "light"],
    ])
    data = load_pair_source(manifest, image_size=4)
    assert data.ids == ["img/0.png", "img/1.png", "img/2.png"]
    assert data.captions == [("a dark square", "black tile", "the darkest one"), ("a grey square",), ("light grey",)]
    assert grey(data) == [10, 60, 110]
    assert data.images.shape == (3, 3, 4, 4) and data.images.dtype == torch.uint8
    assert data.classes == ["dark", "light"] and data.labels.tolist() == [0, 1, 1]
    assert data.texts == ["a dark square", "a grey square", "light grey"], "texts: each image's first caption"
    assert data.num_skipped == 0 and data.source == str(manifest)


def test_a_label_column_asked_for_by_name_must_exist(folder):
    """As for image, audio and text manifests: a mistyped data.label_column names itself and the columns."""
    manifest = write_csv(folder / "pairs.csv", ["image", "caption", "label"], [["img/0.png", "dark", "d"]])
    with pytest.raises(SelfsupError, match=r"pairs\.csv: no label column 'lable'.*image, caption, label"):
        load_pair_source(manifest, image_size=4, label_column="lable")


def test_jsonl_cell_may_hold_a_list_of_captions(folder):
    manifest = write_jsonl(folder / "pairs.jsonl", [
        {"path": "img/1.png", "text": ["one", "two"]},
        {"path": "img/3.png", "text": "three"},
        {"path": "img/1.png", "text": ["four"]},
    ])
    data = load_pair_source(manifest, image_size=4)
    assert data.ids == ["img/1.png", "img/3.png"] and grey(data) == [60, 160]
    assert data.captions == [("one", "two", "four"), ("three",)]
    assert data.texts == ["one", "three"] and data.labels is None


@pytest.mark.parametrize(("columns", "text_field", "chosen"), [
    (["image", "alt", "caption", "text"], "alt", "alt"),  # text_field first when the manifest has it
    (["image", "caption", "text"], "alt", "caption"),  # then caption
    (["image", "text"], "alt", "text"),  # then text
])
def test_caption_column_is_text_field_then_caption_then_text(folder, columns, text_field, chosen):
    rows = [{"image": "img/0.png", **{c: f"{c} words" for c in columns[1:]}}]
    data = load_pair_source(write_jsonl(folder / "pairs.jsonl", rows), image_size=4, text_field=text_field)
    assert data.captions == [(f"{chosen} words",)]


def test_missing_columns_are_listed(folder):
    manifest = write_csv(folder / "pairs.csv", ["file", "label"], [["img/0.png", "a"]])
    with pytest.raises(SelfsupError, match=r"pairs\.csv.*image column.*caption column.*columns are: file, label"):
        load_pair_source(manifest, image_size=4)
    manifest = write_csv(folder / "pairs.csv", ["image", "label"], [["img/0.png", "a"]])
    with pytest.raises(SelfsupError, match=r"caption.*columns are: image, label"):
        load_pair_source(manifest, image_size=4)


@pytest.mark.parametrize("caption", ["", "   "])
def test_an_empty_caption_names_file_and_line(folder, caption):
    manifest = write_csv(folder / "pairs.csv", ["image", "caption"],
                         [["img/0.png", "fine"], ["img/1.png", caption], ["img/2.png", "fine"]])
    with pytest.raises(SelfsupError, match=rf"{manifest}:3: empty `caption`"):
        load_pair_source(manifest, image_size=4)


def test_an_empty_or_malformed_caption_list_names_the_line(folder):
    manifest = write_jsonl(folder / "pairs.jsonl", [{"image": "img/0.png", "caption": "ok"},
                                                    {"image": "img/1.png", "caption": []}])
    with pytest.raises(SelfsupError, match=rf"{manifest}:2: .*empty list"):
        load_pair_source(manifest, image_size=4)
    write_jsonl(manifest, [{"image": "img/0.png", "caption": ["ok", 3]}])
    with pytest.raises(SelfsupError, match=rf"{manifest}:1: .*text or a list of texts, got int"):
        load_pair_source(manifest, image_size=4)


def test_a_manifest_without_rows_is_an_error(folder):
    manifest = write_csv(folder / "pairs.csv", ["image", "caption"], [])
    with pytest.raises(SelfsupError, match=r"pairs\.csv"):
        load_pair_source(manifest, image_size=4)


def test_paths_outside_the_manifest_folder_are_refused(folder):
    write_image(folder.parent / "outside.png", 200)
    for written in ("../outside.png", str(folder.parent / "outside.png")):
        manifest = write_csv(folder / "pairs.csv", ["image", "caption"], [["img/0.png", "in"], [written, "out"]])
        with pytest.raises(SelfsupError, match=r"pairs\.csv:3: path .*outside the manifest's folder"):
            load_pair_source(manifest, image_size=4)


def test_a_corrupt_image_is_named_and_can_be_skipped(folder, caplog):
    (folder / "img" / "bad.png").write_bytes(b"not a png at all")
    manifest = write_csv(folder / "pairs.csv", ["image", "caption", "label"], [
        ["img/0.png", "zero", "a"], ["img/bad.png", "broken", "b"], ["img/1.png", "one", "c"],
        ["img/bad.png", "broken again", "b"], ["img/2.png", "two", "a"], ["img/1.png", "uno", "c"],
    ])
    with pytest.raises(SelfsupError, match=r"bad\.png.*on_bad_file=skip"):
        load_pair_source(manifest, image_size=4)
    with caplog.at_level(logging.WARNING, logger="selfsup"):
        data = load_pair_source(manifest, image_size=4, on_bad="skip", max_bad_fraction=0.5)
    assert data.num_skipped == 1 and "bad.png" in caplog.text
    assert data.ids == ["img/0.png", "img/1.png", "img/2.png"] and grey(data) == [10, 60, 110]
    assert data.captions == [("zero",), ("one", "uno"), ("two",)], "captions stay with their images"
    assert data.classes == ["a", "c"] and data.labels.tolist() == [0, 1, 0]
    with pytest.raises(SelfsupError, match="max_bad_fraction"):
        load_pair_source(manifest, image_size=4, on_bad="skip", max_bad_fraction=0.1)


def test_bad_file_settings_are_checked():
    with pytest.raises(SelfsupError, match="on_bad_file"):
        load_pair_source("emoji", image_size=4, on_bad="ignore")
    with pytest.raises(SelfsupError, match="max_bad_fraction"):
        load_pair_source("emoji", image_size=4, max_bad_fraction=2.0)


def test_other_sources_are_refused_with_what_is_accepted(folder):
    with pytest.raises(SelfsupError, match=r"is a folder.*emoji.*\.csv/\.jsonl"):
        load_pair_source(folder, image_size=4)
    (folder / "notes.txt").write_text("x")
    with pytest.raises(SelfsupError, match=r"notes\.txt is a file"):
        load_pair_source(folder / "notes.txt", image_size=4)


def test_subset_and_join_keep_captions_with_their_images(folder):
    manifest = write_csv(folder / "pairs.csv", ["image", "caption", "label", "group"], [
        ["img/0.png", "zero", "a", "g0"], ["img/1.png", "one", "b", "g1"], ["img/0.png", "nought", "a", "x"],
        ["img/2.png", "two", "a", "g2"], ["img/3.png", "three", "b", "g3"], ["img/3.png", "trois", "b", "x"],
    ])
    data = load_pair_source(manifest, image_size=4)
    assert data.groups == {"group": ["g0", "g1", "g2", "g3"]}
    part = data.subset(torch.tensor([3, 0]))
    assert part.ids == ["img/3.png", "img/0.png"] and grey(part) == [160, 10]
    assert part.captions == [("three", "trois"), ("zero", "nought")] and part.texts == ["three", "zero"]
    assert part.labels.tolist() == [1, 0] and part.groups == {"group": ["g3", "g0"]}
    masked = data.subset(torch.tensor([False, True, True, False]))
    assert masked.ids == ["img/1.png", "img/2.png"] and masked.captions == [("one",), ("two",)]
    joined = PairSet.join(part, masked)
    assert joined.ids == ["img/3.png", "img/0.png", "img/1.png", "img/2.png"] and grey(joined) == [160, 10, 60, 110]
    assert joined.captions == [("three", "trois"), ("zero", "nought"), ("one",), ("two",)]
    assert joined.labels.tolist() == [1, 0, 1, 0] and joined.groups == {"group": ["g3", "g0", "g1", "g2"]}
    assert joined.texts == ["three", "zero", "one", "two"]


# -- the emoji built-in: CLDR names as captions (a private cache, the excerpt of test_emoji) ------


@pytest.fixture
def prepared_emoji(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    from selfsup.data.builtins.emoji import prepare_emoji
    from tests.data.builtins.test_emoji import EXCERPT, HAVE_FONT, WHY_NOT

    if not HAVE_FONT:
        pytest.skip(f"Noto Color Emoji unavailable: {WHY_NOT}")
    monkeypatch.setenv("SELFSUP_CACHE", str(tmp_path / "cache"))  # never the user's real cache
    (tmp_path / "emoji-test.txt").write_text(EXCERPT, encoding="utf-8")
    return prepare_emoji(emoji_test_file=tmp_path / "emoji-test.txt").out


def test_emoji_pairs_are_the_pictures_with_their_cldr_names(prepared_emoji):
    from selfsup.data.images import load_image_source

    images = load_image_source("emoji", image_size=16)
    data = load_pair_source("emoji", image_size=16)
    assert data.source == "builtin:emoji" and data.ids == images.ids and torch.equal(data.images, images.images)
    with open(prepared_emoji / "manifest.csv", newline="", encoding="utf-8") as fh:
        names = {row["path"]: row["name"] for row in csv.DictReader(fh)}
    assert data.captions == [(names[i],) for i in data.ids] and data.texts == [names[i] for i in data.ids]
    assert "waving hand: medium skin tone" in data.texts
    assert data.classes == images.classes and torch.equal(data.labels, images.labels)
    assert data.groups == images.groups
    by_subgroup = load_pair_source("emoji", image_size=16, label_column="subgroup")
    assert by_subgroup.classes == sorted(set(images.groups["subgroup"]))
    assert [by_subgroup.classes[i] for i in by_subgroup.labels] == images.groups["subgroup"]
    with pytest.raises(SelfsupError, match=r"no column 'nope'.*path, label, subgroup"):
        load_pair_source("emoji", image_size=16, label_column="nope")
    # a manifest edited by hand that loses a name says how to prepare it again
    text = (prepared_emoji / "manifest.csv").read_text(encoding="utf-8").replace(",grinning face,", ",,")
    (prepared_emoji / "manifest.csv").write_text(text, encoding="utf-8")
    with pytest.raises(SelfsupError, match=r"no name for smileys-emotion/1F600\.png.*prepare emoji --force"):
        load_pair_source("emoji", image_size=16)
