"""The "espeak" built-in: a few spoken words synthesised by espeak-ng in several voices, for tests.

The speech pipeline needs an audio dataset that any CI machine builds in seconds from a Debian
package, with a label and a subgroup to audit: `prepare_espeak` has espeak-ng (the formant
synthesiser of the Debian package `espeak-ng`) say each word (the label) in each voice (the `voice`
group) at each speed in words per minute (the `speed` group). The default is six command words
("yes", "no", "up", "down", "left", "right", as in keyword spotting) x four English voices (US, British,
a female US variant, a Scottish female variant) x two speeds (140 and 200 words per minute) = 48
clips of 0.45 to 0.91 s, built in under a second.

Each clip is `espeak-ng --stdout -v VOICE -s SPEED` with the word on its standard input (22.05 kHz
16-bit WAV), checked like any decoded file (`audio.finish_wave`: no NaN, not silent) and resampled to
16 kHz with soxr. The output is written like the klettres built-in: 16-bit WAVs under <word>/,
`manifest.csv` (path, label, voice, speed) and the stamp `espeak.json` (settings, the espeak-ng
version, the decoder versions; preparing again with the same ones is a no-op), built beside the
cache folder and renamed into place. espeak-ng is deterministic, so two builds are identical.
"""

from __future__ import annotations

import io
import re
import shutil
import subprocess
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from selfsup.data.audio import AudioSet, finish_wave
from selfsup.data.builtins import cache_dir
from selfsup.data.builtins.prepared import (ProgressBar, build_into_place, debian_package_versions, is_fresh,
                                            load_prepared_audio, previous_stamp, read_stamp, write_wav)
from selfsup.data.decode import _BadFile
from selfsup.errors import SelfsupError

PACKAGES = ("espeak-ng", "espeak-ng-data")
INSTALL_COMMAND = "apt-get install espeak-ng"
PREPARE_COMMAND = "selfsup data prepare espeak"
MANIFEST = "manifest.csv"
STAMP = "espeak.json"
MANIFEST_COLUMNS = ("path", "label", "voice", "speed")
GROUP_COLUMNS = ("voice", "speed")
SAMPLE_RATE = 16000
WORDS = ("yes", "no", "up", "down", "left", "right")
# espeak-ng voice names: a language, optionally "+variant" (f1-f5 female, m1-m7 male, ...)
VOICES = ("en-us", "en-gb", "en-us+f3", "en-gb-scotland+f2")
SPEEDS = (140, 200)  # words per minute; espeak-ng's default is 175
# Bumped whenever the synthesis or the layout changes, so an old cache is rebuilt rather than mixed.
PREPARE_VERSION = 1
_TIMEOUT_S = 60


@dataclass
class EspeakSummary:
    """What a prepare did (or found already done)."""

    out: Path
    num_clips: int
    word_counts: dict[str, int]
    voices: list[str]
    speeds: list[int]
    seconds_of_audio: float
    seconds: float
    reused: bool = False

    def describe(self) -> str:
        """A line or two for the terminal."""
        size = (f"{self.num_clips} clips ({self.seconds_of_audio:.1f} s at {SAMPLE_RATE} Hz) of {len(self.word_counts)} "
                f"words x {len(self.voices)} voices x {len(self.speeds)} speeds")
        if self.reused:
            head = f"espeak already prepared with these settings in {self.out}: {size} (nothing to do; --force rebuilds)"
        else:
            head = f"prepared {size} in {self.out} in {self.seconds:.1f} s"
        return head + f"\n  words: {', '.join(self.word_counts)}; voices: {', '.join(self.voices)}; " \
                      f"speeds: {', '.join(map(str, self.speeds))} words/min"


def espeak_dir() -> Path:
    """The default output folder, which `load_audio_source("espeak")` reads."""
    return cache_dir() / "espeak"


def find_espeak() -> str:
    """The espeak-ng executable, or an error saying how to install it."""
    program = shutil.which("espeak-ng")
    if program is None:
        raise SelfsupError(f"espeak-ng is not installed (not found on PATH). The espeak dataset is synthesised by "
                           f"it; install it as root: {INSTALL_COMMAND}")
    return program


def _espeak_version(program: str) -> str:
    done = subprocess.run([program, "--version"], capture_output=True, text=True, timeout=_TIMEOUT_S)
    return done.stdout.split("Data at:")[0].strip()


def synthesise(program: str, word: str, voice: str, speed: int, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """float32 [T] at `sample_rate`: espeak-ng saying `word` in `voice` at `speed` words per minute."""
    import soundfile

    what = f"espeak-ng -v {voice} -s {speed} saying {word!r}"
    try:
        done = subprocess.run([program, "--stdout", "-v", voice, "-s", str(speed)], input=word.encode("utf-8"),
                              capture_output=True, timeout=_TIMEOUT_S)
    except (OSError, subprocess.SubprocessError) as err:
        raise SelfsupError(f"{what}: failed to run ({err})") from None
    if done.returncode != 0 or not done.stdout:
        reason = done.stderr.decode("utf-8", "replace").strip() or f"exit status {done.returncode}, no output"
        raise SelfsupError(f"{what}: {reason} (`espeak-ng --voices` lists the voices)")
    try:
        samples, rate = soundfile.read(io.BytesIO(done.stdout), dtype="float32", always_2d=True)  # [T, C]
        return finish_wave(samples.mean(axis=1), rate, sample_rate)
    except (_BadFile, soundfile.LibsndfileError) as err:
        raise SelfsupError(f"{what}: its output is not usable audio ({err})") from None


def _check_settings(words: Sequence[str], voices: Sequence[str], speeds: Sequence[int]) -> None:
    for name, values in (("words", words), ("voices", voices), ("speeds", speeds)):
        if isinstance(values, str) or len(values) == 0 or len(set(values)) != len(values):
            raise SelfsupError(f"{name} must be a non-empty list without repeats, got {values!r}")
    for word in words:
        if not isinstance(word, str) or not word.strip() or not word.isprintable():
            raise SelfsupError(f"each word must be printable text on one line, got {word!r}")
    for voice in voices:
        if not isinstance(voice, str) or not re.fullmatch(r"[A-Za-z0-9_+-]+", voice):
            raise SelfsupError(f"a voice is an espeak-ng voice name such as 'en-us' or 'en-us+f3', got {voice!r}")
    for speed in speeds:
        if isinstance(speed, bool) or not isinstance(speed, int) or not 80 <= speed <= 500:
            raise SelfsupError(f"a speed is in words per minute, an integer in 80..500, got {speed!r}")


def _folder_name(word: str) -> str:
    """A word as a folder name: letters, digits, "-" and "_" kept, anything else as "_"."""
    return re.sub(r"[^\w-]+", "_", word.strip()).strip("_") or "word"


def prepare_espeak(out: Path | None = None, words: Sequence[str] = WORDS, voices: Sequence[str] = VOICES,
                   speeds: Sequence[int] = SPEEDS, force: bool = False, progress: bool = False) -> EspeakSummary:
    """Synthesise every word x voice x speed into `out` (default `espeak_dir()`), or find it already there.

    An existing `out` is only ever replaced when it holds a previous espeak build or nothing at all.
    """
    words, voices, speeds = list(words), list(voices), list(speeds)
    _check_settings(words, voices, speeds)
    out = Path(out).expanduser() if out is not None else espeak_dir()
    program = find_espeak()
    import soundfile
    import soxr

    settings = {"sample_rate": SAMPLE_RATE, "words": words, "voices": voices, "speeds": speeds}
    inputs = {"version": PREPARE_VERSION, "espeak-ng": _espeak_version(program),
              "packages": debian_package_versions(PACKAGES), "libsndfile": soundfile.__libsndfile_version__,
              "soxr": soxr.__version__}
    stamp = previous_stamp(out, STAMP, "an espeak dataset")
    if is_fresh(stamp, settings, inputs, force, lambda stamp: (out / MANIFEST).is_file()):
        return EspeakSummary(out=out, num_clips=stamp["num_clips"], word_counts=stamp["words"], voices=voices,
                             speeds=speeds, seconds_of_audio=stamp["seconds_of_audio"], seconds=0.0, reused=True)

    started = time.perf_counter()
    jobs = [(word, voice, speed) for word in words for voice in voices for speed in speeds]
    clips: list[np.ndarray] = []
    bar = ProgressBar(progress, "synthesising words", len(jobs))
    try:
        for number, (word, voice, speed) in enumerate(jobs, start=1):
            clips.append(synthesise(program, word, voice, speed))
            bar.update(completed=number)
    finally:
        bar.close()
    word_counts = dict(Counter(word for word, _, _ in jobs))
    seconds_of_audio = sum(len(clip) for clip in clips) / SAMPLE_RATE

    def write(folder: Path) -> None:
        import csv

        folders: dict[str, str] = {}
        with open(folder / MANIFEST, "w", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh, lineterminator="\n")
            writer.writerow(MANIFEST_COLUMNS)
            for (word, voice, speed), clip in zip(jobs, clips):
                if word not in folders:  # two words that clean to one folder name get their own folders
                    name = _folder_name(word)
                    taken = set(folders.values())
                    folders[word] = name if name not in taken else f"{name}-{len(folders)}"
                relative = f"{folders[word]}/{voice}-{speed}.wav"
                (folder / folders[word]).mkdir(exist_ok=True)
                write_wav(folder / relative, clip, SAMPLE_RATE)
                writer.writerow((relative, word, voice, speed))

    seconds = build_into_place(
        out, STAMP, write, started,
        lambda seconds: {"settings": settings, "inputs": inputs, "num_clips": len(clips), "words": word_counts,
                         "seconds_of_audio": round(seconds_of_audio, 3), "seconds": round(seconds, 2)},
        ensure_ascii=False)
    return EspeakSummary(out=out, num_clips=len(clips), word_counts=word_counts, voices=voices, speeds=speeds,
                         seconds_of_audio=seconds_of_audio, seconds=seconds)


def espeak_status() -> tuple[bool, str]:
    """Whether `load_espeak` can load here, and why not / what to run."""
    folder = espeak_dir()
    stamp = read_stamp(folder / STAMP)
    if stamp is not None and (folder / MANIFEST).is_file():
        return True, f"prepared in {folder}: {stamp.get('num_clips', '?')} clips"
    if shutil.which("espeak-ng") is None:
        return False, f"needs espeak-ng: {INSTALL_COMMAND}; then run: {PREPARE_COMMAND}"
    return False, f"not prepared yet; run: {PREPARE_COMMAND}"


def load_espeak(sample_rate: int = SAMPLE_RATE, label_column: str = "label") -> AudioSet:
    """The prepared dataset from `espeak_dir()`: label = the word (or, with `label_column`, the
    `voice` or the `speed`), groups `voice` and `speed`."""
    _, reason = espeak_status()
    return load_prepared_audio(espeak_dir(), MANIFEST, STAMP, list(GROUP_COLUMNS), sample_rate, "espeak", reason,
                               label_column, ("label", *GROUP_COLUMNS))
