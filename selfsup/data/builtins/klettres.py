"""The "klettres" built-in: 1,829 human recordings of spoken letters and syllables in 20 languages.

Speech pretraining needs real speech that arrives without a download, and a few-label task with a
subgroup to audit: the Debian package `klettres-data` (the sounds of KDE's KLettres alphabet tutor)
holds a speaker per language saying each letter of its alphabet and a set of syllables or short
words, as 1,836 OGG/Vorbis files (1,805 at 44.1 kHz; 29 Danish letters at 128 kHz, one file each at
48 and 22.05 kHz; half mono, half stereo), 0.21 to 7.6 s long (median 1.6 s), 51 minutes in all.

How the package names things (read from its files, klettres-data 4:22.12.3): each language is a
folder of /usr/share/klettres named by its locale code — ar cs da de en en_GB es fr he hu it lt ml
nb nds nl pt_BR ru tn uk have sounds (id and nn have a sounds.xml whose files are not shipped).
Its `sounds.xml` lists `<sound name="..." file="..."/>` under `<alphabet>` (files in `<lang>/alpha/`)
and `<syllables>` (in `<lang>/syllab/`). The `name` is what the sound says, as KLettres shows it:
upper-case letters ("A", "Ä", "CS", "Б", "ഖ") or syllables and short words ("BA", "HAUS", "ЖИТЬ",
"കാ"). File names say nothing reliable (fr/alpha/a-0.ogg is "A", en/alpha/b.ogg is "B"), so the
label is the `name` (stripped, Unicode NFC), the `language` group is the folder and the `kind` group
is "letter" (587 clips) or "syllable" (1,242). Labels are shared across languages: "A" said by the
French and by the English speaker is one class (15 languages say "A"); most syllables occur in one
language only, so there are 1,149 classes, 944 of them with a single clip (205 have two or more).
`data.label_column=language` labels by language instead (20 classes, spoken-language ID), and
`data.label_column=letter` labels the 587 letter clips only (210 letters; each of the 26 Latin
letters is said in 12 to 15 languages, under each language's name for it) and leaves the syllables
unlabelled: pretraining uses every clip, probes and adapt the letters. A letter is the hardest
task one could pick here: each speaker says it once, so a probe must recognise it in the voices of
other languages; at a few hundred pretraining steps no encoder here (nor an untrained one) does.
`data.label_column=vowel` is the phonetic task the set supports across speakers: the vowel (a e i o
u) of each consonant-vowel syllable ("BA", "ДО", "കി"; `syllable_vowel`): 744 clips of 16
languages (ml 321, es 100, pt_BR 76, it 69, ...), the rest unlabelled; with `--groups language` it
audits which speakers a model fails.

What is left out, and listed in the summary: files a sounds.xml lists that are not shipped (all of
id and nn, 3 of ml, 1 of tn: 141); a second listing of a file already listed (6, e.g.
ml/syllab/khi.ogg for both "ഖി" and "ഖീ": KLettres plays the same recording for both, so the first
name is kept); shipped sounds no sounds.xml lists (7, e.g. de/alpha/sz.ogg), which have no name to
be labelled with; and any file that is bad input by `audio.decode_audio`'s rules (none today).

`prepare_klettres` decodes each sound, mixes it to mono, resamples it to 16 kHz with soxr and
writes it as a 16-bit WAV at the package's relative path (`fr/alpha/a-0.wav`; 677 clips overshoot
full scale after Vorbis decoding and are scaled down rather than clipped) with `manifest.csv`
(path, label, language, kind, letter, vowel, original) and the stamp `klettres.json` (settings, the package
version, the decoder versions; preparing again with the same ones is a no-op), built beside the
cache folder and renamed into place like the other prepared built-ins; it takes a few seconds.
`load_klettres` reads it back through `load_audio_source`.
"""

from __future__ import annotations

import hashlib
import os
import time
import unicodedata
import xml.etree.ElementTree as ET
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from selfsup.data.audio import AUDIO_EXTENSIONS, AudioSet, decode_audio
from selfsup.data.builtins import cache_dir
from selfsup.data.builtins.glyph_sources import _dpkg_files
from selfsup.data.builtins.prepared import (ProgressBar, build_into_place, debian_package_versions, is_fresh,
                                            load_prepared_audio, previous_stamp, read_stamp, write_wav)
from selfsup.data.decode import _BadFile
from selfsup.errors import SelfsupError

PACKAGE = "klettres-data"
INSTALL_COMMAND = f"apt-get install {PACKAGE}"
PREPARE_COMMAND = "selfsup data prepare klettres"
# Where Debian puts the sounds; used when dpkg is not there to ask.
DEFAULT_DATA_DIR = Path("/usr/share/klettres")
SOUNDS_XML = "sounds.xml"
MANIFEST = "manifest.csv"
STAMP = "klettres.json"
MANIFEST_COLUMNS = ("path", "label", "language", "kind", "letter", "vowel", "original")
GROUP_COLUMNS = ("language", "kind")
SAMPLE_RATE = 16000
# Bumped whenever the decoding or the selection changes, so an old cache is rebuilt rather than mixed.
PREPARE_VERSION = 3  # 2: the `letter` column; 3: the `vowel` column
# sounds.xml section -> the `kind` group
KINDS = {"alphabet": "letter", "syllables": "syllable"}
# The five vowel qualities of `syllable_vowel`. Latin vowels are read without the accents that keep
# their quality (Á, Ê, Õ: acute, grave, circumflex, tilde; Å, Ä, Ö, Ü are other vowels and left out),
# Cyrillic ones by sound (Ы and І are close to i; Я, Ю, Є, Ї start with a j and are left out), and
# Malayalam's dependent vowel signs with long and short merged (ാ aa -> a, ീ ii -> i; ൈ ai and ൌ au
# are diphthongs and left out).
_SAME_VOWEL_MARKS = {"\u0301", "\u0300", "\u0302", "\u0303"}
_LATIN_VOWELS = {"A": "a", "E": "e", "I": "i", "O": "o", "U": "u"}
_CYRILLIC_VOWELS = {"А": "a", "Е": "e", "Э": "e", "И": "i", "Ы": "i", "І": "i", "О": "o", "У": "u"}
_MALAYALAM_VOWEL_SIGNS = {"\u0d3e": "a", "\u0d3f": "i", "\u0d40": "i", "\u0d41": "u", "\u0d42": "u",
                          "\u0d46": "e", "\u0d47": "e", "\u0d4a": "o", "\u0d4b": "o"}
_MAX_WORKERS = 4  # Vorbis decoding and soxr release the GIL; a few threads overlap them with file I/O
_NUM_EXAMPLES = 5  # left-out files named in the summary, per reason


@dataclass(frozen=True)
class KLettresSound:
    """One `<sound>` of a language's sounds.xml whose file is shipped."""

    language: str  # the language folder, e.g. "en_GB"
    kind: str  # "letter" (listed under <alphabet>) or "syllable" (under <syllables>)
    label: str  # the `name` attribute, stripped and NFC-normalised
    original: str  # the file, relative to the data folder, e.g. "fr/alpha/a-0.ogg"


@dataclass
class KLettresListing:
    """The sounds to prepare and what the sounds.xml files list that cannot be used (reason -> files)."""

    sounds: list[KLettresSound]
    left_out: dict[str, list[str]] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# Finding and listing the sounds


def _missing(what: str) -> SelfsupError:
    return SelfsupError(f"{what}. The klettres dataset is made of the recordings of the Debian package "
                        f"{PACKAGE}; install it as root: {INSTALL_COMMAND}")


def find_data_dir(data_dir: Path | None = None) -> Path:
    """The folder holding one sub-folder per language (each with a sounds.xml): the given one, else
    the one of klettres-data (asked of dpkg), else Debian's path."""
    if data_dir is not None:
        data_dir = Path(data_dir).expanduser()
        if not any(data_dir.glob(f"*/{SOUNDS_XML}")):
            raise _missing(f"{data_dir} holds no <language>/{SOUNDS_XML}")
        return data_dir
    owned = _dpkg_files(PACKAGE)
    if owned == []:
        raise _missing(f"{PACKAGE} is not installed")
    folders = sorted({path.parent.parent for path in owned or [] if path.name == SOUNDS_XML})
    for folder in folders:
        if folder.is_dir():
            return folder
    if DEFAULT_DATA_DIR.is_dir() and any(DEFAULT_DATA_DIR.glob(f"*/{SOUNDS_XML}")):
        return DEFAULT_DATA_DIR
    raise _missing(f"{PACKAGE} is not installed (no {DEFAULT_DATA_DIR}/<language>/{SOUNDS_XML})")


def list_sounds(data_dir: Path) -> KLettresListing:
    """Every shipped sound that a language's sounds.xml names, in language and file order, and the
    files left out by reason: "not shipped", "listed twice", "unnamed", "not listed"."""
    sounds: list[KLettresSound] = []
    left_out: dict[str, list[str]] = {"not shipped": [], "listed twice": [], "unnamed": [], "not listed": []}
    taken: set[str] = set()
    root = data_dir.resolve()
    for xml in sorted(data_dir.glob(f"*/{SOUNDS_XML}")):
        language = xml.parent.name
        try:
            tree = ET.parse(xml)
        except (ET.ParseError, OSError) as err:
            raise SelfsupError(f"{xml}: cannot read the KLettres sound list ({err}); reinstall it as root: "
                               f"apt-get install --reinstall {PACKAGE}") from None
        for section, kind in KINDS.items():
            for element in tree.getroot().iter(section):
                for sound in element.iter("sound"):
                    written = (sound.get("file") or "").strip()
                    label = unicodedata.normalize("NFC", (sound.get("name") or "").strip())
                    path = (data_dir / written).resolve()
                    if not written or not path.is_relative_to(root) or not path.is_file():
                        left_out["not shipped"].append(written or f"{language}: a sound without a file")
                        continue
                    original = path.relative_to(root).as_posix()
                    if original in taken:
                        left_out["listed twice"].append(f"{original} as {label!r}")
                        continue
                    if not label:
                        left_out["unnamed"].append(original)
                        continue
                    taken.add(original)
                    sounds.append(KLettresSound(language, kind, label, original))
    if not sounds:
        raise _missing(f"{data_dir}: no <language>/{SOUNDS_XML} names a shipped sound")
    for language in sorted({xml.parent.name for xml in data_dir.glob(f"*/{SOUNDS_XML}")}):
        for path in sorted((data_dir / language).rglob("*")):
            if path.suffix.lower() in AUDIO_EXTENSIONS and path.is_file():
                relative = path.resolve().relative_to(root).as_posix()
                if relative not in taken:
                    left_out["not listed"].append(relative)
    return KLettresListing(sounds, left_out)


# ---------------------------------------------------------------------------------------------
# Preparing


@dataclass
class KLettresSummary:
    """What a prepare did (or found already done)."""

    out: Path
    num_clips: int
    language_counts: dict[str, int]
    kind_counts: dict[str, int]
    num_classes: int
    seconds_of_audio: float
    seconds: float
    reused: bool = False
    num_scaled: int = 0  # clips scaled down to fit 16-bit full scale
    # reason -> files left out for it (see `list_sounds`, and "bad audio")
    left_out: dict[str, list[str]] = field(default_factory=dict)

    @property
    def num_left_out(self) -> int:
        return sum(len(files) for files in self.left_out.values())

    def describe(self) -> str:
        """A few lines for the terminal."""
        size = (f"{self.num_clips} clips ({self.seconds_of_audio / 60:.1f} min at {SAMPLE_RATE} Hz), "
                f"{len(self.language_counts)} languages, {self.num_classes} letters and syllables")
        if self.reused:
            head = f"klettres already prepared with these settings in {self.out}: {size} (nothing to do; --force rebuilds)"
        else:
            head = f"prepared {size} in {self.out} in {self.seconds:.1f} s"
        lines = [head, "  clips per language: " + ", ".join(f"{k} {v}" for k, v in self.language_counts.items()),
                 "  kinds: " + ", ".join(f"{k} {v}" for k, v in self.kind_counts.items())]
        for reason, files in self.left_out.items():
            if files:
                shown = ", ".join(files[:_NUM_EXAMPLES]) + (", ..." if len(files) > _NUM_EXAMPLES else "")
                lines.append(f"  left out {len(files)} ({reason}): {shown}")
        return "\n".join(lines)


def klettres_dir() -> Path:
    """The default output folder, which `load_audio_source("klettres")` reads."""
    return cache_dir() / "klettres"


def _inputs(data_dir: Path, sounds: list[KLettresSound]) -> dict:
    """Everything besides the settings that decides the output; a change means a rebuild."""
    import soundfile
    import soxr

    listing = hashlib.sha256()
    for xml in sorted(data_dir.glob(f"*/{SOUNDS_XML}")):
        listing.update(xml.read_bytes())
    for sound in sounds:
        listing.update(f"{sound.original}\0{(data_dir / sound.original).stat().st_size}\0".encode())
    return {"version": PREPARE_VERSION, "packages": debian_package_versions((PACKAGE,)),
            "listing_sha256": listing.hexdigest(), "libsndfile": soundfile.__libsndfile_version__,
            "soxr": soxr.__version__}


def prepare_klettres(out: Path | None = None, force: bool = False, progress: bool = False, *,
                     max_files: int | None = None, data_dir: Path | None = None) -> KLettresSummary:
    """Decode the KLettres sounds into `out` (default `klettres_dir()`), or find them already there.

    `max_files` keeps that many sounds spaced evenly through the listing (for quick builds and
    tests); `data_dir` replaces the package's folder (one sub-folder per language with a sounds.xml).
    An existing `out` is only ever replaced when it holds a previous klettres build or nothing at all.
    """
    if max_files is not None and (isinstance(max_files, bool) or not isinstance(max_files, int) or max_files < 1):
        raise SelfsupError(f"max_files must be a positive integer or None, got {max_files!r}")
    out = Path(out).expanduser() if out is not None else klettres_dir()
    data_dir = find_data_dir(data_dir)
    listing = list_sounds(data_dir)
    sounds = listing.sounds
    if max_files is not None and len(sounds) > max_files:
        sounds = [sounds[(i * len(sounds)) // max_files] for i in range(max_files)]
    settings = {"sample_rate": SAMPLE_RATE, "max_files": max_files}
    inputs = _inputs(data_dir, sounds)

    stamp = previous_stamp(out, STAMP, "a klettres dataset")
    if is_fresh(stamp, settings, inputs, force, lambda stamp: (out / MANIFEST).is_file()):
        return KLettresSummary(out=out, num_clips=stamp["num_clips"], language_counts=stamp["languages"],
                               kind_counts=stamp["kinds"], num_classes=stamp["num_classes"],
                               seconds_of_audio=stamp["seconds_of_audio"], seconds=0.0, reused=True,
                               num_scaled=stamp.get("num_scaled", 0), left_out=stamp.get("left_out", {}))

    started = time.perf_counter()
    waves, bad = _decode_all(data_dir, sounds, progress)
    kept = [(sound, wave) for sound, wave in zip(sounds, waves) if wave is not None]
    if not kept:
        raise SelfsupError(f"none of the {len(sounds)} KLettres sounds in {data_dir} could be decoded; the first: "
                           f"{bad[0]}. Reinstall the package as root: apt-get install --reinstall {PACKAGE}")
    left_out = {**listing.left_out, "bad audio": bad}
    counts = Counter(sound.language for sound, _ in kept)
    language_counts = {language: counts[language] for language in sorted(counts)}
    kind_counts = dict(Counter(sound.kind for sound, _ in kept))
    num_classes = len({sound.label for sound, _ in kept})
    durations = np.array([len(wave) / SAMPLE_RATE for _, wave in kept])
    num_scaled = 0

    def write(folder: Path) -> None:
        nonlocal num_scaled
        num_scaled = _write(folder, kept, progress)

    seconds = build_into_place(
        out, STAMP, write, started,
        lambda seconds: {"settings": settings, "inputs": inputs, "num_clips": len(kept), "languages": language_counts,
                         "kinds": kind_counts, "num_classes": num_classes,
                         "seconds_of_audio": round(float(durations.sum()), 2),
                         "clip_seconds": {"min": round(float(durations.min()), 3),
                                          "median": round(float(np.median(durations)), 3),
                                          "max": round(float(durations.max()), 3)},
                         "num_scaled": num_scaled, "left_out": left_out, "seconds": round(seconds, 2)},
        ensure_ascii=False)
    return KLettresSummary(out=out, num_clips=len(kept), language_counts=language_counts, kind_counts=kind_counts,
                           num_classes=num_classes, seconds_of_audio=float(durations.sum()), seconds=seconds,
                           num_scaled=num_scaled, left_out=left_out)


def _decode_all(data_dir: Path, sounds: list[KLettresSound],
                progress: bool) -> tuple[list[np.ndarray | None], list[str]]:
    """float32 [T] at 16 kHz per sound (None when bad input), and the bad ones with their reasons."""

    def decode(sound: KLettresSound) -> np.ndarray | str:
        try:
            return decode_audio(data_dir / sound.original, SAMPLE_RATE)
        except _BadFile as err:
            return f"{sound.original} ({err})"

    waves: list[np.ndarray | None] = []
    bad: list[str] = []
    bar = ProgressBar(progress, "decoding KLettres", len(sounds))
    pool = ThreadPoolExecutor(max_workers=max(1, min(_MAX_WORKERS, os.cpu_count() or 1)))
    try:
        for number, result in enumerate(pool.map(decode, sounds), start=1):
            if isinstance(result, str):
                bad.append(result)
                waves.append(None)
            else:
                waves.append(result)
            if number % 64 == 0 or number == len(sounds):
                bar.update(completed=number)
    finally:
        # on Ctrl-C, drop the queued files instead of decoding all of them before exiting
        pool.shutdown(wait=True, cancel_futures=True)
        bar.close()
    return waves, bad


def syllable_vowel(label: str) -> str:
    """The vowel ("a", "e", "i", "o" or "u") of a consonant-vowel syllable as KLettres spells it, or ""
    for anything else (a longer word, a vowel-initial syllable, a diphthong, Hebrew and Arabic, whose
    spelling leaves the vowels out): "BA" -> "a", "MÁ" -> "a", "ДО" -> "o", "ЖИ" -> "i", "കീ" -> "i"."""
    letters = unicodedata.normalize("NFC", label)
    if len(letters) != 2:
        return ""
    first, second = letters
    if second in _MALAYALAM_VOWEL_SIGNS:  # a consonant with a dependent vowel sign
        return _MALAYALAM_VOWEL_SIGNS[second] if unicodedata.category(first) == "Lo" else ""
    base, *marks = unicodedata.normalize("NFD", second)  # Á -> A + acute
    if not set(marks) <= _SAME_VOWEL_MARKS:  # Å, Ä, Ö, Ü are other vowels
        return ""
    for vowels in (_LATIN_VOWELS, _CYRILLIC_VOWELS):
        if base in vowels:
            first_base = unicodedata.normalize("NFD", first)[0]
            consonant = first.isalpha() and first_base not in vowels and first_base not in "YЙЬЪ"
            return vowels[base] if consonant else ""
    return ""


def _write(folder: Path, kept: list[tuple[KLettresSound, np.ndarray]], progress: bool) -> int:
    """16-bit WAVs at the package's relative paths and manifest.csv; returns how many were scaled down."""
    import csv

    num_scaled = 0
    used: set[str] = set()
    bar = ProgressBar(progress, "writing clips", len(kept))
    try:
        with open(folder / MANIFEST, "w", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh, lineterminator="\n")
            writer.writerow(MANIFEST_COLUMNS)
            for number, (sound, wave) in enumerate(kept, start=1):
                relative = Path(sound.original).with_suffix(".wav").as_posix()
                if relative in used:  # a.ogg beside a.wav in the package: keep both
                    relative = Path(sound.original).with_suffix(Path(sound.original).suffix + ".wav").as_posix()
                used.add(relative)
                target = folder / relative
                target.parent.mkdir(parents=True, exist_ok=True)
                num_scaled += write_wav(target, wave, SAMPLE_RATE)
                letter = sound.label if sound.kind == "letter" else ""  # syllables: no letter (unlabelled)
                vowel = syllable_vowel(sound.label) if sound.kind == "syllable" else ""
                writer.writerow((relative, sound.label, sound.language, sound.kind, letter, vowel, sound.original))
                if number % 128 == 0 or number == len(kept):
                    bar.update(completed=number)
    finally:
        bar.close()
    return num_scaled


# ---------------------------------------------------------------------------------------------
# Loading it back


def klettres_status() -> tuple[bool, str]:
    """Whether `load_klettres` can load here, and why not / what to run."""
    folder = klettres_dir()
    stamp = read_stamp(folder / STAMP)
    if stamp is not None and (folder / MANIFEST).is_file():
        return True, (f"prepared in {folder}: {stamp.get('num_clips', '?')} clips, "
                      f"{len(stamp.get('languages', {}))} languages")
    try:
        find_data_dir()
    except SelfsupError:
        return False, f"needs the Debian package: {INSTALL_COMMAND}; then run: {PREPARE_COMMAND}"
    return False, f"not prepared yet; run: {PREPARE_COMMAND}"


def load_klettres(sample_rate: int = SAMPLE_RATE, label_column: str = "label") -> AudioSet:
    """The prepared dataset from `klettres_dir()`: label = the letter or syllable (or, with
    `label_column`, the `letter` or the `vowel` alone, the `language` or the `kind`), groups `language`
    and `kind`."""
    _, reason = klettres_status()
    return load_prepared_audio(klettres_dir(), MANIFEST, STAMP, list(GROUP_COLUMNS), sample_rate, "klettres", reason,
                               label_column, ("label", "letter", "vowel", *GROUP_COLUMNS))
