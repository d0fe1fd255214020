"""linear_cross_entropy equals the plain projection + cross-entropy, in value and gradients."""

import pytest
import torch
import torch.nn.functional as F

from selfsup.nn.losses import linear_cross_entropy


def _plain(hidden, weight, targets, bias):
    logits = F.linear(hidden, weight, bias).float()
    return F.cross_entropy(logits, targets), (logits.argmax(1) == targets).float().mean()


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("chunk", [7, 64, 1000])
def test_matches_the_plain_path_in_fp32(with_bias, chunk):
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(50, 16, generator=gen, requires_grad=True)
    weight = torch.randn(300, 16, generator=gen, requires_grad=True)
    bias = torch.randn(300, generator=gen, requires_grad=True) if with_bias else None
    targets = torch.randint(300, (50,), generator=gen)
    loss, acc = linear_cross_entropy(hidden, weight, targets, bias, chunk=chunk)
    grads = torch.autograd.grad(loss * 3.0, [hidden, weight] + ([bias] if with_bias else []))
    ref_loss, ref_acc = _plain(hidden, weight, targets, bias)
    ref_grads = torch.autograd.grad(ref_loss * 3.0, [hidden, weight] + ([bias] if with_bias else []))
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-6)
    assert float(acc) == float(ref_acc)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6)


def test_under_bf16_autocast_close_to_the_plain_path_and_no_grad_ok():
    gen = torch.Generator().manual_seed(1)
    hidden = torch.randn(200, 32, generator=gen, requires_grad=True)
    weight = (torch.randn(500, 32, generator=gen) * 0.1).requires_grad_()
    targets = torch.randint(500, (200,), generator=gen)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = linear_cross_entropy(hidden, weight, targets, chunk=64)
        ref, _ = _plain(hidden, weight, targets, None)
    gh, gw = torch.autograd.grad(loss, [hidden, weight])
    rh, rw = torch.autograd.grad(ref, [hidden, weight])
    assert loss.dtype == torch.float32 and gw.dtype == torch.float32 and gh.dtype == torch.float32
    torch.testing.assert_close(loss, ref, rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(gh, rh, rtol=0.05, atol=2e-4)
    torch.testing.assert_close(gw, rw, rtol=0.05, atol=2e-4)
    with torch.no_grad():
        assert torch.isfinite(linear_cross_entropy(hidden, weight, targets)[0])
