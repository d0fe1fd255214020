"""Turns dataset indices into training batches on the device: image views made there, batched, or
packed token blocks with their masks."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from selfsup.data.images import ImageSet
from selfsup.data.packing import PAD_DOCUMENT, PackedBlocks, block_attention_mask, document_positions
from selfsup.data.views import ImageViews

# Datasets below this size (uint8 bytes) are moved to the accelerator once, so a step copies nothing.
_ON_DEVICE_BYTES = 2 << 30


class ImageBatches:
    """`batches(indices, generator)` -> {"views": [V x float [B, C, S, S]], "id": [...], "index", "label"?,
    "generator", "pixel_mean"/"pixel_std" (float [C], the views' normalisation)}."""

    def __init__(self, data: ImageSet, views: ImageViews, device: torch.device):
        self.data, self.views, self.device = data, views, device
        images = data.images
        if device.type != "cpu" and images.numel() < _ON_DEVICE_BYTES:
            images = images.to(device)
        self.images = images
        self.num_items = len(data)
        self.pixel_mean = torch.tensor(views.mean, device=device)  # [C]
        self.pixel_std = torch.tensor(views.std, device=device)  # [C]

    def __call__(self, indices: Tensor, generator: torch.Generator) -> dict[str, Any]:
        images = self.images[indices.to(self.images.device)].to(self.device, non_blocking=True)  # uint8 [B, C, H, W]
        batch: dict[str, Any] = {
            "views": self.views(images, generator),
            "id": [self.data.ids[i] for i in indices.tolist()],
            "index": indices,
            # Masking that is the objective (MAE, BEiT) draws from the step's generator after the views.
            "generator": generator,
            # The views' normalisation, [C] each, for methods that need pixels back (colourisation).
            "pixel_mean": self.pixel_mean,
            "pixel_std": self.pixel_std,
        }
        if self.data.labels is not None:
            batch["label"] = self.data.labels[indices].to(self.device)
        return batch


class TextBatches:
    """`batches(indices, generator)` -> packed token blocks for the text methods:

    - "input_ids" int64 [B, L]; "token_mask" bool [B, L] (True = a real token, False = padding);
    - "document_ids" int64 [B, L] (-1 = padding), so next-token prediction skips document boundaries;
    - "attention_mask": absent when every key may be seen (the fast path: no mask tensor at all),
      [B, L] when the batch holds padding, or [B, L, L] block-diagonal with `document_masks`
      (a token sees its own document only) — then "position_ids" restart at each document too;
    - "generator": the step's generator, for masking that is the objective (MLM);
    - "id": the documents each block holds (for error messages), "index": the block indices,
      "num_tokens": the real tokens in the batch (an int, counted before the copy to the device).
    Causality is the encoder's business (its config), not the batch's.
    """

    def __init__(self, blocks: PackedBlocks, document_names: list[str], device: torch.device, document_masks: bool):
        self.blocks, self.document_names, self.device = blocks, document_names, device
        self.document_masks = document_masks
        self.num_items = blocks.num_blocks

    def __call__(self, indices: Tensor, generator: torch.Generator) -> dict[str, Any]:
        input_ids = self.blocks.input_ids[indices].to(self.device, non_blocking=True)  # [B, L]
        document_ids = self.blocks.document_ids[indices].to(self.device, non_blocking=True)  # [B, L]
        real_cpu = self.blocks.attention_mask[indices]  # [B, L]
        real = real_cpu.to(self.device, non_blocking=True)
        batch: dict[str, Any] = {"input_ids": input_ids, "token_mask": real, "document_ids": document_ids,
                                 "generator": generator, "index": indices, "id": self._names(indices),
                                 "num_tokens": int(real_cpu.sum())}
        if self.document_masks:
            batch["attention_mask"] = block_attention_mask(document_ids, causal=False)  # [B, L, L]
            batch["position_ids"] = document_positions(document_ids)  # [B, L]
        elif not bool(real_cpu.all()):
            batch["attention_mask"] = real
        return batch

    def _names(self, indices: Tensor) -> list[str]:
        names = []
        for row in self.blocks.document_ids[indices]:
            held = [self.document_names[d] for d in torch.unique_consecutive(row).tolist() if d != PAD_DOCUMENT]
            names.append("+".join(held) if len(held) <= 3 else f"{held[0]}+...+{held[-1]} ({len(held)} documents)")
        return names


def channel_stats(images: Tensor, max_items: int = 10_000) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of uint8 images scaled to [0, 1], from at most `max_items` of them."""
    N, C, H, W = images.shape
    step = max(1, N // max_items)
    x = images[::step].float().div_(255).transpose(0, 1).reshape(C, -1)  # [C, n*H*W]
    std = x.std(dim=1).clamp_min(1e-3)
    return x.mean(dim=1).tolist(), std.tolist()
