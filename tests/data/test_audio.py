"""Audio sources and batches: decoding, mono mixdown, resampling, folders and manifests, every kind of
bad input (an error naming the file, or skipped and counted), the batch contract, the config keys."""

from __future__ import annotations

import json
import struct
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch

from selfsup.config import load_config
from selfsup.data.audio import (AudioBatches, AudioSet, decode_audio, load_audio_source, normalise_padded,
                                normalise_wave, resample)
from selfsup.data.decode import _BadFile
from selfsup.errors import SelfsupError

RATE = 16000


def sine(seconds: float, rate: int = RATE, freq: float = 440.0, amplitude: float = 0.5) -> np.ndarray:
    t = np.arange(int(round(seconds * rate))) / rate
    return (amplitude * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def write(path: Path, wave: np.ndarray, rate: int = RATE, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    soundfile.write(path, wave, rate, **kw)
    return path


def wav_header(data_bytes: int, rate: int = RATE, channels: int = 1, bits: int = 16, fmt: int = 1) -> bytes:
    """A canonical 44-byte RIFF/WAVE header (PCM fmt=1, float fmt=3) announcing `data_bytes` of samples."""
    block = channels * bits // 8
    return (b"RIFF" + struct.pack("<I", (36 + data_bytes) & 0xFFFFFFFF) + b"WAVE"
            + b"fmt " + struct.pack("<IHHIIHH", 16, fmt, channels, rate, rate * block, block, bits)
            + b"data" + struct.pack("<I", data_bytes))


def pcm16(wave: np.ndarray) -> bytes:
    return np.round(wave * 32767).astype("<i2").tobytes()


# ---------------------------------------------------------------------------------------------
# Decoding


@pytest.mark.parametrize("suffix, kw, exact", [
    (".wav", {"subtype": "PCM_16"}, 1e-4),
    (".wav", {"subtype": "FLOAT"}, 1e-7),
    (".flac", {}, 1e-4),
    (".ogg", {"format": "OGG", "subtype": "VORBIS"}, None),
    (".opus", {"format": "OGG", "subtype": "OPUS"}, None),
])
def test_each_format_decodes_to_float32_mono(tmp_path: Path, suffix: str, kw: dict, exact: float | None) -> None:
    original = sine(1.0)
    rate = 48000 if suffix == ".opus" else RATE  # Opus encodes at 48 kHz
    source = original if rate == RATE else sine(1.0, rate)
    path = write(tmp_path / f"clip{suffix}", source, rate, **kw)
    wave = decode_audio(path)
    assert wave.dtype == np.float32 and wave.ndim == 1
    assert abs(len(wave) - RATE) <= 2
    n = min(len(wave), RATE)
    if exact is not None:
        assert np.abs(wave[:n] - original[:n]).max() < exact
    else:  # lossy codecs (and Opus' encoder delay): the same tone, by its spectrum
        spectrum = np.abs(np.fft.rfft(wave[: RATE // 2]))
        assert abs(np.argmax(spectrum) * 2 - 440) <= 4


def test_channels_are_averaged_to_mono(tmp_path: Path) -> None:
    left, right = sine(0.5, freq=440), sine(0.5, freq=660, amplitude=0.25)
    path = write(tmp_path / "stereo.wav", np.stack([left, right], axis=1), subtype="FLOAT")
    np.testing.assert_allclose(decode_audio(path), (left + right) / 2, atol=1e-7)


def test_resampling_a_sine_matches_the_analytic_one() -> None:
    """A 1 kHz sine at 44.1 kHz resampled to 16 kHz is the 1 kHz sine sampled at 16 kHz (soxr adds no delay)."""
    seconds = 1.0
    out = resample(sine(seconds, 44100, freq=1000.0), 44100, RATE)
    assert out.dtype == np.float32 and len(out) == RATE
    expected = sine(seconds, RATE, freq=1000.0)
    edge = RATE // 20  # 50 ms: the filter's reach at either end, where the signal was cut off
    rms = float(np.sqrt(np.mean((out[edge:-edge] - expected[edge:-edge]) ** 2)))
    assert rms < 1e-3, rms


def test_files_at_other_rates_are_resampled_on_load(tmp_path: Path) -> None:
    write(tmp_path / "a.wav", sine(0.5, 44100), 44100, subtype="PCM_16")
    write(tmp_path / "b.flac", sine(0.25, 8000), 8000)
    data = load_audio_source(tmp_path)
    assert [len(w) for w in data.waves] == [8000, 4000] and data.sample_rate == RATE
    at_8k = load_audio_source(tmp_path, sample_rate=8000)
    assert [len(w) for w in at_8k.waves] == [4000, 2000] and at_8k.sample_rate == 8000
    assert data.seconds() == pytest.approx(0.75)


# ---------------------------------------------------------------------------------------------
# Folders and manifests


def test_class_subfolders_become_labels(tmp_path: Path) -> None:
    for name, freq in [("yes/a.wav", 300), ("yes/b.flac", 320), ("no/c.wav", 500), ("no/.hidden.wav", 1)]:
        write(tmp_path / name, sine(0.2, freq=freq))
    (tmp_path / "no" / "notes.txt").write_text("not audio, not listed")
    data = load_audio_source(tmp_path)
    assert data.ids == ["no/c.wav", "yes/a.wav", "yes/b.flac"]
    assert data.classes == ["no", "yes"] and data.labels.tolist() == [0, 1, 1]
    assert data.groups == {} and data.source == str(tmp_path) and data.num_skipped == 0
    assert all(w.dtype == torch.float32 and w.ndim == 1 for w in data.waves)


def test_a_folder_with_loose_files_or_one_subfolder_is_unlabelled(tmp_path: Path) -> None:
    write(tmp_path / "one" / "a.wav", sine(0.1))
    write(tmp_path / "one" / "b.wav", sine(0.1))
    assert load_audio_source(tmp_path).labels is None  # one sub-folder is storage, not a labelling
    write(tmp_path / "two" / "c.wav", sine(0.1))
    write(tmp_path / "loose.wav", sine(0.1))
    data = load_audio_source(tmp_path)
    assert data.labels is None and data.classes is None and len(data) == 4


def test_a_folder_without_audio_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "x.txt").write_text("hello")
    with pytest.raises(SelfsupError, match=r"no audio files found .*\.wav, \.flac"):
        load_audio_source(tmp_path)


def test_csv_manifest_with_labels_and_groups(tmp_path: Path) -> None:
    for name in ("clips/a.wav", "clips/b.wav", "clips/c.wav"):
        write(tmp_path / name, sine(0.1))
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,label,language,speaker\nclips/a.wav,yes,en,s1\nclips/b.wav,,fr,s2\n"
                        "clips/c.wav,no,fr,s1\n")
    data = load_audio_source(manifest, group_columns=["language", "speaker"])
    assert data.ids == ["clips/a.wav", "clips/b.wav", "clips/c.wav"]
    assert data.classes == ["no", "yes"] and data.labels.tolist() == [1, -1, 0]  # empty = unlabelled
    assert data.groups == {"language": ["en", "fr", "fr"], "speaker": ["s1", "s2", "s1"]}
    assert load_audio_source(manifest).groups == {}  # only "group" is read unasked, as for images
    with pytest.raises(SelfsupError, match=r"m\.csv: no group column accent; columns are: path, label"):
        load_audio_source(manifest, group_columns=["accent"])
    by_language = load_audio_source(manifest, label_column="language")
    assert by_language.classes == ["en", "fr"] and by_language.labels.tolist() == [0, 1, 1]
    with pytest.raises(SelfsupError, match=r"m\.csv: no label column 'letter'.*path, label, language, speaker"):
        load_audio_source(manifest, label_column="letter")


def test_jsonl_manifest(tmp_path: Path) -> None:
    write(tmp_path / "a.flac", sine(0.1))
    write(tmp_path / "b.wav", sine(0.2))
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("\n".join(json.dumps(row) for row in [{"path": "a.flac", "label": 3, "group": "x"},
                                                              {"path": "b.wav", "label": 10, "group": "y"}]) + "\n")
    data = load_audio_source(manifest)
    assert data.classes == ["3", "10"] and data.labels.tolist() == [0, 1]  # integer classes sort numerically
    assert data.groups == {"group": ["x", "y"]} and [len(w) for w in data.waves] == [1600, 3200]


def test_manifest_paths_stay_inside_its_folder(tmp_path: Path) -> None:
    write(tmp_path / "outside.wav", sine(0.1))
    (tmp_path / "data").mkdir()
    manifest = tmp_path / "data" / "m.csv"
    manifest.write_text("path\n../outside.wav\n")
    with pytest.raises(SelfsupError, match=r"m\.csv:2: path '\.\./outside\.wav' resolves to .*outside the "
                                           r"manifest's folder"):
        load_audio_source(manifest)


def test_manifest_errors_name_the_manifest(tmp_path: Path) -> None:
    empty = tmp_path / "empty.csv"
    empty.write_text("path,label\n")
    with pytest.raises(SelfsupError, match=r"empty\.csv: the manifest lists no audio files"):
        load_audio_source(empty)
    nopath = tmp_path / "nopath.csv"
    nopath.write_text("file,label\na.wav,x\n")
    with pytest.raises(SelfsupError, match=r"nopath\.csv: no 'path' column"):
        load_audio_source(nopath)
    gone = tmp_path / "gone.csv"
    gone.write_text("path\nmissing.wav\n")
    with pytest.raises(SelfsupError, match=r"missing\.wav \(listed at .*gone\.csv:2\): file not found"):
        load_audio_source(gone)


def test_unknown_sources_are_explained(tmp_path: Path) -> None:
    with pytest.raises(SelfsupError, match=r"klettre: no such file or folder \(did you mean 'klettres'\?\)"):
        load_audio_source("klettre")
    notes = tmp_path / "notes.txt"
    notes.write_text("x")
    with pytest.raises(SelfsupError, match=r"notes\.txt: unsupported kind of file '\.txt'; an audio source is"):
        load_audio_source(notes)
    with pytest.raises(SelfsupError, match=r"'mnist' is not audio .*the audio built-ins are: klettres, espeak"):
        load_audio_source("mnist")
    for bad, match in [({"sample_rate": 0}, "sample_rate"), ({"max_file_seconds": 0}, "max_file_seconds"),
                       ({"on_bad": "ignore"}, "on_bad_file"), ({"max_bad_fraction": 2.0}, "max_bad_fraction")]:
        with pytest.raises(SelfsupError, match=match):
            load_audio_source(tmp_path, **bad)


def test_subset_keeps_rows_in_the_order_given(tmp_path: Path) -> None:
    waves = [torch.full((n,), float(n)) for n in (5, 6, 7)]
    data = AudioSet(waves=waves, ids=["a", "b", "c"], labels=torch.tensor([0, 1, 0]), classes=["x", "y"],
                    groups={"speaker": ["s", "t", "u"]}, source="test", num_skipped=2)
    part = data.subset([2, 0])
    assert part.ids == ["c", "a"] and part.labels.tolist() == [0, 0] and part.groups == {"speaker": ["u", "s"]}
    assert [len(w) for w in part.waves] == [7, 5] and part.num_skipped == 2 and part.source == "test"
    assert data.subset(torch.tensor([False, True, True])).ids == ["b", "c"] and len(part) == 2


# ---------------------------------------------------------------------------------------------
# Bad input: each case named, then skipped and counted


def _truncated_header_wav(path: Path) -> None:
    write(path, sine(0.5), subtype="PCM_16")
    path.write_bytes(path.read_bytes()[:30])  # cut inside the header: no data chunk


def _truncated_data_wav(path: Path) -> None:
    write(path, sine(0.5), subtype="PCM_16")
    path.write_bytes(path.read_bytes()[:5000])  # the header still promises 16,000 bytes of samples


def _text_as_wav(path: Path) -> None:
    path.write_text("this is not audio\n" * 20)


def _empty_file(path: Path) -> None:
    path.write_bytes(b"")


def _zero_frame_wav(path: Path) -> None:
    path.write_bytes(wav_header(0))


def _all_zero_wav(path: Path) -> None:
    path.write_bytes(wav_header(2 * RATE) + b"\0" * (2 * RATE))


def _huge_sparse_wav(path: Path) -> None:
    """A header claiming 1e9 bytes (8.7 hours at 16 kHz) on a sparse file of that length: libsndfile
    believes it, and reading it all would take 4 GB of floats."""
    claimed = 1_000_000_000
    with open(path, "wb") as fh:
        fh.write(wav_header(claimed) + pcm16(sine(0.1)))
        fh.truncate(44 + claimed)


def _huge_claim_flac(path: Path) -> None:
    """A FLAC whose STREAMINFO claims 2**35 samples (24 days at 16 kHz) while holding 0.2 s."""
    write(path, sine(0.2))
    data = bytearray(path.read_bytes())
    assert data[:4] == b"fLaC"
    offset = 8 + 10  # STREAMINFO's sample rate / channels / bits / total samples (36 bits), big-endian
    packed = int.from_bytes(data[offset : offset + 8], "big")
    packed = (packed & ~((1 << 36) - 1)) | (1 << 35)
    data[offset : offset + 8] = packed.to_bytes(8, "big")
    path.write_bytes(bytes(data))


def _nan_float_wav(path: Path) -> None:
    wave = sine(0.2)
    wave[100] = np.nan
    path.write_bytes(wav_header(4 * len(wave), bits=32, fmt=3) + wave.astype("<f4").tobytes())


BAD_FILES = [
    ("truncated-header.wav", _truncated_header_wav, r"cannot decode|not an audio file"),
    ("truncated-data.wav", _truncated_data_wav, r"truncated: the WAV header promises 16000 bytes of audio, "
                                                r"the file holds 4956"),
    ("text.wav", _text_as_wav, r"not an audio file libsndfile can read \(Format not recognised"),
    ("empty.wav", _empty_file, r"empty file \(0 bytes\)"),
    ("zero-frames.wav", _zero_frame_wav, r"no audio frames"),
    ("silent.wav", _all_zero_wav, r"silent: every sample is ~0 \(peak 0 < 1e-06\)"),
    ("huge.wav", _huge_sparse_wav, r"its header claims 500000000 frames \(31250 s at 16000 Hz\), over "
                                   r"data\.max_file_seconds=600"),
    ("huge.flac", _huge_claim_flac, r"its header claims 34359738368 frames .* over data\.max_file_seconds=600"),
    ("nan.wav", _nan_float_wav, r"1 NaN or infinite sample\(s\)"),
]


@pytest.mark.parametrize("name, make, reason", BAD_FILES, ids=[case[0] for case in BAD_FILES])
def test_bad_input_is_an_error_naming_the_file(tmp_path: Path, name: str, make, reason: str) -> None:
    folder = tmp_path / "clips"
    folder.mkdir()
    write(folder / "good.wav", sine(0.2))
    make(folder / name)
    with pytest.raises(SelfsupError, match=rf"clips/{name}: ({reason}).*data\.on_bad_file=skip"):
        load_audio_source(folder)


@pytest.mark.parametrize("name, make, reason", BAD_FILES, ids=[case[0] for case in BAD_FILES])
def test_bad_input_is_skipped_and_counted(tmp_path: Path, name: str, make, reason: str) -> None:
    for i in range(3):
        write(tmp_path / f"good{i}.wav", sine(0.2, freq=300 + 100 * i))
    make(tmp_path / name)
    data = load_audio_source(tmp_path, on_bad="skip", max_bad_fraction=0.25)
    assert len(data) == 3 and data.num_skipped == 1 and name not in data.ids


def test_a_lying_header_is_refused_before_any_sample_is_read(tmp_path: Path) -> None:
    _huge_sparse_wav(tmp_path / "huge.wav")
    _huge_claim_flac(tmp_path / "huge.flac")
    for path in (tmp_path / "huge.wav", tmp_path / "huge.flac"):
        tracemalloc.start()
        started = time.perf_counter()
        with pytest.raises(_BadFile, match="header claims"):
            decode_audio(path)
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert peak < 8 << 20 and time.perf_counter() - started < 5, (peak, path)


def test_max_file_seconds_bounds_a_real_long_file(tmp_path: Path) -> None:
    write(tmp_path / "long.flac", sine(3.0))
    with pytest.raises(SelfsupError, match=r"long\.flac: its header claims 48000 frames \(3 s at 16000 Hz\), "
                                           r"over data\.max_file_seconds=2"):
        load_audio_source(tmp_path, max_file_seconds=2)
    assert len(load_audio_source(tmp_path, max_file_seconds=3).waves[0]) == 48000


def test_a_streamed_wav_with_a_placeholder_size_is_not_truncated(tmp_path: Path) -> None:
    """A WAV written to a pipe (espeak-ng --stdout, sox -) cannot fill in its size: 0x7FFFF000 or 0xFFFFFFFF."""
    wave = sine(0.3)
    for i, size in enumerate((0x7FFFF000, 0xFFFFFFFF)):
        (tmp_path / f"streamed{i}.wav").write_bytes(wav_header(size) + pcm16(wave))
    data = load_audio_source(tmp_path)
    assert [len(w) for w in data.waves] == [len(wave)] * 2


def test_skipping_fails_past_max_bad_fraction(tmp_path: Path) -> None:
    for i in range(8):
        write(tmp_path / f"good{i}.wav", sine(0.1))
    _text_as_wav(tmp_path / "a.wav")
    _all_zero_wav(tmp_path / "b.wav")
    with pytest.raises(SelfsupError, match=r"at least 2 of 10 audio files \(20\.0%\) cannot be decoded, over the "
                                           r"limit data\.max_bad_fraction=0\.1; first: .*a\.wav"):
        load_audio_source(tmp_path, on_bad="skip", max_bad_fraction=0.1)
    assert load_audio_source(tmp_path, on_bad="skip", max_bad_fraction=0.2).num_skipped == 2


def test_nothing_usable_is_an_error(tmp_path: Path) -> None:
    _all_zero_wav(tmp_path / "a.wav")
    _empty_file(tmp_path / "b.wav")
    with pytest.raises(SelfsupError, match="no usable audio files: every file failed to decode"):
        load_audio_source(tmp_path, on_bad="skip", max_bad_fraction=1.0)


# ---------------------------------------------------------------------------------------------
# Batches


def _dataset(lengths: list[int], labelled: bool = True) -> AudioSet:
    gen = torch.Generator().manual_seed(0)
    waves = [torch.randn(n, generator=gen) * (i + 1) + i for i, n in enumerate(lengths)]  # distinct means and scales
    labels = torch.arange(len(lengths)) % 3 if labelled else None
    return AudioSet(waves=waves, ids=[f"c{i}" for i in range(len(lengths))], labels=labels,
                    classes=["a", "b", "c"] if labelled else None, groups={}, source="test")


def test_batch_shapes_lengths_and_padding() -> None:
    data = _dataset([500, 3000, 1200, 8000, 64])
    batches = AudioBatches(data, max_samples=2000, device=torch.device("cpu"))
    assert batches.num_items == 5
    indices = torch.tensor([0, 1, 2, 3, 4])
    gen = torch.Generator().manual_seed(3)
    batch = batches(indices, gen)
    audio, lengths = batch["audio"], batch["lengths"]
    assert audio.dtype == torch.float32 and audio.shape == (5, 2000)  # T = the longest crop
    assert lengths.dtype == torch.int64 and lengths.tolist() == [500, 2000, 1200, 2000, 64]
    assert batch["generator"] is gen and batch["id"] == ["c0", "c1", "c2", "c3", "c4"]
    assert torch.equal(batch["index"], indices) and batch["label"].tolist() == [0, 1, 2, 0, 1]
    for row, length in enumerate(lengths.tolist()):
        assert torch.count_nonzero(audio[row, length:]) == 0  # zero right-padding
    short = batches(torch.tensor([0, 4]), gen)
    assert short["audio"].shape == (2, 500)  # padded to this batch's longest crop, not max_samples
    assert "label" not in AudioBatches(_dataset([100], labelled=False), 50, torch.device("cpu"))(
        torch.tensor([0]), torch.Generator().manual_seed(0))


def test_each_crop_is_normalised_over_its_real_samples() -> None:
    data = _dataset([700, 5000, 2500])
    batch = AudioBatches(data, max_samples=2500, device=torch.device("cpu"))(
        torch.tensor([0, 1, 2]), torch.Generator().manual_seed(0))
    for row, length in enumerate(batch["lengths"].tolist()):
        real = batch["audio"][row, :length].double()
        assert abs(float(real.mean())) < 1e-5
        assert float(real.std(unbiased=False)) == pytest.approx(1.0, abs=1e-4)


def test_crops_are_contiguous_pieces_never_longer_than_max_samples() -> None:
    data = _dataset([10_000, 300, 4096])
    batches = AudioBatches(data, max_samples=4096, device=torch.device("cpu"))
    gen = torch.Generator().manual_seed(1)
    starts = set()
    for _ in range(20):
        batch = batches(torch.tensor([0, 1, 2]), gen)
        assert int(batch["lengths"].max()) <= 4096 and batch["audio"].shape[1] <= 4096
        assert batch["lengths"].tolist() == [4096, 300, 4096]
        crop = batch["audio"][0]
        # find where the crop came from: the normalised piece of the wave at that start
        wave = data.waves[0]
        for start in range(len(wave) - 4096 + 1):
            if torch.allclose(normalise_wave(wave[start : start + 4096]), crop, atol=1e-4):
                starts.add(start)
                break
        else:
            raise AssertionError("the crop is no contiguous piece of its clip")
        torch.testing.assert_close(batch["audio"][2], normalise_wave(data.waves[2]), atol=1e-4, rtol=0)
    assert len(starts) > 10  # random starts, not always the opening


def test_the_same_generator_seed_gives_the_same_batch() -> None:
    data = _dataset([9000, 1000, 20_000, 4000])
    batches = AudioBatches(data, max_samples=3000, device=torch.device("cpu"))
    indices = torch.tensor([3, 0, 2, 1])
    first = batches(indices, torch.Generator().manual_seed(7))
    second = batches(indices, torch.Generator().manual_seed(7))
    third = batches(indices, torch.Generator().manual_seed(8))
    assert torch.equal(first["audio"], second["audio"]) and torch.equal(first["lengths"], second["lengths"])
    assert not torch.equal(first["audio"], third["audio"])


def test_the_crops_draw_one_number_per_clip_whatever_the_data() -> None:
    """So the masks a method draws next from the same generator never depend on the clip lengths."""
    gen = torch.Generator().manual_seed(5)
    AudioBatches(_dataset([100, 50_000, 7]), 1000, torch.device("cpu"))(torch.tensor([0, 1, 2]), gen)
    reference = torch.Generator().manual_seed(5)
    torch.rand(3, generator=reference, dtype=torch.float64)
    assert torch.equal(gen.get_state(), reference.get_state())


def test_normalise_padded_matches_normalise_wave_and_the_hf_formula() -> None:
    gen = torch.Generator().manual_seed(0)
    clips = [torch.randn(n, generator=gen) * 3 + 1 for n in (50, 80, 20)]
    audio = torch.zeros(3, 80)
    for i, clip in enumerate(clips):
        audio[i, : len(clip)] = clip
    out = normalise_padded(audio, torch.tensor([50, 80, 20]))
    for i, clip in enumerate(clips):
        x = clip.numpy().astype(np.float64)
        hf = (x - x.mean()) / np.sqrt(x.var() + 1e-7)  # transformers' zero_mean_unit_var_norm
        np.testing.assert_allclose(out[i, : len(clip)].numpy(), hf, atol=1e-5)
        torch.testing.assert_close(out[i, : len(clip)], normalise_wave(clip), atol=1e-5, rtol=0)
        assert torch.count_nonzero(out[i, len(clip):]) == 0
    assert torch.equal(normalise_wave(torch.zeros(10)), torch.zeros(10))  # silence stays zero, no NaN


def test_max_samples_must_be_positive() -> None:
    with pytest.raises(SelfsupError, match="max_samples"):
        AudioBatches(_dataset([10]), 0, torch.device("cpu"))


# ---------------------------------------------------------------------------------------------
# Config


def test_audio_config_keys_and_their_ranges() -> None:
    cfg = load_config()
    assert (cfg.data.sample_rate, cfg.data.max_seconds, cfg.data.max_file_seconds) == (16000, 4.0, 600.0)
    cfg = load_config(None, ["data.sample_rate=8000", "data.max_seconds=2.5", "data.max_file_seconds=30"])
    assert (cfg.data.sample_rate, cfg.data.max_seconds, cfg.data.max_file_seconds) == (8000, 2.5, 30.0)
    for override, match in [("data.sample_rate=0", r"`data\.sample_rate` must be at least 1"),
                            ("data.max_seconds=0", r"`data\.max_seconds` must be positive"),
                            ("data.max_file_seconds=-1", r"`data\.max_file_seconds` must be positive")]:
        with pytest.raises(SelfsupError, match=match):
            load_config(None, [override])
