"""What a reconstruction objective makes of held-out images, as one PNG for the run's report.

Methods that reconstruct something a person can judge (colourisation, MAE) implement
`preview(rgb, mean, std, generator) -> [(title, images in [0, 1]), ...]`; the run writes their rows
above the original images as `previews.png`, which `report.html` embeds.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import Tensor, nn

from selfsup.data.images import ImageSet
from selfsup.train.runtime import Runtime

PREVIEWS_FILE = "previews.png"
_NUM_IMAGES = 8
_SCALE = 3  # 32 px images are too small to judge at 1:1
_LABEL_WIDTH = 110


def save_previews(method: nn.Module, holdout: ImageSet, preprocess: dict[str, Any], runtime: Runtime, path: Path,
                  seed: int) -> bool:
    """Writes `path` when the method has a `preview`; returns whether it did."""
    preview = getattr(method, "preview", None)
    if preview is None:
        return False
    images = holdout.images[:_NUM_IMAGES].to(runtime.device)
    size = preprocess["image_size"]
    rgb = torch.nn.functional.interpolate(images.float() / 255, size=(size, size), mode="bilinear", antialias=True,
                                          align_corners=False) if images.shape[-1] != size else images.float() / 255
    mean = torch.tensor(preprocess["mean"], device=runtime.device)
    std = torch.tensor(preprocess["std"], device=runtime.device)
    was_training = method.training
    method.eval()
    try:
        rows = preview(rgb, mean, std, torch.Generator(device=runtime.device).manual_seed(seed))
    finally:
        method.train(was_training)
    rows = [*rows, ("original", rgb)]
    grid_image(rows).save(path)
    return True


def grid_image(rows: list[tuple[str, Tensor]]) -> Image.Image:
    """A labelled grid: one row per (title, images [B, C, H, W] in [0, 1])."""
    B, C, H, W = rows[0][1].shape
    cell_h, cell_w = H * _SCALE, W * _SCALE
    canvas = Image.new("RGB", (_LABEL_WIDTH + B * (cell_w + 2), len(rows) * (cell_h + 2)), "white")
    draw = ImageDraw.Draw(canvas)
    for r, (title, images) in enumerate(rows):
        top = r * (cell_h + 2)
        draw.text((4, top + cell_h // 2 - 6), title, fill="black")
        pixels = (images.detach().float().clamp(0, 1).cpu() * 255).round().to(torch.uint8)
        if pixels.shape[1] == 1:
            pixels = pixels.expand(-1, 3, -1, -1)
        for i in range(B):
            tile = Image.fromarray(np.ascontiguousarray(pixels[i].permute(1, 2, 0).numpy()))
            canvas.paste(tile.resize((cell_w, cell_h), Image.NEAREST), (_LABEL_WIDTH + i * (cell_w + 2), top))
    return canvas
