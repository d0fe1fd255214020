"""Shared fixtures: tiny data and configs so every test runs in seconds on 2 CPU cores."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402

from selfsup.config import TrainConfig  # noqa: E402
from selfsup.data.images import ImageSet  # noqa: E402

# Tests run beside other processes; one thread avoids the OpenMP collapse described in MACHINE.md.
torch.set_num_threads(1)

# A run that trains in well under a second per step: built-in digits at 16 px, a width-8 ResNet.
TINY_RUN = ["data.source=digits", "data.image_size=16", "encoder.name=resnet10", "encoder.width=8",
            "train.batch_size=32", "train.steps=4", "train.checkpoint_every=2", "train.log_every=1",
            "train.precision=fp32", "train.device=cpu"]


def make_image_set(num_items: int = 48, num_classes: int = 4, size: int = 16, channels: int = 3, seed: int = 0) -> ImageSet:
    """Random images whose class shows in their mean brightness, so probes have something to find."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(num_items) % num_classes
    base = (labels.float() + 0.5) / num_classes * 200
    noise = torch.randint(0, 56, (num_items, channels, size, size), generator=gen).float()
    images = (base.view(-1, 1, 1, 1) + noise).clamp(0, 255).to(torch.uint8)
    return ImageSet(images=images, ids=[f"img{i}" for i in range(num_items)], labels=labels,
                    classes=[str(c) for c in range(num_classes)], groups={}, source="synthetic")


@pytest.fixture
def image_set() -> ImageSet:
    return make_image_set()


def tiny_train_config(**overrides) -> TrainConfig:
    base = dict(steps=6, batch_size=8, checkpoint_every=2, keep_last=10, log_every=1, precision="fp32", device="cpu",
                lr=1e-3, warmup_fraction=0.2)
    base.update(overrides)
    return TrainConfig(**base)
