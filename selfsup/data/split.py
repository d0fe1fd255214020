"""The held-out split shared by every modality: stratified by label, seeded, source order kept.

Images (`images.split_holdout`) and text (`text.split_holdout_text`) hold different rows but the same
labels tensor, so the choice of rows lives here and each set only applies it with its own `subset`.
"""

from __future__ import annotations

import math

import torch

from selfsup.errors import SelfsupError


def holdout_mask(labels: torch.Tensor | None, num_items: int, fraction: float, seed: int) -> torch.Tensor:
    """bool [num_items]: True for the rows to hold out.

    Each class (unlabelled rows, -1, count as one more class) sends round(fraction * n) of its n
    rows to the holdout, at least 1 when fraction > 0 and n >= 2 and never all of them, so that a
    rare class is both trained on and evaluated. The same seed gives the same rows.
    """
    if not 0.0 <= fraction < 1.0:
        raise SelfsupError(f"holdout fraction must lie in [0, 1), got {fraction!r}")
    assert labels is None or labels.shape == (num_items,), (None if labels is None else labels.shape, num_items)
    is_held = torch.zeros(num_items, dtype=torch.bool)
    if fraction == 0.0 or num_items == 0:
        return is_held
    generator = torch.Generator().manual_seed(seed)
    if labels is None:
        strata = [torch.arange(num_items)]
    else:
        strata = [(labels == label).nonzero().flatten() for label in labels.unique().tolist()]
    for members in strata:
        num_members = len(members)
        if num_members < 2:
            continue
        num_held = min(max(1, math.floor(fraction * num_members + 0.5)), num_members - 1)
        order = torch.randperm(num_members, generator=generator)
        is_held[members[order[:num_held]]] = True
    return is_held
