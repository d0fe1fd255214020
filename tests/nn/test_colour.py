"""Batched colour operations: parity of each with a naive per-image implementation of its formula
(torchvision's definitions, colorsys for HSV), and bit-exact selection by float masks."""

from __future__ import annotations

import colorsys

import torch

from selfsup.nn import colour


def rand_float(B: int = 5, C: int = 3, H: int = 12, W: int = 12, seed: int = 2) -> torch.Tensor:
    return torch.rand(B, C, H, W, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------------------
# colour operations against torchvision's formulas, one image at a time


def naive_grey(img: torch.Tensor) -> torch.Tensor:
    return 0.299 * img[0] + 0.587 * img[1] + 0.114 * img[2] if img.shape[0] == 3 else img[0]


def test_brightness_contrast_saturation_match_naive_per_image_formulas():
    x = rand_float(B=6)
    factor = torch.tensor([0.0, 0.6, 1.0, 1.4, 2.5, 0.9])
    for n in range(6):
        img, f = x[n], factor[n].item()
        torch.testing.assert_close(colour.adjust_brightness(x, factor)[n], (f * img).clamp(0, 1), atol=1e-6, rtol=0)
        mean = naive_grey(img).mean()
        torch.testing.assert_close(colour.adjust_contrast(x, factor)[n], (f * img + (1 - f) * mean).clamp(0, 1), atol=1e-5, rtol=0)
        grey = naive_grey(img)
        torch.testing.assert_close(colour.adjust_saturation(x, factor)[n], (f * img + (1 - f) * grey).clamp(0, 1), atol=1e-5, rtol=0)
    # Grey images: contrast uses the image itself as the grey, saturation does nothing.
    g = rand_float(B=2, C=1)
    f = torch.tensor([0.5, 1.5])
    torch.testing.assert_close(colour.adjust_contrast(g, f)[1], (1.5 * g[1] - 0.5 * g[1].mean()).clamp(0, 1), atol=1e-6, rtol=0)
    assert torch.equal(colour.adjust_saturation(g, f), g)


def test_factor_one_is_bit_exact_identity_for_brightness_contrast_saturation():
    x = rand_float()
    one = torch.ones(x.shape[0])
    for op in (colour.adjust_brightness, colour.adjust_contrast, colour.adjust_saturation):
        assert torch.equal(op(x, one), x), op.__name__


def test_hsv_round_trip_matches_colorsys():
    x = rand_float(B=3, H=8, W=8)
    # Ties (two or three equal channels), black and white exercise every branch of the hue formula.
    specials = [(0.5, 0.5, 0.5), (0.7, 0.7, 0.2), (0.1, 0.7, 0.7), (0.6, 0.2, 0.6), (0, 0, 0), (1, 1, 1), (1, 0, 0),
                (0.2, 0.3, 0.9), (0.9, 0.1, 0.2)]
    for k, rgb in enumerate(specials):
        x[0, :, k // 8, k % 8] = torch.tensor(rgb, dtype=torch.float32)
    hsv = colour.rgb_to_hsv(x)
    pixels = x.permute(0, 2, 3, 1).reshape(-1, 3).double()
    expected = torch.tensor([colorsys.rgb_to_hsv(*p) for p in pixels.tolist()], dtype=torch.float64)
    got = hsv.permute(0, 2, 3, 1).reshape(-1, 3).double()
    hue_gap = (got[:, 0] - expected[:, 0]).abs()
    assert torch.minimum(hue_gap, 1 - hue_gap).max() < 1e-5  # hue is circular: 0.999999 ~ 0
    torch.testing.assert_close(got[:, 1:], expected[:, 1:], atol=1e-5, rtol=0)
    assert (hsv[:, 0] >= 0).all() and (hsv[:, 0] < 1).all()
    torch.testing.assert_close(colour.hsv_to_rgb(hsv), x, atol=1e-5, rtol=0)
    # hsv_to_rgb against colorsys from random HSV too.
    hsv_rand = rand_float(B=1, H=6, W=6, seed=9)
    back = colour.hsv_to_rgb(hsv_rand).permute(0, 2, 3, 1).reshape(-1, 3).double()
    expected_rgb = torch.tensor([colorsys.hsv_to_rgb(*p) for p in hsv_rand.permute(0, 2, 3, 1).reshape(-1, 3).tolist()],
                                dtype=torch.float64)
    torch.testing.assert_close(back, expected_rgb, atol=1e-5, rtol=0)


def test_hue_shift_zero_and_full_turn_are_identity_and_half_turn_matches_colorsys():
    x = rand_float()
    B = x.shape[0]
    torch.testing.assert_close(colour.adjust_hue(x, torch.zeros(B)), x, atol=1e-5, rtol=0)
    torch.testing.assert_close(colour.adjust_hue(x, torch.ones(B)), x, atol=1e-5, rtol=0)
    torch.testing.assert_close(colour.adjust_hue(x, -torch.ones(B)), x, atol=1e-5, rtol=0)
    shift = torch.tensor([-0.5, -0.3, 0.0, 0.1, 0.45])  # not symmetric: a sign error must show
    out = colour.adjust_hue(x, shift)
    for n in range(B):
        pixels = x[n].permute(1, 2, 0).reshape(-1, 3).tolist()
        expected = []
        for rgb in pixels:
            h, s, v = colorsys.rgb_to_hsv(*rgb)
            expected.append(colorsys.hsv_to_rgb((h + shift[n].item()) % 1.0, s, v))
        got = out[n].permute(1, 2, 0).reshape(-1, 3)
        torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float32), atol=1e-5, rtol=0)
    grey = rand_float(C=1)
    assert torch.equal(colour.adjust_hue(grey, shift), grey)


# ----------------------------------------------------------------------------------------------
# selection by float masks


def test_choose_is_bit_exact_selection():
    new, old = rand_float(seed=3) * 7 - 3, rand_float(seed=4) * 5 + 1
    take = (rand_float(seed=5) > 0.5).float()
    assert torch.equal(colour._choose(take, new, old), torch.where(take.bool(), new, old))
    per_sample = torch.tensor([1.0, 0.0, 1.0, 0.0, 0.0]).view(-1, 1, 1, 1)
    assert torch.equal(colour._choose(per_sample, new, old), torch.where(per_sample.bool(), new, old))
