"""HuBERT — self-supervised speech representation learning by masked prediction of hidden units
(Hsu et al. 2021, arXiv:2106.07447).

Objective: every 20 ms frame of the training audio has a discrete target, its k-means cluster; frames
are masked in spans as in wav2vec 2.0 (each real frame starts a span of M = 10 frames with p = 0.08;
`nn/masking.span_mask`; the Transformer sees the mask embedding there) and the model predicts the
cluster of each masked frame, with cross-entropy over the K clusters of logits

    l_k = cos(W c_t, e_k) / τ,   τ = 0.1,

W a linear projection of the Transformer output c_t and e_k a learned embedding per cluster
(fairseq's final_proj and label_embs). Unmasked frames weigh 0 by default (the paper's α = 1: the loss
is on masked frames only; `unmasked_weight` sets the weight of the unmasked frames' mean loss).
fairseq's L2 penalty on the feature encoder's output (weight 10 in its HuBERT configs) is a knob, off
by default (below).

Targets, made before step 1 from the training data (`fit_targets`) and assigned on the fly per batch:
- `method.targets=mfcc` (iteration 1): 39-d MFCC features (13 Kaldi MFCCs + deltas + delta-deltas,
  fairseq's recipe, `nn/mfcc.py`) of each frame, clustered with k-means (`nn/targets.KMeansTokenizer`,
  shared with BEiT). MFCC come at 100 Hz and the model runs at 50 Hz: model frame t takes MFCC frame
  2t, whose 25 ms window is exactly frame t's receptive field (fairseq's label_rate 100 on a 50 Hz
  model does the same: `forward_targets` keeps every second label).
- `method.targets=run:RUN[:TOWER]` with `method.target_layer=N` (or `run:RUN:layer=N`) (iteration 2):
  the output of Transformer block N of RUN's encoder (the paper: layer 6 of the 12-layer iteration-1
  BASE model; default here: half the depth), clustered likewise. That teacher is loaded with
  `data.load_run(RUN)` in `fit_targets`, frozen, in eval mode, and runs under no_grad in `forward`.

The teacher of iteration 2 is `self.teacher`, not `self.encoder` (the exported encoder is the student),
and its parameters do not require gradients, so no optimizer sees them. It IS stored in the run's
checkpoints (it is a registered submodule): a resumed run skips `fit_targets`, and targets computed on
the fly need the same teacher weights to resume exactly, whether or not the teacher's run folder is
still there. For its weights to have a place in the checkpoint before `fit_targets` runs, the teacher
is built as a copy of this run's encoder architecture: the teacher run must have the same encoder
architecture as this one (the paper's BASE iteration 2 setup), else `fit_targets` says so.

The codebook is written beside the encoder as `hubert_targets.safetensors` (`save_artifacts`),
recording which features it clusters.

Deviations from the paper:
- No feature penalty by default (fairseq: weight 10). Measured on KLettres (wav2vec2_tiny, MFCC
  targets, K = 100, batch 16 crops of at most 2 s, AdamW 5e-4, one seed each): with weight 10 the
  conv features shrank 100-fold in 180 steps and the masked cross-entropy stayed at 3.9-4.3 (steps
  100-180); without it, 3.4-4.1 with masked accuracy up to 0.31. wav2vec 2.0 showed the same penalty
  collapsing its codebook (`wav2vec2.py`).
- Small defaults for CPU: K = 100 clusters for both iterations (the paper: 100 for MFCC, 500 for
  iteration 2), a projection width of 128 (paper 256); k-means on at most 100k frames of at most 15 s
  per clip (the paper: MiniBatchKMeans on 10 % of LibriSpeech 960 h).
- Targets are computed on the fly on each batch's crop (fairseq precomputes them per utterance):
  the MFCC deltas of the first and last two frames of a crop see the crop's edges, not the
  neighbouring audio. The MFCC are those of the normalised clip (what the encoder reads; the
  fitting normalises its clips the same way): a gain only shifts c0.
- Masking: independent Bernoulli starts per real frame, spans cut at the utterance end, at least 2
  spans per utterance, ragged counts per utterance (fairseq: a fixed count, truncated to the batch
  minimum).
- The loss is masked_weight x (mean masked cross-entropy) + unmasked_weight x (mean unmasked
  cross-entropy) (fairseq divides the weighted sums by the number of frames counted); identical with
  the defaults.
- Under DDP the masked and unmasked means, the feature penalty and `masked_fraction` are over the
  global batch's frames (each rank's weighted by its share of them, `nn/distributed.global_mean_scale`),
  as one process computes them; fairseq averages per-GPU means.
- No dropout or LayerDrop; the feature-encoder gradient scale is a knob (fairseq BASE: 0.1), default 1.0.
- An iteration-2 teacher runs under the training precision (bf16 autocast when so), its features are
  assigned to clusters in float32; the iteration-1 MFCC are always float32.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from selfsup.errors import SelfsupError
from selfsup.methods.wav2vec2 import check_audio_encoder, latents_with_penalty
from selfsup.nn.distributed import global_mean_scale
from selfsup.nn.masking import span_mask
from selfsup.nn.mfcc import FEATURE_DIM, FRAME_SHIFT, SAMPLE_RATE, model_rate_mfcc
from selfsup.nn.targets import KMeansTokenizer

if TYPE_CHECKING:
    from selfsup.modalities.base import FitData

HUBERT_TARGETS_FILE = "hubert_targets.safetensors"  # the run keeps the k-means codebook of its targets
_FIT_BATCH = 16  # clips per teacher forward while fitting


@dataclass
class Config:
    targets: str = "mfcc"  # "mfcc" (iteration 1) or "run:RUN[:TOWER]" (iteration 2: clusters of a layer of that run's encoder)
    target_layer: int | None = None  # iteration 2: the teacher's block whose output is clustered (None: half its depth)
    num_clusters: int = 100  # K (the paper: 100 for MFCC, 500 for iteration 2)
    mask_prob: float = 0.8  # p * M: each real frame starts a masked span with probability mask_prob / mask_length (p = 0.08)
    mask_length: int = 10  # M, frames per span
    min_masks: int = 2  # spans at least, per utterance
    proj_dim: int = 128  # width of the projection and of the cluster embeddings (the paper: 256)
    logit_temp: float = 0.1  # τ of the cosine logits
    masked_weight: float = 1.0  # weight of the masked frames' mean cross-entropy
    unmasked_weight: float = 0.0  # weight of the unmasked frames' mean cross-entropy (the paper's default: 0)
    feature_penalty: float = 0.0  # weight of the L2 penalty on the feature encoder's output (fairseq: 10; see the docstring)
    feature_grad_mult: float = 1.0  # scale of the gradient entering the convolutional feature encoder (fairseq BASE: 0.1)
    fit_max_frames: int = 100_000  # frames (at most) the k-means is fitted on
    fit_max_seconds: float = 15.0  # longest piece of a clip read while fitting (a random window of longer clips)
    fit_passes: int = 5  # mini-batch k-means passes


def parse_targets(text: str) -> tuple[str | None, int | None]:
    """`mfcc` -> (None, None); `run:RUN[:TOWER][:layer=N]` -> ("RUN[:TOWER]", N or None)."""
    if text == "mfcc":
        return None, None
    if isinstance(text, str) and text.startswith("run:"):
        spec, layer = text[len("run:"):], None
        head, sep, tail = spec.rpartition(":")
        if sep and tail.startswith("layer="):
            try:
                layer = int(tail[len("layer="):])
            except ValueError:
                raise SelfsupError(f"method.targets={text}: `layer=` takes a block number, e.g. run:runs/hubert1:layer=2") from None
            spec = head
        if spec:
            return spec, layer
    raise SelfsupError(f"method.targets must be `mfcc` (iteration 1) or `run:RUN` (iteration 2: a finished HuBERT "
                       f"run, e.g. run:runs/hubert1 with method.target_layer=2, or run:runs/hubert1:layer=2), got {text!r}")


def _mfcc_stride(encoder: nn.Module) -> int:
    """MFCC frames (10 ms) per encoder frame, from the encoder's own frame arithmetic (2 for 20 ms frames)."""
    frames = encoder.frame_lengths(torch.tensor([2 * SAMPLE_RATE, 3 * SAMPLE_RATE]))
    per_second = int(frames[1] - frames[0])
    if per_second < 1 or SAMPLE_RATE % per_second or (SAMPLE_RATE // per_second) % FRAME_SHIFT:
        raise SelfsupError(f"HuBERT's MFCC targets need encoder frames every multiple of 10 ms; this encoder gives "
                           f"{per_second} frames per second")
    return SAMPLE_RATE // per_second // FRAME_SHIFT


def pad_clips(clips: list[Tensor]) -> tuple[Tensor, Tensor]:
    """(audio [B, T] right-padded with zeros, lengths int64 [B])."""
    lengths = torch.tensor([len(c) for c in clips], dtype=torch.long)
    audio = clips[0].new_zeros(len(clips), int(lengths.max()))
    for i, clip in enumerate(clips):
        audio[i, : len(clip)] = clip
    return audio, lengths


class HuBERT(nn.Module):
    fits_targets = True  # pretrain calls fit_targets(data, generator) before training

    def __init__(self, cfg: Config, encoder: nn.Module):
        super().__init__()
        check_audio_encoder(encoder, "hubert")
        if cfg.mask_length < 1 or not 0.0 < cfg.mask_prob <= cfg.mask_length:
            raise SelfsupError(f"method.mask_prob must be in (0, method.mask_length] and mask_length >= 1, got "
                               f"{cfg.mask_prob}, {cfg.mask_length}")
        if cfg.logit_temp <= 0 or cfg.masked_weight < 0 or cfg.unmasked_weight < 0:
            raise SelfsupError("method.logit_temp must be positive and the loss weights non-negative")
        self.cfg = cfg
        self.encoder = encoder
        self.run, layer = parse_targets(cfg.targets)
        if layer is not None and cfg.target_layer is not None and layer != cfg.target_layer:
            raise SelfsupError(f"method.targets={cfg.targets} names layer {layer} but method.target_layer is "
                               f"{cfg.target_layer}: give it once")
        self.teacher: nn.Module | None = None
        if self.run is None:
            self.target_layer = None
            self.mfcc_stride = _mfcc_stride(encoder)
            target_dim = FEATURE_DIM
        else:
            # A frozen copy of this architecture, filled with the teacher run's weights by fit_targets (and
            # by the checkpoint on resume).
            self.teacher = copy.deepcopy(encoder).requires_grad_(False).eval()
            depth = int(encoder.num_layers)
            self.target_layer = layer if layer is not None else cfg.target_layer
            if self.target_layer is None:
                self.target_layer = max(1, depth // 2)
            if not 0 <= self.target_layer <= depth:
                raise SelfsupError(f"method.target_layer must be a block of the teacher, 1 to {depth}, got {self.target_layer}")
            target_dim = int(encoder.dim)
        self.tokenizer = KMeansTokenizer(cfg.num_clusters, target_dim)
        self.project = nn.Linear(encoder.dim, cfg.proj_dim)  # fairseq's final_proj
        self.cluster_embeddings = nn.Parameter(torch.empty(cfg.num_clusters, cfg.proj_dim))  # fairseq's label_embs
        nn.init.uniform_(self.cluster_embeddings)

    def train(self, mode: bool = True) -> HuBERT:
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()  # the teacher only ever gives targets
        return self

    # ---------------------------------------------------------------- targets

    def _load_teacher(self, data: FitData) -> None:
        if data.load_run is None:
            raise SelfsupError(f"method.targets={self.cfg.targets}: this run cannot load other runs' encoders")
        loaded, meta = data.load_run(self.run)
        mine, theirs = self.teacher.state_dict(), loaded.state_dict()
        if set(mine) != set(theirs) or any(mine[k].shape != theirs[k].shape for k in mine):
            described = (meta or {}).get("encoder", {})
            raise SelfsupError(
                f"method.targets={self.cfg.targets}: that run's encoder ({described.get('name', '?')}, "
                f"{described.get('config', {})}) is not this run's architecture; HuBERT's iteration 2 trains the "
                f"architecture of the run its targets come from: set encoder.name and its knobs as in that run's "
                f"encoder.json")
        self.teacher.load_state_dict(theirs)
        self.teacher.requires_grad_(False).eval()

    def _teacher_features(self, audio: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        """(features [B, F, D] of the teacher's block `target_layer`, frame_mask [B, F])."""
        z, frame_mask = self.teacher.latents(audio, lengths)
        return self.teacher.contextualise(z, frame_mask, layer=self.target_layer), frame_mask

    @torch.no_grad()
    def fit_targets(self, data: FitData, generator: torch.Generator) -> dict[str, float]:
        """Fit the k-means codebook on frames of the training clips (`data.items`: an AudioSet, or a list of
        waves [T]): MFCC features (iteration 1) or the teacher's layer (iteration 2), each clip (a random
        window of at most fit_max_seconds) prepared as the batches are (`data.prepare`)."""
        cfg = self.cfg
        if self.teacher is not None:
            self._load_teacher(data)
        waves = getattr(data.items, "waves", data.items)
        max_samples = max(1, int(cfg.fit_max_seconds * SAMPLE_RATE))
        chosen: list[Tensor] = []
        total = 0
        for i in torch.randperm(len(waves), generator=generator, device=generator.device).tolist():
            wave = waves[i]
            length = min(len(wave), max_samples)
            start = int(torch.randint(len(wave) - length + 1, (1,), generator=generator, device=generator.device))
            frames = int(self.encoder.frame_lengths(torch.tensor([length])))
            if frames < 1:
                continue  # shorter than one frame
            chosen.append(data.prepare(wave[start : start + length].to(data.device)))
            total += frames
            if total >= cfg.fit_max_frames:
                break
        if not chosen:
            raise SelfsupError("HuBERT found no training clip long enough for one frame (25 ms) to fit its targets on")
        vectors = self._clip_features(chosen)  # [M, dim]
        if len(vectors) > cfg.fit_max_frames:
            keep = torch.randperm(len(vectors), generator=generator, device=generator.device)[: cfg.fit_max_frames]
            vectors = vectors[keep.sort().values.to(vectors.device)]
        stats = self.tokenizer.fit(vectors.to(data.device), generator, num_passes=cfg.fit_passes)
        self.tokenizer.to(self.cluster_embeddings.device)
        return {**stats, "frames": float(len(vectors)), "clips": float(len(chosen))}

    def _clip_features(self, clips: list[Tensor]) -> Tensor:
        """The features to cluster of every real frame of `clips` (each [T]), concatenated [M, dim]."""
        if self.teacher is None:
            return torch.cat([model_rate_mfcc(c, int(self.encoder.frame_lengths(torch.tensor([len(c)]))), self.mfcc_stride)
                              for c in clips])
        device = self.cluster_embeddings.device
        order = sorted(range(len(clips)), key=lambda i: len(clips[i]))  # similar lengths together: less padding
        parts = []
        for start in range(0, len(order), _FIT_BATCH):
            audio, lengths = pad_clips([clips[i] for i in order[start : start + _FIT_BATCH]])
            features, frame_mask = self._teacher_features(audio.to(device), lengths.to(device))
            parts.append(features[frame_mask].float())
        return torch.cat(parts)

    @torch.no_grad()
    def assign_targets(self, audio: Tensor, lengths: Tensor, frame_mask: Tensor) -> Tensor:
        """Cluster ids [B, F] of a batch's frames (-1 at padded frames)."""
        B, num_frames = frame_mask.shape
        targets = torch.full((B, num_frames), -1, dtype=torch.long, device=frame_mask.device)
        if self.teacher is not None:
            features, teacher_mask = self._teacher_features(audio, lengths)
            if teacher_mask.shape != frame_mask.shape:
                raise SelfsupError("the teacher's frames do not line up with the encoder's")
            with torch.autocast(features.device.type, enabled=False):
                targets[frame_mask] = self.tokenizer.assign(features[frame_mask].float())
            return targets
        counts = frame_mask.sum(dim=1).tolist()
        with torch.autocast(audio.device.type, enabled=False):
            for b in range(B):
                if counts[b]:
                    clip = audio[b, : int(lengths[b])].float()
                    targets[b, : counts[b]] = self.tokenizer.assign(model_rate_mfcc(clip, counts[b], self.mfcc_stride))
        return targets

    def save_artifacts(self, folder: Path) -> None:
        """The fitted codebook beside the encoder (`hubert_targets.safetensors`), with what it clusters."""
        if self.teacher is None:
            what = {"targets": "mfcc", "features": f"kaldi mfcc 13 + deltas + delta-deltas, every {self.mfcc_stride}th "
                                                   f"10 ms frame"}
        else:
            what = {"targets": self.cfg.targets, "features": f"block {self.target_layer} of run {self.run}"}
        self.tokenizer.save(folder / HUBERT_TARGETS_FILE, metadata=what)

    # ---------------------------------------------------------------- the objective

    def logits(self, context: Tensor) -> Tensor:
        """Cosine logits [N, K] of context frames [N, D] against the cluster embeddings, / τ."""
        x = F.normalize(self.project(context).float(), dim=-1)
        with torch.autocast(x.device.type, enabled=False):
            return x @ F.normalize(self.cluster_embeddings.float(), dim=-1).T / self.cfg.logit_temp

    def forward(self, batch: dict, progress: float) -> dict[str, Tensor]:
        cfg = self.cfg
        audio, generator = batch["audio"], batch["generator"]
        lengths = batch.get("lengths")
        if lengths is None:
            lengths = torch.full((audio.shape[0],), audio.shape[1], dtype=torch.long, device=audio.device)
        z, frame_mask, penalty = latents_with_penalty(self.encoder, audio, lengths, cfg.feature_grad_mult)
        targets = self.assign_targets(audio, lengths, frame_mask)  # [B, F]
        mask = span_mask(frame_mask, generator, mask_prob=cfg.mask_prob, span=cfg.mask_length,
                         min_masks=cfg.min_masks)  # [B, F], True = masked
        context = self.encoder.contextualise(z, frame_mask, mask)  # [B, F, D]
        out: dict[str, Tensor] = {}
        loss = 0.0 * context.float().sum()  # keeps the graph whole if no frame counts
        unmasked = frame_mask & ~mask
        # Under DDP each mean is weighted by this rank's share of its frames (masked, unmasked, real:
        # utterances differ in length and masks in size), so the ranks' average is the global batch's
        # mean; ones in one process. One collective for the three.
        scales = global_mean_scale(torch.stack([mask.sum(), unmasked.sum(), frame_mask.sum()]).float(), self.training)
        for i, (name, where, weight) in enumerate((("masked", mask, cfg.masked_weight),
                                                   ("unmasked", unmasked, cfg.unmasked_weight))):
            if name == "unmasked" and weight == 0:
                continue
            if bool(where.any()):
                logits = self.logits(context[where])  # [N, K]
                part = F.cross_entropy(logits, targets[where]) * scales[i]
                accuracy = (logits.argmax(dim=-1) == targets[where]).float().mean() * scales[i]
            else:
                part, accuracy = 0.0 * loss, torch.zeros((), device=loss.device)
            loss = loss + weight * part
            out[f"{name}_loss"], out[f"{name}_acc"] = part.detach(), accuracy.detach()
        if penalty is not None:
            penalty = penalty * scales[2]  # a mean over the real frames
            loss = loss + cfg.feature_penalty * penalty
            out["feature_penalty"] = penalty.detach()
        out["masked_fraction"] = (mask.sum() / frame_mask.sum().clamp(min=1)).float() * scales[2]
        return {"loss": loss, **out}
