"""NT-Xent against a naive loop written from the paper's equation (Chen et al. 2020, eq. 1)."""

import math

import torch
import torch.nn.functional as F

from selfsup.methods.simclr import nt_xent


def naive_nt_xent(z1: torch.Tensor, z2: torch.Tensor, tau: float) -> float:
    z = [F.normalize(v, dim=0) for v in torch.cat([z1, z2])]  # the 2N views; k and k+N are a positive pair
    n = z1.shape[0]
    total = 0.0
    for i in range(2 * n):
        j = (i + n) % (2 * n)
        denom = sum(math.exp(float(z[i] @ z[k]) / tau) for k in range(2 * n) if k != i)
        total += -math.log(math.exp(float(z[i] @ z[j]) / tau) / denom)
    return total / (2 * n)


def test_nt_xent_matches_paper_formula():
    gen = torch.Generator().manual_seed(0)
    for tau in (0.1, 0.5):
        z1, z2 = torch.randn(7, 5, generator=gen, dtype=torch.float64), torch.randn(7, 5, generator=gen, dtype=torch.float64)
        loss, _ = nt_xent(z1.float(), z2.float(), tau)
        assert abs(loss.item() - naive_nt_xent(z1, z2, tau)) < 1e-4


def test_identical_views_are_easy_and_top1_is_exact():
    gen = torch.Generator().manual_seed(1)
    z = torch.randn(16, 32, generator=gen)
    loss_same, top1 = nt_xent(z, z.clone(), 0.1)
    loss_random, _ = nt_xent(z, torch.randn(16, 32, generator=gen), 0.1)
    assert top1.item() == 1.0
    assert loss_same < loss_random


def test_gradient_flows_to_both_views():
    z1 = torch.randn(4, 8, requires_grad=True)
    z2 = torch.randn(4, 8, requires_grad=True)
    nt_xent(z1, z2, 0.2)[0].backward()
    assert z1.grad.abs().sum() > 0 and z2.grad.abs().sum() > 0
