"""DINO — self-distillation with no labels (Caron et al. 2021, arXiv:2104.14294).

Objective: a student network (encoder + DINO head) is trained to match the output distribution of
a teacher network — an exponential moving average of the student — across views. Each image is
cropped into 2 global views and N smaller local views (multi-crop). The teacher sees only the
global views; its logits are centred (a running mean c of teacher logits is subtracted) and
sharpened with a low temperature τ_t; the student's logits are softened with τ_s:

    P_t(x) = softmax((g_t(x) - c) / τ_t),   P_s(x) = softmax(g_s(x) / τ_s),
    L = mean over pairs (global view u, any view v != u) of  -Σ_k P_t(u)_k log P_s(v)_k.

Centring stops one dimension from dominating; sharpening stops the uniform collapse centring
would cause. After each optimizer step c <- m_c c + (1 - m_c) mean(g_t) over the global batch
(all-reduced across ranks) and the teacher follows the student with a cosine momentum schedule.
The head is an MLP, an l2-normalised bottleneck and a weight-normalised prototype layer with
unit-norm rows. The student's encoder is what is kept.

Deviations from the paper:
- AdamW with warm-up + cosine learning rate, fixed weight decay (the paper ramps it 0.04 -> 0.4).
- Small defaults for small images, short runs and CPUs: 2,048 prototypes (paper: 65,536), a head
  of width 512 with a 64-d bottleneck (paper: 2048 / 256), BatchNorm in the head's MLP (the
  paper's `use_bn_in_head` option), teacher momentum from 0.99 (paper: 0.996), τ_t = 0.04
  throughout (the warm-up is a knob), local crops at half the image size. Measured on digits
  (ResNet-10, batch 128, 200 steps): with the paper's head, momentum and τ_t 0.07, the head's
  outputs differ too little between images, centring wipes them out and the teacher sits at the
  uniform distribution (entropy 0.99+ of log K, loss flat at log K) — the plateau many users
  report; with these defaults the teacher stays sharp (entropy ~0.94) and the loss falls.
- The prototype layer's gradient is zero for the first `freeze_last_layer` fraction of training
  (the paper drops it for the first epoch).
- The centre update is applied after the optimizer step (with gradient accumulation, from the
  mean over the step's micro-batches) rather than inside the loss.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from selfsup.nn.diagnostics import embedding_diagnostics
from selfsup.nn.distributed import world
from selfsup.nn.ema import ema_update, make_teacher
from selfsup.nn.schedules import cosine_ramp, linear_warmup


@dataclass
class Config:
    out_dim: int = 2048  # prototypes K (the paper: 65,536)
    hidden_dim: int = 512  # hidden width of the head's MLP (the paper: 2048)
    bottleneck_dim: int = 64  # width of the l2-normalised bottleneck (the paper: 256)
    student_temp: float = 0.1  # τ_s
    teacher_temp: float = 0.04  # τ_t after warm-up (the paper's code default; 0.07 for long ViT runs)
    warmup_teacher_temp: float = 0.04  # τ_t at the start
    teacher_temp_warmup: float = 0.3  # fraction of training over which τ_t rises linearly
    center_momentum: float = 0.9  # m_c of the teacher-logit centre
    momentum_start: float = 0.99  # teacher EMA momentum at the start, rising to momentum_end (the paper: 0.996)
    momentum_end: float = 1.0  # teacher EMA momentum at the end of training
    freeze_last_layer: float = 0.01  # fraction of training during which the prototypes are not trained
    head_batchnorm: bool = True  # BatchNorm in the head's MLP (the paper's use_bn_in_head option; see deviations)


class DINOHead(nn.Module):
    """MLP (3 layers, GELU) -> l2-normalised bottleneck -> weight-normalised prototypes (unit-norm rows)."""

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int, bottleneck_dim: int, batchnorm: bool = True):
        super().__init__()
        norm = (lambda: nn.BatchNorm1d(hidden_dim)) if batchnorm else nn.Identity
        self.mlp = nn.Sequential(
            nn.Linear(in_dim, hidden_dim), norm(), nn.GELU(),
            nn.Linear(hidden_dim, hidden_dim), norm(), nn.GELU(),
            nn.Linear(hidden_dim, bottleneck_dim),
        )
        for module in self.mlp:
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
        # Weight norm with the gain fixed to 1 (the paper's norm_last_layer): only directions are learnt.
        self.prototypes = nn.Parameter(torch.empty(out_dim, bottleneck_dim))
        nn.init.trunc_normal_(self.prototypes, std=0.02)

    def forward(self, x: Tensor, freeze_prototypes: bool = False) -> Tensor:
        x = F.normalize(self.mlp(x), dim=-1)  # [B, bottleneck]
        w = self.prototypes
        if freeze_prototypes:
            # A zero gradient rather than none: DDP expects every trainable parameter to get one.
            # (Weight decay may shrink the rows meanwhile; they are normalised, so nothing changes.)
            w = w.detach() + 0.0 * w
        return x @ F.normalize(w, dim=1).T  # [B, out_dim]


def dino_loss(student_logits: list[Tensor], teacher_logits: list[Tensor], center: Tensor,
              student_temp: float, teacher_temp: float) -> Tensor:
    """Cross-entropy between the centred, sharpened teacher and the student over all pairs of
    different views: teacher_logits are the global views' [B, K] each (student_logits lists the
    same global views first, then the local ones)."""
    teacher_probs = [F.softmax((t.float() - center) / teacher_temp, dim=-1) for t in teacher_logits]
    student_logp = [F.log_softmax(s.float() / student_temp, dim=-1) for s in student_logits]
    total, num_pairs = 0.0, 0
    for u, p_t in enumerate(teacher_probs):
        for v, logp_s in enumerate(student_logp):
            if u == v:  # the same crop: nothing to predict
                continue
            total = total + (-(p_t * logp_s).sum(dim=-1)).mean()
            num_pairs += 1
    return total / num_pairs


class DINO(nn.Module):
    def __init__(self, cfg: Config, encoder: nn.Module):
        super().__init__()
        self.cfg = cfg
        self.encoder = encoder
        self.head = DINOHead(encoder.dim, cfg.out_dim, cfg.hidden_dim, cfg.bottleneck_dim, cfg.head_batchnorm)
        self.teacher = make_teacher(nn.ModuleDict({"encoder": encoder, "head": self.head}))
        self.register_buffer("center", torch.zeros(cfg.out_dim))
        # Sum of the step's batch centres (over micro-steps) and their count, applied after the step.
        self._pending: tuple[Tensor, int] | None = None

    def forward(self, batch: dict, progress: float) -> dict[str, Tensor]:
        views = batch["views"]
        num_global = 2
        B = views[0].shape[0]
        freeze = progress < self.cfg.freeze_last_layer
        # Views of one resolution share a forward pass: the global pair, then the local crops.
        global_h = self.encoder.embed(torch.cat(views[:num_global]))  # [2B, D]
        student = self.head(global_h, freeze).chunk(num_global)
        if len(views) > num_global:
            local_h = self.encoder.embed(torch.cat(views[num_global:]))  # [N_local*B, D]
            student = student + self.head(local_h, freeze).chunk(len(views) - num_global)
        with torch.no_grad():
            teacher_h = self.teacher["encoder"].embed(torch.cat(views[:num_global]))
            teacher = self.teacher["head"](teacher_h).float()  # [2B, K]
        teacher_temp = linear_warmup(progress, self.cfg.warmup_teacher_temp, self.cfg.teacher_temp, self.cfg.teacher_temp_warmup)
        loss = dino_loss(list(student), list(teacher.chunk(num_global)), self.center, self.cfg.student_temp, teacher_temp)
        self._stash_center(teacher)
        out = {"loss": loss}
        if batch.get("diagnose"):
            out.update(embedding_diagnostics(global_h[:B]))
            out.update(teacher_diagnostics(teacher, self.center, teacher_temp))
        return out

    @torch.no_grad()
    def _stash_center(self, teacher: Tensor) -> None:
        batch_sum = teacher.sum(dim=0)  # [K]
        count = teacher.shape[0]
        if world()[1] > 1:
            dist.all_reduce(batch_sum)
            count *= world()[1]
        if self._pending is not None:
            batch_sum, count = batch_sum + self._pending[0], count + self._pending[1]
        self._pending = (batch_sum, count)

    @torch.no_grad()
    def after_optimizer_step(self, progress: float) -> None:
        if self._pending is not None:
            batch_center = self._pending[0] / self._pending[1]
            self.center.mul_(self.cfg.center_momentum).add_(batch_center, alpha=1 - self.cfg.center_momentum)
            self._pending = None
        momentum = cosine_ramp(progress, self.cfg.momentum_start, self.cfg.momentum_end)
        ema_update(self.teacher, nn.ModuleDict({"encoder": self.encoder, "head": self.head}), momentum)


@torch.no_grad()
def teacher_diagnostics(teacher_logits: Tensor, center: Tensor, teacher_temp: float) -> dict[str, Tensor]:
    """Entropy of the teacher's centred, sharpened output (as a fraction of log K) and its KL to the
    centre's own distribution: entropy -> 1 with KL -> 0 means the teacher only echoes the centre
    (uniform collapse); entropy -> 0 means one prototype wins for every image."""
    K = teacher_logits.shape[1]
    log_p = F.log_softmax((teacher_logits - center) / teacher_temp, dim=-1)  # [B, K]
    p = log_p.exp()
    entropy = -(p * log_p).sum(dim=-1).mean() / math.log(K)
    log_c = F.log_softmax(center / teacher_temp, dim=-1)
    kl = (p * (log_p - log_c)).sum(dim=-1).mean()
    return {"teacher_entropy": entropy, "teacher_kl_center": kl}
