"""The exponential-moving-average teacher of BYOL and DINO.

teacher <- m * teacher + (1 - m) * student after each optimizer step. The teacher never receives
gradients; its weights are part of the method's state_dict, so checkpoints and resume carry it.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


def make_teacher(student: nn.Module) -> nn.Module:
    """A frozen copy of `student` (same initial weights, as in BYOL and DINO)."""
    teacher = copy.deepcopy(student)
    for param in teacher.parameters():
        param.requires_grad_(False)
    return teacher


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """teacher = momentum * teacher + (1 - momentum) * student, over parameters (one fused op per list).

    Buffers (BatchNorm statistics) are the teacher's own: it runs in training mode on its own
    inputs, as in the papers' code.
    """
    t_params = list(teacher.parameters())
    s_params = [p.detach() for p in student.parameters()]
    assert len(t_params) == len(s_params), "teacher and student must share an architecture"
    torch._foreach_lerp_(t_params, s_params, 1.0 - momentum)
