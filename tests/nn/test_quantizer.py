"""wav2vec 2.0's Gumbel-softmax product quantizer: shapes, hard choices with straight-through
gradients, the perplexity formula, the diversity loss and the temperature schedule."""

import math

import pytest
import torch

from selfsup.errors import SelfsupError
from selfsup.nn.quantizer import GumbelQuantizer, diversity_loss, gumbel_temperature, perplexity


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def quantizer(G: int = 2, V: int = 8, C: int = 16, code_dim: int = 12) -> GumbelQuantizer:
    torch.manual_seed(0)
    return GumbelQuantizer(C, groups=G, entries=V, code_dim=code_dim)


def test_shapes_and_codes():
    q = quantizer()
    z = torch.randn(3, 7, 16)
    out, diag = q(z, 2.0, gen(0))
    assert out.shape == (3, 7, 12)
    assert diag["codes"].shape == (3, 7, 2) and diag["codes"].dtype == torch.int64
    assert diag["prob_perplexity"].ndim == 0 and diag["code_perplexity"].ndim == 0
    # Each group's slice of q is exactly the chosen codevector (hard choices, also in training).
    codes = diag["codes"].reshape(-1, 2)
    flat = out.reshape(-1, 2, 6)
    for g in range(2):
        assert torch.allclose(flat[:, g], q.codevectors[g][codes[:, g]], atol=1e-6)


def test_eval_is_the_noise_free_argmax_and_training_draws_from_the_generator():
    q = quantizer()
    z = torch.randn(50, 16)
    logits = q.logits(z).view(50, 2, 8)
    q.eval()
    _, diag = q(z, 2.0, gen(0))
    assert diag["codes"].equal(logits.argmax(-1))
    q.train()
    a = q(z, 2.0, gen(1))[1]["codes"]
    assert a.equal(q(z, 2.0, gen(1))[1]["codes"])  # seeded
    assert not a.equal(q(z, 2.0, gen(2))[1]["codes"])  # the noise changes some choices at τ = 2
    # At a very low temperature the noise still decides (the sample is argmax(l + n), τ only shapes the gradient).
    assert q(z, 1e-3, gen(1))[1]["codes"].equal(a)


def test_straight_through_gradient_reaches_the_logits_projection():
    q = quantizer()
    z = torch.randn(20, 16, requires_grad=True)
    out, _ = q(z, 2.0, gen(0))
    (out * torch.randn_like(out)).sum().backward()
    assert q.logits.weight.grad is not None and q.logits.weight.grad.abs().sum() > 0
    assert z.grad is not None and z.grad.abs().sum() > 0
    assert q.codevectors.grad.abs().sum() > 0
    # Only the chosen codevectors receive gradient.
    used = torch.zeros(2, 8, dtype=torch.bool)
    codes = q(z, 2.0, gen(0))[1]["codes"]
    for g in range(2):
        used[g, codes[:, g]] = True
    assert (q.codevectors.grad.abs().sum(-1)[~used] == 0).all()


def test_perplexity_formula_on_hand_made_probabilities():
    G, V = 2, 8
    assert torch.isclose(perplexity(torch.full((G, V), 1.0 / V)), torch.tensor(float(G * V)), rtol=1e-5)
    one_hot = torch.zeros(G, V)
    one_hot[:, 3] = 1
    assert torch.isclose(perplexity(one_hot), torch.tensor(float(G)), rtol=1e-5)
    # Two of V entries evenly in one group, one in the other: exp(log 2) + 1 = 3.
    mixed = torch.zeros(G, V)
    mixed[0, :2] = 0.5
    mixed[1, 5] = 1
    assert torch.isclose(perplexity(mixed), torch.tensor(3.0), rtol=1e-5)
    # Diversity loss: 0 at full use, (GV - G)/GV at collapse.
    assert diversity_loss(perplexity(torch.full((G, V), 1.0 / V)), G * V).abs() < 1e-5
    assert torch.isclose(diversity_loss(perplexity(one_hot), G * V), torch.tensor((G * V - G) / (G * V)), rtol=1e-5)


def test_diagnostics_are_the_batch_averaged_softmax_and_hard_choices():
    q = quantizer()
    z = torch.randn(64, 16)
    _, diag = q(z, 2.0, gen(0))
    logits = q.logits(z).view(64, 2, 8)
    expected_prob = sum(math.exp(-(p * torch.log(p + 1e-7)).sum().item()) for p in logits.softmax(-1).mean(0))
    assert abs(diag["prob_perplexity"].item() - expected_prob) < 1e-4
    freq = torch.stack([torch.bincount(logits.argmax(-1)[:, g], minlength=8).float() / 64 for g in range(2)])
    assert abs(diag["code_perplexity"].item() - perplexity(freq).item()) < 1e-4
    # A collapsed projection (every frame the same logits) uses one entry per group.
    with torch.no_grad():
        q.logits.weight.zero_()
        q.logits.bias.copy_(torch.arange(16.0))
    _, diag = q(z, 2.0, gen(0))
    assert abs(diag["code_perplexity"].item() - 2.0) < 1e-4


def test_temperature_schedule_follows_the_paper():
    # The paper: max(0.5, 2 * 0.999995^step) over 400k updates; here a function of progress = step / 400k.
    for step in (0, 1000, 50_000, 200_000, 277_000, 300_000, 400_000):
        paper = max(0.5, 2 * 0.999995**step)
        assert abs(gumbel_temperature(step / 400_000) - paper) < 1e-3 * paper, step
    assert gumbel_temperature(0.0) == 2.0 and gumbel_temperature(1.0) == 0.5
    values = [gumbel_temperature(p / 100) for p in range(101)]
    assert all(a >= b for a, b in zip(values, values[1:]))  # monotone
    assert gumbel_temperature(0.5, start=1.0, end=0.1, anneal_until=0.5) == 0.1
    assert abs(gumbel_temperature(0.25, start=1.0, end=0.01, anneal_until=0.5) - 0.1) < 1e-9


def test_bad_sizes_are_refused():
    with pytest.raises(SelfsupError, match="multiple of groups"):
        GumbelQuantizer(16, groups=3, entries=8, code_dim=16)
    with pytest.raises(SelfsupError, match="positive"):
        gumbel_temperature(0.5, start=0.0)


def test_bf16_autocast_keeps_float_diagnostics():
    q = quantizer()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, diag = q(torch.randn(10, 16), 2.0, gen(0))
    assert diag["prob_perplexity"].dtype == torch.float32 and torch.isfinite(out.float()).all()
