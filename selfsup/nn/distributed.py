"""Collectives that objectives need inside their loss (e.g. negatives from every rank).

They are no-ops in a single process, so a method reads the same with or without torchrun.

The contract under DDP: the mean of the ranks' losses, and DDP's average of their gradients, are one
process's loss and gradients on the global batch. A loss that averages over a number of items that
differs between ranks (masked tokens, patches, frames) is weighted by the rank's share of them
(`global_mean_scale`); statistics over the batch (wav2vec 2.0's codebook usage) are summed over the
ranks with their gradients (`all_reduce_shared`); BatchNorm statistics stay per rank unless
`sync_batchnorm` is applied (GPU only). Tested per objective in tests/train/test_ddp_methods.py.
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


class _AllReduceShared(torch.autograd.Function):
    """all_reduce (sum) for a term every rank computes identically from the sum; backward: world x grad."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # type: ignore[override]
        total = x.clone().contiguous()
        dist.all_reduce(total)
        return total

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        return grad * world()[1]


def all_reduce_shared(x: Tensor) -> Tensor:
    """The sum of `x` over every rank, with gradients to every rank's `x`; `x` itself in one process.

    For a term that every rank's loss holds as the same function of the sum (wav2vec 2.0's codebook
    diversity over the global batch). As with `all_gather_with_grad`, each rank's backward gets
    d(sum of all ranks' losses)/d(x), so DDP's average of the ranks' gradients is the term's gradient:
    that is the sum of the ranks' incoming gradients, which are all the same here, so it is world x
    this rank's — without a collective in the backward pass, where it would have to keep step with
    DDP's own gradient all-reduces. Gradients from anything else that reads the sum differently on
    each rank would be wrong: use it only for such shared terms.
    """
    if world()[1] == 1:
        return x
    return _AllReduceShared.apply(x)


def global_mean_scale(counts: Tensor, enabled: bool = True) -> Tensor:
    """Factors world * counts / (counts summed over ranks) that make per-rank means global ones.

    `counts` [k] (float) holds how many items this rank's k means average (masked tokens, frames);
    one collective carries them all. A rank's mean of its n items times its factor, averaged over
    the ranks as DDP averages gradients and the loop the logged values, is the mean over all ranks'
    items, as one process computes it on the global batch — where a plain average of per-rank means
    weighs a rank with few items as much as one with many. A factor is 0 where no rank has items.

    Ones (exactly, so the single-process path is unchanged) in one process or when `enabled` is
    false: methods pass `self.training`, because rank 0 alone runs the held-out monitor in eval
    mode and a collective there would wait forever for the other ranks.
    """
    world_size = world()[1]
    if world_size == 1 or not enabled:
        return torch.ones_like(counts, dtype=torch.float32)
    total = counts.detach().float().clone()
    dist.all_reduce(total)
    return torch.where(total > 0, counts.detach().float() * world_size / total.clamp(min=1e-12),
                       torch.zeros_like(total))


def sync_batchnorm(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """`module` with every BatchNorm turned into torch's SyncBatchNorm (batch statistics over every
    rank's rows, as one process on the global batch) under DDP; `module` unchanged in one process.

    For the objectives whose BatchNorms should see the global batch (SimCLR/BYOL/DINO heads and ResNet
    encoders, colorize's decoder); per-rank statistics are the default, as in most reference code.
    Call it before wrapping in DDP and before building the optimizer (the parameters are kept, the
    modules replaced). torch's SyncBatchNorm has no CPU kernel: on the CPU (gloo) it raises.
    """
    if world()[1] == 1:
        return module
    if device.type == "cpu":
        from selfsup.errors import SelfsupError

        raise SelfsupError("train.sync_batchnorm needs GPUs: torch's SyncBatchNorm has no CPU implementation "
                           "(turn it off for gloo runs on the CPU)")
    return torch.nn.SyncBatchNorm.convert_sync_batchnorm(module)
