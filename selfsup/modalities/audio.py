"""Audio: mono clips at 16 kHz held in memory; random crops, normalised per utterance, padded.

- data: `klettres` (spoken letters and syllables in ~20 languages) and `espeak` (synthesised words
  in several voices) built-ins, a folder of audio files (class sub-folders become labels) or a
  CSV/JSONL manifest (`data/audio.py` decodes with soundfile and resamples with soxr, naming bad files);
- pretraining: batches of random crops of at most `data.max_seconds`, each normalised to zero mean
  and unit variance over its real samples (Wav2Vec2FeatureExtractor's do_normalize), right-padded,
  with their lengths; the kNN monitor on held-out clips; the training clips for data-fitted targets
  (HuBERT's MFCC clusters);
- reading: a clip's first `max_seconds`, normalised, and its feature is `encoder.embed` (the mean
  over its real frames); positive pairs are two random crops of each clip; a report shows log-mel
  spectrograms and embeds the clips as playable audio.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from selfsup.config import RunConfig
from selfsup.data.audio import (AUDIO_BUILTINS, AUDIO_EXTENSIONS, AUDIO_FILES, MANIFEST_KINDS, MIN_SAMPLES,
                                AudioBatches, AudioSet, AudioStreamBatches, DecodeClips, _Decoder, collate_clips,
                                decode_clip_bytes, load_audio_source, normalise_wave)
from selfsup.data.decode import _BadFilePolicy
from selfsup.data.shards import (ShardIndex, ShardReader, ShardSplit, ShardSummary, StreamParts, is_shard_folder,
                                 payload_member, read_rows, write_dataset, write_listed, write_shard_folder)
from selfsup.data.sources import FileListing, list_file_source
from selfsup.errors import SelfsupError
from selfsup.modalities.base import (Assembly, EncoderBatch, FitData, Modality, Pairs, Reader, TaskInputs,
                                     check_no_tokenizer)
from selfsup.nn.knn import knn_accuracy
from selfsup.train.runtime import Runtime

_CONTRACT_SAMPLES = 3200  # 0.2 s: 9 frames of 20 ms
_EXAMPLE_SECONDS = 2.0  # of each example clip embedded in a report


_MIN_SAMPLES = MIN_SAMPLES  # wav2vec 2.0's conv stack needs one receptive field (25 ms) for one frame


def pad_clips(clips: list[Tensor]) -> tuple[Tensor, Tensor]:
    """(audio [B, T] right-padded with zeros, lengths int64 [B]); a clip shorter than one frame's
    receptive field is zero-padded to it and counted at that length (silence, not an error)."""
    lengths = torch.tensor([max(len(c), _MIN_SAMPLES) for c in clips], dtype=torch.long)
    audio = torch.zeros(len(clips), int(lengths.max()))
    for i, clip in enumerate(clips):
        audio[i, : len(clip)] = clip
    return audio, lengths


class AudioTaskInputs(TaskInputs):
    batch_size = 32

    def __init__(self, data: AudioSet, rows: Tensor, preprocess: dict[str, Any]):
        self.rows = rows
        self.labels = None if data.labels is None else data.labels[rows]
        limit = int(preprocess["max_seconds"] * preprocess["sample_rate"])
        self.clips = [normalise_wave(data.waves[i][:limit]) for i in rows.tolist()]  # deterministic: the opening

    def batch(self, index: Tensor, device: torch.device) -> EncoderBatch:
        audio, lengths = pad_clips([self.clips[i] for i in index.tolist()])
        return EncoderBatch((audio.to(device), lengths.to(device)), len(index))


class AudioReader(Reader):
    modality = "audio"

    def task_inputs(self, data: AudioSet, rows: Tensor, chunks: int = 1) -> AudioTaskInputs:
        return AudioTaskInputs(data, rows, self.preprocess)

    @torch.no_grad()
    def positive_pairs(self, encoder: nn.Module, data: AudioSet, inputs: TaskInputs, rows: Tensor, runtime: Runtime,
                       generator: torch.Generator) -> Pairs:
        views: list[list[Tensor]] = [[], []]
        for start in range(0, len(rows), 32):
            clips = [inputs.clips[int(i)] for i in rows[start : start + 32]]
            for v in range(2):
                crops = []
                for clip in clips:  # a crop of half to all of the clip, anywhere in it
                    T = len(clip)
                    size = max(1, int(T * (0.5 + 0.5 * float(torch.rand(1, generator=generator)))))
                    begin = int(torch.randint(0, T - size + 1, (1,), generator=generator))
                    crops.append(normalise_wave(clip[begin : begin + size]))
                audio, lengths = pad_clips(crops)
                with runtime.autocast():
                    views[v].append(encoder.embed(audio.to(runtime.device), lengths.to(runtime.device)).float().cpu())
        if not views[0]:
            return Pairs(None, None, "no clips")
        return Pairs(torch.cat(views[0]), torch.cat(views[1]), "two random crops (half to all) of each clip")

    def examples(self, data: AudioSet, rows: Tensor) -> dict[str, Any]:
        rate = int(self.preprocess["sample_rate"])
        clips = [data.waves[int(i)][: int(_EXAMPLE_SECONDS * rate)] for i in rows[:3]]
        return {"thumbnail": spectrogram_grid(clips, rate), "audio": [wav_data_uri(c, rate) for c in clips],
                "snippets": [data.ids[int(i)] for i in rows[:3]]}


class AudioModality(Modality):
    name = "audio"
    batch_kind = "audio"
    default_source = "klettres"
    unit = "clips"

    def load(self, cfg: RunConfig, progress: bool = True) -> AudioSet:
        d = cfg.data
        if is_shard_folder(d.source):  # written by `data shard`: both splits, read into memory
            return self.load_shard_folder(cfg, progress)
        data = load_audio_source(d.source, sample_rate=d.sample_rate, max_file_seconds=d.max_file_seconds,
                                 on_bad=d.on_bad_file, max_bad_fraction=d.max_bad_fraction,
                                 label_column=d.label_column, group_columns=d.group_columns, progress=progress)
        _refuse_short([data.ids[i] for i, wave in enumerate(data.waves) if len(wave) < _MIN_SAMPLES], data.source)
        return data

    def join(self, first: AudioSet, second: AudioSet) -> AudioSet:
        groups = {g: list(first.groups[g]) + list(second.groups.get(g, [""] * len(second))) for g in first.groups}
        labels = None if first.labels is None else torch.cat([first.labels, second.labels])
        return AudioSet(waves=first.waves + second.waves, ids=first.ids + second.ids, labels=labels,
                        classes=first.classes, groups=groups, source=first.source, sample_rate=first.sample_rate)

    def assemble(self, cfg: RunConfig, out: Path, runtime: Runtime, train: AudioSet | ShardSplit, holdout: AudioSet,
                 spec: Any, progress: bool = True) -> Assembly:
        d = cfg.data
        preprocess = {"modality": self.name, "sample_rate": d.sample_rate, "max_seconds": d.max_seconds,
                      "normalize": True}
        max_samples = int(d.max_seconds * d.sample_rate)
        if isinstance(train, ShardSplit):  # a shards folder, streamed
            index = train.index
            parts = StreamParts(index.shards("train"), ShardReader(index.counts(), d.on_bad_file),
                                DecodeClips(d.sample_rate, d.max_file_seconds, d.on_bad_file, d.max_bad_fraction), sum,
                                collate_clips, d.workers, d.shuffle_buffer)
            batches: Any = AudioStreamBatches(parts, max_samples, runtime.device, index.classes is not None, len(train))
            fit_items = (self._first(cfg, index, FIT_CLIPS, labelled=False)
                         if getattr(spec.cls, "fits_targets", False) else None)

            def bank() -> Any:  # the kNN bank: the first labelled training clips (their openings), read when needed
                if index.classes is None or holdout.labels is None or len(holdout) == 0:
                    return train  # no labels: no monitor
                return self._first(cfg, index, cfg.train.knn_max_bank, labelled=True, keep_samples=max_samples)
        else:
            batches = AudioBatches(train, max_samples, runtime.device)
            fit_items = train

            def bank() -> Any:
                return train
        fit_data = None if fit_items is None else FitData(fit_items, normalise_wave, runtime.device)
        return Assembly(
            batches, {self.name: {}}, {self.name: preprocess}, dict(cfg.method),
            lambda rt, encoder_of: knn_monitor(bank(), holdout, preprocess, rt, cfg.train.knn_max_bank, cfg.probe.knn_k,
                                               cfg.seed, encoder_of),
            fit_data=fit_data,
        )

    # -- sharded sources ------------------------------------------------------------------------

    def write_shards(self, cfg: RunConfig, out: Path, shard_items: int, overwrite: bool, progress: bool = True,
                     tokenizer_kind: str | None = None) -> ShardSummary:
        """Folders and manifests: every file checked (decoded at data.sample_rate) under the bad-file
        rule, the kept files split as a run splits them and copied byte for byte; built-ins: loaded as a
        run loads them (at data.sample_rate) and stored as 32-bit float WAV."""
        check_no_tokenizer(tokenizer_kind, self.name)
        d = cfg.data
        listing = _audio_listing(cfg)

        def write(writers: dict[str, Any], folder: Path) -> dict[str, Any]:
            if listing is not None:
                lengths: list[int] = []

                def refuse_short(kept: list[int]) -> None:
                    _refuse_short([listing.items[row][1] for row, n in zip(kept, lengths) if n < MIN_SAMPLES],
                                  str(d.source))

                fields = write_listed(writers, listing, _Decoder(d.sample_rate, float(d.max_file_seconds)),
                                      _BadFilePolicy(d.on_bad_file, d.max_bad_fraction), AUDIO_FILES,
                                      d.holdout_fraction, cfg.seed, progress,
                                      checked=lambda _, wave: lengths.append(len(wave)), after_check=refuse_short)
            else:
                data = self.load(cfg, progress)
                fields = write_dataset(writers, data, lambda i: {"wav": wav_bytes(data.waves[i], data.sample_rate)},
                                       d.holdout_fraction, cfg.seed, progress)
            fields.pop("train_rows")
            return {**fields, "seed": cfg.seed, "holdout_fraction": d.holdout_fraction, "label_column": d.label_column,
                    "settings": {"sample_rate": d.sample_rate}}

        return write_shard_folder(out, overwrite, self.name, shard_items, str(d.source), write)

    def load_shards(self, cfg: RunConfig, index: ShardIndex, split: str, progress: bool = True) -> AudioSet:
        return self._first(cfg, index, None, labelled=False, split=split, progress=progress)

    def _first(self, cfg: RunConfig, index: ShardIndex, limit: int | None, labelled: bool, split: str = "train",
               progress: bool = False, keep_samples: int | None = None) -> AudioSet:
        """The first `limit` clips of a split of a shards folder (all with None; only labelled ones with
        `labelled`), decoded as a run decodes them; `keep_samples`: only each clip's opening."""
        d = cfg.data
        rows = read_rows(index, split, payload_member(AUDIO_EXTENSIONS, "audio"),
                         lambda data: torch.from_numpy(decode_clip_bytes(data, d.sample_rate, d.max_file_seconds)),
                         _BadFilePolicy(d.on_bad_file, d.max_bad_fraction), AUDIO_FILES, progress, limit, labelled)
        waves = rows.values if keep_samples is None else [w[:keep_samples].clone() for w in rows.values]
        return AudioSet(waves=waves, ids=rows.ids, labels=rows.labels, classes=rows.classes, groups=rows.groups,
                        source=index.source, sample_rate=d.sample_rate)

    def reader(self, preprocess: dict[str, Any], folder: Path | None) -> AudioReader:
        return AudioReader(preprocess)

    def contract_inputs(self) -> dict[str, int]:
        return {}

    def contract_batch(self, batch_size: int = 6) -> dict[str, Any]:
        gen = torch.Generator().manual_seed(0)
        audio = torch.randn(batch_size, _CONTRACT_SAMPLES, generator=gen)
        lengths = torch.full((batch_size,), _CONTRACT_SAMPLES, dtype=torch.long)
        lengths[-1] = _CONTRACT_SAMPLES * 3 // 4  # one padded clip
        audio[-1, lengths[-1]:] = 0
        return {"audio": audio, "lengths": lengths, "generator": torch.Generator().manual_seed(1),
                "id": [str(i) for i in range(batch_size)]}

    def contract_fit_data(self) -> FitData:
        gen = torch.Generator().manual_seed(2)
        waves = [torch.randn(_CONTRACT_SAMPLES * 2, generator=gen) for _ in range(8)]
        data = AudioSet(waves=waves, ids=[f"c{i}" for i in range(8)], labels=None, classes=None, groups={},
                        source="contract")
        return FitData(data, normalise_wave, torch.device("cpu"))


FIT_CLIPS = 2048  # a streamed run fits data-fitted targets (HuBERT's clusters) on this many first training clips


def _refuse_short(short: list[str], source: str) -> None:
    """Clips shorter than one 20 ms frame's receptive field leave no frame to train on: an error naming them."""
    if short:
        raise SelfsupError(f"{source}: {len(short)} clip(s) shorter than {_MIN_SAMPLES / 16000 * 1000:.0f} ms "
                           f"at 16 kHz, e.g. {', '.join(short[:3])}; remove them from the source")


def _audio_listing(cfg: RunConfig) -> FileListing | None:
    """The files of a folder or manifest source, listed (not read); None for a built-in, which `load`
    reads into memory as a run does."""
    d = cfg.data
    source = str(d.source)
    if is_shard_folder(source):
        raise SelfsupError(f"{source}: already a shards folder; train on it with data.source={source}")
    path = Path(source).expanduser()
    if source in AUDIO_BUILTINS:
        return None
    if path.is_dir():
        return list_file_source(path, AUDIO_EXTENSIONS, "audio files")
    if path.is_file() and path.suffix.lower() in MANIFEST_KINDS:
        return list_file_source(path, AUDIO_EXTENSIONS, "audio files", d.label_column, d.group_columns)
    return None


def wav_bytes(wave: Tensor, rate: int) -> bytes:
    """A clip float32 [T] as a 32-bit float WAV file's bytes (its samples kept exactly)."""
    import soundfile

    buffer = io.BytesIO()
    soundfile.write(buffer, wave.numpy(), rate, format="WAV", subtype="FLOAT")
    return buffer.getvalue()


def knn_monitor(train: AudioSet, holdout: AudioSet, preprocess: dict[str, Any], runtime: Runtime, max_bank: int,
                k: int, seed: int, encoder_of: Callable[[nn.Module], nn.Module]):
    """kNN accuracy of the current encoder on the held-out clips (None when the data have no labels)."""
    if train.labels is None or holdout.labels is None or len(holdout) == 0:
        return None
    labelled = torch.nonzero(train.labels >= 0).flatten()
    bank = labelled[torch.randperm(len(labelled), generator=torch.Generator().manual_seed(seed))[:max_bank]]
    queries = torch.nonzero(holdout.labels >= 0).flatten()
    if len(bank) == 0 or len(queries) == 0:
        return None
    reader = AudioReader(preprocess)

    def monitor(method: nn.Module) -> dict[str, float]:
        fx = reader.features(encoder_of(method), train, bank, runtime)
        fq = reader.features(encoder_of(method), holdout, queries, runtime)
        return {"knn_acc": knn_accuracy(fx, train.labels[bank], fq, holdout.labels[queries], k=k)}

    return monitor


def log_mel(wave: Tensor, rate: int, num_mels: int = 64) -> Tensor:
    """A log-mel spectrogram [num_mels, frames] (25 ms windows, 10 ms hop) for pictures, not features."""
    win, hop = int(0.025 * rate), int(0.010 * rate)
    if len(wave) < win:
        wave = torch.nn.functional.pad(wave, (0, win - len(wave)))
    spec = torch.stft(wave, n_fft=512, hop_length=hop, win_length=win, window=torch.hann_window(win),
                      return_complex=True).abs().square()  # [257, frames]
    freqs = torch.linspace(0, rate / 2, spec.shape[0])
    mel = 2595 * torch.log10(1 + freqs / 700)
    edges = torch.linspace(0, float(mel.max()), num_mels + 2)
    lower, centre, upper = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    bank = torch.clamp(torch.minimum((mel - lower) / (centre - lower), (upper - mel) / (upper - centre)), min=0)
    return torch.log(bank @ spec + 1e-6)


def spectrogram_grid(clips: list[Tensor], rate: int, height: int = 64) -> Image.Image:
    """Log-mel spectrograms side by side (low frequencies at the bottom), scaled per clip."""
    tiles = []
    for clip in clips:
        spec = log_mel(clip, rate).flip(0)
        spec = (spec - spec.min()) / (spec.max() - spec.min() + 1e-6)
        pixels = (spec.numpy() * 255).astype(np.uint8)
        tiles.append(Image.fromarray(pixels, mode="L").resize((max(pixels.shape[1], 8) * 2, height)))
    width = sum(t.width for t in tiles) + 4 * (len(tiles) - 1)
    canvas = Image.new("L", (max(width, 1), height), 255)
    x = 0
    for tile in tiles:
        canvas.paste(tile, (x, 0))
        x += tile.width + 4
    return canvas.convert("RGB")


def wav_data_uri(clip: Tensor, rate: int) -> str:
    """The clip as a 16-bit WAV `data:` URI, playable in a self-contained page."""
    import soundfile

    peak = float(clip.abs().max()) or 1.0
    buffer = io.BytesIO()
    soundfile.write(buffer, (clip / peak * 0.9).numpy(), rate, format="WAV", subtype="PCM_16")
    return "data:audio/wav;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")
