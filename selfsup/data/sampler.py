"""Seeded batch order that can be resumed mid-epoch and split across ranks.

The order of epoch e is a permutation drawn from (seed, e) alone, so the position (epoch, batch)
is all a checkpoint needs, and W ranks together see exactly the batches one process would see.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from selfsup.errors import SelfsupError


@dataclass
class BatchOrder:
    num_items: int  # items in the dataset
    batch_size: int  # global batch: all ranks and accumulation micro-steps together
    seed: int
    epoch: int = 0  # position: the epoch being drawn from ...
    batch: int = 0  # ... and the next batch within it
    _cache: tuple[int, Tensor] | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.num_items < self.batch_size:
            raise SelfsupError(
                f"the dataset has {self.num_items} items, fewer than one batch of {self.batch_size}: "
                f"lower `train.batch_size` or add data"
            )

    @property
    def batches_per_epoch(self) -> int:
        # The ragged tail of each epoch is dropped so every step sees a full batch (its items come
        # first in a later epoch's permutation: nothing is systematically never seen).
        return self.num_items // self.batch_size

    def _permutation(self, epoch: int) -> Tensor:
        if self._cache is None or self._cache[0] != epoch:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._cache = (epoch, torch.randperm(self.num_items, generator=gen))
        return self._cache[1]

    def next(self) -> Tensor:
        """Global indices [batch_size] of the next batch; advances the position."""
        if self.batch >= self.batches_per_epoch:
            self.epoch, self.batch = self.epoch + 1, 0
        start = self.batch * self.batch_size
        indices = self._permutation(self.epoch)[start : start + self.batch_size]
        self.batch += 1
        return indices

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batch": self.batch, "seed": self.seed, "num_items": self.num_items,
                "batch_size": self.batch_size}

    def load_state_dict(self, state: dict[str, int]) -> None:
        for key in ("seed", "num_items", "batch_size"):
            if int(state[key]) != getattr(self, key):
                raise SelfsupError(
                    f"cannot resume: the checkpoint's data order has {key}={int(state[key])}, "
                    f"this run has {getattr(self, key)} (did the data or the config change?)"
                )
        self.epoch, self.batch = int(state["epoch"]), int(state["batch"])


def shard(indices: Tensor, part: int, num_parts: int) -> Tensor:
    """The `part`-th of `num_parts` equal contiguous slices (micro-step x rank) of a global batch."""
    size = indices.shape[0] // num_parts
    return indices[part * size : (part + 1) * size]
