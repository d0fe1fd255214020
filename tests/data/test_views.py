"""Batched SimCLR views: parity of every operation with a naive per-image implementation of its
formula (torchvision's definitions), reproducibility from the explicit generator, and validation."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from selfsup.data import views as V
from selfsup.nn import colour
from selfsup.data.views import ImageViews, ViewsConfig, normalise, validate_views_config
from selfsup.errors import SelfsupError

MEAN3, STD3 = (0.5, 0.4, 0.3), (0.25, 0.2, 0.3)

# Every random operation off: what is left is a plain resize, so each test can turn on one part.
PLAIN = dict(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip_p=0.0, jitter_p=0.0, grayscale_p=0.0,
             blur_p=0.0, solarize_p=0.0)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def rand_images(B: int = 6, C: int = 3, H: int = 16, W: int = 16, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 256, (B, C, H, W), generator=gen(seed), dtype=torch.uint8)


def rand_float(B: int = 5, C: int = 3, H: int = 12, W: int = 12, seed: int = 2) -> torch.Tensor:
    return torch.rand(B, C, H, W, generator=gen(seed))


def views_for(size: int = 16, channels: int = 3, **fields) -> ImageViews:
    mean, std = (MEAN3, STD3) if channels == 3 else ((0.5,), (0.25,))
    return ImageViews(ViewsConfig(**fields), size, mean, std)


# ----------------------------------------------------------------------------------------------
# the whole pipeline


def test_same_generator_state_gives_identical_views_and_a_different_state_different_ones():
    views = views_for(12, blur_p=0.5, solarize_p=0.3)
    images = rand_images()
    first = views(images, gen(7))
    again = views(images, gen(7))
    other = views(images, gen(8))
    assert len(first) == 2
    for a, b, c in zip(first, again, other):
        assert torch.equal(a, b)
        assert not torch.equal(a, c)
    # The two views of one call are drawn independently.
    assert not torch.equal(first[0], first[1])


def test_global_rng_is_never_touched():
    views = views_for(12, blur_p=0.5, solarize_p=0.3)
    state = torch.get_rng_state()
    views(rand_images(), gen(0))
    assert torch.equal(state, torch.get_rng_state())


def test_call_shapes_dtypes_and_normalisation_range():
    views = views_for(10, num_views=3)
    images = rand_images(B=4, H=20, W=14)  # non-square input, resized to 10 x 10
    out = views(images, gen(0))
    assert len(out) == 3
    mean = torch.tensor(MEAN3).view(1, 3, 1, 1)
    std = torch.tensor(STD3).view(1, 3, 1, 1)
    for view in out:
        assert view.shape == (4, 3, 10, 10) and view.dtype == torch.float32
        pixels = view * std + mean  # undo the normalisation: back in [0, 1]
        assert pixels.min() >= -1e-6 and pixels.max() <= 1 + 1e-6


def test_one_view_stays_in_unit_range_with_every_operation_on():
    views = views_for(12, blur_p=1.0, solarize_p=0.5, jitter_p=1.0, brightness=0.9, contrast=0.9, saturation=0.9, hue=0.5)
    out = views.one_view(rand_float(B=8), gen(3))
    assert out.shape == (8, 3, 12, 12)
    assert out.min() >= 0.0 and out.max() <= 1.0


def test_parameters_differ_across_the_batch():
    # Eight copies of one image: any difference between the outputs comes from per-sample draws.
    image = rand_images(B=1, H=16, W=16)
    batch = image.expand(8, -1, -1, -1).contiguous()
    for fields in (dict(crop_scale=(0.2, 1.0), crop_ratio=(0.75, 1.33), flip_p=0.0, jitter_p=0.0, grayscale_p=0.0),
                   dict(PLAIN, jitter_p=1.0)):
        view = views_for(16, num_views=1, **fields)(batch, gen(0))[0]
        distinct = {tuple(v.flatten().tolist()) for v in view}
        assert len(distinct) == 8, fields


def test_plain_crop_is_a_bilinear_resize():
    x = rand_float(H=10, W=10)
    for size in (10, 16, 7):
        out = views_for(size, **PLAIN).one_view(x, gen(0))
        expected = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)


def test_flip_p_one_is_torch_flip():
    x = rand_float(H=9, W=9)
    out = views_for(9, **dict(PLAIN, flip_p=1.0)).one_view(x, gen(0))
    torch.testing.assert_close(out, torch.flip(x, dims=[-1]), atol=1e-5, rtol=0)


def test_greyscale_p_one_is_the_itu_601_formula_on_every_channel():
    x = rand_float()
    out = views_for(12, **dict(PLAIN, grayscale_p=1.0)).one_view(x, gen(0))
    grey = 0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]
    for c in range(3):
        torch.testing.assert_close(out[:, c], grey, atol=1e-5, rtol=0)


def test_skipped_samples_are_bit_identical_and_about_one_minus_p_are_skipped():
    # Crop and flip are drawn before any colour op, so the same generator state gives the same crops.
    x = rand_float(B=200, H=8, W=8)
    base = dict(crop_scale=(0.3, 1.0), flip_p=0.5, jitter_p=0.0, grayscale_p=0.0)
    plain = views_for(8, **base).one_view(x, gen(4))
    for field in ("jitter_p", "grayscale_p", "blur_p", "solarize_p"):
        out = views_for(8, **dict(base, **{field: 0.7}, solarize_threshold=0.0)).one_view(x, gen(4))
        unchanged = torch.tensor([torch.equal(a, b) for a, b in zip(out, plain)])
        assert 0.15 < unchanged.float().mean() < 0.45, field  # 1 - p = 0.3, on 200 samples


def test_single_channel_images_work_and_skip_colour_ops():
    images = rand_images(B=5, C=1)
    cfg = dict(jitter_p=1.0, brightness=0.0, contrast=0.0, saturation=0.9, hue=0.5, grayscale_p=1.0)
    views = views_for(16, channels=1, **dict(PLAIN, **cfg))
    out = views(images, gen(0))
    assert [tuple(v.shape) for v in out] == [(5, 1, 16, 16)] * 2
    # Saturation, hue and greyscale have no effect on grey images: only normalisation remains.
    torch.testing.assert_close(out[0], (images.float() / 255 - 0.5) / 0.25, atol=1e-5, rtol=0)
    # The full default pipeline (brightness and contrast do apply) runs too.
    out = views_for(12, channels=1, blur_p=0.5, solarize_p=0.5)(images, gen(0))
    assert out[0].shape == (5, 1, 12, 12)


def test_channels_must_match_mean_and_std():
    with pytest.raises(SelfsupError, match="channels"):
        views_for(16)(rand_images(C=1), gen(0))
    with pytest.raises(SelfsupError, match="uint8"):
        views_for(16)(rand_float(), gen(0))


# ----------------------------------------------------------------------------------------------
# crop boxes and resampling


def test_crop_boxes_fit_and_respect_scale_and_ratio():
    H, W = 40, 30
    boxes = V.sample_crop_boxes(500, H, W, (0.2, 0.6), (0.5, 1.5), gen(0))
    top, left, h, w = boxes.unbind(1)
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= H).all() and (left + w <= W).all()
    assert (top == top.round()).all() and (h >= 1).all()
    # Rounding the sides to whole pixels moves area and ratio slightly off their ranges.
    area = h * w / (H * W)
    assert area.min() > 0.2 * 0.85 and area.max() < 0.6 * 1.15
    ratio = w / h
    assert ratio.min() > 0.5 * 0.85 and ratio.max() < 1.5 * 1.15
    assert len({tuple(b) for b in boxes.tolist()}) > 100  # boxes vary per sample


def test_crop_box_fallback_is_the_centre_crop_clamped_to_the_ratio():
    # A 2:1 box of the whole area never fits a square image: every sample falls back.
    boxes = V.sample_crop_boxes(4, 20, 20, (1.0, 1.0), (2.0, 2.0), gen(0))
    assert boxes.tolist() == [[5.0, 0.0, 10.0, 20.0]] * 4  # width 20, height round(20 / 2), centred


def naive_crop_sampler(num: int, H: int, W: int, scale, ratio, generator: torch.Generator) -> torch.Tensor:
    """torchvision's RandomResizedCrop.get_params, one sample at a time (its own draws)."""
    boxes = []
    for _ in range(num):
        for _ in range(10):
            target = H * W * (scale[0] + (scale[1] - scale[0]) * torch.rand((), generator=generator).item())
            log_r = math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * torch.rand((), generator=generator).item()
            w = int(round(math.sqrt(target * math.exp(log_r))))
            h = int(round(math.sqrt(target / math.exp(log_r))))
            if 0 < w <= W and 0 < h <= H:
                i = int(torch.randint(0, H - h + 1, (), generator=generator))
                j = int(torch.randint(0, W - w + 1, (), generator=generator))
                boxes.append((i, j, h, w))
                break
        else:
            boxes.append((0, 0, H, W))  # the test's ratio range holds the image's ratio: the whole image
    return torch.tensor(boxes, dtype=torch.float64)


def test_crop_box_distribution_matches_torchvisions_rejection_sampler():
    # Wide scale and ratio ranges on a non-square image make many tries fail, so this checks that the
    # vectorised "first fitting try" reproduces the sequential sampler's distribution, not just its range.
    num, H, W, scale, ratio = 4000, 24, 40, (0.3, 1.0), (0.25, 4.0)
    ours = V.sample_crop_boxes(num, H, W, scale, ratio, gen(0))
    naive = naive_crop_sampler(num, H, W, scale, ratio, gen(1))
    for column, name in enumerate(("top", "left", "height", "width")):
        a, b = ours[:, column], naive[:, column]
        stderr = math.sqrt((a.var() + b.var()).item() / num)
        assert abs(a.mean() - b.mean()).item() < 4 * stderr + 1e-9, name


def test_crop_flip_resize_matches_per_image_crop_then_interpolate():
    x = rand_float(B=4, H=14, W=18)
    boxes = torch.tensor([[0, 0, 14, 18], [2, 3, 5, 9], [7, 10, 7, 8], [1, 0, 13, 4]], dtype=torch.float64)
    flip = torch.tensor([0.0, 1.0, 0.0, 1.0])
    out = V.crop_flip_resize(x, boxes, flip, 11)
    for n, (top, left, h, w) in enumerate(boxes.long().tolist()):
        crop = x[n:n + 1, :, top:top + h, left:left + w]
        expected = F.interpolate(crop, size=(11, 11), mode="bilinear", align_corners=False)[0]
        if flip[n]:
            expected = expected.flip(-1)
        torch.testing.assert_close(out[n], expected, atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------------------------
# blur and solarize


def naive_blur(img: torch.Tensor, sigma: float, size: int) -> torch.Tensor:
    """One image, a 2-D Gaussian kernel (outer product), reflect padding, plain conv2d."""
    half = size // 2
    taps = torch.arange(size, dtype=torch.float64) - half
    k1 = torch.exp(-taps**2 / (2 * sigma**2))
    k1 = k1 / k1.sum()
    kernel = (k1[:, None] * k1[None, :]).float()
    C = img.shape[0]
    padded = F.pad(img[None], (half, half, half, half), mode="reflect")
    return F.conv2d(padded, kernel.expand(C, 1, size, size), groups=C)[0]


def test_blur_matches_naive_per_image_conv():
    x = rand_float(B=4, H=13, W=11)
    sigma = torch.tensor([0.1, 0.7, 1.5, 3.0])
    for size in (3, 5):
        out = V.gaussian_blur(x, sigma, size)
        for n in range(4):
            torch.testing.assert_close(out[n], naive_blur(x[n], sigma[n].item(), size), atol=1e-5, rtol=0)


def test_blur_kernel_is_about_ten_percent_of_the_image_and_odd():
    assert V.blur_kernel_size(32) == 3
    assert V.blur_kernel_size(96) == 11
    assert V.blur_kernel_size(224) == 23
    assert V.blur_kernel_size(1) == 1  # reflect padding needs pad < side
    views = views_for(9, **dict(PLAIN, blur_p=1.0, blur_sigma=(1.0, 1.0)))
    x = rand_float(H=9, W=9)
    torch.testing.assert_close(views.one_view(x, gen(0)), torch.stack([naive_blur(img, 1.0, 3) for img in x]), atol=1e-5, rtol=0)


def test_solarize_inverts_at_or_above_the_threshold_exactly():
    x = rand_float()
    x[0, 0, 0, :3] = torch.tensor([0.5, 0.4999, 0.5001])
    assert torch.equal(colour.solarize(x, 0.5), torch.where(x >= 0.5, 1 - x, x))
    out = views_for(12, **dict(PLAIN, solarize_p=1.0, solarize_threshold=0.3)).one_view(x, gen(0))
    torch.testing.assert_close(out, torch.where(x >= 0.3, 1 - x, x), atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------------------------
# the evaluation path


def test_normalise_matches_the_formula_and_resizes():
    images = rand_images(B=3, H=8, W=8)
    out = normalise(images, MEAN3, STD3)
    expected = (images.float() / 255 - torch.tensor(MEAN3).view(1, 3, 1, 1)) / torch.tensor(STD3).view(1, 3, 1, 1)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-6)
    resized = normalise(images, MEAN3, STD3, image_size=12)
    assert resized.shape == (3, 3, 12, 12)
    assert normalise(images, MEAN3, STD3, image_size=4).shape == (3, 3, 4, 4)
    with pytest.raises(SelfsupError, match="one value per channel"):
        normalise(images, (0.5,), (0.25,))


# ----------------------------------------------------------------------------------------------
# configuration


@pytest.mark.parametrize("field, value", [
    ("num_views", 0), ("flip_p", 1.5), ("jitter_p", -0.1), ("grayscale_p", 2.0), ("blur_p", -1.0),
    ("solarize_p", 1.01), ("solarize_threshold", 1.5), ("brightness", -0.1), ("contrast", -1.0),
    ("saturation", -0.5), ("hue", 0.6), ("crop_scale", (0.5, 0.2)), ("crop_scale", (0.0, 1.0)),
    ("crop_scale", (0.5, 1.2)), ("crop_scale", (0.5,)), ("crop_ratio", (0.0, 1.0)), ("crop_ratio", (2.0, 1.0)),
    ("blur_sigma", (0.0, 1.0)), ("blur_sigma", (2.0, 1.0)), ("flip_p", float("nan")),
])
def test_validation_names_the_field(field, value):
    cfg = dataclasses.replace(ViewsConfig(), **{field: value})
    with pytest.raises(SelfsupError, match=f"views.{field}"):
        validate_views_config(cfg)
    with pytest.raises(SelfsupError, match=f"views.{field}"):
        ImageViews(cfg, 16, MEAN3, STD3)


def test_defaults_are_valid_and_yaml_lists_become_tuples():
    validate_views_config(ViewsConfig())
    cfg = ViewsConfig(crop_scale=[0.3, 1.0], blur_sigma=[0.5, 1.0])
    assert cfg.crop_scale == (0.3, 1.0) and cfg.blur_sigma == (0.5, 1.0)
    with pytest.raises(SelfsupError, match="image_size"):
        ImageViews(ViewsConfig(), 0, MEAN3, STD3)
