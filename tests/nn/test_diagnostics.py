"""The collapse detector fires on a collapsed encoder and stays quiet on a healthy one."""

import torch
from torch import nn

from selfsup.data.builtins import load_builtin
from selfsup.data.views import normalise
from selfsup.encoders import build_encoder
from selfsup.nn.diagnostics import collapse_warning, embedding_diagnostics


def _row(z: torch.Tensor) -> dict[str, float]:
    return {k: float(v) for k, v in embedding_diagnostics(z).items()}


def test_constant_encoder_is_flagged():
    z = torch.ones(64, 32) * torch.randn(32)  # every image mapped to one point
    row = _row(z)
    assert row["embed_std"] < 1e-3 and row["embed_erank"] == 1.0
    assert "collapsing" in collapse_warning(row)


def test_dimensional_collapse_is_flagged():
    e1, e2 = torch.eye(32)[0], torch.eye(32)[1]
    z = torch.randn(64, 1) * e1 + 5 * e2  # the normalised embeddings vary along one direction only
    row = _row(z)
    assert row["embed_erank"] < 1.5 and collapse_warning(row) is not None


def test_healthy_encoder_on_real_images_is_quiet():
    data = load_builtin("digits", 16, 3)
    images = normalise(data.images[:128], [0.5] * 3, [0.25] * 3)
    torch.manual_seed(0)
    encoder = build_encoder("resnet10", in_channels=3, image_size=16, width=8).eval()
    with torch.no_grad():
        row = _row(encoder.embed(images))
    assert row["embed_erank"] > 2 and collapse_warning(row) is None
    assert collapse_warning(_row(torch.randn(128, 64))) is None


def test_effective_rank_of_isotropic_data_is_near_full():
    erank = _row(torch.randn(4096, 8))["embed_erank"]
    assert 7.5 < erank <= 8.0


def test_uniform_dino_teacher_is_flagged():
    assert "uniform" in collapse_warning({"embed_std": 0.5, "embed_erank": 20.0, "teacher_entropy": 0.995})
    assert collapse_warning({"embed_std": 0.5, "embed_erank": 20.0, "teacher_entropy": 0.8}) is None
