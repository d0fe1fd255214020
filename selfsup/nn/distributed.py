"""Collectives that objectives need inside their loss (e.g. negatives from every rank).

They are no-ops in a single process, so a method reads the same with or without torchrun.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) outside torch.distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _AllGatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sends every rank's gradient back to the rank that owns the rows.

    `dist.all_gather` alone cuts the graph: a rank's embeddings would then receive gradient only from
    its own anchors, not from being a negative for the other ranks' anchors. Backward sums the
    gathered gradient over ranks (all_reduce works on gloo, unlike reduce_scatter) and keeps this
    rank's slice, which is exactly d(sum of all ranks' losses)/d(local rows).
    """

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # type: ignore[override]
        rank, world_size = world()
        ctx.rank, ctx.rows = rank, x.shape[0]
        parts = [torch.empty_like(x) for _ in range(world_size)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.rows : (ctx.rank + 1) * ctx.rows]


def all_gather_with_grad(x: Tensor) -> Tensor:
    """Rows of `x` from every rank, in rank order, [world * B, ...]; gradients flow back to their owners.

    Every rank must pass the same number of rows.
    """
    if world()[1] == 1:
        return x
    return _AllGatherWithGrad.apply(x)
