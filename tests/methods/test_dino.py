"""DINO: the loss against a naive implementation of the paper's equations, centring, temperatures."""

import math

import torch

from selfsup.encoders import build_encoder
from selfsup.methods import build_method
from selfsup.methods.dino import dino_loss
from selfsup.nn.schedules import linear_warmup


def naive_dino_loss(student, teacher, center, tau_s, tau_t) -> float:
    """Caron et al. 2021, Algorithm 1 / eq. 3, one sample and one pair at a time."""
    total, pairs = 0.0, 0
    for u, t_view in enumerate(teacher):
        for v, s_view in enumerate(student):
            if u == v:
                continue
            pair_total = 0.0
            for t_row, s_row in zip(t_view, s_view):
                t_exp = [math.exp((float(t) - float(c)) / tau_t) for t, c in zip(t_row, center)]
                p_t = [e / sum(t_exp) for e in t_exp]
                s_exp = [math.exp(float(s) / tau_s) for s in s_row]
                log_p_s = [math.log(e / sum(s_exp)) for e in s_exp]
                pair_total += -sum(a * b for a, b in zip(p_t, log_p_s))
            total += pair_total / len(t_view)
            pairs += 1
    return total / pairs


def test_loss_matches_the_paper():
    gen = torch.Generator().manual_seed(0)
    B, K = 3, 7
    student = [torch.randn(B, K, generator=gen) for _ in range(4)]  # 2 global + 2 local
    teacher = [torch.randn(B, K, generator=gen) for _ in range(2)]
    center = torch.randn(K, generator=gen) * 0.1
    ours = dino_loss(student, teacher, center, 0.1, 0.04).item()
    assert abs(ours - naive_dino_loss(student, teacher, center, 0.1, 0.04)) < 1e-4


def _dino(num_local: int = 2):
    torch.manual_seed(0)
    encoder = build_encoder("resnet10", in_channels=3, image_size=16, width=8)
    return build_method({"name": "dino", "out_dim": 32, "hidden_dim": 16, "bottleneck_dim": 8}, encoder)


def _views(B: int = 4, num_local: int = 2):
    gen = torch.Generator().manual_seed(1)
    return [torch.randn(B, 3, 16, 16, generator=gen) for _ in range(2)] + [torch.randn(B, 3, 8, 8, generator=gen) for _ in range(num_local)]


def test_center_update_is_the_momentum_mean_of_teacher_logits():
    method = _dino()
    views = _views()
    with torch.no_grad():
        teacher = method.teacher["head"](method.teacher["encoder"].embed(torch.cat(views[:2])))
    method({"views": views}, 0.5)
    method.after_optimizer_step(0.5)
    torch.testing.assert_close(method.center, 0.1 * teacher.mean(dim=0))


def test_prototypes_frozen_early_then_trained():
    method = _dino()
    method({"views": _views()}, 0.0)["loss"].backward()
    assert method.head.prototypes.grad is not None and method.head.prototypes.grad.abs().sum() == 0
    method.zero_grad()
    method({"views": _views()}, 0.5)["loss"].backward()
    assert method.head.prototypes.grad.abs().sum() > 0


def test_teacher_temperature_warms_up():
    assert linear_warmup(0.0, 0.04, 0.07, 0.3) == 0.04
    assert abs(linear_warmup(0.15, 0.04, 0.07, 0.3) - 0.055) < 1e-12
    assert linear_warmup(0.6, 0.04, 0.07, 0.3) == 0.07


def test_works_with_vit_and_local_crops_of_another_size():
    torch.manual_seed(0)
    encoder = build_encoder("vit_tiny", in_channels=3, image_size=16, dim=32, depth=2, heads=2)
    method = build_method({"name": "dino", "out_dim": 32, "hidden_dim": 16, "bottleneck_dim": 8}, encoder)
    out = method({"views": _views(), "diagnose": True}, 0.5)
    assert torch.isfinite(out["loss"])
    assert 0 <= out["teacher_entropy"] <= 1 and out["teacher_kl_center"] >= 0
