"""Every registered method meets the contract with every registered encoder (tiny sizes)."""

import pytest
import torch

from selfsup.encoders import ENCODERS, build_encoder, encoder_config
from selfsup.methods import METHODS, build_method
from selfsup.modalities import MODALITIES

TINY_ENCODER = {"resnet18": {"width": 8}, "resnet10": {"width": 8}, "vit_tiny": {"dim": 32, "depth": 2, "heads": 2},
                "vit_small": {"dim": 32, "depth": 2, "heads": 2}, "text_encoder": {"dim": 32, "depth": 2, "heads": 2},
                "text_decoder": {"dim": 32, "depth": 2, "heads": 2},
                "wav2vec2_tiny": {"conv_channels": 16, "dim": 32, "depth": 2, "heads": 2, "pos_conv_kernel": 8,
                                  "pos_conv_groups": 2},
                "wav2vec2_small": {"conv_channels": 16, "dim": 32, "depth": 2, "heads": 2, "pos_conv_kernel": 8,
                                   "pos_conv_groups": 2}}


def make_batch(method_name: str, B: int = 6) -> dict:
    """A fresh batch of the method's default modality (its generator too, so two calls give identical batches)."""
    return MODALITIES[METHODS[method_name].modality].contract_batch(B)


def build_for(encoder_name: str):
    inputs = MODALITIES[ENCODERS[encoder_name].modality].contract_inputs()
    return build_encoder(encoder_name, **inputs, **TINY_ENCODER.get(encoder_name, {}))


def fit_if_needed(method, method_name: str) -> None:
    """Methods with data-fitted targets (BEiT's tokens, colourisation's bins) get them as pretrain gives them."""
    if getattr(method, "fits_targets", False):
        data = MODALITIES[METHODS[method_name].modality].contract_fit_data()
        assert data is not None, "a method that fits targets needs its modality's contract_fit_data"
        method.fit_targets(data, torch.Generator().manual_seed(3))


def _pairs() -> list[tuple[str, str]]:
    """Every method with every encoder it accepts (the modality matches; causality where required)."""
    pairs = []
    for method_name, method in sorted(METHODS.items()):
        for encoder_name, encoder in sorted(ENCODERS.items()):
            if encoder.modality != method.modality:
                continue
            if method.causal is not None and encoder_config(encoder_name).causal != method.causal:
                continue
            if method.vit_only and encoder.module_type.__name__ != "ViT":
                continue
            pairs.append((method_name, encoder_name))
    return pairs


def test_every_method_and_encoder_is_covered():
    covered_methods = {m for m, _ in _pairs()}
    covered_encoders = {e for _, e in _pairs()}
    assert covered_methods == set(METHODS) and covered_encoders == set(ENCODERS)


@pytest.mark.parametrize(("method_name", "encoder_name"), _pairs())
def test_method_contract(method_name, encoder_name):
    torch.manual_seed(0)
    encoder = build_for(encoder_name)
    method = build_method({"name": method_name}, encoder)
    assert method.encoder is encoder, "the exported encoder must be `method.encoder`"
    fit_if_needed(method, method_name)
    batch = make_batch(method_name)
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
    assert torch.equal(method(make_batch(method_name), 0.0)["loss"], method(make_batch(method_name), 0.0)["loss"])


@pytest.mark.parametrize("method_name", sorted(METHODS))
def test_method_runs_under_bf16_autocast(method_name):
    torch.manual_seed(0)
    method = build_method({"name": method_name}, build_for(METHODS[method_name].encoder))
    fit_if_needed(method, method_name)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = method(make_batch(method_name), 0.0)["loss"]
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
