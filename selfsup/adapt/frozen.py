"""Probing a frozen encoder on a labelled split: features once, then every probe and label fraction."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from selfsup.adapt.probes import extract_features
from selfsup.data.images import ImageSet
from selfsup.data.views import normalise
from selfsup.errors import SelfsupError


def labelled(data: ImageSet, what: str) -> tuple[Tensor, Tensor]:
    """(images, labels) of the rows that carry a label; an error when there are none."""
    if data.labels is None or not bool((data.labels >= 0).any()):
        raise SelfsupError(f"{data.source}: the {what} split has no labels, so it cannot be probed; "
                           f"use a labelled source (class sub-folders, a manifest label column, or .npz `y`)")
    keep = torch.nonzero(data.labels >= 0).flatten()
    return data.images[keep], data.labels[keep]


def encoder_features(encoder: nn.Module, images: Tensor, preprocess: dict[str, Any], device: torch.device,
                     autocast_dtype: torch.dtype | None) -> Tensor:
    """Pooled embeddings [N, D] (float32, CPU) of uint8 images, prepared as the encoder was trained."""
    prep = lambda x: normalise(x, preprocess["mean"], preprocess["std"], preprocess["image_size"])  # noqa: E731
    encoder.eval()
    return extract_features(encoder.embed, images, device=device, autocast_dtype=autocast_dtype, preprocess=prep)


def raw_pixels(images: Tensor) -> Tensor:
    """The raw-pixel baseline: flattened images scaled to [0, 1], [N, C*H*W]."""
    return images.flatten(1).float() / 255

