"""Encoder contract swept over every registered encoder, plus ResNet/ViT invariants and parity.

Every test builds tiny variants (width 8, dim 32, depth 2) at 16 px so the file runs in seconds.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from selfsup.encoders import ENCODERS, build_encoder, describe_encoder, encoder_config
from selfsup.encoders.resnet import BasicBlock, ResNet, ResNetConfig
from selfsup.encoders.vit import ViT, ViTConfig, attend
from selfsup.errors import SelfsupError

IMAGE_SIZE = 16
# Small overrides per config type (not per name), so a new preset of an existing family is swept
# automatically, and a new family fails loudly here until it gets its own tiny overrides.
TINY: dict[type, dict] = {
    ResNetConfig: {"width": 8},
    ViTConfig: {"dim": 32, "depth": 2, "heads": 2},
}
NAMES = sorted(n for n, spec in ENCODERS.items() if spec.modality == "image")  # text: test_text_encoders.py


def tiny(name: str, in_channels: int = 3, seed: int = 0, **extra) -> nn.Module:
    torch.manual_seed(seed)
    overrides = {**TINY[ENCODERS[name].config_type], **extra}
    return build_encoder(name, in_channels=in_channels, image_size=IMAGE_SIZE, **overrides)


def images(batch: int = 4, channels: int = 3, size: int = IMAGE_SIZE, seed: int = 1) -> Tensor:
    return torch.randn(batch, channels, size, size, generator=torch.Generator().manual_seed(seed))


def expected_num_tokens(encoder: nn.Module, size: int) -> int:
    """Tokens the contract promises: the final grid of a ResNet, [CLS] + patches of a ViT."""
    if isinstance(encoder, ResNet):
        stride = 2 ** (len(encoder.cfg.layers) - 1) * (1 if encoder.cfg.small_input else 4)
        return (size // stride) ** 2
    if isinstance(encoder, ViT):
        return 1 + (size // encoder.cfg.patch_size) ** 2
    raise AssertionError(f"no token-count rule for {type(encoder).__name__}; add one here")


def random_batchnorm(encoder: nn.Module, seed: int = 2) -> None:
    """Non-zero BN gammas and non-trivial running stats, so BN-related checks are not vacuous.

    The zero-init of each block's last gamma would otherwise cut the gradient to that block's
    second convolution at step 0 (by design, see test_resnet_blocks_start_as_identity).
    """
    gen = torch.Generator().manual_seed(seed)
    for module in encoder.modules():
        if isinstance(module, nn.BatchNorm2d):
            with torch.no_grad():
                module.weight.copy_(torch.rand(module.weight.shape, generator=gen) + 0.5)
                module.bias.copy_(torch.randn(module.bias.shape, generator=gen) * 0.1)
                module.running_mean.copy_(torch.randn(module.running_mean.shape, generator=gen) * 0.1)
                module.running_var.copy_(torch.rand(module.running_var.shape, generator=gen) + 0.5)


def some_mask(encoder: nn.Module, batch: int, seed: int = 3) -> Tensor | None:
    if not isinstance(encoder, ViT):
        return None
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(batch, encoder.num_patches, generator=gen) < 0.5


# ---------------------------------------------------------------- contract, every registered encoder


def test_every_encoder_family_has_tiny_overrides() -> None:
    missing = {ENCODERS[n].config_type.__name__ for n in NAMES} - {t.__name__ for t in TINY}
    assert not missing, f"add tiny overrides for {missing} to TINY"


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("in_channels", [1, 3])
def test_forward_and_embed_shapes(name: str, in_channels: int) -> None:
    encoder = tiny(name, in_channels=in_channels)
    x = images(batch=3, channels=in_channels)
    tokens, pooled = encoder(x), encoder.embed(x)
    assert isinstance(encoder.dim, int)
    assert tokens.shape == (3, expected_num_tokens(encoder, IMAGE_SIZE), encoder.dim)
    assert pooled.shape == (3, encoder.dim)
    assert torch.isfinite(tokens).all() and torch.isfinite(pooled).all()


@pytest.mark.parametrize("name", NAMES)
def test_gradients_reach_every_parameter(name: str) -> None:
    encoder = tiny(name)
    random_batchnorm(encoder)
    x = images()
    gen = torch.Generator().manual_seed(4)
    tokens = encoder(x, mask=some_mask(encoder, len(x)))  # a mask, so the ViT's mask token is used
    pooled = encoder.embed(x)
    # Random weights, not .sum(): a LayerNorm output sums to a constant and would pass no gradient.
    loss = (tokens * torch.randn(tokens.shape, generator=gen)).sum() + (pooled * torch.randn(pooled.shape, generator=gen)).sum()
    loss.backward()
    dead = [n for n, p in encoder.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not dead, f"no gradient reaches {dead}"


@pytest.mark.parametrize("name", NAMES)
def test_every_parameter_is_in_the_graph_without_a_mask(name: str) -> None:
    # DDP errors on parameters without a gradient (unless find_unused_parameters=True), so an
    # objective that never masks must still reach e.g. the ViT's mask token, if only with zeros.
    encoder = tiny(name)
    encoder.embed(images()).square().sum().backward()
    assert [n for n, p in encoder.named_parameters() if p.grad is None] == []


@pytest.mark.parametrize("name", NAMES)
def test_bf16_autocast_matches_fp32(name: str) -> None:
    encoder = tiny(name)
    random_batchnorm(encoder)
    encoder.eval()  # fixed BN statistics: the two precisions see the same normalisation
    x = images()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        tokens = encoder(x, mask=some_mask(encoder, len(x)))
        pooled = encoder.embed(x)
    reference = encoder(x, mask=some_mask(encoder, len(x)))
    error = (tokens.float() - reference).norm() / reference.norm()
    assert error < 0.05, f"bf16 autocast deviates from fp32 by {error:.3f} (relative)"
    (tokens.float().square().mean() + pooled.float().square().mean()).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in encoder.parameters())


@pytest.mark.parametrize("name", NAMES)
def test_deterministic_under_seed(name: str) -> None:
    first, second, other = tiny(name, seed=7), tiny(name, seed=7), tiny(name, seed=8)
    for (key, a), b in zip(first.state_dict().items(), second.state_dict().values()):
        assert torch.equal(a, b), key
    assert torch.equal(first(images()), second(images()))
    assert not torch.equal(first(images()), other(images())), "the seed should matter"


@pytest.mark.parametrize("name", NAMES)
def test_eval_embedding_of_a_sample_ignores_the_rest_of_the_batch(name: str) -> None:
    encoder = tiny(name)
    x = images(batch=5)
    encoder.train()
    for _ in range(3):  # realistic BN running statistics
        encoder(images(batch=8, seed=9))
    encoder.eval()
    with torch.no_grad():
        together = encoder.embed(x)
        alone = torch.cat([encoder.embed(x[i : i + 1]) for i in range(len(x))])
        reordered = encoder.embed(x.flip(0)).flip(0)
    torch.testing.assert_close(alone, together, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(reordered, together, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", NAMES)
def test_describe_then_build_rebuilds_the_same_encoder(name: str, tmp_path: Path) -> None:
    overrides = TINY[ENCODERS[name].config_type]
    original = tiny(name)
    description = json.loads(json.dumps(describe_encoder(name, in_channels=3, image_size=IMAGE_SIZE, **overrides)))
    assert description["name"] == name and description["in_channels"] == 3 and description["image_size"] == IMAGE_SIZE
    assert description["config"] == dataclasses.asdict(encoder_config(name, overrides))
    torch.manual_seed(123)  # different init, so equality below comes from the loaded weights
    rebuilt = build_encoder(**description)
    # Through safetensors, as export does: it rejects non-contiguous tensors.
    save_file(original.state_dict(), str(tmp_path / "w.safetensors"))
    rebuilt.load_state_dict(load_file(str(tmp_path / "w.safetensors")))
    original.eval(), rebuilt.eval()
    assert torch.equal(original(images()), rebuilt(images()))
    assert torch.equal(original.embed(images()), rebuilt.embed(images()))


# ---------------------------------------------------------------- registry and config errors


@pytest.mark.parametrize(("typo", "nearest"), [("resnet81", "resnet18"), ("vit_tiney", "vit_tiny"), ("VIT_SMALL", "vit_small")])
def test_unknown_name_names_the_nearest(typo: str, nearest: str) -> None:
    with pytest.raises(SelfsupError, match=f"'{nearest}'"):
        encoder_config(typo)
    with pytest.raises(SelfsupError, match=f"'{nearest}'"):
        build_encoder(typo, in_channels=3, image_size=IMAGE_SIZE)


@pytest.mark.parametrize(("name", "typo", "nearest"), [("resnet18", "widht", "width"), ("vit_tiny", "heeds", "heads"),
                                                       ("vit_small", "patchsize", "patch_size")])
def test_unknown_key_names_the_nearest(name: str, typo: str, nearest: str) -> None:
    with pytest.raises(SelfsupError, match=f"'{typo}'.*'{nearest}'"):
        encoder_config(name, {typo: 8})
    with pytest.raises(SelfsupError, match=f"'{nearest}'"):
        describe_encoder(name, in_channels=3, image_size=IMAGE_SIZE, **{typo: 8})


@pytest.mark.parametrize(("name", "overrides", "key"), [
    ("vit_tiny", {"dim": 30, "heads": 4}, "dim"),
    ("vit_tiny", {"pool": "max"}, "pool"),
    ("resnet18", {"layers": []}, "layers"),
    ("resnet18", {"width": 0}, "width"),
    ("resnet18", {"small_input": "no"}, "small_input"),
])
def test_invalid_values_name_the_key(name: str, overrides: dict, key: str) -> None:
    with pytest.raises(SelfsupError, match=f"'{key}'"):
        encoder_config(name, overrides)


def test_presets_and_overrides() -> None:
    assert encoder_config("resnet18") == ResNetConfig(layers=[2, 2, 2, 2], width=64, small_input=True)
    assert encoder_config("resnet10") == ResNetConfig(layers=[1, 1, 1, 1], width=32, small_input=True)
    assert encoder_config("vit_tiny") == ViTConfig(patch_size=4, dim=192, depth=12, heads=3, mlp_ratio=4.0)
    assert encoder_config("vit_small") == ViTConfig(patch_size=4, dim=384, depth=12, heads=6, mlp_ratio=4.0)
    cfg = encoder_config("resnet18", {"layers": [1, 1]})
    cfg.layers.append(5)  # must not leak into the preset
    assert encoder_config("resnet18").layers == [2, 2, 2, 2]


# ---------------------------------------------------------------- ResNet


def resnet_parameter_count(in_channels: int, width: int, layers: list[int], stem_kernel: int) -> int:
    """Parameters of a BasicBlock ResNet without a classifier, from its definition (He et al. 2015)."""
    def conv_bn(c_in: int, c_out: int, k: int) -> int:
        return c_in * c_out * k * k + 2 * c_out  # bias-free conv + BN gamma/beta

    total = conv_bn(in_channels, width, stem_kernel)
    channels = width
    for stage, num_blocks in enumerate(layers):
        out = width * 2**stage
        for block in range(num_blocks):
            c_in = channels if block == 0 else out
            total += conv_bn(c_in, out, 3) + conv_bn(out, out, 3)
            if c_in != out or (block == 0 and stage > 0):
                total += conv_bn(c_in, out, 1)  # projection shortcut
        channels = out
    return total


def test_resnet18_parameter_count() -> None:
    counts = {}
    for small_input, stem_kernel in ((True, 3), (False, 7)):
        encoder = build_encoder("resnet18", in_channels=3, image_size=32, small_input=small_input)
        counts[small_input] = sum(p.numel() for p in encoder.parameters())
        assert counts[small_input] == resnet_parameter_count(3, 64, [2, 2, 2, 2], stem_kernel)
        assert encoder.dim == 512
    # Cross-check against the published ImageNet ResNet-18 count (11,689,512 including its
    # 512x1000 classifier): the ImageNet-stem backbone must be that minus the classifier.
    assert counts[False] == 11_689_512 - (512 * 1000 + 1000)
    assert abs(counts[True] - 11.17e6) < 0.01e6


def test_resnet_blocks_start_as_identity_with_zero_init_residual() -> None:
    encoder = tiny("resnet18", zero_init_residual=True)
    blocks = [m for m in encoder.modules() if isinstance(m, BasicBlock)]
    identity_blocks = [b for b in blocks if isinstance(b.shortcut, nn.Identity)]
    assert identity_blocks
    for block in identity_blocks:
        x = torch.relu(torch.randn(2, block.conv1.in_channels, 4, 4))  # a ReLU output, as blocks receive
        assert torch.equal(block.train()(x.clone()), x)
        with torch.no_grad():
            block.bn2.weight.fill_(1.0)  # what a trained block looks like: no longer the identity
        assert not torch.equal(block(x.clone()), x)


def test_resnet_tokens_are_the_final_feature_map_row_major() -> None:
    encoder = tiny("resnet18").eval()
    x = images()
    grid = encoder.feature_map(x)  # [B, D, h, w]
    tokens = encoder(x)
    B, D, h, w = grid.shape
    assert torch.equal(tokens[:, 1], grid[:, :, 0, 1])  # second token = row 0, column 1
    assert torch.equal(tokens[:, w], grid[:, :, 1, 0])  # first token of row 1
    torch.testing.assert_close(encoder.embed(x), tokens.mean(dim=1))


def test_resnet_rejects_a_mask_and_ignores_image_size() -> None:
    encoder = tiny("resnet10")
    with pytest.raises(SelfsupError, match="mask"):
        encoder(images(), mask=torch.zeros(4, 4, dtype=torch.bool))
    assert encoder(images(size=24)).shape == (4, 9, encoder.dim)  # any size works


# ---------------------------------------------------------------- ViT


def test_vit_all_false_mask_equals_no_mask() -> None:
    encoder = tiny("vit_tiny").eval()
    x = images()
    assert torch.equal(encoder(x, mask=torch.zeros(4, encoder.num_patches, dtype=torch.bool)), encoder(x))


def test_vit_masked_patch_pixels_are_invisible() -> None:
    encoder = tiny("vit_tiny").eval()
    p = encoder.patch_size
    x = images()
    mask = torch.zeros(4, encoder.num_patches, dtype=torch.bool)
    mask[:, 5] = True  # patch 5 = row 1, column 1 (row-major on a 4x4 grid)
    changed = x.clone()
    changed[:, :, p : 2 * p, p : 2 * p] += 3.0  # rewrite that patch's pixels
    assert torch.equal(encoder(changed, mask=mask), encoder(x, mask=mask))
    assert not torch.allclose(encoder(changed), encoder(x))  # unmasked, the same change shows
    assert not torch.allclose(encoder(x, mask=mask), encoder(x))  # the mask token replaces the patch


def test_vit_masked_patches_keep_their_positions() -> None:
    # BEiT-style: the mask token replaces the patch *before* positions are added, so two masked
    # patches of one image still differ (by position); replacing after would make them identical.
    encoder = tiny("vit_tiny").eval()
    mask = torch.zeros(4, encoder.num_patches, dtype=torch.bool)
    mask[:, [2, 9]] = True
    tokens = encoder(images(), mask=mask)  # [B, 1 + N, D]; patch i is token 1 + i
    assert not torch.allclose(tokens[:, 1 + 2], tokens[:, 1 + 9])


def test_vit_rejects_a_bad_mask() -> None:
    encoder = tiny("vit_tiny")
    with pytest.raises(SelfsupError, match=r"\[4, 16\]"):
        encoder(images(), mask=torch.zeros(4, 15, dtype=torch.bool))
    with pytest.raises(SelfsupError, match="bool"):
        encoder(images(), mask=torch.zeros(4, 16))


def test_vit_image_size_must_be_a_multiple_of_the_patch() -> None:
    with pytest.raises(SelfsupError, match=r"image_size \(30\).*patch_size \(4\)"):
        build_encoder("vit_tiny", in_channels=3, image_size=30)
    encoder = tiny("vit_tiny")
    with pytest.raises(SelfsupError, match="patch_size"):
        encoder(images(size=18))


def test_vit_other_input_size_uses_resized_positions() -> None:
    encoder = tiny("vit_tiny").eval()
    small = images(size=8)
    assert encoder(small).shape == (4, 1 + 4, encoder.dim)
    # Bicubic resizing keeps a constant field constant, so with every position equal the 8 px
    # input must see exactly that position on every token.
    with torch.no_grad():
        encoder.pos_embed.copy_(encoder.pos_embed[:, 3:4].expand_as(encoder.pos_embed))
    torch.testing.assert_close(encoder._positions(2, 2), encoder.pos_embed[:, :5])


def test_vit_mean_pool_averages_patch_tokens() -> None:
    encoder = tiny("vit_tiny", pool="mean").eval()
    x = images()
    torch.testing.assert_close(encoder.embed(x), encoder(x)[:, 1:].mean(dim=1))
    cls_encoder = tiny("vit_tiny").eval()
    assert torch.equal(cls_encoder.embed(x), cls_encoder(x)[:, 0])


def naive_block(block: nn.Module, x: Tensor, num_heads: int) -> Tensor:
    """One pre-norm block written from the paper's equations in float64, with the block's weights."""
    p = {k: v.double() for k, v in block.state_dict().items()}
    x = x.double()

    def layer_norm(t: Tensor, prefix: str) -> Tensor:
        mu = t.mean(-1, keepdim=True)
        var = ((t - mu) ** 2).mean(-1, keepdim=True)
        return (t - mu) / torch.sqrt(var + 1e-6) * p[f"{prefix}.weight"] + p[f"{prefix}.bias"]

    B, N, D = x.shape
    d = D // num_heads
    qkv = layer_norm(x, "norm1") @ p["attn.qkv.weight"].T + p["attn.qkv.bias"]
    heads = []
    for h in range(num_heads):
        q = qkv[..., h * d : (h + 1) * d]
        k = qkv[..., D + h * d : D + (h + 1) * d]
        v = qkv[..., 2 * D + h * d : 2 * D + (h + 1) * d]
        heads.append(torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(d), dim=-1) @ v)
    x = x + torch.cat(heads, dim=-1) @ p["attn.proj.weight"].T + p["attn.proj.bias"]
    hidden = layer_norm(x, "norm2") @ p["mlp.0.weight"].T + p["mlp.0.bias"]
    hidden = 0.5 * hidden * (1 + torch.erf(hidden / math.sqrt(2)))  # exact GELU
    return x + hidden @ p["mlp.2.weight"].T + p["mlp.2.bias"]


def test_vit_block_matches_naive_attention() -> None:
    encoder = tiny("vit_tiny", heads=4)
    block = encoder.blocks[0]
    with torch.no_grad():  # larger weights than the 0.02 init, so attention is far from uniform
        for param in block.parameters():
            param.normal_(0.0, 0.3)
    x = torch.randn(3, 17, encoder.dim, generator=torch.Generator().manual_seed(5))
    reference = naive_block(block, x, num_heads=4)
    torch.testing.assert_close(block(x).double(), reference, atol=1e-4, rtol=1e-4)  # fp32: SDPA


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attend_matches_naive_attention(dtype: torch.dtype) -> None:
    # bf16 on the CPU takes the explicit-matmul path, fp32 takes SDPA: both must be attention.
    gen = torch.Generator().manual_seed(6)
    q, k, v = (torch.randn(2, 3, 17, 8, generator=gen) * 2 for _ in range(3))
    reference = torch.softmax(q.double() @ k.double().transpose(-2, -1) / math.sqrt(8), dim=-1) @ v.double()
    out = attend(q.to(dtype), k.to(dtype), v.to(dtype)).double()
    tolerance = 1e-5 if dtype == torch.float32 else 0.05
    assert (out - reference).abs().max() < tolerance * reference.abs().max()
