"""The "emoji" built-in: parsing emoji-test.txt, drawing with Noto Color Emoji, the cache, loading, the CLI.

Parsing tests read a hand-written excerpt of emoji-test.txt. Drawing tests render that excerpt (17
emoji, well under a second) with the real font; they are skipped where fonts-noto-color-emoji is not
installed or Pillow lacks libraqm.
"""

from __future__ import annotations

import csv
import hashlib
import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, features

from selfsup import cli
from selfsup.data import builtins
from selfsup.data.builtins import emoji
from selfsup.data.builtins import BUILTIN, builtin_available, load_builtin
from selfsup.data.builtins.emoji import (MANIFEST, MANIFEST_COLUMNS, PIXELS, EmojiRenderer, parse_emoji_test,
                                prepare_emoji, skin_tone_of)
from selfsup.data.images import load_image_source
from selfsup.errors import SelfsupError

# Lines copied from emoji-test.txt 15.0, plus two the font cannot draw (marked "not in the font").
EXCERPT = """\
# emoji-test.txt (excerpt)
# Version: 15.0

# group: Smileys & Emotion

# subgroup: face-smiling
1F600                                                  ; fully-qualified     # 😀 E1.0 grinning face
1F923                                                  ; fully-qualified     # 🤣 E3.0 rolling on the floor laughing

# subgroup: face-affection
263A FE0F                                              ; fully-qualified     # ☺️ E0.6 smiling face
263A                                                   ; unqualified         # ☺ E0.6 smiling face

# group: People & Body

# subgroup: hand-fingers-open
1F44B                                                  ; fully-qualified     # 👋 E0.6 waving hand
1F44B 1F3FB                                            ; fully-qualified     # 👋🏻 E1.0 waving hand: light skin tone
1F44B 1F3FD                                            ; fully-qualified     # 👋🏽 E1.0 waving hand: medium skin tone
1F44B 1F3FF                                            ; fully-qualified     # 👋🏿 E1.0 waving hand: dark skin tone

# subgroup: family
1F9D1 1F3FB 200D 1F91D 200D 1F9D1 1F3FB                ; fully-qualified     # 🧑🏻‍🤝‍🧑🏻 E12.0 people holding hands: light skin tone
1F9D1 1F3FC 200D 1F91D 200D 1F9D1 1F3FE                ; fully-qualified     # 🧑🏼‍🤝‍🧑🏾 E12.1 people holding hands: medium-light skin tone, medium-dark skin tone
1F468 200D 1F469 200D 1F466                            ; fully-qualified     # 👨‍👩‍👦 E2.0 family: man, woman, boy

# subgroup: person-gesture
1F646 1F3FE 200D 2642 FE0F                             ; fully-qualified     # 🙆🏾‍♂️ E4.0 man gesturing OK: medium-dark skin tone
1F646 1F3FE 200D 2642                                  ; minimally-qualified # 🙆🏾‍♂ E4.0 man gesturing OK: medium-dark skin tone

# group: Component

# subgroup: skin-tone
1F3FB                                                  ; component           # 🏻 E1.0 light skin tone

# group: Animals & Nature

# subgroup: animal-mammal
1F42E                                                  ; fully-qualified     # 🐮 E0.6 cow face

# group: Symbols

# subgroup: keycap
0023 FE0F 20E3                                         ; fully-qualified     # #️⃣ E0.6 keycap: #
0023 20E3                                              ; unqualified         # #⃣ E0.6 keycap: #

# subgroup: not-in-the-font
0041                                                   ; fully-qualified     # A E0.0 latin capital a
1F600 1F3FB                                            ; fully-qualified     # 😀🏻 E0.0 grinning face: light skin tone

# group: Flags

# subgroup: country-flag
1F1FA 1F1F8                                            ; fully-qualified     # 🇺🇸 E0.6 flag: United States

# subgroup: subdivision-flag
1F3F4 E0067 E0062 E0073 E0063 E0074 E007F              ; fully-qualified     # 🏴󠁧󠁢󠁳󠁣󠁴󠁿 E5.0 flag: Scotland
"""
NUM_FULLY_QUALIFIED = 17
NUM_DRAWN = 15  # all but the two "not-in-the-font" lines
GROUP_COUNTS = {"Smileys & Emotion": 3, "People & Body": 8, "Animals & Nature": 1, "Symbols": 1, "Flags": 2}
SKIN_TONE_COUNTS = {"none": 9, "light": 2, "medium": 1, "medium-dark": 1, "dark": 1, "mixed": 1}


def _system_font() -> tuple[bool, str]:
    if not features.check("raqm"):
        return False, "this Pillow has no libraqm, which emoji sequences need"
    try:
        return True, str(emoji.find_font())
    except SelfsupError as err:
        return False, str(err)


HAVE_FONT, WHY_NOT = _system_font()
needs_font = pytest.mark.skipif(not HAVE_FONT, reason=f"Noto Color Emoji unavailable: {WHY_NOT}")


@pytest.fixture(autouse=True)
def private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Never touch the user's real cache (or a real prepared emoji set) from a test."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("SELFSUP_CACHE", str(cache))
    return cache


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    """cli.main points the selfsup logger at the captured stderr, which pytest closes after the test."""
    logger = logging.getLogger("selfsup")
    saved = (logger.handlers[:], logger.level, logger.propagate)
    yield
    logger.handlers[:], logger.level, logger.propagate = saved[0], saved[1], saved[2]


@pytest.fixture
def excerpt(tmp_path: Path) -> Path:
    path = tmp_path / "emoji-test.txt"
    path.write_text(EXCERPT, encoding="utf-8")
    return path


def _manifest(out: Path) -> list[dict[str, str]]:
    with open(out / MANIFEST, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


# ---------------------------------------------------------------------------------------------
# No font needed


def test_emoji_is_registered_and_preparable() -> None:
    assert "emoji" in BUILTIN and "prepare emoji" in BUILTIN["emoji"]
    assert "emoji" in builtins.PREPARABLE and cli.PREPARABLE == builtins.PREPARABLE


def test_parse_groups_subgroups_status_and_skin_tones(excerpt: Path) -> None:
    entries = parse_emoji_test(excerpt)
    assert len(entries) == 21  # 17 fully-qualified, 2 unqualified, 1 minimally, 1 component
    by_id = {(entry.id, entry.status): entry for entry in entries}
    wave = by_id["1F44B-1F3FD", "fully-qualified"]
    assert (wave.group, wave.subgroup, wave.name, wave.version) == ("People & Body", "hand-fingers-open",
                                                                     "waving hand: medium skin tone", "1.0")
    assert wave.text == "\U0001F44B\U0001F3FD" and wave.skin_tone == "medium" and wave.line_number == 19
    assert by_id["263A", "unqualified"].subgroup == "face-affection"
    assert by_id["1F3FB", "component"].group == "Component"
    assert by_id["1F646-1F3FE-200D-2642", "minimally-qualified"].skin_tone == "medium-dark"
    assert by_id["0023-FE0F-20E3", "fully-qualified"].name == "keycap: #"
    assert by_id["1F1FA-1F1F8", "fully-qualified"].group == "Flags"

    fully = [entry for entry in entries if entry.status == "fully-qualified"]
    assert len(fully) == NUM_FULLY_QUALIFIED
    tones = {entry.name: entry.skin_tone for entry in fully}
    assert tones["waving hand"] == "none" and tones["waving hand: dark skin tone"] == "dark"
    assert tones["people holding hands: light skin tone"] == "light"  # the same tone twice is that tone
    assert tones["people holding hands: medium-light skin tone, medium-dark skin tone"] == "mixed"
    assert tones["family: man, woman, boy"] == "none"
    assert [entry.line_number for entry in entries] == sorted(entry.line_number for entry in entries)


def test_skin_tone_of_each_modifier() -> None:
    assert [skin_tone_of([0x1F44B, modifier]) for modifier in range(0x1F3FB, 0x1F400)] == \
        ["light", "medium-light", "medium", "medium-dark", "dark"]
    assert skin_tone_of([0x1F600]) == "none"
    assert skin_tone_of([0x1F9D1, 0x1F3FB, 0x200D, 0x1F91D, 0x200D, 0x1F9D1, 0x1F3FF]) == "mixed"


def test_parse_errors_name_the_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.txt"
    bad.write_text("# group: Smileys & Emotion\n# subgroup: face-smiling\n1F600 fully-qualified # 😀 grinning\n",
                   encoding="utf-8")
    with pytest.raises(SelfsupError, match=r"bad.txt:3: expected"):
        parse_emoji_test(bad)
    headless = tmp_path / "headless.txt"
    headless.write_text("1F600 ; fully-qualified # 😀 E1.0 grinning face\n", encoding="utf-8")
    with pytest.raises(SelfsupError, match=r"headless.txt:1: an emoji before any '# group:'"):
        parse_emoji_test(headless)
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing here\n", encoding="utf-8")
    with pytest.raises(SelfsupError, match="no emoji lines found"):
        parse_emoji_test(empty)


def test_missing_font_names_the_package(tmp_path: Path, excerpt: Path) -> None:
    with pytest.raises(SelfsupError, match="apt-get install fonts-noto-color-emoji unicode-data") as err:
        prepare_emoji(tmp_path / "out", font_file=tmp_path / "NotoColorEmoji.ttf", emoji_test_file=excerpt)
    assert "NotoColorEmoji.ttf does not exist" in str(err.value)
    with pytest.raises(SelfsupError, match="apt-get install fonts-noto-color-emoji unicode-data"):
        emoji.find_emoji_test(tmp_path / "emoji-test.txt.missing")
    assert not (tmp_path / "out").exists()


def test_uninstalled_packages_say_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(emoji, "_dpkg_files", lambda package: [])  # dpkg present, packages not
    with pytest.raises(SelfsupError, match="fonts-noto-color-emoji is not installed.*"
                                           "apt-get install fonts-noto-color-emoji unicode-data"):
        prepare_emoji()
    with pytest.raises(SelfsupError, match="unicode-data is not installed"):
        emoji.find_emoji_test()
    available, reason = builtin_available("emoji")
    assert not available and "apt-get install fonts-noto-color-emoji unicode-data" in reason
    assert "selfsup data prepare emoji" in reason


def test_unprepared_emoji_say_how_to_prepare() -> None:
    with pytest.raises(SelfsupError, match="not prepared.*selfsup data prepare emoji"):
        load_image_source("emoji", image_size=32)


def test_cli_prepare_reports_missing_font(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(emoji, "_dpkg_files", lambda package: [])
    assert cli.main(["data", "prepare", "emoji"]) == 2
    assert "apt-get install fonts-noto-color-emoji unicode-data" in capsys.readouterr().err


def test_bad_settings_are_refused(tmp_path: Path, excerpt: Path) -> None:
    with pytest.raises(SelfsupError, match="--size"):
        prepare_emoji(tmp_path / "out", size=4, emoji_test_file=excerpt)
    with pytest.raises(SelfsupError, match="max_items"):
        prepare_emoji(tmp_path / "out", max_items=0, emoji_test_file=excerpt)


# ---------------------------------------------------------------------------------------------
# With the font


@needs_font
def test_renders_colour_emoji_with_labels_and_groups(tmp_path: Path, excerpt: Path) -> None:
    out = tmp_path / "emoji"
    summary = prepare_emoji(out, size=32, emoji_test_file=excerpt)
    assert not summary.reused and summary.num_listed == NUM_FULLY_QUALIFIED and summary.num_images == NUM_DRAWN
    assert summary.group_counts == GROUP_COUNTS and summary.skin_tone_counts == SKIN_TONE_COUNTS
    # the two the font cannot draw are skipped and named, never silently
    assert summary.skipped["blank"] == ["latin capital a (0041)"]
    assert summary.skipped["split"] == ["grinning face: light skin tone (1F600-1F3FB)"]
    assert summary.skipped["error"] == []
    text = summary.describe()
    assert "15 emoji images of 5 groups" in text and "2 skipped" in text and "latin capital a" in text

    rows = _manifest(out)
    assert list(rows[0]) == list(MANIFEST_COLUMNS) and len(rows) == NUM_DRAWN
    row = next(row for row in rows if row["id"] == "1F9D1-1F3FC-200D-1F91D-200D-1F9D1-1F3FE")
    assert row == {"path": "people-body/1F9D1-1F3FC-200D-1F91D-200D-1F9D1-1F3FE.png", "label": "People & Body",
                   "subgroup": "family", "skin_tone": "mixed", "id": row["id"], "version": "12.1",
                   "name": "people holding hands: medium-light skin tone, medium-dark skin tone"}
    assert [r["id"] for r in rows][:3] == ["1F600", "1F923", "263A-FE0F"]  # file order, fully-qualified only

    pixels = []
    for row in rows:
        with Image.open(out / row["path"]) as im:
            assert im.mode == "RGB" and im.size == (32, 32)
            x = np.asarray(im).astype(np.int16)
        pixels.append(x)
        border = np.concatenate([x[0], x[-1], x[:, 0], x[:, -1]])
        assert border.min() >= 200, row["name"]  # not clipped: a (near) white margin all round
        assert (x < 200).any()  # something drawn
        chroma = np.abs(x[..., 0] - x[..., 1]) + np.abs(x[..., 1] - x[..., 2])
        # colour, not greyscale (Noto draws the family sequences as grey silhouettes, by design)
        assert chroma.max() > 40 or row["subgroup"] == "family" and row["skin_tone"] == "none", row["name"]
    flat = np.stack(pixels).reshape(len(pixels), -1)
    assert len({p.tobytes() for p in flat}) == NUM_DRAWN  # all distinct
    # the skin tones really differ: the mean colour of the four waving hands are far apart
    hands = [pixels[i].reshape(-1, 3).mean(0) for i, r in enumerate(rows) if r["id"].startswith("1F44B")]
    assert len(hands) == 4
    assert min(np.abs(a - b).sum() for i, a in enumerate(hands) for b in hands[i + 1:]) > 5
    # drawn centred: the ink's bounding box is centred within a pixel or two
    ink = np.nonzero((pixels[0] < 250).any(axis=2))
    for axis in ink:
        assert abs((axis.min() + axis.max()) / 2 - 15.5) <= 1.5


@needs_font
def test_loads_through_load_image_source_and_load_builtin(excerpt: Path, private_cache: Path) -> None:
    summary = prepare_emoji(emoji_test_file=excerpt)  # the default place: the cache
    assert summary.out == private_cache / "emoji"
    available, reason = builtin_available("emoji")
    assert available and f"{NUM_DRAWN} images" in reason

    data = load_image_source("emoji", image_size=16)
    assert data.images.shape == (NUM_DRAWN, 3, 16, 16) and data.source == "builtin:emoji"
    assert data.classes == sorted(GROUP_COUNTS)
    assert {name: int(count) for name, count in zip(data.classes, torch.bincount(data.labels))} == GROUP_COUNTS
    assert set(data.groups) == {"subgroup", "skin_tone"}
    assert {tone: data.groups["skin_tone"].count(tone) for tone in SKIN_TONE_COUNTS} == SKIN_TONE_COUNTS
    assert "family" in data.groups["subgroup"] and not torch.equal(data.images[:, 0], data.images[:, 1])

    # the fast path (pixels.npz) gives what the manifest gives when read as any other manifest
    manifest = load_image_source(str(summary.out / MANIFEST), image_size=32,
                                 group_columns=["subgroup", "skin_tone"])
    native = load_builtin("emoji", image_size=32)
    assert native.ids == manifest.ids and native.classes == manifest.classes and native.groups == manifest.groups
    assert torch.equal(native.labels, manifest.labels) and torch.equal(native.images, manifest.images)

    (summary.out / PIXELS).write_bytes(b"PK\x03\x04 half a zip")  # a broken pixel file falls back to the PNGs
    fallback = load_builtin("emoji", image_size=32)
    assert torch.equal(fallback.images, native.images) and fallback.groups == native.groups
    assert fallback.source == "builtin:emoji"


@needs_font
def test_rerun_is_a_no_op_and_new_settings_rebuild(tmp_path: Path, excerpt: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "emoji"
    first = prepare_emoji(out, emoji_test_file=excerpt)
    manifest_mtime = (out / MANIFEST).stat().st_mtime_ns
    digest = hashlib.sha256((out / PIXELS).read_bytes()).hexdigest()

    def no_render(self: EmojiRenderer, text: str) -> None:
        raise AssertionError("an unchanged build should not render again")

    with monkeypatch.context() as patch:
        patch.setattr(EmojiRenderer, "render", no_render)
        again = prepare_emoji(out, emoji_test_file=excerpt)
    assert again.reused and "already prepared" in again.describe()
    assert (again.num_images, again.group_counts, again.skin_tone_counts, again.skipped) == \
        (first.num_images, first.group_counts, first.skin_tone_counts, first.skipped)
    assert (out / MANIFEST).stat().st_mtime_ns == manifest_mtime

    smaller = prepare_emoji(out, size=16, max_items=5, emoji_test_file=excerpt)
    assert not smaller.reused and smaller.num_listed == 5
    rows = _manifest(out)
    assert len(rows) == smaller.num_images and len(list(out.rglob("*.png"))) == len(rows)  # replaced, not merged
    with Image.open(out / rows[0]["path"]) as im:
        assert im.size == (16, 16)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["emoji", "emoji-test.txt"]  # no temporary folder left

    prepare_emoji(out, emoji_test_file=excerpt)
    assert hashlib.sha256((out / PIXELS).read_bytes()).hexdigest() == digest  # same inputs, same bytes
    assert not prepare_emoji(out, emoji_test_file=excerpt, force=True).reused


@needs_font
def test_a_rendering_error_is_counted_and_named(tmp_path: Path, excerpt: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_draw = EmojiRenderer._draw

    def failing_draw(self: EmojiRenderer, text: str) -> Image.Image:
        if text == "\U0001F42E":
            raise OSError("broken bitmap")
        return real_draw(self, text)

    monkeypatch.setattr(EmojiRenderer, "_draw", failing_draw)
    summary = prepare_emoji(tmp_path / "emoji", emoji_test_file=excerpt)
    assert summary.skipped["error"] == ["cow face (1F42E)"] and summary.num_images == NUM_DRAWN - 1
    assert "Animals & Nature" not in summary.group_counts
    assert "skipped 1 (Pillow failed to draw): cow face (1F42E)" in summary.describe()


@needs_font
def test_a_font_without_the_emoji_draws_nothing(tmp_path: Path, excerpt: Path) -> None:
    outline = Path("/usr/share/fonts/truetype/noto/NotoSans-Regular.ttf")
    if not outline.is_file():
        pytest.skip(f"{outline} (fonts-noto-core) is not installed")
    renderer = EmojiRenderer(outline, 32)
    assert renderer.render("\U0001F600") == (None, "blank")  # the font's missing-glyph box
    assert renderer.render("\U0001F44B\U0001F3FD") == (None, "split")  # two boxes, not one emoji
    only_emoji = tmp_path / "only-emoji.txt"
    only_emoji.write_text("\n".join(line for line in EXCERPT.splitlines() if "0041 " not in line), encoding="utf-8")
    with pytest.raises(SelfsupError, match="none of the 16 emoji .* could be drawn"):
        prepare_emoji(tmp_path / "out", font_file=outline, emoji_test_file=only_emoji)
    assert not (tmp_path / "out").exists()


@needs_font
def test_never_replaces_a_folder_it_did_not_write(tmp_path: Path, excerpt: Path) -> None:
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(SelfsupError, match="not an emoji dataset"):
        prepare_emoji(out, emoji_test_file=excerpt)
    assert (out / "notes.txt").read_text() == "keep me"


@needs_font
def test_cli_prepare_then_list(excerpt: Path, private_cache: Path, monkeypatch: pytest.MonkeyPatch,
                               capsys: pytest.CaptureFixture[str]) -> None:
    real_find = emoji.find_emoji_test
    monkeypatch.setattr(emoji, "find_emoji_test", lambda given=None: real_find(given or excerpt))
    assert cli.main(["data", "prepare", "emoji", "--size", "24"]) == 0
    printed = capsys.readouterr().out
    assert "prepared 15 emoji images of 5 groups" in printed and "mixed 1" in printed
    assert cli.main(["data", "prepare", "emoji", "--size", "24"]) == 0
    assert "already prepared" in capsys.readouterr().out
    assert cli.main(["data", "list"]) == 0
    listing = [line for line in capsys.readouterr().out.splitlines() if line.startswith("emoji")]
    assert len(listing) == 1 and "available" in listing[0]
    with Image.open(private_cache / "emoji" / "flags" / "1F1FA-1F1F8.png") as im:
        assert im.size == (24, 24) and im.mode == "RGB"
