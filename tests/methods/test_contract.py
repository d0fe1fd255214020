"""Every registered method meets the contract with every registered encoder (tiny sizes)."""

import pytest
import torch

from selfsup.encoders import ENCODERS, build_encoder
from selfsup.methods import METHODS, build_method

TINY_ENCODER = {"resnet18": {"width": 8}, "resnet10": {"width": 8}, "vit_tiny": {"dim": 32, "depth": 2, "heads": 2},
                "vit_small": {"dim": 32, "depth": 2, "heads": 2}}


def make_batch(spec_inputs: str, B: int = 6, C: int = 3, S: int = 16) -> dict:
    gen = torch.Generator().manual_seed(0)
    assert spec_inputs == "views", "add a batch maker for the new input kind"
    return {"views": [torch.randn(B, C, S, S, generator=gen) for _ in range(2)], "id": [str(i) for i in range(B)]}


@pytest.mark.parametrize("encoder_name", sorted(n for n, spec in ENCODERS.items() if spec.modality == "image"))
@pytest.mark.parametrize("method_name", sorted(METHODS))
def test_method_contract(method_name, encoder_name):
    torch.manual_seed(0)
    encoder = build_encoder(encoder_name, in_channels=3, image_size=16, **TINY_ENCODER.get(encoder_name, {}))
    method = build_method({"name": method_name}, encoder)
    assert method.encoder is encoder, "the exported encoder must be `method.encoder`"
    batch = make_batch(METHODS[method_name].inputs)
    out = method(batch, 0.0)
    assert set(out) >= {"loss"}
    assert out["loss"].ndim == 0 and torch.isfinite(out["loss"])
    for key, value in out.items():
        assert isinstance(value, torch.Tensor) and value.ndim == 0, key
    out["loss"].backward()
    # Every parameter is reached (zero-initialised residual gammas legitimately give some zero gradients).
    without_grad = [n for n, p in encoder.named_parameters() if p.requires_grad and p.grad is None]
    assert not without_grad, f"encoder parameters without gradient: {without_grad[:5]}"
    assert sum(p.grad.abs().sum() for p in encoder.parameters()) > 0
    if hasattr(method, "after_optimizer_step"):
        method.after_optimizer_step(0.5)
    # Same weights and batch -> same loss (no hidden global randomness outside the batch).
    assert torch.equal(method(batch, 0.0)["loss"], method(batch, 0.0)["loss"])


@pytest.mark.parametrize("method_name", sorted(METHODS))
def test_method_runs_under_bf16_autocast(method_name):
    torch.manual_seed(0)
    method = build_method({"name": method_name}, build_encoder("resnet10", in_channels=3, image_size=16, width=8))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = method(make_batch(METHODS[method_name].inputs), 0.0)["loss"]
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
