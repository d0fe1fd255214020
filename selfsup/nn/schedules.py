"""Schedules as pure functions of training progress in [0, 1], so resuming needs no schedule state."""

from __future__ import annotations

import math


def cosine_ramp(progress: float, start: float, end: float) -> float:
    """`start` at progress 0 to `end` at progress 1 along a half cosine (BYOL's / DINO's EMA momentum)."""
    p = min(max(progress, 0.0), 1.0)
    return end - (end - start) * (math.cos(math.pi * p) + 1) / 2


def linear_warmup(progress: float, start: float, end: float, warmup: float) -> float:
    """Linear from `start` to `end` over the first `warmup` fraction of training, then `end` (DINO's teacher temperature)."""
    if warmup <= 0 or progress >= warmup:
        return end
    return start + (end - start) * max(progress, 0.0) / warmup
