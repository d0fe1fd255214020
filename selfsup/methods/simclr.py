"""SimCLR — A Simple Framework for Contrastive Learning of Visual Representations (Chen et al. 2020, arXiv:2002.05709).

Objective: each image in a batch of B is augmented twice; the encoder and a small MLP projection
head map the 2B views to vectors z, l2-normalised. For each view, the other view of the same image
is the positive and the remaining 2B - 2 views are negatives. The NT-Xent loss is the cross-entropy
of picking the positive among all other views, with cosine similarities divided by a temperature τ:

    l(i, j) = -log( exp(sim(z_i, z_j) / τ) / Σ_{k != i} exp(sim(z_i, z_k) / τ) ),

averaged over all 2B (anchor, positive) pairs. The encoder (before the head) is what is kept.

Under torchrun the negatives come from the whole global batch: projections are all-gathered with
a gather whose backward returns each rank's share of the gradient, so W ranks of B images optimise
exactly the loss of one process with a batch of W*B (tested).

Deviations from the paper:
- AdamW with warm-up + cosine (the loop's optimizer) instead of LARS; the paper's batch sizes of
  256-8192 are a knob (`train.batch_size`), not a default.
- BatchNorm statistics are per rank (the paper uses global BN across TPU cores).
- Temperature default 0.2 (the paper's CIFAR runs use 0.5; 0.1-0.5 all appear in its ablations —
  smaller batches favour lower values).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from selfsup.nn.diagnostics import embedding_diagnostics
from selfsup.nn.distributed import all_gather_with_grad, world
from selfsup.nn.heads import mlp_head


@dataclass
class Config:
    temperature: float = 0.2  # τ in NT-Xent: lower sharpens the softmax over negatives
    proj_hidden: int | None = None  # hidden width of the projection MLP; None = the encoder's dim
    proj_dim: int = 128  # output width of the projection head (the paper's 128)
    proj_layers: int = 2  # linear layers in the head (the paper: 2; SimCLR v2: 3)


def nt_xent(z1: Tensor, z2: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """NT-Xent over the global batch; returns (loss over this rank's anchors, top-1 positive accuracy).

    z1, z2: [B, D] projections of the two views of this rank's B images. The loss is the mean
    over this rank's 2B anchors; summed over ranks and divided by the world size (what DDP's
    gradient averaging does) it equals the single-process loss on the global batch.
    """
    B, _ = z1.shape
    rank, world_size = world()
    z1 = F.normalize(z1.float(), dim=1)
    z2 = F.normalize(z2.float(), dim=1)
    candidates = torch.cat([all_gather_with_grad(z1), all_gather_with_grad(z2)])  # [2WB, D]: view 1 of all ranks, then view 2
    anchors = torch.cat([z1, z2])  # [2B, D]
    logits = anchors @ candidates.T / temperature  # [2B, 2WB]

    local = torch.arange(B, device=z1.device) + rank * B  # this rank's rows within one view's block
    offset = world_size * B
    self_index = torch.cat([local, local + offset])  # [2B]
    positive_index = torch.cat([local + offset, local])  # [2B]
    logits = logits.masked_fill(F.one_hot(self_index, 2 * offset).bool(), float("-inf"))
    loss = F.cross_entropy(logits, positive_index)
    top1 = (logits.argmax(dim=1) == positive_index).float().mean()
    return loss, top1


class SimCLR(nn.Module):
    def __init__(self, cfg: Config, encoder: nn.Module):
        super().__init__()
        self.cfg = cfg
        self.encoder = encoder
        # The paper's head: Linear-BN-ReLU, then Linear-BN (BatchNorm on every layer, as in its code).
        self.head = mlp_head(encoder.dim, cfg.proj_hidden or encoder.dim, cfg.proj_dim, cfg.proj_layers, last_norm=True)

    def forward(self, batch: dict, progress: float) -> dict[str, Tensor]:
        view1, view2 = batch["views"][:2]
        B = view1.shape[0]
        # One pass over both views: BatchNorm then normalises over all 2B views, as in the paper.
        h = self.encoder.embed(torch.cat([view1, view2]))  # [2B, D]
        z = self.head(h)  # [2B, proj_dim]
        loss, top1 = nt_xent(z[:B], z[B:], self.cfg.temperature)
        out = {"loss": loss, "top1": top1.detach()}
        if batch.get("diagnose"):
            out.update(embedding_diagnostics(h[:B]))
        return out
