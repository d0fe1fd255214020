"""The klettres built-in: reading the package's sound lists, preparing (a sample, then all of it through
the CLI), reuse, loading. The package is required, never skipped: CI installs klettres-data, and
without it these tests fail with the command that installs it."""

from __future__ import annotations

import csv
import unicodedata
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch

from selfsup import cli
from selfsup.data import builtins
from selfsup.data.audio import load_audio_source
from selfsup.data.builtins import BUILTIN, builtin_available
from selfsup.data.builtins import klettres
from selfsup.data.builtins.klettres import (MANIFEST, MANIFEST_COLUMNS, PREPARE_COMMAND, STAMP, find_data_dir,
                                            klettres_dir, list_sounds, load_klettres, prepare_klettres, syllable_vowel)
from selfsup.data.images import load_image_source
from selfsup.errors import SelfsupError


@pytest.fixture(autouse=True)
def private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Never touch the user's real cache from a test."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("SELFSUP_CACHE", str(cache))
    return cache


@pytest.fixture(scope="module")
def data_dir() -> Path:
    """The package's folder; an error saying `apt-get install klettres-data` when it is missing."""
    return find_data_dir()


def test_registered_as_a_preparable_audio_builtin() -> None:
    assert "klettres" in BUILTIN and "prepare klettres" in BUILTIN["klettres"]
    assert "klettres" in builtins.PREPARABLE and cli.PREPARABLE == builtins.PREPARABLE
    with pytest.raises(SelfsupError, match="'klettres' is audio, not images"):
        load_image_source("klettres", image_size=32)


def test_not_prepared_says_what_to_run(private_cache: Path) -> None:
    assert klettres_dir() == private_cache / "klettres"
    with pytest.raises(SelfsupError, match=f"klettres dataset is not prepared .*{PREPARE_COMMAND}"):
        load_audio_source("klettres")
    available, reason = builtin_available("klettres")
    assert not available and PREPARE_COMMAND in reason


def test_a_missing_package_says_how_to_install(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(klettres, "_dpkg_files", lambda package: [])  # dpkg present, the package not
    with pytest.raises(SelfsupError, match="klettres-data is not installed.*apt-get install klettres-data"):
        prepare_klettres(tmp_path / "out")
    available, reason = builtin_available("klettres")
    assert not available and "apt-get install klettres-data" in reason and PREPARE_COMMAND in reason
    assert cli.main(["data", "prepare", "klettres"]) == 2
    assert "apt-get install klettres-data" in capsys.readouterr().err
    with pytest.raises(SelfsupError, match=r"holds no <language>/sounds\.xml.*apt-get install klettres-data"):
        prepare_klettres(tmp_path / "out", data_dir=tmp_path)
    assert not (tmp_path / "out").exists()


def test_bad_max_files_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SelfsupError, match="max_files"):
        prepare_klettres(tmp_path / "out", max_files=0)


# ---------------------------------------------------------------------------------------------
# The listing rules, on a package-shaped folder of our own


def _fake_package(root: Path) -> Path:
    rate = 44100
    t = np.arange(rate // 4) / rate
    tone = (0.3 * np.sin(2 * np.pi * 300 * t)).astype(np.float32)
    for name in ("xx/alpha/a.ogg", "xx/alpha/b.ogg", "xx/syllab/ba.ogg", "xx/syllab/extra.ogg", "yy/alpha/c-0.ogg"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        soundfile.write(root / name, np.stack([tone, tone / 2], axis=1), rate, format="OGG", subtype="VORBIS")
    soundfile.write(root / "yy/alpha/silent.wav", np.zeros(1000, np.float32), rate)
    decomposed = unicodedata.normalize("NFD", "É")
    (root / "xx/sounds.xml").write_text(f"""<klettres><language code="xx">
      <menuitem><label>Xx</label></menuitem>
      <alphabet>
        <sound name=" A " file="xx/alpha/a.ogg"/>
        <sound name="{decomposed}" file="xx/alpha/b.ogg"/>
        <sound name="Z" file="xx/alpha/gone.ogg"/>
      </alphabet>
      <syllables>
        <sound name="BA" file="xx/syllab/ba.ogg"/>
        <sound name="BE" file="xx/syllab/ba.ogg"/>
      </syllables></language></klettres>""", encoding="utf-8")
    (root / "yy/sounds.xml").write_text("""<klettres><language code="yy"><alphabet>
        <sound name="A" file="yy/alpha/c-0.ogg"/>
        <sound name="Q" file="yy/alpha/silent.wav"/>
        <sound name="X" file="../outside.ogg"/>
      </alphabet></language></klettres>""", encoding="utf-8")
    return root


def test_listing_follows_sounds_xml(tmp_path: Path) -> None:
    root = _fake_package(tmp_path / "pkg")
    listing = list_sounds(root)
    assert [(s.language, s.kind, s.label, s.original) for s in listing.sounds] == [
        ("xx", "letter", "A", "xx/alpha/a.ogg"), ("xx", "letter", "É", "xx/alpha/b.ogg"),
        ("xx", "syllable", "BA", "xx/syllab/ba.ogg"), ("yy", "letter", "A", "yy/alpha/c-0.ogg"),
        ("yy", "letter", "Q", "yy/alpha/silent.wav")]
    assert listing.sounds[1].label == unicodedata.normalize("NFC", "É")  # names are NFC
    assert listing.left_out["not shipped"] == ["xx/alpha/gone.ogg", "../outside.ogg"]
    assert listing.left_out["listed twice"] == ["xx/syllab/ba.ogg as 'BE'"]  # the first name is kept
    assert listing.left_out["not listed"] == ["xx/syllab/extra.ogg"]


def test_prepare_decodes_resamples_and_counts_what_is_left_out(tmp_path: Path) -> None:
    root = _fake_package(tmp_path / "pkg")
    out = tmp_path / "out"
    summary = prepare_klettres(out, data_dir=root)
    assert summary.num_clips == 4 and summary.language_counts == {"xx": 3, "yy": 1}
    assert summary.kind_counts == {"letter": 3, "syllable": 1} and summary.num_classes == 3
    assert len(summary.left_out["bad audio"]) == 1 and "yy/alpha/silent.wav (silent" in summary.left_out["bad audio"][0]
    text = summary.describe()
    assert "prepared 4 clips" in text and "left out 1 (bad audio)" in text and "left out 1 (listed twice)" in text
    with open(out / MANIFEST, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert tuple(rows[0]) == MANIFEST_COLUMNS
    assert [row["path"] for row in rows] == ["xx/alpha/a.wav", "xx/alpha/b.wav", "xx/syllab/ba.wav", "yy/alpha/c-0.wav"]
    info = soundfile.info(out / "xx" / "alpha" / "a.wav")
    assert (info.samplerate, info.channels, info.subtype, info.frames) == (16000, 1, "PCM_16", 4000)
    data = load_audio_source(out / MANIFEST, group_columns=["language", "kind"])
    assert data.classes == ["A", "BA", "É"] and data.labels.tolist() == [0, 2, 1, 0]
    assert data.groups == {"language": ["xx", "xx", "xx", "yy"], "kind": ["letter", "letter", "syllable", "letter"]}
    # the stereo tone (1 and 1/2) is averaged to mono at 3/4 of its amplitude
    assert float(data.waves[0].abs().max()) == pytest.approx(0.225, abs=0.01)


# ---------------------------------------------------------------------------------------------
# The real package (required)


def test_the_package_lists_its_sounds(data_dir: Path) -> None:
    listing = list_sounds(data_dir)
    sounds = listing.sounds
    languages = {s.language for s in sounds}
    assert len(sounds) >= 1700 and len(languages) >= 18 and {"fr", "de", "en", "ru", "ml"} <= languages
    assert {s.kind for s in sounds} == {"letter", "syllable"} and all(s.label for s in sounds)
    assert len({s.original for s in sounds}) == len(sounds)  # each recording once
    french = {s.original: s.label for s in sounds if s.language == "fr"}
    assert french["fr/alpha/a-0.ogg"] == "A" and french["fr/alpha/a-25.ogg"] == "Z"


def test_prepare_a_sample_then_reuse_and_load(data_dir: Path, private_cache: Path) -> None:
    summary = prepare_klettres(max_files=40)
    assert summary.out == private_cache / "klettres" and summary.num_clips == 40 and not summary.reused
    assert len(summary.language_counts) >= 10 and 40 < summary.seconds_of_audio < 200
    assert (private_cache / "klettres" / STAMP).is_file()
    again = prepare_klettres(max_files=40)
    assert again.reused and again.num_clips == 40 and "already prepared" in again.describe()
    assert not prepare_klettres(max_files=40, force=True).reused
    data = load_audio_source("klettres")
    assert len(data) == 40 and data.source == "builtin:klettres" and data.sample_rate == 16000
    assert set(data.groups) == {"language", "kind"} and data.labels is not None and (data.labels >= 0).all()
    assert all(w.dtype == torch.float32 and w.ndim == 1 and len(w) > 1000 for w in data.waves)
    assert all(0.01 < float(w.abs().max()) <= 1.0 for w in data.waves)  # quiet ones peak at 0.05
    by_language = load_audio_source("klettres", label_column="language")
    assert by_language.classes == sorted(set(data.groups["language"]))
    by_letter = load_audio_source("klettres", label_column="letter")  # syllables unlabelled, letters labelled
    is_letter = torch.tensor([kind == "letter" for kind in data.groups["kind"]])
    assert torch.equal(by_letter.labels >= 0, is_letter)
    by_vowel = load_audio_source("klettres", label_column="vowel")  # consonant-vowel syllables only
    assert set(by_vowel.classes or []) <= set("aeiou")
    assert all(kind == "syllable" for kind, y in zip(data.groups["kind"], by_vowel.labels) if y >= 0)
    with pytest.raises(SelfsupError, match="label_column=speaker.*label, letter, vowel, language, kind"):
        load_audio_source("klettres", label_column="speaker")
    at_8k = load_klettres(sample_rate=8000)
    assert all(abs(len(w8) - len(w) / 2) <= 1 for w8, w in zip(at_8k.waves, data.waves))
    assert builtin_available("klettres")[0]


def test_cli_prepares_all_of_it(data_dir: Path, private_cache: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["data", "prepare", "klettres"]) == 0
    printed = capsys.readouterr().out
    assert "prepared" in printed and "clips per language" in printed
    data = load_audio_source("klettres")
    assert len(data) >= 1700 and len(set(data.groups["language"])) >= 18
    assert len(data.classes) > 1000 and data.seconds() > 45 * 60
    assert cli.main(["data", "prepare", "klettres"]) == 0
    assert "already prepared" in capsys.readouterr().out


@pytest.mark.parametrize("label, vowel", [
    ("BA", "a"), ("MÁ", "a"), ("ŘE", "e"), ("MÃ", "a"), ("ДО", "o"), ("ЖИ", "i"), ("БІ", "i"), ("ДЫ", "i"),
    ("കീ", "i"), ("കാ", "a"), ("കൊ", "o"),
    # not a consonant-vowel syllable, or a vowel of another quality: unlabelled
    ("AD", ""), ("HAUS", ""), ("CH", ""), ("BÅ", ""), ("BÜ", ""), ("YA", ""), ("ЙО", ""), ("БЯ", ""),
    ("കൈ", ""), ("അ", ""), ("אב", ""), ("A", ""), ("", "")])
def test_syllable_vowel(label: str, vowel: str) -> None:
    assert syllable_vowel(label) == vowel
