"""Every registered method meets the contract with every registered encoder (tiny sizes)."""

import pytest
import torch

from selfsup.encoders import ENCODERS, build_encoder, encoder_config
from selfsup.methods import METHODS, build_method

TINY_ENCODER = {"resnet18": {"width": 8}, "resnet10": {"width": 8}, "vit_tiny": {"dim": 32, "depth": 2, "heads": 2},
                "vit_small": {"dim": 32, "depth": 2, "heads": 2}, "text_encoder": {"dim": 32, "depth": 2, "heads": 2},
                "text_decoder": {"dim": 32, "depth": 2, "heads": 2}}
VOCAB, SEQ = 50, 12


def make_batch(spec_inputs: str, B: int = 6, C: int = 3, S: int = 16) -> dict:
    """A fresh batch (its generator too, so two calls give identical batches)."""
    gen = torch.Generator().manual_seed(0)
    if spec_inputs == "tokens":
        ids = torch.randint(5, VOCAB, (B, SEQ), generator=gen)
        ids[:, 0] = 2  # a [CLS]-like special token that must never be a target of masking
        documents = (torch.arange(SEQ) >= SEQ // 2).long().expand(B, SEQ).clone()  # two documents per block
        return {"input_ids": ids, "token_mask": torch.ones(B, SEQ, dtype=torch.bool), "document_ids": documents,
                "generator": torch.Generator().manual_seed(1), "id": [str(i) for i in range(B)]}
    assert spec_inputs == "views", "add a batch maker for the new input kind"
    return {"views": [torch.randn(B, C, S, S, generator=gen) for _ in range(2)], "id": [str(i) for i in range(B)],
            "generator": torch.Generator().manual_seed(1), "pixel_mean": torch.full((C,), 0.5),
            "pixel_std": torch.full((C,), 0.25)}


def build_for(encoder_name: str):
    spec = ENCODERS[encoder_name]
    if spec.modality == "text":
        return build_encoder(encoder_name, vocab_size=VOCAB, max_len=SEQ, **TINY_ENCODER[encoder_name])
    return build_encoder(encoder_name, in_channels=3, image_size=16, **TINY_ENCODER.get(encoder_name, {}))


def fit_if_needed(method) -> None:
    """Methods with data-fitted targets (BEiT's tokens, colourisation's bins) get them as pretrain gives them."""
    if getattr(method, "fits_targets", False):
        images = torch.randint(0, 256, (64, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
        method.fit_targets(images, lambda x: (x.float() / 255 - 0.5) / 0.25, torch.Generator().manual_seed(3))


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
    fit_if_needed(method)
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
    inputs = METHODS[method_name].inputs
    assert torch.equal(method(make_batch(inputs), 0.0)["loss"], method(make_batch(inputs), 0.0)["loss"])


@pytest.mark.parametrize("method_name", sorted(METHODS))
def test_method_runs_under_bf16_autocast(method_name):
    torch.manual_seed(0)
    method = build_method({"name": method_name}, build_for(METHODS[method_name].encoder))
    fit_if_needed(method)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = method(make_batch(METHODS[method_name].inputs), 0.0)["loss"]
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
