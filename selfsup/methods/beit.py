"""BERT pre-training of image transformers — BEiT (Bao et al. 2021, arXiv:2106.08254).

Objective: every image patch has a discrete visual token; about 40 % of the patches are hidden
in blocks (BEiT's blockwise masking) by replacing their embeddings with a learned mask token; the
ViT reads the corrupted sequence and a linear head predicts the token of every masked patch, with
cross-entropy on the masked positions only.

Deviation from the paper — where the tokens come from. BEiT takes them from the DALL-E dVAE, a
network trained on 250M images that cannot be downloaded here, and a dVAE of our own would be a
second long training run. Instead the visual tokenizer is fitted on the run's own unlabelled
images before training: k-means (`nn/targets.py`, mini-batch k-means, 512 tokens) over patches of
the training images, each patch taken as its raw pixels after the run's channel normalisation.
Why k-means over raw patches: like dVAE tokens, the codes then carry colour, brightness and
layout together — a dVAE's decoder must rebuild the pixels from the tokens — and k-means is a
deterministic fit of a few seconds, reused by HuBERT for its targets. Per-patch normalisation was
not used: it would turn every flat patch into amplified noise. Tokens are computed from the
*augmented* view (the crop the ViT sees), as BEiT computes them from its view; they are fixed for
the run and saved with it (`visual_tokens.safetensors`).

Under DDP the loss is the mean over the masked patches of the global batch (each rank's mean weighted
by its share of them, `nn/distributed.global_mean_scale`): blockwise masks hide different numbers of
patches per image.

Other deviations: no layer-scale or relative position bias (our ViT is the plain one, shared with
DINO and MAE); the block-size floor of 16 patches is capped at a quarter of the grid so blocks
fit small images (8x8 patches at 32 px).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from selfsup.errors import SelfsupError
from selfsup.nn.distributed import global_mean_scale
from selfsup.nn.masking import blockwise_mask, patchify
from selfsup.nn.targets import KMeansTokenizer

if TYPE_CHECKING:
    from selfsup.modalities.base import FitData

VISUAL_TOKENS_FILE = "visual_tokens.safetensors"  # the run keeps the k-means codebook of patch tokens


@dataclass
class Config:
    mask_ratio: float = 0.4  # fraction of patches hidden, in blocks
    min_block: int = 16  # smallest block in patches (capped at a quarter of the grid)
    num_tokens: int = 512  # size of the visual vocabulary fitted with k-means
    fit_max_images: int = 8192  # training images whose patches fit the tokenizer
    fit_passes: int = 5  # mini-batch k-means passes over those patches


class BEiT(nn.Module):
    fits_targets = True  # pretrain calls fit_targets(data, generator) before training

    def __init__(self, cfg: Config, encoder: nn.Module):
        super().__init__()
        if not hasattr(encoder, "patch_size") or not hasattr(encoder, "mask_token"):
            raise SelfsupError("beit needs a ViT encoder (masked patches enter as its mask token): "
                               "use encoder.name=vit_tiny or vit_small")
        self.cfg = cfg
        self.encoder = encoder
        patch_pixels = encoder.patch_size**2 * encoder.patch_embed.in_channels
        self.tokenizer = KMeansTokenizer(cfg.num_tokens, patch_pixels)
        self.head = nn.Linear(encoder.dim, cfg.num_tokens)
        nn.init.trunc_normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    def fit_targets(self, data: FitData, generator: torch.Generator) -> dict:
        """Fit the visual tokenizer on the patches of the uint8 training images [M, C, H, W], normalised as the views are."""
        images = data.items
        # A random sample: the split keeps source order (class folders sorted), so its head is a few classes.
        pick = torch.randperm(len(images), generator=generator, device=generator.device)[: self.cfg.fit_max_images]
        sample = data.prepare(images[pick.sort().values.to(images.device)].to(generator.device))  # [M, C, H, W]
        patches = patchify(sample, self.encoder.patch_size)  # [M, N, P]
        return self.tokenizer.fit(patches.reshape(-1, patches.shape[-1]), generator, num_passes=self.cfg.fit_passes)

    def save_artifacts(self, folder: Path) -> None:
        """The fitted codebook beside the encoder (`visual_tokens.safetensors`), so a reader of the run sees its targets."""
        self.tokenizer.save(folder / VISUAL_TOKENS_FILE)

    def forward(self, batch: dict, progress: float) -> dict[str, Tensor]:
        images = batch["views"][0]  # [B, C, S, S], normalised
        B, C, H, W = images.shape
        p = self.encoder.patch_size
        if H != W:
            raise SelfsupError(f"beit's blockwise masking expects square views, got {H}x{W}")
        mask = blockwise_mask(B, H // p, self.cfg.mask_ratio, batch["generator"], min_block=self.cfg.min_block)
        mask = mask.to(images.device)  # [B, N], True = hidden
        targets = self.tokenizer.assign(patchify(images, p))  # [B, N] token ids of the uncorrupted view
        tokens = self.encoder(images, mask)  # [B, 1 + N, D]
        logits = self.head(tokens[:, 1:][mask])  # [num_masked, K]
        # Under DDP: weighted by this rank's share of the masked patches (blockwise masks hide different
        # numbers per image), so the ranks' average is the global batch's mean; 1 in one process.
        scale = global_mean_scale(mask.sum().view(1).float(), self.training)[0]
        loss = F.cross_entropy(logits.float(), targets[mask]) * scale
        accuracy = (logits.argmax(dim=-1) == targets[mask]).float().mean() * scale
        return {"loss": loss, "token_acc": accuracy.detach()}
