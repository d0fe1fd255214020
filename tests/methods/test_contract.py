"""Every registered method meets the contract with every registered encoder (tiny sizes).

A method with several towers (`MethodSpec.towers`) is swept tower by tower: each role takes every
encoder of its modality (`tower_modalities`, else the data's) while the other roles keep their
default encoders; each tower is built from its modality's tiny inputs as the method's data gives
them (`contract_tower_inputs` of a pair modality, else the tower modality's `contract_inputs`)."""

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
                                   "pos_conv_groups": 2},
                "clip_vit": {"dim": 32, "depth": 2, "heads": 2}, "clip_text": {"dim": 32, "depth": 2, "heads": 2}}


def make_batch(method_name: str, B: int = 6) -> dict:
    """A fresh batch of the method's default modality (its generator too, so two calls give identical batches)."""
    return MODALITIES[METHODS[method_name].modality].contract_batch(B)


def build_for(encoder_name: str, method_name: str | None = None):
    """A tiny `encoder_name`, built from the inputs its modality has in `method_name`'s data."""
    modality = ENCODERS[encoder_name].modality
    data = MODALITIES[METHODS[method_name].modality] if method_name is not None else None
    if data is not None and hasattr(data, "contract_tower_inputs"):
        inputs = data.contract_tower_inputs()[modality]
    else:
        inputs = MODALITIES[modality].contract_inputs()
    return build_encoder(encoder_name, **inputs, **TINY_ENCODER.get(encoder_name, {}))


def tower_modality(method_name: str, role: str) -> str:
    spec = METHODS[method_name]
    return spec.tower_modalities.get(role, spec.modality)


def default_towers(method_name: str) -> dict[str, str]:
    """role -> the encoder name the method uses without a config."""
    spec = METHODS[method_name]
    return {"encoder": spec.encoder} if spec.towers is None else dict(spec.towers)


def build_towers(method_name: str, encoders: dict[str, str]) -> dict:
    """role -> a tiny encoder, built in the method's role order."""
    return {role: build_for(encoders[role], method_name) for role in METHODS[method_name].roles}


def fit_if_needed(method, method_name: str) -> None:
    """Methods with data-fitted targets (BEiT's tokens, colourisation's bins) get them as pretrain gives them."""
    if getattr(method, "fits_targets", False):
        data = MODALITIES[METHODS[method_name].modality].contract_fit_data()
        assert data is not None, "a method that fits targets needs its modality's contract_fit_data"
        method.fit_targets(data, torch.Generator().manual_seed(3))


def _accepts(method_name: str, role: str, encoder_name: str) -> bool:
    """The encoder reads the role's modality (and is causal / a ViT where the method requires it)."""
    method, encoder = METHODS[method_name], ENCODERS[encoder_name]
    if encoder.modality != tower_modality(method_name, role):
        return False
    if method.causal is not None and encoder_config(encoder_name).causal != method.causal:
        return False
    return not (method.vit_only and encoder.module_type.__name__ != "ViT")


def _cases() -> list[tuple[str, dict[str, str]]]:
    """Every method with every encoder it accepts in each of its roles (the other roles at their defaults)."""
    cases = []
    for method_name, method in sorted(METHODS.items()):
        for role in method.roles:
            for encoder_name in sorted(ENCODERS):
                if _accepts(method_name, role, encoder_name):
                    cases.append((method_name, {**default_towers(method_name), role: encoder_name}))
    return cases


def _pairs() -> list[tuple[str, str]]:
    """(method, encoder) of every case (the encoder that varies; a single-tower method's encoder)."""
    return [(m, "+".join(f"{r}={e}" if len(towers) > 1 else e for r, e in towers.items())) for m, towers in _cases()]


def test_every_method_and_encoder_is_covered():
    covered_methods = {m for m, _ in _cases()}
    covered_encoders = {e for _, towers in _cases() for e in towers.values()}
    assert covered_methods == set(METHODS) and covered_encoders == set(ENCODERS)
    # every default tower is one its role accepts (so the sweep of the other roles runs on real defaults)
    for method_name in METHODS:
        for role, encoder_name in default_towers(method_name).items():
            assert _accepts(method_name, role, encoder_name), (method_name, role, encoder_name)


@pytest.mark.parametrize(("method_name", "encoders"), [pytest.param(m, t, id=f"{m}-{p}")
                                                     for (m, t), (_, p) in zip(_cases(), _pairs())])
def test_method_contract(method_name, encoders):
    torch.manual_seed(0)
    towers = build_towers(method_name, encoders)
    method = build_method({"name": method_name}, **towers)
    for role, tower in towers.items():
        assert getattr(method, role) is tower, f"the exported tower {role!r} must be `method.{role}`"
    fit_if_needed(method, method_name)
    batch = make_batch(method_name)
    out = method(batch, 0.0)
    assert set(out) >= {"loss"}
    assert out["loss"].ndim == 0 and torch.isfinite(out["loss"])
    for key, value in out.items():
        assert isinstance(value, torch.Tensor) and value.ndim == 0, key
    out["loss"].backward()
    # Every parameter of every tower is reached (zero-initialised residual gammas legitimately give
    # some zero gradients).
    for role, tower in towers.items():
        without_grad = [n for n, p in tower.named_parameters() if p.requires_grad and p.grad is None]
        assert not without_grad, f"{role} parameters without gradient: {without_grad[:5]}"
        assert sum(p.grad.abs().sum() for p in tower.parameters() if p.grad is not None) > 0, role
    if hasattr(method, "after_optimizer_step"):
        method.after_optimizer_step(0.5)
    # Same weights and batch -> same loss (no hidden global randomness outside the batch).
    assert torch.equal(method(make_batch(method_name), 0.0)["loss"], method(make_batch(method_name), 0.0)["loss"])


@pytest.mark.parametrize("method_name", sorted(METHODS))
def test_method_runs_under_bf16_autocast(method_name):
    torch.manual_seed(0)
    method = build_method({"name": method_name}, **build_towers(method_name, default_towers(method_name)))
    fit_if_needed(method, method_name)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = method(make_batch(method_name), 0.0)["loss"]
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
