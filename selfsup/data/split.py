"""The held-out split shared by every modality: stratified by label, seeded, source order kept.

Every modality's dataset holds different rows but the same kind of labels tensor, so the choice of
rows lives here and each dataset only applies it with its own `subset` (`Modality.split`).
"""

from __future__ import annotations

import math
from typing import Any

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


def split_holdout(data: Any, fraction: float, seed: int) -> tuple[Any, Any]:
    """(training, held-out) parts of any modality's dataset: stratified by label, seeded, both in
    source order; a fraction that holds nothing out gives the whole set and an empty held-out part."""
    is_held = holdout_mask(data.labels, len(data), fraction, seed)
    if not bool(is_held.any()):
        return data, data.subset([])
    return data.subset(~is_held), data.subset(is_held)


def labelled_rows(data: Any, what: str) -> torch.Tensor:
    """Indices of the rows of a dataset (any modality's) that carry a label; an error when there are none."""
    if data.labels is None or not bool((data.labels >= 0).any()):
        raise SelfsupError(f"{data.source}: the {what} split has no labels, so it cannot be probed; "
                           f"use a labelled source (class sub-folders, a manifest label column, or .npz `y`)")
    return torch.nonzero(data.labels >= 0).flatten()
