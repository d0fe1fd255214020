"""BYOL — Bootstrap Your Own Latent (Grill et al. 2020, arXiv:2006.07733).

Objective: an online network (encoder -> projector -> predictor) predicts the projection that a
target network (an exponential moving average of the online encoder and projector) gives to the
other augmented view of the same image. With q the online prediction of view 1 and z' the target
projection of view 2, both l2-normalised, the loss is the normalised regression

    L = || q - z' ||^2 = 2 - 2 <q, z'>,

symmetrised by swapping the views and summed over both orders. No negatives are used; the
predictor and the slowly moving target keep it from collapsing. After each optimizer step the
target follows the online weights with momentum τ that rises from `momentum_start` to 1 along a
cosine, τ = 1 - (1 - τ_base)(cos(π k / K) + 1) / 2. The online encoder is what is kept.

Deviations from the paper:
- AdamW with warm-up + cosine instead of LARS; the loop's gradient clipping applies.
- The asymmetric augmentations (blur 1.0 / 0.1, solarize 0 / 0.2 on the two views) are the
  method's default view recipe; the crop scale stays at SimCLR's small-image (0.2, 1) rather than
  the paper's ImageNet (0.08, 1).
- BatchNorm statistics are per rank (the paper uses global BN across TPU cores).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from selfsup.nn.diagnostics import embedding_diagnostics
from selfsup.nn.ema import ema_update, make_teacher
from selfsup.nn.heads import mlp_head
from selfsup.nn.schedules import cosine_ramp


@dataclass
class Config:
    proj_hidden: int = 4096  # hidden width of the projector and the predictor (the paper's 4096)
    proj_dim: int = 256  # output width of the projector and the predictor (the paper's 256)
    momentum_start: float = 0.99  # EMA momentum τ_base at the start; rises to momentum_end (paper: 0.996 for 1000 epochs)
    momentum_end: float = 1.0  # EMA momentum at the end of training


def normalized_regression(prediction: Tensor, target: Tensor) -> Tensor:
    """2 - 2 cos(prediction, target), averaged over the batch ([B, D] each; target carries no gradient)."""
    p = F.normalize(prediction.float(), dim=1)
    t = F.normalize(target.float(), dim=1)
    return (2 - 2 * (p * t).sum(dim=1)).mean()


class BYOL(nn.Module):
    def __init__(self, cfg: Config, encoder: nn.Module):
        super().__init__()
        self.cfg = cfg
        self.encoder = encoder
        self.projector = mlp_head(encoder.dim, cfg.proj_hidden, cfg.proj_dim)
        self.predictor = mlp_head(cfg.proj_dim, cfg.proj_hidden, cfg.proj_dim)
        # The target network: an EMA copy of encoder + projector, never trained by gradient.
        self.target = make_teacher(nn.ModuleDict({"encoder": encoder, "projector": self.projector}))

    def forward(self, batch: dict, progress: float) -> dict[str, Tensor]:
        view1, view2 = batch["views"][:2]
        B = view1.shape[0]
        both = torch.cat([view1, view2])  # [2B, C, S, S]
        h = self.encoder.embed(both)  # [2B, D]
        q = self.predictor(self.projector(h))  # [2B, proj_dim]
        with torch.no_grad():
            z_target = self.target["projector"](self.target["encoder"].embed(both))  # [2B, proj_dim]
        # View 1's prediction regresses view 2's target and vice versa.
        loss = normalized_regression(q[:B], z_target[B:]) + normalized_regression(q[B:], z_target[:B])
        out = {"loss": loss}
        if batch.get("diagnose"):
            out.update(embedding_diagnostics(h[:B]))
        return out

    def after_optimizer_step(self, progress: float) -> None:
        momentum = cosine_ramp(progress, self.cfg.momentum_start, self.cfg.momentum_end)
        ema_update(self.target, nn.ModuleDict({"encoder": self.encoder, "projector": self.projector}), momentum)
