"""Turns dataset indices into training batches on the device, with the views made there, batched."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from selfsup.data.images import ImageSet
from selfsup.data.views import ImageViews

# Datasets below this size (uint8 bytes) are moved to the accelerator once, so a step copies nothing.
_ON_DEVICE_BYTES = 2 << 30


class ImageBatches:
    """`batches(indices, generator)` -> {"views": [V x float [B, C, S, S]], "id": [...], "index", "label"?}."""

    def __init__(self, data: ImageSet, views: ImageViews, device: torch.device):
        self.data, self.views, self.device = data, views, device
        images = data.images
        if device.type != "cpu" and images.numel() < _ON_DEVICE_BYTES:
            images = images.to(device)
        self.images = images
        self.num_items = len(data)

    def __call__(self, indices: Tensor, generator: torch.Generator) -> dict[str, Any]:
        images = self.images[indices.to(self.images.device)].to(self.device, non_blocking=True)  # uint8 [B, C, H, W]
        batch: dict[str, Any] = {
            "views": self.views(images, generator),
            "id": [self.data.ids[i] for i in indices.tolist()],
            "index": indices,
        }
        if self.data.labels is not None:
            batch["label"] = self.data.labels[indices].to(self.device)
        return batch


def channel_stats(images: Tensor, max_items: int = 10_000) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of uint8 images scaled to [0, 1], from at most `max_items` of them."""
    N, C, H, W = images.shape
    step = max(1, N // max_items)
    x = images[::step].float().div_(255).transpose(0, 1).reshape(C, -1)  # [C, n*H*W]
    std = x.std(dim=1).clamp_min(1e-3)
    return x.mean(dim=1).tolist(), std.tolist()
