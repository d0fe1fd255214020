"""Masked autoencoders — MAE (He et al. 2021, arXiv:2111.06377).

Objective: hide a random 75 % of each image's patches; a ViT encoder sees only the visible 25 %
(the masked patches are dropped from the sequence, not zeroed, which is what makes MAE cheap); a
lightweight decoder (its own width and depth) gets the encoded visible tokens plus a shared learned
mask token at every masked position, all with fixed 2-D sine-cosine positions, and predicts the
pixels of every patch. The loss is the mean squared error on the masked patches only, against
each patch's pixels normalised by that patch's own mean and variance (`norm_pix_loss`, the
paper's better-performing target) or the raw (channel-normalised) pixels.

Under DDP no weighting is needed: every image hides exactly round(ratio * N) patches, so ranks average
equal counts and DDP's average of their means is the global mean (tests/train/test_ddp_methods.py).

Deviations from the paper: the encoder's positions are whatever the ViT was built with (the
paper's fixed sine-cosine table is `encoder.positions=sincos`; learned is the default so MAE and
DINO/BEiT encoders are interchangeable); the input view is the shared random-resized crop + flip
(no colour augmentation, as in the paper); the decoder defaults are scaled to 32 px images (width
128, depth 2, instead of 512 and 8 for 224 px).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from selfsup.encoders.transformer import Block
from selfsup.encoders.vit import sincos_positions
from selfsup.errors import SelfsupError
from selfsup.nn.masking import patchify, random_mask, unpatchify


@dataclass
class Config:
    mask_ratio: float = 0.75  # fraction of patches hidden from the encoder
    decoder_dim: int = 128  # width of the decoder (the paper: 512 for ViT-B at 224 px)
    decoder_depth: int = 2  # transformer blocks in the decoder (the paper: 8)
    decoder_heads: int = 4  # attention heads in the decoder
    norm_pix_loss: bool = True  # predict each patch normalised by its own mean and variance


def masked_patch_loss(pred: Tensor, target: Tensor, mask: Tensor, norm_pix: bool) -> Tensor:
    """Mean squared error over the masked patches only; `pred`/`target` [B, N, P], `mask` bool [B, N]."""
    if norm_pix:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1e-6).sqrt()
    per_patch = (pred.float() - target.float()).square().mean(dim=-1)  # [B, N]
    return per_patch[mask].mean()


class MAE(nn.Module):
    def __init__(self, cfg: Config, encoder: nn.Module):
        super().__init__()
        if not hasattr(encoder, "patch_size") or not hasattr(encoder, "grid_size"):
            raise SelfsupError("mae needs a ViT encoder (it drops masked patches from the sequence): "
                               "use encoder.name=vit_tiny or vit_small")
        if cfg.decoder_dim % cfg.decoder_heads or cfg.decoder_dim % 4:
            raise SelfsupError(f"method.decoder_dim ({cfg.decoder_dim}) must be a multiple of method.decoder_heads "
                               f"({cfg.decoder_heads}) and of 4 (sine-cosine positions)")
        self.cfg = cfg
        self.encoder = encoder
        patch_pixels = encoder.patch_size**2 * encoder.patch_embed.in_channels
        self.decoder_embed = nn.Linear(encoder.dim, cfg.decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, cfg.decoder_dim))
        self.decoder_blocks = nn.ModuleList(Block(cfg.decoder_dim, cfg.decoder_heads, 4.0)
                                            for _ in range(cfg.decoder_depth))
        self.decoder_norm = nn.LayerNorm(cfg.decoder_dim, eps=1e-6)
        self.decoder_pred = nn.Linear(cfg.decoder_dim, patch_pixels)
        nn.init.normal_(self.mask_token, std=0.02)
        for module in (self.decoder_embed, self.decoder_pred, *self.decoder_blocks.modules()):
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)

    def reconstruct(self, images: Tensor, mask: Tensor) -> Tensor:
        """Predicted patches [B, N, patch*patch*C] for every patch, from the visible ones only."""
        B = images.shape[0]
        N = mask.shape[1]
        latent = self.encoder(images, mask, drop_masked=True)  # [B, 1 + N_visible, D]
        x = self.decoder_embed(latent)  # [B, 1 + N_visible, d]
        d = x.shape[-1]
        # Visible tokens back at their places (row-major, the order they were kept in), mask tokens elsewhere.
        full = self.mask_token.to(x.dtype).expand(B, N, d).masked_scatter(~mask.unsqueeze(-1), x[:, 1:])  # [B, N, d]
        grid = self.encoder.grid_size if N == self.encoder.num_patches else int(N**0.5)
        positions = sincos_positions(grid, grid, d).to(x.device, x.dtype)  # [N, d]
        x = torch.cat([x[:, :1], full + positions], dim=1)  # [B, 1 + N, d]; [CLS] at position zero
        for block in self.decoder_blocks:
            x = block(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:]  # [B, N, P]

    def forward(self, batch: dict, progress: float) -> dict[str, Tensor]:
        images = batch["views"][0]  # [B, C, S, S], normalised
        B, C, H, W = images.shape
        p = self.encoder.patch_size
        N = (H // p) * (W // p)
        mask = random_mask(B, N, self.cfg.mask_ratio, batch["generator"]).to(images.device)  # [B, N], True = hidden
        pred = self.reconstruct(images, mask)  # [B, N, P]
        loss = masked_patch_loss(pred, patchify(images, p), mask, self.cfg.norm_pix_loss)
        return {"loss": loss}

    @torch.no_grad()
    def preview(self, rgb: Tensor, mean: Tensor, std: Tensor, generator: torch.Generator) -> list[tuple[str, Tensor]]:
        """For the report: what the encoder saw (masked patches grey) and the reconstruction (visible
        patches pasted back), of RGB [B, C, H, W] in [0, 1]."""
        scale, shift = std.view(1, -1, 1, 1), mean.view(1, -1, 1, 1)
        images = (rgb - shift) / scale
        B, C, H, W = images.shape
        p = self.encoder.patch_size
        mask = random_mask(B, (H // p) * (W // p), self.cfg.mask_ratio, generator).to(images.device)
        target = patchify(images, p)  # [B, N, P]
        pred = self.reconstruct(images, mask).float()
        if self.cfg.norm_pix_loss:  # back from per-patch normalised pixels, with the true patch statistics
            pred = pred * (target.var(dim=-1, keepdim=True) + 1e-6).sqrt() + target.mean(dim=-1, keepdim=True)
        keep = mask.unsqueeze(-1)
        seen = unpatchify(torch.where(keep, torch.zeros_like(target), target), p, C, H, W)
        rebuilt = unpatchify(torch.where(keep, pred, target), p, C, H, W)
        return [("masked input", (seen * scale + shift).clamp(0, 1)), ("reconstruction", (rebuilt * scale + shift).clamp(0, 1))]
