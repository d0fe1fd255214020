"""The "glyphs" built-in: rendering, the cache, loading, the CLI (its inputs: test_glyph_sources.py).

Rendering tests use three small real fonts (Armenian in Sans and Serif, Gunjala Gondi in Sans, ~300
glyphs, well under a second) linked into a private font folder; they are skipped where the Debian
packages are not installed.
"""

from __future__ import annotations

import csv
import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from selfsup import cli
from selfsup.data import builtins
from selfsup.data.builtins import glyph_sources
from selfsup.data.builtins import BUILTIN, builtin_available
from selfsup.data.builtins.glyph_sources import GlyphRenderer, parse_scripts
from selfsup.data.builtins.glyphs import MANIFEST, MANIFEST_COLUMNS, PIXELS, STAMP, prepare_glyphs
from selfsup.data.images import load_image_source
from selfsup.errors import SelfsupError

TEST_FONTS = ("NotoSansArmenian-Regular.ttf", "NotoSerifArmenian-Regular.ttf", "NotoSansGunjalaGondi-Regular.ttf")
GUNJALA_VIRAMA = 0x11D97  # in NotoSansGunjalaGondi's cmap, but its glyph leaves no ink on its own


def _system_inputs() -> tuple[bool, str]:
    try:
        scripts = glyph_sources.find_scripts_file()
    except SelfsupError as err:
        return False, str(err)
    missing = [name for name in TEST_FONTS if not (glyph_sources.DEFAULT_FONT_DIR / name).is_file()]
    if missing:
        return False, (f"fonts-noto-core is not installed ({', '.join(missing)} missing): "
                       f"{glyph_sources.INSTALL_COMMAND}")
    return True, str(scripts)


HAVE_FONTS, WHY_NOT = _system_inputs()
needs_fonts = pytest.mark.skipif(not HAVE_FONTS, reason=f"Noto fonts / Scripts.txt unavailable: {WHY_NOT}")


@pytest.fixture(autouse=True)
def private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Never touch the user's real cache (or a real prepared glyphs set) from a test."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("SELFSUP_CACHE", str(cache))
    return cache


@pytest.fixture
def font_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "fonts"
    folder.mkdir()
    for name in TEST_FONTS:
        (folder / name).symlink_to(glyph_sources.DEFAULT_FONT_DIR / name)
    return folder


def _manifest(out: Path) -> list[dict[str, str]]:
    with open(out / MANIFEST, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def _cmap(name: str) -> dict[int, str]:
    from fontTools.ttLib import TTFont

    with TTFont(glyph_sources.DEFAULT_FONT_DIR / name, lazy=True) as font:
        return font.getBestCmap()


def _tree_digest(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != STAMP}


# ---------------------------------------------------------------------------------------------
# No fonts needed


def test_glyphs_is_registered_and_preparable() -> None:
    assert "glyphs" in BUILTIN and "prepare glyphs" in BUILTIN["glyphs"]
    assert cli.PREPARABLE == builtins.PREPARABLE == ("glyphs", "emoji", "manpages", "klettres", "espeak")  # the CLI keeps its own copy to parse fast


def test_bad_settings_are_refused(font_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(SelfsupError, match="--size"):
        prepare_glyphs(tmp_path / "out", size=4, font_dir=font_dir)
    with pytest.raises(SelfsupError, match="--max-per-script must be an integer >= --min-per-script"):
        prepare_glyphs(tmp_path / "out", min_per_script=50, max_per_script=10, font_dir=font_dir)


def test_missing_fonts_say_what_to_install(tmp_path: Path) -> None:
    empty = tmp_path / "no-fonts"
    empty.mkdir()
    with pytest.raises(SelfsupError, match="apt-get install fonts-noto-core unicode-data") as err:
        prepare_glyphs(tmp_path / "out", font_dir=empty)
    assert str(empty) in str(err.value)
    with pytest.raises(SelfsupError, match="apt-get install fonts-noto-core unicode-data"):
        prepare_glyphs(tmp_path / "out", font_dir=tmp_path / "does-not-exist")
    with pytest.raises(SelfsupError, match="apt-get install fonts-noto-core unicode-data"):
        glyph_sources.find_scripts_file(tmp_path / "Scripts.txt")
    assert not (tmp_path / "out").exists()


def test_uninstalled_packages_say_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(glyph_sources, "_dpkg_files", lambda package: [])  # dpkg present, packages not
    with pytest.raises(SelfsupError, match="fonts-noto-core is not installed.*apt-get install fonts-noto-core unicode-data"):
        glyph_sources.find_fonts()
    with pytest.raises(SelfsupError, match="unicode-data is not installed.*apt-get install fonts-noto-core unicode-data"):
        glyph_sources.find_scripts_file()
    available, reason = builtin_available("glyphs")
    assert not available and "apt-get install fonts-noto-core unicode-data" in reason
    assert "selfsup data prepare glyphs" in reason


def test_unprepared_glyphs_say_how_to_prepare() -> None:
    with pytest.raises(SelfsupError, match="not prepared.*selfsup data prepare glyphs"):
        load_image_source("glyphs", image_size=32)


def test_cli_prepare_reports_missing_fonts(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    empty = tmp_path / "no-fonts"
    empty.mkdir()
    assert cli.main(["data", "prepare", "glyphs", "--out", str(tmp_path / "out"), "--font-dir", str(empty)]) == 2
    assert "apt-get install fonts-noto-core unicode-data" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["data", "prepare", "cifar10"])  # only preparable names parse


# ---------------------------------------------------------------------------------------------
# With the fonts


@needs_fonts
def test_manifest_labels_families_and_images(font_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "glyphs"
    summary = prepare_glyphs(out, size=32, min_per_script=10, font_dir=font_dir)
    rows = _manifest(out)
    assert list(rows[0]) == list(MANIFEST_COLUMNS)
    assert summary.num_images == len(rows) and not summary.reused
    assert summary.script_counts == {"Armenian": 192, "Gunjala_Gondi": 62}

    table = parse_scripts(glyph_sources.find_scripts_file())
    for row in rows:
        codepoint = int(row["codepoint"].removeprefix("U+"), 16)
        assert row["label"] == table.script_of(codepoint)
        assert row["family"] == ("Serif" if row["font"].startswith("NotoSerif") else "Sans")
        assert row["path"].startswith(f"{row['label']}/")
    families = {(row["label"], row["family"]) for row in rows}
    assert families == {("Armenian", "Sans"), ("Armenian", "Serif"), ("Gunjala_Gondi", "Sans")}
    assert summary.family_counts == {"Sans": 96 + 62, "Serif": 96}

    # every Armenian-script code point of the Sans font is there, none of its Common/Inherited ones
    armenian_sans = {int(row["codepoint"][2:], 16) for row in rows if row["font"] == TEST_FONTS[0]}
    expected = {cp for cp in _cmap(TEST_FONTS[0]) if table.script_of(cp) == "Armenian"}
    assert armenian_sans == expected

    for row in rows[::17]:
        with Image.open(out / row["path"]) as im:
            assert im.mode == "L" and im.size == (32, 32)
            pixels = np.asarray(im)
        assert pixels.min() < 128 and (pixels[0] == 255).all() and (pixels[-1] == 255).all()  # ink, white margin
        ink_rows, ink_cols = np.nonzero(pixels < 255)
        extent = max(np.ptp(ink_rows), np.ptp(ink_cols)) + 1
        assert 27 <= extent <= 30  # scaled to fit the 28 px box (antialiasing may add a faint pixel each side)


@needs_fonts
def test_blank_glyphs_and_whitespace_are_skipped(font_dir: Path, tmp_path: Path) -> None:
    assert GUNJALA_VIRAMA in _cmap(TEST_FONTS[2])
    assert GlyphRenderer(font_dir / TEST_FONTS[2], 32).render(GUNJALA_VIRAMA) is None
    summary = prepare_glyphs(tmp_path / "a", min_per_script=10, font_dir=font_dir)
    codepoints = {row["codepoint"] for row in _manifest(tmp_path / "a")}
    assert f"U+{GUNJALA_VIRAMA:04X}" not in codepoints and summary.num_blank >= 1

    # with a table that calls the controls, the space and the hyphen "Latin", only the hyphen is drawn
    scripts = tmp_path / "Scripts.txt"
    scripts.write_text("0000..001F ; Latin\n0020 ; Latin\n002D ; Latin\n00A0 ; Latin\n")
    prepare_glyphs(tmp_path / "b", min_per_script=1, font_dir=font_dir, scripts_file=scripts)
    rows = _manifest(tmp_path / "b")
    assert {row["codepoint"] for row in rows} == {"U+002D"} and len(rows) == len(TEST_FONTS)


@needs_fonts
def test_two_builds_are_identical(font_dir: Path, tmp_path: Path) -> None:
    prepare_glyphs(tmp_path / "a", min_per_script=10, font_dir=font_dir)
    prepare_glyphs(tmp_path / "b", min_per_script=10, font_dir=font_dir)
    assert (tmp_path / "a" / MANIFEST).read_bytes() == (tmp_path / "b" / MANIFEST).read_bytes()
    assert _tree_digest(tmp_path / "a") == _tree_digest(tmp_path / "b")
    rows = _manifest(tmp_path / "a")
    order = [(row["font"], int(row["codepoint"][2:], 16)) for row in rows]
    assert order == sorted(order)


@needs_fonts
def test_rerun_is_a_no_op_and_new_settings_rebuild(font_dir: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "glyphs"
    first = prepare_glyphs(out, min_per_script=10, font_dir=font_dir)
    manifest_mtime = (out / MANIFEST).stat().st_mtime_ns

    def no_render(self: GlyphRenderer, codepoint: int) -> None:
        raise AssertionError("an unchanged build should not render again")

    with monkeypatch.context() as patch:
        patch.setattr(GlyphRenderer, "render", no_render)
        again = prepare_glyphs(out, min_per_script=10, font_dir=font_dir)
    assert again.reused and "already prepared" in again.describe()
    assert again.num_images == first.num_images and again.script_counts == first.script_counts
    assert (out / MANIFEST).stat().st_mtime_ns == manifest_mtime

    capped = prepare_glyphs(out, min_per_script=10, max_per_script=20, font_dir=font_dir)
    assert not capped.reused and capped.script_counts == {"Armenian": 20, "Gunjala_Gondi": 20}
    rows = _manifest(out)
    assert len(rows) == 40 and {row["family"] for row in rows if row["label"] == "Armenian"} == {"Sans", "Serif"}
    assert len(list(out.rglob("*.png"))) == 40  # the old build was replaced, not merged
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fonts", "glyphs"]  # no temporary folder left

    forced = prepare_glyphs(out, min_per_script=10, max_per_script=20, font_dir=font_dir, force=True)
    assert not forced.reused

    dropped = prepare_glyphs(out, min_per_script=100, font_dir=font_dir)
    assert dropped.script_counts == {"Armenian": 192} and dropped.dropped_scripts == {"Gunjala_Gondi": 62}


@needs_fonts
def test_never_replaces_a_folder_it_did_not_write(font_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(SelfsupError, match="not a glyphs dataset"):
        prepare_glyphs(out, min_per_script=10, font_dir=font_dir)
    assert (out / "notes.txt").read_text() == "keep me"


@needs_fonts
def test_force_never_deletes_files_added_to_a_prepared_dataset(font_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "glyphs"
    prepare_glyphs(out, min_per_script=10, font_dir=font_dir)
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(SelfsupError, match="notes.txt"):
        prepare_glyphs(out, min_per_script=10, font_dir=font_dir, force=True)
    assert (out / "notes.txt").read_text() == "keep me"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "no build left behind"


@needs_fonts
def test_loads_through_load_image_source(font_dir: Path, private_cache: Path) -> None:
    summary = prepare_glyphs(min_per_script=10, font_dir=font_dir)  # the default place: the cache
    assert summary.out == private_cache / "glyphs"
    available, reason = builtin_available("glyphs")
    assert available and f"{summary.num_images} images" in reason

    data = load_image_source("glyphs", image_size=16, channels=1)
    assert data.images.shape == (summary.num_images, 1, 16, 16) and data.source == "builtin:glyphs"
    assert data.classes == ["Armenian", "Gunjala_Gondi"]
    assert torch.bincount(data.labels).tolist() == [192, 62]
    assert sorted(set(data.groups["family"])) == ["Sans", "Serif"]

    # the fast path (pixels.npz) gives what the manifest gives when read as any other manifest
    manifest = load_image_source(str(summary.out / MANIFEST), image_size=16, channels=1, group_columns=["family"])
    assert data.ids == manifest.ids and data.classes == manifest.classes and data.groups == manifest.groups
    assert torch.equal(data.labels, manifest.labels)
    assert (data.images.int() - manifest.images.int()).abs().max() <= 1  # resize rounding only
    native = load_image_source("glyphs", image_size=32, channels=1)
    assert torch.equal(native.images, load_image_source(str(summary.out / MANIFEST), 32, 1).images)

    (summary.out / PIXELS).write_bytes(b"PK\x03\x04 half a zip")  # a broken pixel file falls back to the PNGs
    fallback = load_image_source("glyphs", image_size=32, channels=1)
    assert torch.equal(fallback.images, native.images) and fallback.source == "builtin:glyphs"


@needs_fonts
def test_cli_prepare_then_list(font_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["data", "prepare", "glyphs", "--font-dir", str(font_dir), "--min-per-script", "10", "--size", "24"]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "prepared 254 glyph images of 2 scripts" in printed and "Sans 158, Serif 96" in printed
    assert cli.main(argv) == 0
    assert "already prepared" in capsys.readouterr().out
    assert cli.main(["data", "list"]) == 0
    listing = [line for line in capsys.readouterr().out.splitlines() if line.startswith("glyphs")]
    assert len(listing) == 1 and "available" in listing[0]
    with Image.open(next((tmp_path / "cache" / "glyphs" / "Armenian").iterdir())) as im:
        assert im.size == (24, 24)


@needs_fonts
def test_too_high_a_minimum_names_the_largest_script(font_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(SelfsupError, match=r"the largest, Armenian, has 192\); lower --min-per-script"):
        prepare_glyphs(tmp_path / "out", min_per_script=500, font_dir=font_dir)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fonts"]
