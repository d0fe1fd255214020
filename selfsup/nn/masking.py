"""Patch masks for masked image modelling, drawn from an explicit generator.

- `random_mask` (MAE, He et al. 2021): each image hides exactly round(ratio * N) patches chosen
  uniformly, so every row has the same number of visible patches and the encoder can drop the
  masked ones without padding.
- `blockwise_mask` (BEiT, Bao et al. 2021, Algorithm 1): rectangles of random area (at least
  `min_block` patches) and aspect ratio (between `min_aspect` and 1/`min_aspect`) are added until
  `ratio * N` patches are masked. Blocks keep neighbouring patches hidden together, so a masked
  patch cannot simply be copied from the visible patch next to it.
- `span_mask` (wav2vec 2.0, Baevski et al. 2020; HuBERT, Hsu et al. 2021): spans of consecutive
  audio frames, each real frame starting one with probability p; spans may overlap.

They return bool [B, N] with True = masked (the image masks: patches in row-major order, the order of
`patchify`). Drawing uses only the given generator, so a resumed run (whose step generator is
seeded by the step) masks exactly as before.
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


def span_mask(frame_mask: Tensor, generator: torch.Generator, *, mask_prob: float = 0.65, span: int = 10,
              min_masks: int = 2) -> Tensor:
    """bool [B, F] of masked frames (True = masked) for utterances whose real frames are `frame_mask` [B, F].

    wav2vec 2.0's masking (section 3.2 / 4.2 of the paper): every real frame is the start of a span of
    `span` frames with probability p = mask_prob / span (mask_prob 0.65, span 10: the paper's p = 0.065,
    M = 10; HuBERT's p = 0.08 is mask_prob 0.8); spans may overlap, so a frame far from the edges is
    masked with probability 1 - (1 - p)^M (0.49 for wav2vec 2.0, 0.57 for HuBERT). A span is cut at the
    utterance's last real frame: padded frames are never masked. An utterance that drew fewer than
    `min_masks` starts gets more, uniformly among its frames where a whole span fits (frame 0 when it
    is shorter than a span), so every utterance has at least `min_masks` spans (they may overlap, as
    fairseq's `min_masks`; an utterance of at most `span` frames is then masked whole, as in fairseq).

    Differences from fairseq's `compute_mask_indices`: fairseq draws a fixed number of starts per
    utterance (round(mask_prob * F / span) + a random 0/1) without replacement among the frames
    where a span fits, and then truncates every utterance of the batch to the same number of masked
    frames (`require_same_masks`); here starts are independent Bernoulli draws (the paper's wording)
    and utterances keep their own counts (the losses handle ragged counts). Exactly two tensors of
    [B, F] uniforms are drawn from `generator` whatever the data, on the generator's device; the mask
    is returned on frame_mask's device.
    """
    if frame_mask.dim() != 2 or frame_mask.dtype != torch.bool:
        raise SelfsupError(f"span_mask expects a bool frame mask [B, F], got {frame_mask.dtype} of shape "
                           f"{tuple(frame_mask.shape)}")
    if not 0.0 < mask_prob <= span:
        raise SelfsupError(f"mask_prob must be in (0, span={span}] (it is p * span, the paper's p = 0.065 being "
                           f"mask_prob 0.65 with span 10), got {mask_prob}")
    if span < 1 or min_masks < 0:
        raise SelfsupError(f"span must be >= 1 and min_masks >= 0, got span={span}, min_masks={min_masks}")
    B, num_frames = frame_mask.shape
    device = frame_mask.device
    u_start = torch.rand(B, num_frames, generator=generator, device=generator.device).to(device)  # [B, F]
    u_extra = torch.rand(B, num_frames, generator=generator, device=generator.device).to(device)  # [B, F]
    lengths = frame_mask.sum(dim=1, keepdim=True)  # [B, 1] real frames (a prefix of each row)
    starts = (u_start < mask_prob / span) & frame_mask  # [B, F]
    # Utterances with too few starts: add the missing ones at random frames where a span fits.
    need = (min_masks - starts.sum(dim=1, keepdim=True)).clamp(min=0)  # [B, 1]
    t = torch.arange(num_frames, device=device).unsqueeze(0)  # [1, F]
    eligible = frame_mask & ~starts & (t <= (lengths - span).clamp(min=0))  # [B, F]
    score = torch.where(eligible, u_extra, torch.full_like(u_extra, 2.0))  # ineligible frames last
    rank = score.argsort(dim=1).argsort(dim=1)  # [B, F]: each frame's rank among its row's eligible frames
    starts = starts | (eligible & (rank < need))
    # Frame t is masked when a span started in [t - span + 1, t]: a windowed count of starts.
    count = torch.cumsum(starts.long(), dim=1)  # [B, F]
    before = torch.nn.functional.pad(count, (span, 0))[:, :num_frames]  # count at t - span (0 before the start)
    return ((count - before) > 0) & frame_mask
