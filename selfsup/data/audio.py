"""Audio sources: turn a folder, a manifest or a built-in name into mono 16 kHz clips, and clips into batches.

Every source ends up as an `AudioSet`: one float32 waveform per file, mono, at one sample rate
(16 kHz by default), held in memory as decoded — not normalised — plus labels and subgroup columns
(`language`, `speaker`, ...) when the source has them. Decoding happens once, up front, so that a
broken file is found before training starts rather than hours into it, and so that a step only
crops and normalises tensors.

Decoding: `soundfile` (libsndfile: WAV, FLAC, OGG/Vorbis, Opus, MP3, ...) reads the file, channels
are averaged to mono, and `soxr` (the SoX resampler, "HQ" quality) resamples to the target rate.
A file is bad input — an error naming it, or skipped and counted under on_bad="skip", with the
same policy and messages as images (`decode._decode_files`) — when it is empty or not audio that
libsndfile reads, when its WAV header promises more audio than the file holds (truncated), when
its header claims more than `max_file_seconds` (checked before a sample is read, so a lying
header cannot exhaust memory: a file costs at most max_file_seconds of samples), when it holds
no frames, NaN or infinite samples, or only silence (peak below 1e-6).

Sources follow the image rules (`sources.py`, shared): a folder's class sub-folders become labels
when it holds nothing but them; a .csv/.jsonl manifest has a `path` column (paths stay inside the
manifest's folder), an optional label column and subgroup columns.

Batches (`AudioBatches`): each clip is cropped at a random start (drawn from the step's generator)
to at most `max_samples`, normalised to zero mean and unit variance over its real samples (as
Wav2Vec2FeatureExtractor's do_normalize=True), and right-padded with zeros to the longest clip of
the batch; `lengths` says how many samples of each row are real.
"""

from __future__ import annotations

import difflib
import io
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor

from selfsup.data.decode import _BadFile, _BadFilePolicy, _decode_files, _FileKind, check_bad_file_settings
from selfsup.data.shards import BadSamples, Sample, payload_member, sample_meta
from selfsup.data.sources import FileListing, list_file_source
from selfsup.errors import SelfsupError

AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".oga", ".opus", ".mp3")
MANIFEST_KINDS = (".csv", ".jsonl")
# Built-in audio datasets that `load_audio_source` accepts by name (each also in builtins.BUILTIN).
AUDIO_BUILTINS = ("klettres", "espeak")
AUDIO_FILES = _FileKind("audio files", "no usable audio files", "decoding audio")
# A clip whose loudest sample is below this is silence (or a file of zeros): nothing to learn from.
SILENCE_PEAK = 1e-6
# No audio format records faster than this; a header claiming more is corrupt. With
# max_file_seconds it bounds what one file can cost in memory.
MAX_SOURCE_RATE = 384_000
# The variance floor of the per-clip normalisation, Wav2Vec2FeatureExtractor's.
NORM_EPS = 1e-7
# Frames read from a file at a time, mixed to mono as they come (a block of a many-channel file stays small).
_READ_BLOCK = 1 << 16
# A WAV written to a pipe cannot seek back to fill in its size, so it carries a placeholder this
# large or larger (0xFFFFFFFF, or 0x7FFFF000 as espeak-ng writes); that is not a truncated file.
_STREAMING_WAV_SIZE = 0x7FFF0000


@dataclass
class AudioSet:
    """Decoded clips held in memory at one sample rate, with optional labels and subgroup columns.

    `waves[i]` is float32 [T_i], mono, at `sample_rate`, as decoded and resampled (not normalised);
    `ids` names each clip (its path relative to the data root); `labels` is int64 [N] indexing
    `classes` (-1 marks an unlabelled row of a partially labelled manifest) or None; `groups` maps a
    subgroup column to one string per clip; `num_skipped` counts files dropped under on_bad="skip".
    """

    waves: list[Tensor]
    ids: list[str]
    labels: Tensor | None
    classes: list[str] | None
    groups: dict[str, list[str]] = field(default_factory=dict)
    source: str = ""
    num_skipped: int = 0
    sample_rate: int = 16000

    def __post_init__(self) -> None:
        N = len(self.waves)
        assert all(w.dtype == torch.float32 and w.ndim == 1 for w in self.waves)
        assert len(self.ids) == N
        assert self.labels is None or self.labels.shape == (N,)
        assert all(len(values) == N for values in self.groups.values())

    def __len__(self) -> int:
        return len(self.ids)

    def subset(self, index: Tensor | list[int]) -> AudioSet:
        """The clips at `index`, in the order given (a boolean mask selects clips in order)."""
        index = torch.as_tensor(index)
        if index.dtype == torch.bool:
            index = index.nonzero().flatten()
        index = index.to(torch.long).flatten()
        rows = index.tolist()
        return AudioSet(
            waves=[self.waves[i] for i in rows],
            ids=[self.ids[i] for i in rows],
            labels=None if self.labels is None else self.labels[index],
            classes=self.classes,
            groups={name: [values[i] for i in rows] for name, values in self.groups.items()},
            source=self.source,
            num_skipped=self.num_skipped,
            sample_rate=self.sample_rate,
        )

    def seconds(self) -> float:
        """The total duration of the clips."""
        return sum(len(w) for w in self.waves) / self.sample_rate


def load_audio_source(
    source: str | Path,
    *,
    sample_rate: int = 16000,
    max_file_seconds: float = 600.0,
    on_bad: str = "error",
    max_bad_fraction: float = 0.01,
    label_column: str = "label",
    group_columns: list[str] | None = None,
    progress: bool = False,
) -> AudioSet:
    """Load every clip a source names, decoded, mixed to mono and resampled, with labels and subgroups.

    `source` is a built-in dataset name (`AUDIO_BUILTINS`, made by `selfsup data prepare NAME`; its
    subgroup columns are fixed, its label can be any of its columns through `label_column`), a
    folder of audio files (sub-folders become classes when the folder holds nothing but them), or a
    .csv/.jsonl manifest with a `path` column. A built-in name wins over a folder of the same name
    in the working directory; write "./klettres" to mean the folder.

    `on_bad="error"` stops at the first file that is bad input (see the module docstring); `"skip"`
    drops such files, logs a summary, and still fails if more than `max_bad_fraction` of them are bad.
    """
    from selfsup.data.builtins import BUILTIN  # builtins imports images; only needed here

    source = os.fspath(source)
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, int) or sample_rate < 1:
        raise SelfsupError(f"sample_rate must be a positive integer (Hz), got {sample_rate!r}")
    if not (isinstance(max_file_seconds, (int, float)) and max_file_seconds > 0 and np.isfinite(max_file_seconds)):
        raise SelfsupError(f"max_file_seconds must be a positive number, got {max_file_seconds!r}")
    check_bad_file_settings(on_bad, max_bad_fraction)

    if source in AUDIO_BUILTINS:
        return load_audio_builtin(source, sample_rate, label_column)
    if source in BUILTIN:
        raise SelfsupError(f"'{source}' is not audio ({BUILTIN[source]}); the audio built-ins are: "
                           f"{', '.join(AUDIO_BUILTINS)} (write ./{source} to mean a folder of that name)")
    path = Path(source).expanduser()
    policy = _BadFilePolicy(on_bad, max_bad_fraction)
    decode = _Decoder(sample_rate, float(max_file_seconds))
    if path.is_dir():
        return _load_folder(path, decode, policy, progress)
    suffix = path.suffix.lower()
    if path.is_file() and suffix in MANIFEST_KINDS:
        return _load_manifest(path, decode, policy, label_column, group_columns, progress)

    accepted = (f"a built-in dataset ({', '.join(AUDIO_BUILTINS)}), a folder of audio files "
                f"({', '.join(AUDIO_EXTENSIONS)}), or a .csv or .jsonl manifest with a 'path' column")
    if path.is_file():
        raise SelfsupError(f"{source}: unsupported kind of file '{suffix}'; an audio source is {accepted}")
    hint = difflib.get_close_matches(source, list(AUDIO_BUILTINS), n=1)
    did_you_mean = f" (did you mean '{hint[0]}'?)" if hint else ""
    raise SelfsupError(f"{source}: no such file or folder{did_you_mean}; an audio source is {accepted}")


def load_audio_builtin(name: str, sample_rate: int = 16000, label_column: str = "label") -> AudioSet:
    """A prepared built-in audio dataset (`AUDIO_BUILTINS`) at `sample_rate`, labelled by `label_column`
    (one of its manifest's columns: e.g. klettres' "language" instead of the letter or syllable)."""
    if name == "klettres":
        from selfsup.data.builtins.klettres import load_klettres  # it imports this module

        return load_klettres(sample_rate, label_column)
    if name == "espeak":
        from selfsup.data.builtins.espeak import load_espeak  # it imports this module

        return load_espeak(sample_rate, label_column)
    raise SelfsupError(f"'{name}' is not a built-in audio dataset; the audio built-ins are: {', '.join(AUDIO_BUILTINS)}")


# ---------------------------------------------------------------------------------------------
# Folders and manifests


def _load_folder(root: Path, decode: _Decoder, policy: _BadFilePolicy, progress: bool) -> AudioSet:
    """A folder tree; hidden files and folders (".name") are ignored, symlinked folders not followed."""
    return _load_listed(list_file_source(root, AUDIO_EXTENSIONS, "audio files"), decode, policy, progress)


def _load_manifest(manifest: Path, decode: _Decoder, policy: _BadFilePolicy, label_column: str,
                   group_columns: list[str] | None, progress: bool) -> AudioSet:
    listing = list_file_source(manifest, AUDIO_EXTENSIONS, "audio files", label_column, group_columns)
    return _load_listed(listing, decode, policy, progress)


def _load_listed(listing: FileListing, decode: _Decoder, policy: _BadFilePolicy, progress: bool) -> AudioSet:
    kept, waves, bad = _decode_files(listing.items, decode, policy, progress, AUDIO_FILES)
    ids, labels, classes, groups = listing.rows(kept)
    return AudioSet(waves=waves, ids=ids, labels=labels, classes=classes, groups=groups, source=listing.source,
                    num_skipped=len(bad), sample_rate=decode.sample_rate)


# ---------------------------------------------------------------------------------------------
# Decoding one file


@dataclass(frozen=True)
class _Decoder:
    """One file -> float32 [T] mono at `sample_rate`, or `_BadFile` with a reason."""

    sample_rate: int
    max_file_seconds: float

    def __call__(self, path: Path) -> Tensor:
        return torch.from_numpy(decode_audio(path, self.sample_rate, self.max_file_seconds))


def decode_audio(path: Path, sample_rate: int = 16000, max_file_seconds: float = 600.0) -> np.ndarray:
    """One file -> float32 [T] mono at `sample_rate` (channels averaged, resampled with soxr), or
    `_BadFile` with a reason (see the module docstring for what is bad input)."""
    wave, rate = _read_mono(Path(path), max_file_seconds)
    return finish_wave(wave, rate, sample_rate)


def decode_audio_bytes(data: bytes, sample_rate: int = 16000, max_file_seconds: float = 600.0) -> np.ndarray:
    """An audio file held in memory (a shard member) -> float32 [T] mono at `sample_rate`, or
    `_BadFile`: the same decoding and checks as a file (`decode_audio`)."""
    wave, rate = _read_mono(io.BytesIO(data), max_file_seconds)
    return finish_wave(wave, rate, sample_rate)


def finish_wave(wave: np.ndarray, rate: int, sample_rate: int = 16000) -> np.ndarray:
    """Decoded mono samples float32 [T] at `rate` -> float32 [T'] at `sample_rate`, or `_BadFile` when
    they hold NaN or infinite values or only silence (the checks every decoded clip passes)."""
    if not np.isfinite(wave).all():
        count = int((~np.isfinite(wave)).sum())
        raise _BadFile(f"{count} NaN or infinite sample(s)")
    peak = float(np.abs(wave).max())
    if peak < SILENCE_PEAK:
        raise _BadFile(f"silent: every sample is ~0 (peak {peak:.3g} < {SILENCE_PEAK:g})")
    wave = resample(wave, rate, sample_rate)
    if len(wave) == 0:
        raise _BadFile(f"too short: shorter than one sample at {sample_rate} Hz")
    return wave


def _read_mono(path: Path | io.BytesIO, max_file_seconds: float) -> tuple[np.ndarray, int]:
    """(float32 [T] mono as recorded, its sample rate) of a file or of a file's bytes in memory; the
    header is checked before any sample is read."""
    import soundfile  # loads libsndfile: only when audio is read, not whenever selfsup.data.audio is imported

    try:
        if _size(path) == 0:
            raise _BadFile("empty file (0 bytes)")
        with soundfile.SoundFile(path) as fh:
            frames, rate, channels = fh.frames, fh.samplerate, fh.channels
            if frames <= 0:
                raise _BadFile("no audio frames (the file holds a header and no samples)")
            if not 0 < rate <= MAX_SOURCE_RATE or channels < 1:
                raise _BadFile(f"corrupt header: {channels} channel(s) at {rate} Hz")
            if frames > max_file_seconds * rate:
                raise _BadFile(f"its header claims {frames} frames ({frames / rate:.0f} s at {rate} Hz), over "
                               f"data.max_file_seconds={max_file_seconds:g}; a longer file is bad input (split it, "
                               f"or raise data.max_file_seconds)")
            if fh.format in ("WAV", "WAVEX"):
                _check_wav_size(path)
            mono = np.empty(frames, dtype=np.float32)
            done = 0
            # blocks [n, channels] mixed to mono as read: memory is the mono clip plus one block
            for block in fh.blocks(blocksize=_READ_BLOCK, frames=frames, dtype="float32", always_2d=True):
                mono[done : done + len(block)] = block[:, 0] if channels == 1 else block.mean(axis=1)
                done += len(block)
    except _BadFile:
        raise
    except FileNotFoundError:
        raise _BadFile("file not found") from None
    except PermissionError:
        raise _BadFile("permission denied") from None
    except soundfile.LibsndfileError as err:
        reason = getattr(err, "error_string", str(err))
        if "recognised" in reason or "recognized" in reason:
            raise _BadFile(f"not an audio file libsndfile can read ({reason.strip()})") from None
        raise _BadFile(f"cannot decode ({reason.strip()})") from None
    except Exception as err:  # corrupt data reaches odd corners of the decoders
        raise _BadFile(f"cannot decode ({type(err).__name__}: {err})") from None
    if done == 0:
        raise _BadFile("no audio frames could be decoded")
    return mono[:done], rate


def _size(path: Path | io.BytesIO) -> int:
    return path.getbuffer().nbytes if isinstance(path, io.BytesIO) else path.stat().st_size


def _check_wav_size(path: Path | io.BytesIO) -> None:
    """A RIFF/WAVE file whose `data` chunk promises more bytes than the file holds is truncated
    (libsndfile would quietly read what is there); a streaming placeholder size is not."""
    size = _size(path)
    with (io.BytesIO(path.getbuffer()) if isinstance(path, io.BytesIO) else open(path, "rb")) as fh:
        head = fh.read(12)
        if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
            return  # RF64 and friends: libsndfile's own checks apply
        offset = 12
        while offset + 8 <= size:
            fh.seek(offset)
            chunk, length = struct.unpack("<4sI", fh.read(8))
            if chunk == b"data":
                held = size - offset - 8
                if length < _STREAMING_WAV_SIZE and length > held:
                    raise _BadFile(f"truncated: the WAV header promises {length} bytes of audio, the file holds "
                                   f"{held}")
                return
            offset += 8 + length + (length & 1)  # chunks are padded to an even size


def resample(wave: np.ndarray, rate: int, target: int) -> np.ndarray:
    """float32 [T] at `rate` -> float32 [T * target / rate] at `target`, with soxr ("HQ": a linear-phase
    filter, passband to 91 % of Nyquist, over 100 dB of stopband rejection); unchanged when equal."""
    if rate == target:
        return np.ascontiguousarray(wave, dtype=np.float32)
    import soxr

    return soxr.resample(np.ascontiguousarray(wave, dtype=np.float32), rate, target, quality="HQ").astype(
        np.float32, copy=False)


# ---------------------------------------------------------------------------------------------
# Batches


def normalise_wave(wave: Tensor) -> Tensor:
    """A clip [T] at zero mean and unit variance, as Wav2Vec2FeatureExtractor's do_normalize
    ((x - mean) / sqrt(var + 1e-7)); a silent clip stays zero."""
    centred = wave - wave.mean()
    return centred / torch.sqrt(centred.square().mean() + NORM_EPS)


class AudioBatches:
    """`batches(indices, generator)` -> {"audio": float32 [B, T], "lengths": int64 [B], "generator",
    "id": [...], "index", "label"?} on the device.

    Each clip is cropped to at most `max_samples` at a start drawn from the step's generator (one
    draw per clip, on the generator's device, whatever the clip's length, so the stream of draws
    never depends on the data), normalised over its real samples (`normalise_wave`), and
    right-padded with zeros to the longest crop of the batch (T = max(lengths)).
    """

    def __init__(self, data: AudioSet, max_samples: int, device: torch.device):
        if isinstance(max_samples, bool) or not isinstance(max_samples, int) or max_samples < 1:
            raise SelfsupError(f"max_samples must be a positive integer, got {max_samples!r}")
        self.data, self.max_samples, self.device = data, max_samples, torch.device(device)
        self.num_items = len(data)
        self.lengths = torch.tensor([len(w) for w in data.waves], dtype=torch.long)  # [N]

    def __call__(self, indices: Tensor, generator: torch.Generator) -> dict[str, Any]:
        rows = indices.tolist()
        labels = None if self.data.labels is None else self.data.labels[indices.cpu()]
        return clip_batch([self.data.waves[row] for row in rows], self.lengths[indices.cpu()],
                          [self.data.ids[i] for i in rows], labels, self.max_samples, self.device, generator, indices)


def clip_batch(waves: list[Tensor], full: Tensor, ids: list[str], labels: Tensor | None, max_samples: int,
               device: torch.device, generator: torch.Generator, index: Tensor | None = None) -> dict[str, Any]:
    """The audio batch (`AudioBatches`' fields) of B clips float32 [T_b] with their lengths int64 [B]:
    cropped at starts drawn from the step's generator, normalised, padded, on `device` (in memory or
    streamed alike)."""
    B = len(waves)
    u = torch.rand(B, generator=generator, device=generator.device, dtype=torch.float64).cpu()  # [B]
    lengths = full.clamp(max=max_samples)  # [B]
    starts = (u * (full - lengths + 1).double()).floor().long().clamp(max=full - lengths)  # [B]
    audio = torch.zeros(B, int(lengths.max()) if B else 0)  # [B, T]
    for i, wave in enumerate(waves):
        start, length = int(starts[i]), int(lengths[i])
        audio[i, :length] = wave[start : start + length]
    audio = audio.to(device, non_blocking=True)
    lengths_dev = lengths.to(device, non_blocking=True)
    batch: dict[str, Any] = {
        "audio": normalise_padded(audio, lengths_dev),
        "lengths": lengths_dev,
        # Masking that is the objective (wav2vec 2.0's spans, HuBERT's) draws from it after the crops.
        "generator": generator,
        "id": ids,
    }
    if index is not None:  # a streamed batch has no in-memory rows to index
        batch["index"] = index
    if labels is not None:
        batch["label"] = labels.to(device)
    return batch


class AudioStreamBatches:
    """The audio batches of a streamed shards folder: `stream_parts` (clips decoded and resampled in
    data/stream.py's workers) and `(collated, generator)` -> the batch dict `AudioBatches` makes (the
    crops drawn from the step's generator here, as in memory), from a collated micro-batch (clips,
    ids, labels int64 [B])."""

    def __init__(self, stream_parts: Any, max_samples: int, device: torch.device, labelled: bool, num_items: int):
        if isinstance(max_samples, bool) or not isinstance(max_samples, int) or max_samples < 1:
            raise SelfsupError(f"max_samples must be a positive integer, got {max_samples!r}")
        self.stream_parts, self.max_samples, self.device = stream_parts, max_samples, torch.device(device)
        self.labelled, self.num_items = labelled, num_items

    def __call__(self, collated: tuple[list[Tensor], list[str], Tensor], generator: torch.Generator) -> dict[str, Any]:
        waves, ids, labels = collated
        full = torch.tensor([len(w) for w in waves], dtype=torch.long)  # [B]
        return clip_batch(list(waves), full, list(ids), labels if self.labelled else None, self.max_samples,
                          self.device, generator)


MIN_SAMPLES = 400  # wav2vec 2.0's conv stack needs one receptive field (25 ms at 16 kHz) for one frame


@dataclass(frozen=True)
class DecodeClips:
    """A stream's `to_items` for audio (runs in a DataLoader worker): each sample's audio member decoded
    as a file is at load (`decode_audio_bytes`: mono, resampled to `sample_rate`) -> (float32 [T], id,
    label); a member that cannot be decoded, or shorter than one frame, stops the run naming shard and
    member, or is skipped and counted (`data.on_bad_file`, shards.BadSamples)."""

    sample_rate: int
    max_file_seconds: float
    on_bad: str = "error"
    max_bad_fraction: float = 0.01
    per_sample: ClassVar[bool] = True  # one item per sample, nothing carried over: a resume skips samples undecoded

    def __call__(self, samples: Iterator[Sample]) -> Iterator[tuple[Tensor, str, int]]:
        bad = BadSamples(self.on_bad, self.max_bad_fraction)
        payload = payload_member(AUDIO_EXTENSIONS, "audio")
        for key, files in samples:
            meta = sample_meta(key, files)
            ext = payload(key, files)
            try:
                wave = decode_clip_bytes(files[ext], self.sample_rate, self.max_file_seconds)
            except _BadFile as err:
                bad.failed(f"{key}.{ext}", err)
                continue
            bad.ok()
            yield torch.from_numpy(wave), meta["id"], int(meta["label"])


def decode_clip_bytes(data: bytes, sample_rate: int, max_file_seconds: float) -> np.ndarray:
    """`decode_audio_bytes`, and a clip shorter than one frame's receptive field is bad input too."""
    wave = decode_audio_bytes(data, sample_rate, max_file_seconds)
    if len(wave) < MIN_SAMPLES:
        raise _BadFile(f"too short: {len(wave)} samples at {sample_rate} Hz, under the {MIN_SAMPLES} of one frame")
    return wave


def collate_clips(items: list[tuple[Tensor, str, int]]) -> tuple[list[Tensor], list[str], Tensor]:
    """(clips float32 [T_b] of any length, ids, labels int64 [B]) of a micro-batch of decoded clips."""
    return [i[0] for i in items], [i[1] for i in items], torch.tensor([i[2] for i in items], dtype=torch.long)


def normalise_padded(audio: Tensor, lengths: Tensor) -> Tensor:
    """Right-padded clips [B, T] -> each normalised over its first lengths[b] samples (`normalise_wave`),
    padding left at zero."""
    real = torch.arange(audio.shape[1], device=audio.device)[None, :] < lengths[:, None]  # bool [B, T]
    count = lengths.clamp(min=1).to(audio.dtype)[:, None]  # [B, 1]
    mean = (audio * real).sum(dim=1, keepdim=True) / count  # [B, 1]
    centred = (audio - mean) * real  # [B, T]
    var = centred.square().sum(dim=1, keepdim=True) / count  # [B, 1]
    return centred / torch.sqrt(var + NORM_EPS)
