"""Colourful image colourisation — Zhang, Isola & Efros 2016 (arXiv:1603.08511).

Objective: the encoder sees only the lightness of an image (CIE Lab L, rendered back as a grey RGB
image) and a small decoder predicts, for every pixel of a 1/4-resolution grid, a distribution over
quantised chroma bins (the ab plane cut into 10x10 cells; the cells the training data ever use).
Targets are soft-encoded: each pixel's true ab spreads over its 5 nearest bins with a Gaussian
kernel (sigma 5). The loss is the multinomial cross-entropy, each pixel weighted by the *class
rebalancing* factor of its nearest bin, w ∝ ((1 - λ) p̃ + λ / Q)^-1 with p̃ the Gaussian-smoothed
empirical bin distribution of the training images and λ = 1/2, normalised so E_p̃[w] = 1 — without
it the model predicts the desaturated colours that dominate natural images. A colourised image is
the *annealed mean* of the predicted distribution (temperature 0.38): the paper's compromise
between the mean (greyish) and the mode (patchy).

The quantised-bins variant is implemented rather than regression on ab: the paper shows that L2
regression averages the modes and gives sepia images, and the classification head is what its
representation-learning results use.

Under DDP the loss is a mean over equal numbers of pixels per rank, so DDP's average is the global
mean; the BatchNorm statistics (the decoder's, a ResNet encoder's) are per rank unless
`nn/distributed.sync_batchnorm` is applied.

Deviations from the paper: the bins and their rebalancing weights are computed from the run's
training images (`fit_targets`, before training) instead of ImageNet's 313 in-gamut bins; the
encoder is any selfsup image encoder (ResNet or ViT) with a small upsampling decoder instead of
the paper's VGG-style network with dilated convolutions; the encoder input is the grey image as
3 identical channels (so the exported encoder takes ordinary RGB input; probes feed it grey, as
`encoder.json`'s preprocess says); the input view is a random-resized crop + flip.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from selfsup.nn.colour import lab_to_rgb, lightness_as_grey, rgb_to_lab
from selfsup.errors import SelfsupError

if TYPE_CHECKING:
    from selfsup.modalities.base import FitData

_AB_RANGE = 110.0  # |a|, |b| of sRGB colours stay within this


@dataclass
class Config:
    bin_size: float = 10.0  # side of the ab quantisation cells
    sigma: float = 5.0  # Gaussian width for soft-encoding targets and smoothing the bin distribution
    num_neighbours: int = 5  # bins each target pixel spreads over
    rebalance: float = 0.5  # λ: 0 = full rebalancing towards rare colours, 1 = none
    temperature: float = 0.38  # annealed-mean temperature for showing colourised images
    out_stride: int = 4  # chroma is predicted at 1/out_stride of the input resolution
    decoder_dim: int = 128  # channels of the upsampling decoder
    fit_max_images: int = 8192  # training images used to find the bins and their weights


def ab_bins(bin_size: float) -> Tensor:
    """Centres [Q, 2] of the ab grid cells covering [-110, 110]^2."""
    centres = torch.arange(-_AB_RANGE, _AB_RANGE + 1e-6, bin_size)
    a, b = torch.meshgrid(centres, centres, indexing="ij")
    return torch.stack([a.flatten(), b.flatten()], dim=1)


def soft_encode(ab: Tensor, centres: Tensor, num_neighbours: int, sigma: float, allowed: Tensor | None = None) -> Tensor:
    """ab [P, 2] -> soft targets [P, Q]: Gaussian weights on the nearest allowed bins, summing to 1."""
    dist = torch.cdist(ab.float(), centres)  # [P, Q]
    if allowed is not None:
        dist = dist.masked_fill(~allowed, float("inf"))
    near_dist, near = dist.topk(num_neighbours, dim=1, largest=False)  # [P, k]
    # Relative to the nearest bin (the normalisation cancels it): a colour far from every bin in use
    # would otherwise underflow to 0/0.
    weights = torch.exp(-(near_dist.square() - near_dist[:, :1].square()) / (2 * sigma**2))
    weights = weights / weights.sum(dim=1, keepdim=True)
    return torch.zeros_like(dist).scatter_(1, near, weights)


class Colorize(nn.Module):
    fits_targets = True  # pretrain calls fit_targets(data, generator) before training

    def __init__(self, cfg: Config, encoder: nn.Module):
        super().__init__()
        self.cfg = cfg
        self.encoder = encoder
        self.has_cls = hasattr(encoder, "patch_size")  # ViT tokens start with [CLS]
        centres = ab_bins(cfg.bin_size)
        Q = centres.shape[0]
        self.register_buffer("centres", centres, persistent=False)
        self.register_buffer("in_gamut", torch.ones(Q, dtype=torch.bool))
        self.register_buffer("weights", torch.ones(Q))
        d = cfg.decoder_dim
        self.decoder_in = nn.Sequential(nn.Conv2d(encoder.dim, d, 1), nn.BatchNorm2d(d), nn.ReLU(inplace=True))
        self.refine = nn.Sequential(nn.Conv2d(d, d, 3, padding=1), nn.BatchNorm2d(d), nn.ReLU(inplace=True))
        self.classifier = nn.Conv2d(d, Q, 1)

    # -- targets fitted on the data -------------------------------------------------------------

    @torch.no_grad()
    def fit_targets(self, data: FitData, generator: torch.Generator) -> dict:
        """Bins in use and rebalancing weights from the uint8 RGB training images [M, 3, H, W]."""
        images = data.items
        if images.shape[1] != 3:
            raise SelfsupError("colorize needs colour images: set data.channels=3 and use a colour source "
                               "(e.g. data.source=emoji); greyscale data has no colour to predict")
        # A random sample: the split keeps source order (class folders sorted), so its head is a few classes.
        pick = torch.randperm(len(images), generator=generator, device=generator.device)[: self.cfg.fit_max_images]
        sample = images[pick.sort().values.to(images.device)]
        counts = torch.zeros(len(self.centres))
        for start in range(0, len(sample), 512):
            lab = rgb_to_lab(sample[start : start + 512].float() / 255)
            ab = lab[:, 1:].permute(0, 2, 3, 1).reshape(-1, 2)  # [P, 2]
            counts += torch.bincount(torch.cdist(ab, self.centres.cpu()).argmin(dim=1), minlength=len(counts)).float()
        p = counts / counts.sum()
        in_gamut = counts > 0
        # Smooth the empirical distribution with the same Gaussian as the targets, then rebalance.
        kernel = torch.exp(-torch.cdist(self.centres.cpu(), self.centres.cpu()).square() / (2 * self.cfg.sigma**2))
        smooth = (kernel @ p) * in_gamut
        smooth = smooth / smooth.sum()
        Q = int(in_gamut.sum())
        if Q < 2:
            raise SelfsupError("the training images have no colour (every pixel falls in one ab bin), so "
                               "colourisation has nothing to learn; use a colour source such as data.source=emoji")
        weights = 1.0 / ((1 - self.cfg.rebalance) * smooth + self.cfg.rebalance / Q)
        weights = weights * in_gamut
        weights = weights / (smooth * weights).sum()  # E_p̃[w] = 1
        self.in_gamut.copy_(in_gamut)
        self.weights.copy_(weights)
        grey_share = float(p[torch.cdist(torch.zeros(1, 2), self.centres.cpu()).argmin()])
        return {"bins_in_gamut": float(Q), "grey_bin_share": grey_share}

    # -- the model ------------------------------------------------------------------------------

    def _grey_input(self, rgb: Tensor, mean: Tensor, std: Tensor) -> tuple[Tensor, Tensor]:
        """(Lab of the view [B, 3, H, W], the encoder's input: the view's lightness as grey RGB, normalised)."""
        lab = rgb_to_lab(rgb)
        grey = lightness_as_grey(lab)  # [B, 3, H, W]
        return lab, (grey - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)

    def logits(self, grey: Tensor, out_size: int) -> Tensor:
        """Bin logits [B, Q, out, out] (out-of-gamut bins at -inf) for normalised grey inputs."""
        tokens = self.encoder(grey)  # [B, (1+)N, D]
        if self.has_cls:
            tokens = tokens[:, 1:]
        B, N, D = tokens.shape
        g = math.isqrt(N)
        x = tokens.transpose(1, 2).reshape(B, D, g, g)  # the encoder's spatial grid
        x = self.decoder_in(x)
        if x.shape[-1] != out_size:  # the encoder's grid (4x4 for a ResNet at 32 px) to the output grid
            x = F.interpolate(x, size=(out_size, out_size), mode="bilinear", align_corners=False)
        return self.classifier(self.refine(x)).float().masked_fill(~self.in_gamut.view(1, -1, 1, 1), float("-inf"))

    def forward(self, batch: dict, progress: float) -> dict[str, Tensor]:
        view = batch["views"][0]  # [B, 3, S, S], normalised
        B, C, H, W = view.shape
        if C != 3:
            raise SelfsupError("colorize needs 3-channel views: set data.channels=3")
        mean, std = batch["pixel_mean"], batch["pixel_std"]
        rgb = (view.float() * std.view(1, -1, 1, 1) + mean.view(1, -1, 1, 1)).clamp(0, 1)
        lab, grey = self._grey_input(rgb, mean, std)
        out = H // self.cfg.out_stride
        logits = self.logits(grey.to(view.dtype), out)  # [B, Q, out, out]
        ab = F.adaptive_avg_pool2d(lab[:, 1:], out)  # [B, 2, out, out]: the target chroma per output cell
        ab = ab.permute(0, 2, 3, 1).reshape(-1, 2)  # [P, 2]
        targets = soft_encode(ab, self.centres, self.cfg.num_neighbours, self.cfg.sigma, self.in_gamut)  # [P, Q]
        pixel_weight = self.weights[targets.argmax(dim=1)]  # [P], the nearest bin's rebalancing factor
        log_probs = logits.permute(0, 2, 3, 1).reshape(-1, logits.shape[1]).log_softmax(dim=1)  # [P, Q]
        cross_entropy = -(targets * log_probs.masked_fill(targets == 0, 0.0)).sum(dim=1)  # [P]
        loss = (pixel_weight * cross_entropy).mean()
        return {"loss": loss, "unweighted_ce": cross_entropy.mean().detach()}

    @torch.no_grad()
    def preview(self, rgb: Tensor, mean: Tensor, std: Tensor, generator: torch.Generator) -> list[tuple[str, Tensor]]:
        """For the report: the grey input and the model's colourisation (annealed mean) of RGB [B, 3, H, W] in [0, 1]."""
        B, _, H, W = rgb.shape
        lab, grey = self._grey_input(rgb, mean, std)
        logits = self.logits(grey, H // self.cfg.out_stride)  # [B, Q, out, out]
        probs = (logits / self.cfg.temperature).softmax(dim=1)
        ab = torch.einsum("bqhw,qc->bchw", probs, self.centres)  # [B, 2, out, out]
        ab = F.interpolate(ab, size=(H, W), mode="bilinear", align_corners=False)
        return [("grey input", lightness_as_grey(lab)), ("colourised", lab_to_rgb(torch.cat([lab[:, :1], ab], dim=1)))]
