"""AdamW with decay only where it belongs, and the warm-up + cosine learning-rate schedule."""

from __future__ import annotations

import math

import torch
from torch import nn


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: weights of linear/conv layers decay; norms, biases and 1-d tokens/embeddings don't.

    Decaying a norm's scale or a bias only pulls the network towards a degenerate function, which
    is why the BERT/ViT/SimCLR recipes all exclude them; 1-d parameters cover exactly those.
    """
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if param.ndim <= 1 or name.endswith(".bias") or "pos_embed" in name or "token" in name.rsplit(".", 1)[-1]:
            no_decay.append(param)
        else:
            decay.append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float], *,
                    fused: bool = False) -> torch.optim.AdamW:
    """foreach (the default): one kernel per group instead of one per tensor. fused: one kernel for
    the whole update, which also takes a device-side `found_inf` flag (the loop's deferred guard)."""
    if fused:
        return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=betas, fused=True)
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=betas, foreach=True)


def lr_at(step: int, total_steps: int, peak_lr: float, warmup_fraction: float, min_lr_ratio: float) -> float:
    """Linear warm-up from ~0 to `peak_lr`, then a cosine to `peak_lr * min_lr_ratio` at the last step.

    A pure function of the step, so resuming needs no scheduler state.
    """
    warmup = int(round(warmup_fraction * total_steps))
    if step < warmup:
        return peak_lr * (step + 1) / warmup
    decay_steps = max(1, total_steps - warmup - 1)
    t = min(1.0, (step - warmup) / decay_steps)
    floor = peak_lr * min_lr_ratio
    return floor + (peak_lr - floor) * 0.5 * (1.0 + math.cos(math.pi * t))
