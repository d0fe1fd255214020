"""BYOL: the normalised-regression loss against the paper's formula, and the EMA target."""

import torch

from selfsup.encoders import build_encoder
from selfsup.methods import build_method
from selfsup.methods.byol import normalized_regression
from selfsup.nn.schedules import cosine_ramp


def naive_regression(p: torch.Tensor, z: torch.Tensor) -> float:
    """|| p/|p| - z/|z| ||^2 per sample (Grill et al. 2020, eq. 2), averaged."""
    total = 0.0
    for a, b in zip(p, z):
        total += float(((a / a.norm() - b / b.norm()) ** 2).sum())
    return total / len(p)


def test_loss_matches_the_paper():
    gen = torch.Generator().manual_seed(0)
    p, z = torch.randn(9, 6, generator=gen), torch.randn(9, 6, generator=gen)
    assert abs(normalized_regression(p, z).item() - naive_regression(p, z)) < 1e-5
    assert normalized_regression(z, z).item() < 1e-6


def _byol():
    torch.manual_seed(0)
    encoder = build_encoder("resnet10", in_channels=3, image_size=16, width=8)
    return build_method({"name": "byol", "proj_hidden": 32, "proj_dim": 16}, encoder)


def test_target_starts_equal_gets_no_gradient_and_follows_by_ema():
    method = _byol()
    online = list(method.encoder.parameters()) + list(method.projector.parameters())
    target = list(method.target.parameters())
    assert all(torch.equal(a, b) for a, b in zip(online, target))
    assert not any(p.requires_grad for p in target)
    views = [torch.randn(4, 3, 16, 16) for _ in range(2)]
    method({"views": views}, 0.0)["loss"].backward()
    assert all(p.grad is None for p in target)
    with torch.no_grad():  # an optimizer step, by hand
        for p in online:
            p.add_(torch.randn_like(p))
    before = [p.clone() for p in target]
    method.after_optimizer_step(0.3)
    m = cosine_ramp(0.3, 0.99, 1.0)
    for t_old, t_new, s in zip(before, target, online):
        torch.testing.assert_close(t_new, m * t_old + (1 - m) * s)


def test_momentum_schedule_is_cosine_from_start_to_end():
    assert cosine_ramp(0.0, 0.99, 1.0) == 0.99
    assert abs(cosine_ramp(0.5, 0.99, 1.0) - 0.995) < 1e-12
    assert cosine_ramp(1.0, 0.99, 1.0) == 1.0
