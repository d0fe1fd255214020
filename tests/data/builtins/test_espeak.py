"""The espeak built-in: synthesis, the default 48 clips, reuse, loading, and the errors. espeak-ng is
required, never skipped: CI installs it, and without it these tests fail with the command that
installs it."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch

from selfsup import cli
from selfsup.data import builtins
from selfsup.data.audio import AudioBatches, load_audio_source
from selfsup.data.builtins import BUILTIN, builtin_available
from selfsup.data.builtins import espeak
from selfsup.data.builtins.espeak import (MANIFEST, PREPARE_COMMAND, SPEEDS, VOICES, WORDS, espeak_dir, find_espeak,
                                          prepare_espeak, synthesise)
from selfsup.errors import SelfsupError


@pytest.fixture(autouse=True)
def private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Never touch the user's real cache from a test."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("SELFSUP_CACHE", str(cache))
    return cache


@pytest.fixture(scope="module")
def program() -> str:
    """espeak-ng; an error saying `apt-get install espeak-ng` when it is missing."""
    return find_espeak()


def test_registered_as_a_preparable_audio_builtin() -> None:
    assert "espeak" in BUILTIN and "prepare espeak" in BUILTIN["espeak"]
    assert "espeak" in builtins.PREPARABLE and cli.PREPARABLE == builtins.PREPARABLE
    with pytest.raises(SelfsupError, match="'espeak' is audio, not images"):
        builtins.load_builtin("espeak", image_size=32)


def test_not_prepared_says_what_to_run(private_cache: Path) -> None:
    assert espeak_dir() == private_cache / "espeak"
    with pytest.raises(SelfsupError, match=f"espeak dataset is not prepared .*{PREPARE_COMMAND}"):
        load_audio_source("espeak")
    assert not builtin_available("espeak")[0]


def test_missing_espeak_says_how_to_install(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(espeak.shutil, "which", lambda name: None)
    with pytest.raises(SelfsupError, match="espeak-ng is not installed.*apt-get install espeak-ng"):
        prepare_espeak(tmp_path / "out")
    available, reason = builtin_available("espeak")
    assert not available and "apt-get install espeak-ng" in reason
    assert cli.main(["data", "prepare", "espeak"]) == 2
    assert "apt-get install espeak-ng" in capsys.readouterr().err


def test_bad_settings_are_refused(tmp_path: Path) -> None:
    for kw, match in [({"words": []}, "words must be a non-empty list"), ({"words": ["a", "a"]}, "without repeats"),
                      ({"words": ["two\nlines"]}, "printable text on one line"),
                      ({"voices": ["en us"]}, "espeak-ng voice name"), ({"speeds": [20]}, "words per minute")]:
        with pytest.raises(SelfsupError, match=match):
            prepare_espeak(tmp_path / "out", **kw)


def test_an_unknown_voice_is_named(program: str) -> None:
    with pytest.raises(SelfsupError, match=r"espeak-ng -v xx-nosuch -s 150 saying 'yes': .*espeak-ng --voices"):
        synthesise(program, "yes", "xx-nosuch", 150)


def test_synthesis_is_deterministic_speech_at_16k(program: str) -> None:
    first = synthesise(program, "left", "en-us", 140)
    assert first.dtype == np.float32 and first.ndim == 1 and 0.3 * 16000 < len(first) < 1.5 * 16000
    assert np.array_equal(first, synthesise(program, "left", "en-us", 140))
    faster = synthesise(program, "left", "en-us", 200)
    assert len(faster) < len(first)
    assert not np.array_equal(synthesise(program, "left", "en-us+f3", 140)[: len(faster)], first[: len(faster)])


def test_prepare_the_default_set_then_reuse_and_load(program: str, private_cache: Path) -> None:
    summary = prepare_espeak()
    assert summary.num_clips == len(WORDS) * len(VOICES) * len(SPEEDS) == 48 and not summary.reused
    assert summary.word_counts == {word: 8 for word in WORDS} and 20 < summary.seconds_of_audio < 60
    assert prepare_espeak().reused
    with open(private_cache / "espeak" / MANIFEST, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert rows[0] == {"path": "yes/en-us-140.wav", "label": "yes", "voice": "en-us", "speed": "140"}
    info = soundfile.info(private_cache / "espeak" / rows[0]["path"])
    assert (info.samplerate, info.channels, info.subtype) == (16000, 1, "PCM_16")

    data = load_audio_source("espeak")
    assert len(data) == 48 and data.source == "builtin:espeak" and sorted(data.classes) == sorted(WORDS)
    assert torch.bincount(data.labels).tolist() == [8] * 6
    assert sorted(set(data.groups["voice"])) == sorted(VOICES)
    assert sorted(set(data.groups["speed"])) == [str(s) for s in SPEEDS]
    batch = AudioBatches(data, 8000, torch.device("cpu"))(torch.arange(8), torch.Generator().manual_seed(0))
    assert batch["audio"].shape[0] == 8 and int(batch["lengths"].max()) <= 8000
    by_voice = load_audio_source("espeak", label_column="voice")
    assert sorted(by_voice.classes) == sorted(VOICES)
    assert builtin_available("espeak")[0]


def test_other_words_and_voices(program: str, tmp_path: Path) -> None:
    summary = prepare_espeak(tmp_path / "out", words=["bonjour", "merci"], voices=["fr"], speeds=[150])
    assert summary.num_clips == 2
    data = load_audio_source(tmp_path / "out" / MANIFEST, group_columns=["voice"])
    assert data.classes == ["bonjour", "merci"] and data.groups == {"voice": ["fr", "fr"]}


def test_cli_prepare(program: str, private_cache: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["data", "prepare", "espeak"]) == 0
    assert "prepared 48 clips" in capsys.readouterr().out
    assert cli.main(["data", "prepare", "espeak"]) == 0
    assert "already prepared" in capsys.readouterr().out
