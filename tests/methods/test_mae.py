"""MAE (He et al. 2021): the ViT's dropping of masked patches, the masked-patch loss against the
paper's formula, the asymmetric encoder/decoder compute, and the preview for the report."""

import math

import pytest
import torch

from selfsup.encoders import build_encoder
from selfsup.encoders.vit import sincos_positions
from selfsup.errors import SelfsupError
from selfsup.methods import build_method
from selfsup.methods.mae import masked_patch_loss
from selfsup.nn.masking import patchify, random_mask, unpatchify

S, P = 16, 4  # 16 px images, 4 px patches: a 4x4 grid of N = 16 patches
N = (S // P) ** 2


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def tiny_vit(positions: str = "learned", depth: int = 2):
    torch.manual_seed(0)
    return build_encoder("vit_tiny", in_channels=3, image_size=S, dim=32, depth=depth, heads=2, positions=positions)


def tiny_mae(norm_pix: bool = True, positions: str = "learned"):
    encoder = tiny_vit(positions)
    return build_method({"name": "mae", "decoder_dim": 16, "decoder_depth": 2, "decoder_heads": 2,
                         "norm_pix_loss": norm_pix}, encoder)


def record_inputs(module: torch.nn.Module) -> list[tuple[int, ...]]:
    """Shapes of what `module` is called with, appended at each call."""
    shapes: list[tuple[int, ...]] = []
    module.register_forward_pre_hook(lambda _m, args: shapes.append(tuple(args[0].shape)))
    return shapes


# -- the ViT with drop_masked --------------------------------------------------------------------


@pytest.mark.parametrize("positions", ["learned", "sincos"])
def test_drop_masked_equals_a_naive_encoder_of_the_visible_patches(positions):
    vit = tiny_vit(positions).eval()
    B = 3
    images = torch.randn(B, 3, S, S, generator=gen(0))
    mask = random_mask(B, N, 0.75, gen(1))
    out = vit(images, mask, drop_masked=True)
    assert out.shape == (B, 1 + N // 4, vit.dim)

    # Naive: embed every patch, add its position, keep the visible ones in row-major order (a loop),
    # prepend [CLS] + its position, run the blocks, norm.
    if positions == "learned":
        pos = vit.pos_embed[0]  # [1 + N, D]
    else:
        pos = torch.cat([torch.zeros(1, vit.dim), sincos_positions(S // P, S // P, vit.dim)])  # [CLS] at position zero
    embedded = vit.patch_embed(images).flatten(2).transpose(1, 2) + pos[1:]  # [B, N, D]
    rows = []
    for b in range(B):
        visible = [embedded[b, n] for n in range(N) if not mask[b, n]]
        rows.append(torch.stack([vit.cls_token[0, 0] + pos[0], *visible]))
    x = torch.stack(rows)
    for block in vit.blocks:
        x = block(x)
    assert torch.allclose(out, vit.norm(x), atol=1e-5)


def test_drop_masked_runs_the_blocks_on_the_visible_patches_only():
    vit = tiny_vit()
    seen = record_inputs(vit.blocks[0])
    vit(torch.randn(4, 3, S, S), random_mask(4, N, 0.75, gen(0)), drop_masked=True)
    vit(torch.randn(4, 3, S, S), random_mask(4, N, 0.75, gen(0)))  # without dropping: every patch, as mask tokens
    assert seen == [(4, 1 + N // 4, vit.dim), (4, 1 + N, vit.dim)]


def test_drop_masked_output_ignores_the_masked_pixels():
    vit = tiny_vit().eval()
    images = torch.randn(2, 3, S, S, generator=gen(0))
    mask = random_mask(2, N, 0.75, gen(1))
    scribbled = unpatchify(torch.where(mask.unsqueeze(-1), torch.randn(2, N, P * P * 3), patchify(images, P)), P, 3, S, S)
    assert not torch.equal(scribbled, images)
    assert torch.allclose(vit(images, mask, drop_masked=True), vit(scribbled, mask, drop_masked=True), atol=1e-6)


def test_drop_masked_needs_equal_counts_per_row():
    vit = tiny_vit()
    mask = torch.zeros(2, N, dtype=torch.bool)
    mask[0, :12] = True
    mask[1, :11] = True
    with pytest.raises(SelfsupError, match="same number of masked patches"):
        vit(torch.randn(2, 3, S, S), mask, drop_masked=True)


def test_sincos_positions_follow_the_formula_and_are_not_parameters():
    table = sincos_positions(3, 5, 16)
    assert table.shape == (15, 16) and torch.equal(table, sincos_positions(3, 5, 16))
    # MAE's 2-D table: a quarter of the channels each for sin(row w_i), cos(row w_i), sin(col w_i),
    # cos(col w_i), with w_i = 1 / 10000^(i / (D/4)); patch n = row * width + col.
    for n in range(15):
        row, col = divmod(n, 5)
        for i in range(4):
            w = 1.0 / 10000 ** (i / 4)
            expected = [math.sin(row * w), math.cos(row * w), math.sin(col * w), math.cos(col * w)]
            assert torch.allclose(table[n, i::4], torch.tensor(expected), atol=1e-6), (n, i)
    with pytest.raises(SelfsupError, match="divisible by 4"):
        sincos_positions(2, 2, 18)

    learned, fixed = tiny_vit("learned"), tiny_vit("sincos")
    assert fixed.pos_embed is None
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(learned) - count(fixed) == (1 + N) * 32
    assert set(learned.state_dict()) - set(fixed.state_dict()) == {"pos_embed"}
    assert not any("pos" in key for key in fixed.state_dict())


# -- the loss ------------------------------------------------------------------------------------


def naive_masked_patch_loss(pred, target, mask, norm_pix):
    """The paper's loss written out: for each masked patch, the mean over its pixels of the squared
    error (against the patch normalised by its own mean and unbiased std when norm_pix, as the
    reference code's `target.var()`), averaged over the masked patches."""
    total, count = 0.0, 0
    B, num, num_pixels = target.shape
    for b in range(B):
        for n in range(num):
            if not mask[b, n]:
                continue
            t = target[b, n].double()
            if norm_pix:
                mean = t.sum() / num_pixels
                var = ((t - mean) ** 2).sum() / (num_pixels - 1)
                t = (t - mean) / math.sqrt(var + 1e-6)
            total += float(((pred[b, n].double() - t) ** 2).sum() / num_pixels)
            count += 1
    return total / count


@pytest.mark.parametrize("norm_pix", [False, True])
def test_masked_patch_loss_matches_the_naive_formula(norm_pix):
    pred = torch.randn(3, N, 48, generator=gen(0))
    target = torch.randn(3, N, 48, generator=gen(1)) * 2 + 0.5
    mask = random_mask(3, N, 0.75, gen(2))
    loss = masked_patch_loss(pred, target, mask, norm_pix)
    assert loss.ndim == 0
    assert abs(float(loss) - naive_masked_patch_loss(pred, target, mask, norm_pix)) < 1e-5


@pytest.mark.parametrize("norm_pix", [False, True])
def test_visible_patches_do_not_count(norm_pix):
    pred = torch.randn(2, N, 48, generator=gen(0))
    target = torch.randn(2, N, 48, generator=gen(1))
    mask = random_mask(2, N, 0.75, gen(2))
    visible = ~mask.unsqueeze(-1)
    other_pred = torch.where(visible, torch.randn(2, N, 48), pred)
    other_target = torch.where(visible, torch.randn(2, N, 48), target)
    base = masked_patch_loss(pred, target, mask, norm_pix)
    assert torch.equal(base, masked_patch_loss(other_pred, other_target, mask, norm_pix))
    # ... while a masked patch does.
    changed = target.clone()
    b, n = torch.nonzero(mask)[0].tolist()
    changed[b, n] += torch.linspace(-1, 1, 48)  # not a constant shift: norm_pix would cancel that
    assert not torch.equal(base, masked_patch_loss(pred, changed, mask, norm_pix))


# -- the model -----------------------------------------------------------------------------------


def make_batch(B: int = 4, seed: int = 1) -> dict:
    return {"views": [torch.randn(B, 3, S, S, generator=gen(0))], "generator": gen(seed),
            "pixel_mean": torch.full((3,), 0.5), "pixel_std": torch.full((3,), 0.25)}


def test_encoder_sees_a_quarter_and_decoder_every_patch():
    mae = tiny_mae()
    encoder_in, decoder_in = record_inputs(mae.encoder.blocks[0]), record_inputs(mae.decoder_blocks[0])
    mae(make_batch(), 0.0)
    assert encoder_in == [(4, 1 + N // 4, 32)]
    assert decoder_in == [(4, 1 + N, 16)]


@pytest.mark.parametrize("norm_pix", [False, True])
def test_forward_loss_is_the_masked_loss_of_the_reconstruction(norm_pix):
    mae = tiny_mae(norm_pix).eval()
    batch = make_batch()
    images = batch["views"][0]
    mask = random_mask(4, N, 0.75, gen(1))  # what forward draws from the same generator
    pred = mae.reconstruct(images, mask)
    expected = naive_masked_patch_loss(pred.detach(), patchify(images, P), mask, norm_pix)
    with torch.no_grad():
        loss = float(mae(batch, 0.0)["loss"])
    assert abs(loss - expected) < 1e-5


def test_decoder_gets_visible_tokens_back_at_their_places():
    """A naive decoder: encoded visible tokens put back at their patch positions by a loop, the
    shared mask token at the masked ones, sine-cosine positions, blocks, norm, pixel head."""
    mae = tiny_mae().eval()
    images = torch.randn(2, 3, S, S, generator=gen(0))
    mask = random_mask(2, N, 0.75, gen(1))
    latent = mae.decoder_embed(mae.encoder(images, mask, drop_masked=True))  # [B, 1 + N/4, d]
    pos = sincos_positions(S // P, S // P, 16)
    rows = []
    for b in range(2):
        visible = iter(latent[b, 1:])
        tokens = [next(visible) if not mask[b, n] else mae.mask_token[0, 0] for n in range(N)]
        rows.append(torch.cat([latent[b, :1], torch.stack(tokens) + pos]))
    x = torch.stack(rows)
    for block in mae.decoder_blocks:
        x = block(x)
    naive = mae.decoder_pred(mae.decoder_norm(x))[:, 1:]
    assert torch.allclose(mae.reconstruct(images, mask), naive, atol=1e-5)


def test_reconstruction_ignores_the_masked_pixels():
    """The whole model (encoder and decoder) cannot see what it must predict."""
    mae = tiny_mae().eval()
    images = torch.randn(2, 3, S, S, generator=gen(0))
    mask = random_mask(2, N, 0.75, gen(1))
    scribbled = unpatchify(torch.where(mask.unsqueeze(-1), torch.randn(2, N, 48), patchify(images, P)), P, 3, S, S)
    assert torch.allclose(mae.reconstruct(images, mask), mae.reconstruct(scribbled, mask), atol=1e-6)


def test_gradients_reach_encoder_and_decoder():
    mae = tiny_mae()
    mae(make_batch(), 0.0)["loss"].backward()
    params = dict(mae.named_parameters())
    for name in ("encoder.patch_embed.weight", "encoder.cls_token", "encoder.blocks.0.mlp.0.weight", "decoder_embed.weight",
                 "mask_token", "decoder_blocks.1.mlp.2.weight", "decoder_pred.weight"):
        assert params[name].grad is not None and params[name].grad.abs().sum() > 0, name


def test_a_non_vit_encoder_is_refused():
    resnet = build_encoder("resnet10", in_channels=3, image_size=S, width=8)
    with pytest.raises(SelfsupError, match="ViT"):
        build_method({"name": "mae"}, resnet)


@pytest.mark.parametrize("norm_pix", [False, True])
def test_preview_shows_the_masked_input_and_pastes_the_visible_patches_back(norm_pix):
    mae = tiny_mae(norm_pix).eval()
    rgb = torch.rand(3, 3, S, S, generator=gen(0))
    mean, std = torch.tensor([0.4, 0.5, 0.6]), torch.tensor([0.2, 0.25, 0.3])
    rows = mae.preview(rgb, mean, std, gen(5))
    assert [title for title, _ in rows] == ["masked input", "reconstruction"]
    for _, images in rows:
        assert images.shape == rgb.shape and images.min() >= 0 and images.max() <= 1
    mask = random_mask(3, N, 0.75, gen(5)).unsqueeze(-1)  # the preview's mask, from the same seed
    seen, rebuilt = (patchify(images, P) for _, images in rows)
    original = patchify(rgb, P)
    # Visible patches: the original, in both rows. Masked patches: blank (the mean colour) in the input row.
    assert torch.allclose(torch.where(mask, 0.0, seen), torch.where(mask, 0.0, original), atol=1e-5)
    assert torch.allclose(torch.where(mask, 0.0, rebuilt), torch.where(mask, 0.0, original), atol=1e-5)
    blank = patchify(mean.view(1, 3, 1, 1).expand(3, 3, S, S), P)
    assert torch.allclose(torch.where(mask, seen, blank), blank, atol=1e-6)
