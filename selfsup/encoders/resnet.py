"""ResNet image encoder (He et al. 2015, arXiv:1512.03385) with BasicBlocks.

The vision methods need a convolutional baseline that every SSL paper reports against; this is it.
The encoder returns the final feature map as a token sequence (so that methods written against the
Encoder contract treat CNN cells and ViT patches alike) and pools it by global averaging for probes.

Small inputs (CIFAR-sized, 32 px) get the stem from the SimCLR paper's CIFAR experiments: one 3x3
stride-1 convolution and no max-pool, because the ImageNet stem (7x7 stride 2 plus max-pool) would
shrink a 32 px image to 8 px before the first block and throw most of the signal away.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from selfsup.errors import SelfsupError


@dataclass
class ResNetConfig:
    """Architecture knobs of a BasicBlock ResNet; the presets live in `selfsup.encoders.ENCODERS`."""

    layers: list[int] = field(default_factory=lambda: [2, 2, 2, 2])  # blocks per stage; stage i has width * 2**i channels
    width: int = 64  # channels of the stem and the first stage
    small_input: bool = True  # True: 3x3 stride-1 stem, no max-pool (CIFAR-sized images); False: ImageNet 7x7/2 stem + max-pool
    zero_init_residual: bool = False  # start each residual block as the identity (last BN gamma = 0): helps large-batch supervised runs, but leaves an untrained net a strided subsampler

    def __post_init__(self) -> None:
        if not isinstance(self.width, int) or isinstance(self.width, bool) or self.width < 1:
            raise SelfsupError(f"encoder config key 'width' must be a positive integer, got {self.width!r}")
        layers = list(self.layers) if isinstance(self.layers, (list, tuple)) else None
        if not layers or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in layers):
            raise SelfsupError(
                f"encoder config key 'layers' must be a non-empty list of positive integers "
                f"(blocks per stage, e.g. [2, 2, 2, 2]), got {self.layers!r}"
            )
        if not isinstance(self.small_input, bool):
            raise SelfsupError(f"encoder config key 'small_input' must be true or false, got {self.small_input!r}")
        self.layers = layers  # a tuple from code or a list from YAML/JSON: store one form so describe() is stable


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with an identity (or 1x1 projection) shortcut."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: Tensor) -> Tensor:
        residual = self.relu(self.bn1(self.conv1(x)))
        residual = self.bn2(self.conv2(residual))
        return self.relu(residual + self.shortcut(x))


class ResNet(nn.Module):
    """BasicBlock ResNet whose tokens are the cells of its final feature map.

    `image_size` is accepted so that every encoder is built the same way, and ignored: the network
    is fully convolutional and pools globally, so any input size of at least a few pixels works.
    """

    def __init__(self, cfg: ResNetConfig, *, in_channels: int, image_size: int | None = None) -> None:
        super().__init__()
        if in_channels < 1:
            raise SelfsupError(f"in_channels must be a positive integer, got {in_channels}")
        self.cfg = cfg
        width = cfg.width
        if cfg.small_input:
            self.stem = nn.Sequential(
                nn.Conv2d(in_channels, width, 3, stride=1, padding=1, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(inplace=True),
            )
        else:
            self.stem = nn.Sequential(
                nn.Conv2d(in_channels, width, 7, stride=2, padding=3, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(3, stride=2, padding=1),
            )
        stages: list[nn.Module] = []
        channels = width
        for stage_index, num_blocks in enumerate(cfg.layers):
            out_channels = width * 2**stage_index
            # The first stage keeps the stem's resolution; every later one halves it in its first block.
            blocks = [BasicBlock(channels, out_channels, stride=1 if stage_index == 0 else 2)]
            blocks += [BasicBlock(out_channels, out_channels, stride=1) for _ in range(num_blocks - 1)]
            stages.append(nn.Sequential(*blocks))
            channels = out_channels
        self.stages = nn.Sequential(*stages)
        self.dim: int = channels
        self._init_weights()

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                # He init for ReLU networks keeps activation variance constant through depth.
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        for module in self.modules():
            if isinstance(module, BasicBlock) and self.cfg.zero_init_residual:
                # Zero gamma on the last BN of each residual branch makes every block start as the
                # identity, so the untrained network behaves like a shallow one and trains stably
                # with large batches and learning rates (Goyal et al. 2017, arXiv:1706.02677, sec 5.1).
                nn.init.zeros_(module.bn2.weight)

    def feature_map(self, x: Tensor) -> Tensor:
        """The final stage's activations [B, dim, H', W'] (H' = H/8 with the small-input stem)."""
        if x.dim() != 4:
            raise SelfsupError(f"the ResNet encoder expects images shaped [B, C, H, W], got shape {tuple(x.shape)}")
        # Channels-last activations let oneDNN's convolutions skip layout reorders: measured on the
        # 2-vCPU dev box (ResNet-18, 32 px, 1 thread, fwd+bwd) +6% img/s at batch 64 and +14% at 256
        # under bf16 autocast, +8% in fp32. Only the input is converted, the weights stay contiguous,
        # so state_dict() saves to safetensors unchanged (which rejects non-contiguous tensors).
        # Not when a stage has a channel count that is no multiple of 8: oneDNN 3.x's AVX2 channels-last
        # convolution backward (brgconv_strided / jit_1x1 on 4-channel maps) corrupts the heap on AVX2-only
        # CPUs ("corrupted size vs. prev_size", measured on an AMD EPYC Zen 2 with width=4).
        if self.cfg.width % 8 == 0:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.stages(self.stem(x))

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """The final feature map as tokens [B, H'*W', dim], cells in row-major order."""
        if mask is not None:
            raise SelfsupError(
                "the ResNet encoder does not support a patch mask; use a ViT encoder (e.g. 'vit_tiny') "
                "for masked-image objectives such as mae or beit"
            )
        features = self.feature_map(x)
        B, D, H, W = features.shape
        # permute+reshape (not flatten+transpose) is a free view when the map is channels-last.
        return features.permute(0, 2, 3, 1).reshape(B, H * W, D)  # [B, N, D], N = H*W row-major

    def embed(self, x: Tensor) -> Tensor:
        """Global average pool of the final feature map: the representation probes use, [B, dim]."""
        return self.feature_map(x).mean(dim=(2, 3))
