"""Patch masks for masked image modelling, drawn from an explicit generator.

- `random_mask` (MAE, He et al. 2021): each image hides exactly round(ratio * N) patches chosen
  uniformly, so every row has the same number of visible patches and the encoder can drop the
  masked ones without padding.
- `blockwise_mask` (BEiT, Bao et al. 2021, Algorithm 1): rectangles of random area (at least
  `min_block` patches) and aspect ratio (between `min_aspect` and 1/`min_aspect`) are added until
  `ratio * N` patches are masked. Blocks keep neighbouring patches hidden together, so a masked
  patch cannot simply be copied from the visible patch next to it.

Both return bool [B, N] with True = masked, patches in row-major order, the order of `patchify`. Drawing uses only the given
generator, so a resumed run (whose step generator is seeded by the step) masks exactly as before.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from selfsup.errors import SelfsupError


def patchify(images: Tensor, patch: int) -> Tensor:
    """[B, C, H, W] -> [B, N, patch*patch*C], patches row-major, each flattened (row, column, channel)."""
    B, C, H, W = images.shape
    x = images.reshape(B, C, H // patch, patch, W // patch, patch)
    x = x.permute(0, 2, 4, 3, 5, 1)  # [B, gh, gw, p, p, C]
    return x.reshape(B, (H // patch) * (W // patch), patch * patch * C)


def unpatchify(patches: Tensor, patch: int, channels: int, height: int, width: int) -> Tensor:
    """The inverse of `patchify`: [B, N, patch*patch*C] -> [B, C, H, W]."""
    B = patches.shape[0]
    x = patches.reshape(B, height // patch, width // patch, patch, patch, channels)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(B, channels, height, width)


def num_masked(num_patches: int, ratio: float) -> int:
    if not 0.0 < ratio < 1.0:
        raise SelfsupError(f"mask ratio must be in (0, 1), got {ratio}")
    return max(1, min(num_patches - 1, round(ratio * num_patches)))


def random_mask(batch: int, num_patches: int, ratio: float, generator: torch.Generator) -> Tensor:
    """bool [B, N]: exactly num_masked(N, ratio) True per row, uniformly placed."""
    count = num_masked(num_patches, ratio)
    noise = torch.rand(batch, num_patches, generator=generator, device=generator.device)  # [B, N]
    ranks = noise.argsort(dim=1).argsort(dim=1)  # [B, N]: each patch's rank in its row's noise
    return ranks < count


def blockwise_mask(batch: int, grid: int, ratio: float, generator: torch.Generator, *, min_block: int = 16,
                   min_aspect: float = 0.3, max_attempts: int = 10) -> Tensor:
    """bool [B, grid*grid] of rectangles (BEiT's blockwise masking), about `ratio` of the patches each.

    As the reference algorithm: a block's target area is uniform in [min_block, still-to-mask]
    (a remainder below min_block gives a smaller block), its log-aspect uniform in
    [log min_aspect, -log min_aspect]; a block is kept when it adds between 1 and still-to-mask new
    patches, and a row stops early when `max_attempts` draws in a row add nothing. On small grids
    (8x8 at 32 px with 4 px patches) `min_block` is capped at a quarter of the grid so blocks fit.
    The draws happen on the CPU (a few per image); the mask is returned on the generator's device.
    """
    num_patches = grid * grid
    target = num_masked(num_patches, ratio)
    min_block = max(1, min(min_block, num_patches // 4))
    cpu = torch.Generator().manual_seed(int(torch.randint(2**62, (1,), generator=generator, device=generator.device)))
    mask = torch.zeros(batch, grid, grid, dtype=torch.bool)
    log_lo, log_hi = math.log(min_aspect), -math.log(min_aspect)
    for row in range(batch):
        count, failures = 0, 0
        while count < target and failures < max_attempts:
            left = target - count
            u = torch.rand(4, generator=cpu).tolist()
            low, high = sorted((min_block, left))
            area = low + (high - low) * u[0]
            aspect = math.exp(log_lo + (log_hi - log_lo) * u[1])
            h = int(round(math.sqrt(area * aspect)))
            w = int(round(math.sqrt(area / aspect)))
            if not (1 <= h <= grid and 1 <= w <= grid):
                failures += 1
                continue
            top = int(u[2] * (grid - h + 1))
            lft = int(u[3] * (grid - w + 1))
            block = mask[row, top : top + h, lft : lft + w]
            added = int((~block).sum())
            if 0 < added <= left:
                block.fill_(True)
                count += added
                failures = 0
            else:
                failures += 1
    return mask.flatten(1).to(generator.device)  # [B, N]
