"""Speech encoder of wav2vec 2.0 (Baevski et al. 2020, arXiv:2006.11477), also HuBERT's (Hsu et al. 2021,
arXiv:2106.07447): a convolutional feature encoder over the raw waveform, then a Transformer.

    audio [B, T] (16 kHz, normalised per utterance)
      -> 7 temporal convolutions, each Conv1d -> LayerNorm over channels -> GELU   (`convs`)
      -> LayerNorm                                    = the latents z [B, F, C]    (`latents`)
      -> Linear C -> D; masked frames := mask_embedding; padded frames := 0
      -> + GELU(weight-normed grouped Conv1d over time)  (relative positions, `pos_conv`)
      -> pre-LN Transformer blocks (padded frames never attended to) -> LayerNorm  (`contextualise`)

The paper's feature encoder has kernels (10, 3, 3, 3, 3, 2, 2) and strides (5, 2, 2, 2, 2, 2, 2): one
frame per 320 samples (20 ms at 16 kHz) with a receptive field of 400 samples (25 ms), so 1 s of audio
gives 49 frames. `frame_lengths` is the same arithmetic on each clip's real samples; a frame is real
when its whole receptive field lies inside the clip, which makes the conv stack's real frames
independent of right-padding.

The layout is the paper's LARGE variant ("layer_norm" feature extractor, pre-LN "stable layer norm"
blocks), which is transformers' `Wav2Vec2Model` / `HubertModel` with feat_extract_norm="layer",
do_stable_layer_norm=True, weight for weight; `selfsup.export.hf_audio` writes that folder and its
test reproduces these hidden states to 1e-4. The blocks are the shared pre-norm blocks of
`selfsup.encoders.transformer` (fused qkv split into transformers' q/k/v projections on export) with
PyTorch's LayerNorm epsilon 1e-5, used everywhere here as in fairseq and transformers.

Deviations from the paper and choices:
- The pre-LN layout of the paper's LARGE model at every size (the BASE model is post-LN with a
  GroupNorm feature encoder): pre-LN trains without warm-up tricks, as the ViT and text encoders here.
- No dropout, LayerDrop or feature-gradient scaling (the paper scales the conv stack's gradient by
  0.1): runs are short and exact resume tests need determinism; a method may scale the latents'
  gradient itself (`z = z * s + z.detach() * (1 - s)`).
- Padded frames are set to zero before the position convolution (as transformers does), so a clip's
  real frames see the same zeros beyond its end alone or padded in a batch; the Transformer hides
  them as keys. Their outputs are computed but meaningless; `embed` averages real frames only.
- `contextualise(layer=k)` returns block k's output before the final LayerNorm (k = 0: the
  Transformer's input, after positions), which is transformers' `hidden_states[k]`; HuBERT's
  iteration-2 targets read it.
- Initialisation as fairseq / transformers: Kaiming-normal conv weights, N(0, 0.02) Transformer
  linears with zero biases, PyTorch's default for the C -> D projection, the position convolution
  N(0, 2 / sqrt(kernel * D)) before weight norm (its gain g starts at the weight's norm), and a
  uniform [0, 1) mask embedding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from selfsup.encoders.transformer import Block
from selfsup.errors import SelfsupError

EPS = 1e-5  # every LayerNorm's epsilon (PyTorch's default; fairseq's and transformers' wav2vec 2.0)
PAPER_KERNELS, PAPER_STRIDES = (10, 3, 3, 3, 3, 2, 2), (5, 2, 2, 2, 2, 2, 2)  # 400-sample frames every 320


@dataclass
class AudioEncoderConfig:
    """Architecture knobs of the wav2vec 2.0 encoder (defaults: the paper's BASE sizes, 95M params);
    the presets live in `selfsup.encoders.ENCODERS`."""

    conv_channels: int = 512  # C: channels of every feature-encoder convolution = the latent width (paper 512)
    conv_kernels: list[int] = field(default_factory=lambda: list(PAPER_KERNELS))  # kernel of each convolution
    conv_strides: list[int] = field(default_factory=lambda: list(PAPER_STRIDES))  # stride of each; product = frame hop (320)
    conv_bias: bool = True  # a bias in each convolution (wav2vec 2.0 LARGE's layer-norm extractor has one)
    dim: int = 768  # D: the Transformer width
    depth: int = 12  # Transformer blocks
    heads: int = 12  # attention heads per block; dim must be a multiple of it
    mlp_ratio: float = 4.0  # each block's feed-forward width as a multiple of dim (4.0 at dim 768 = FFN 3072)
    pos_conv_kernel: int = 128  # frames the relative position convolution spans (128 = 2.56 s)
    pos_conv_groups: int = 16  # groups of that convolution; dim must be a multiple of it

    def __post_init__(self) -> None:
        for key in ("conv_channels", "dim", "depth", "heads", "pos_conv_kernel", "pos_conv_groups"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise SelfsupError(f"encoder config key '{key}' must be a positive integer, got {value!r}")
        for key in ("conv_kernels", "conv_strides"):
            value = getattr(self, key)
            items = list(value) if isinstance(value, (list, tuple)) else None
            if not items or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in items):
                raise SelfsupError(
                    f"encoder config key '{key}' must be a non-empty list of positive integers "
                    f"(one per convolution, e.g. {list(PAPER_KERNELS if key == 'conv_kernels' else PAPER_STRIDES)}), "
                    f"got {value!r}"
                )
            setattr(self, key, items)  # a tuple from code or a list from YAML/JSON: one form, so describe() is stable
        if len(self.conv_kernels) != len(self.conv_strides):
            raise SelfsupError(
                f"encoder config keys 'conv_kernels' ({len(self.conv_kernels)} items) and 'conv_strides' "
                f"({len(self.conv_strides)} items) must have one entry per convolution each"
            )
        if not isinstance(self.conv_bias, bool):
            raise SelfsupError(f"encoder config key 'conv_bias' must be true or false, got {self.conv_bias!r}")
        if self.dim % self.heads != 0:
            raise SelfsupError(f"encoder config key 'dim' ({self.dim}) must be a multiple of 'heads' ({self.heads})")
        if self.dim % self.pos_conv_groups != 0:
            raise SelfsupError(
                f"encoder config key 'dim' ({self.dim}) must be a multiple of 'pos_conv_groups' ({self.pos_conv_groups})"
            )
        ratio = self.mlp_ratio
        if (not isinstance(ratio, (int, float)) or isinstance(ratio, bool) or not math.isfinite(ratio)
                or int(self.dim * ratio) < 1):
            raise SelfsupError(f"encoder config key 'mlp_ratio' must be a positive number, got {ratio!r}")


class ConvLayer(nn.Module):
    """One feature-encoder layer: Conv1d over time, LayerNorm over its channels, GELU."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int, stride: int, bias: bool) -> None:
        super().__init__()
        self.conv = nn.Conv1d(in_channels, out_channels, kernel, stride=stride, bias=bias)
        self.norm = nn.LayerNorm(out_channels, eps=EPS)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv(x)  # [B, C, T']
        x = self.norm(x.transpose(1, 2)).transpose(1, 2)  # per frame, over channels
        return F.gelu(x)


class PositionalConv(nn.Module):
    """The relative position embedding: GELU(grouped Conv1d over time), its weight weight-normed.

    weight = g * v / ||v||, the norm taken per kernel tap over both channel axes (weight norm with
    dim=2, as the paper and transformers' parametrisation), g [1, 1, K] and v [D, D / groups, K]. The
    convolution pads K // 2 frames on each side; an even kernel then yields one frame too many at the
    end, which is dropped (transformers' `SamePadLayer`), so output frame t sees frames t - K/2 ..
    t + K/2 - 1.
    """

    def __init__(self, dim: int, kernel: int, groups: int) -> None:
        super().__init__()
        self.kernel, self.groups = kernel, groups
        self.weight_g = nn.Parameter(torch.ones(1, 1, kernel))
        self.weight_v = nn.Parameter(torch.empty(dim, dim // groups, kernel))
        self.bias = nn.Parameter(torch.zeros(dim))

    def weight(self) -> Tensor:
        """The effective convolution weight [D, D / groups, K]."""
        v = self.weight_v
        return v * (self.weight_g / v.norm(dim=(0, 1), keepdim=True))

    def forward(self, x: Tensor) -> Tensor:
        B, N, D = x.shape
        out = F.conv1d(x.transpose(1, 2), self.weight(), self.bias, padding=self.kernel // 2, groups=self.groups)
        out = out[:, :, :N]  # [B, D, N]: an even kernel's extra last frame dropped
        return F.gelu(out).transpose(1, 2)  # [B, N, D]


class AudioEncoder(nn.Module):
    """Raw audio [B, T] -> frames [B, F, D]; the two halves (`latents`, `contextualise`) are exposed for
    the masked-prediction objectives, which mask between them."""

    def __init__(self, cfg: AudioEncoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.dim: int = cfg.dim
        self.latent_dim: int = cfg.conv_channels
        self.num_layers: int = cfg.depth
        self.frame_hop: int = math.prod(cfg.conv_strides)  # samples per frame step (320 = 20 ms at 16 kHz)
        receptive = 1
        for kernel, stride in zip(reversed(cfg.conv_kernels), reversed(cfg.conv_strides)):
            receptive = (receptive - 1) * stride + kernel
        self.min_samples: int = receptive  # one frame's receptive field (400 = 25 ms): the shortest clip
        C, D = cfg.conv_channels, cfg.dim
        self.convs = nn.ModuleList(
            ConvLayer(1 if i == 0 else C, C, kernel, stride, cfg.conv_bias)
            for i, (kernel, stride) in enumerate(zip(cfg.conv_kernels, cfg.conv_strides))
        )
        self.latent_norm = nn.LayerNorm(C, eps=EPS)
        self.project = nn.Linear(C, D)
        self.mask_embedding = nn.Parameter(torch.empty(D))
        self.pos_conv = PositionalConv(D, cfg.pos_conv_kernel, cfg.pos_conv_groups)
        self.blocks = nn.ModuleList(Block(D, cfg.heads, cfg.mlp_ratio, eps=EPS) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(D, eps=EPS)
        self._init_weights()

    def _init_weights(self) -> None:
        # fairseq / transformers: Kaiming-normal convolutions (their biases keep PyTorch's uniform
        # default), BERT's N(0, 0.02) in the Transformer, PyTorch's default for the projection (set at
        # construction), the position conv at N(0, 2/sqrt(K*D)) with g = ||v|| so that it starts as
        # the plain convolution, and a uniform mask embedding.
        for layer in self.convs:
            nn.init.kaiming_normal_(layer.conv.weight)
        for module in self.blocks.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
        for module in self.modules():
            if isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        pos = self.pos_conv
        with torch.no_grad():
            nn.init.normal_(pos.weight_v, std=2.0 / math.sqrt(pos.kernel * self.dim))
            pos.weight_g.copy_(pos.weight_v.norm(dim=(0, 1), keepdim=True))
            pos.bias.zero_()
        nn.init.uniform_(self.mask_embedding)

    # ---------------------------------------------------------------- lengths

    def frame_lengths(self, lengths: Tensor) -> Tensor:
        """Real frames [B] of clips with `lengths` [B] real samples: floor((L - k) / s) + 1 per
        convolution, as transformers' `_get_feat_extract_output_lengths` (0 below `min_samples`)."""
        frames = lengths.long()
        for kernel, stride in zip(self.cfg.conv_kernels, self.cfg.conv_strides):
            frames = torch.div(frames - kernel, stride, rounding_mode="floor") + 1
        return frames.clamp(min=0)

    def _check_audio(self, audio: Tensor, lengths: Tensor | None) -> Tensor:
        """The real samples per clip [B] (all of T without `lengths`), or an error saying what to fix."""
        if audio.dim() != 2 or not audio.is_floating_point():
            raise SelfsupError(
                f"the audio encoder expects float waveforms shaped [batch, samples], got {audio.dtype} "
                f"of shape {tuple(audio.shape)}"
            )
        B, T = audio.shape
        if lengths is None:
            lengths = torch.full((B,), T, dtype=torch.long, device=audio.device)
        elif lengths.shape != (B,) or lengths.is_floating_point() or lengths.dtype == torch.bool:
            raise SelfsupError(
                f"lengths must be an integer tensor of real samples per clip, shaped [{B}], got {lengths.dtype} "
                f"of shape {tuple(lengths.shape)}"
            )
        shortest, longest = (int(v) for v in torch.aminmax(lengths))
        if longest > T:
            raise SelfsupError(f"lengths hold {longest} samples but the audio has only {T} per clip")
        if shortest < self.min_samples:
            raise SelfsupError(
                f"a clip of {shortest} samples is shorter than one frame's receptive field ({self.min_samples} "
                f"samples, {self.min_samples / 16:.0f} ms at 16 kHz); pad or drop clips that short"
            )
        return lengths

    # ---------------------------------------------------------------- the two halves

    def latents(self, audio: Tensor, lengths: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(z [B, F, C]: the conv stack's output after its LayerNorm, frame_mask bool [B, F], True = real frame).

        `lengths` [B] are the real samples of right-padded clips (all of T when None). Padded frames
        of z hold whatever the padding gives; only frame_mask says which are real.
        """
        lengths = self._check_audio(audio, lengths)
        x = audio.unsqueeze(1)  # [B, 1, T]
        for layer in self.convs:
            x = layer(x)  # [B, C, T']
        z = self.latent_norm(x.transpose(1, 2))  # [B, F, C]
        B, num_frames, C = z.shape
        frame_mask = torch.arange(num_frames, device=z.device) < self.frame_lengths(lengths).unsqueeze(1)  # [B, F]
        return z, frame_mask

    def contextualise(
        self, z: Tensor, frame_mask: Tensor, mask: Tensor | None = None, layer: int | None = None,
    ) -> Tensor:
        """z [B, F, C] -> [B, F, D]: the projection; frames where `mask` (bool [B, F], True = masked)
        are replaced by `mask_embedding`; padded frames (`frame_mask` False) set to zero; the position
        convolution added; the blocks (padded frames hidden as keys); the final LayerNorm.

        `layer=k` returns the output of block k (1-based, before the final LayerNorm) instead; k = 0
        is the blocks' input (after positions). Blocks after k do not run.
        """
        B, N, C = z.shape
        if C != self.latent_dim:
            raise SelfsupError(f"contextualise expects latents of width {self.latent_dim}, got shape {tuple(z.shape)}")
        if frame_mask.shape != (B, N) or frame_mask.dtype != torch.bool:
            raise SelfsupError(
                f"frame_mask must be a bool tensor shaped [{B}, {N}] (True = real frame, as latents() returns), "
                f"got {frame_mask.dtype} of shape {tuple(frame_mask.shape)}"
            )
        if layer is not None and (isinstance(layer, bool) or not isinstance(layer, int)
                                  or not 0 <= layer <= self.num_layers):
            raise SelfsupError(
                f"layer must be an integer from 0 to {self.num_layers} (the blocks, 1-based), got {layer!r}"
            )
        x = self.project(z)  # [B, F, D]
        if mask is None:
            # Nothing is masked; a zero-weight term keeps the mask embedding in the graph for DDP.
            x = x + 0.0 * self.mask_embedding.to(x.dtype)
        else:
            if mask.shape != (B, N) or mask.dtype != torch.bool:
                raise SelfsupError(
                    f"mask must be a bool tensor shaped [{B}, {N}] (True = masked frame), got {mask.dtype} "
                    f"of shape {tuple(mask.shape)}"
                )
            x = torch.where(mask.unsqueeze(-1), self.mask_embedding.to(x.dtype), x)
        real = frame_mask.unsqueeze(-1)  # [B, F, 1]
        x = torch.where(real, x, torch.zeros((), dtype=x.dtype, device=x.device))  # padded frames: 0
        x = x + self.pos_conv(x)
        if layer == 0:
            return x
        # Keys only: every query (a padded frame too) sees the clip's real frames, of which there is
        # at least one. None when nothing is padded, so SDPA may take its unmasked kernels.
        attn_mask = None if bool(frame_mask.all()) else frame_mask[:, None, None, :]  # [B, 1, 1, F]
        for index, block in enumerate(self.blocks, start=1):
            x = block(x, attn_mask)
            if index == layer:
                return x
        return self.norm(x)

    # ---------------------------------------------------------------- the encoder contract

    def forward(self, audio: Tensor, mask: Tensor | None = None, lengths: Tensor | None = None) -> Tensor:
        """Frames [B, F, D] of right-padded audio [B, T] with `lengths` [B] real samples; `mask` as in
        `contextualise`."""
        z, frame_mask = self.latents(audio, lengths)
        return self.contextualise(z, frame_mask, mask)

    def embed(self, audio: Tensor, lengths: Tensor | None = None) -> Tensor:
        """The clip's representation [B, D]: the mean of its real frames' outputs."""
        z, frame_mask = self.latents(audio, lengths)
        frames = self.contextualise(z, frame_mask)  # [B, F, D]
        real = frame_mask.unsqueeze(-1)  # [B, F, 1]
        # Summed in fp32 (a bf16 sum of hundreds of frames drifts); padded frames take no part.
        total = torch.where(real, frames.float(), 0.0).sum(dim=1)  # [B, D]
        return (total / real.sum(dim=1)).to(frames.dtype)  # every clip has a real frame
