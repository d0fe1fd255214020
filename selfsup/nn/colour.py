"""Per-pixel colour operations on float images in [0, 1], batched with one factor per sample.

These are the colour-jitter, greyscale and solarize steps of the SimCLR/BYOL view pipeline
(`selfsup.data.views.ImageViews`), following torchvision's per-image definitions, and the CIE Lab
conversions that colourisation (`methods/colorize.py`) and frozen-feature preparation
(`modalities/image.py`) share. The jitter steps select with float 0/1 masks rather than bool masks,
which are slow on the CPU (see `_indicator`); the view pipeline uses the same `_per_sample` and
`_choose` helpers to apply an operation to some samples only.
"""

from __future__ import annotations

import torch
from torch import Tensor

# ITU-R 601 luma weights, as torchvision's rgb_to_grayscale (contrast/saturation use them too).
_LUMA = (0.299, 0.587, 0.114)


def _per_sample(factor: Tensor) -> Tensor:
    """[B] -> [B, 1, 1, 1], to broadcast a per-sample factor over an image batch."""
    return factor.reshape(-1, 1, 1, 1)


def to_grayscale(x: Tensor) -> Tensor:
    """ITU-R 601 luma of RGB images, [B, 1, H, W]; a 1-channel batch is already grey."""
    if x.shape[1] == 1:
        return x
    r, g, b = x.unbind(1)
    grey = r * _LUMA[0]
    grey.add_(g, alpha=_LUMA[1]).add_(b, alpha=_LUMA[2])
    return grey.unsqueeze(1)


def adjust_brightness(x: Tensor, factor: Tensor) -> Tensor:
    """Scales intensities by a per-sample factor (torchvision: blend with black), clamped to [0, 1]."""
    return (x * _per_sample(factor)).clamp_(0.0, 1.0)


def adjust_contrast(x: Tensor, factor: Tensor) -> Tensor:
    """Blends each image with the mean of its greyscale version (torchvision's definition of contrast)."""
    B, C, H, W = x.shape
    channel_mean = x.mean(dim=(2, 3))  # [B, C]; the grey mean is the luma of the channel means
    if C == 3:
        grey_mean = channel_mean @ channel_mean.new_tensor(_LUMA)  # [B]
    else:
        grey_mean = channel_mean[:, 0]
    factor = _per_sample(factor)
    return torch.addcmul(_per_sample(grey_mean) * (1.0 - factor), x, factor).clamp_(0.0, 1.0)


def adjust_saturation(x: Tensor, factor: Tensor) -> Tensor:
    """Blends each RGB image with its greyscale version; greyscale images have no saturation to change."""
    if x.shape[1] == 1:
        return x
    factor = _per_sample(factor)
    return torch.addcmul(to_grayscale(x) * (1.0 - factor), x, factor).clamp_(0.0, 1.0)


def _indicator(a: Tensor, b: Tensor | float) -> Tensor:
    """Float 1.0 where a >= b, else 0.0.

    Written into a float tensor on purpose: on the CPU, bool masks (and `torch.where` on them) run
    unvectorised, ~10x slower than float arithmetic on 32 px batches.
    """
    return torch.ge(a, b, out=torch.empty_like(a))


def _choose(take: Tensor, new: Tensor, old: Tensor) -> Tensor:
    """`new` where take == 1.0, `old` where take == 0.0, bit-exactly (take broadcasts).

    torch.lerp returns `end - (end - start) * (1 - w)` for w >= 0.5 and `start + w * (end - start)`
    otherwise, so 0/1 weights give exactly one input; it is the float-mask alternative to a bool
    `torch.where` (see `_indicator`).
    """
    return torch.lerp(old, new, take)


def _hue_value_chroma(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Hue in turns [0, 1), value (max channel) and chroma (max - min) of RGB images, each [B, H, W].

    Branch-free: which channel is the largest (ties go to red, then green, as colorsys does) picks
    the 120-degree sector through 0/1 weights instead of argmax/where, which are slow on the CPU.
    Written with in-place ops: at 32 px, allocating fresh tensors costs as much as the arithmetic.
    """
    r, g, b = x.unbind(1)
    value = x.amax(dim=1)
    chroma = x.amin(dim=1).neg_().add_(value)
    red_max = _indicator(r, value)
    green_max = _indicator(g, value)
    green_max.addcmul_(green_max, red_max, value=-1.0)  # green counts only where red is not the max
    blue_max = (1.0 - red_max).sub_(green_max)
    sextant = (g - b).mul_(red_max)
    sextant.addcmul_(b - r, green_max).addcmul_(r - g, blue_max)
    # Where chroma is 0 all channels are equal, so the numerator is 0: divide by 1 to get hue 0.
    sextant.div_(torch.eq(chroma, 0.0, out=torch.empty_like(chroma)).add_(chroma))
    sextant.add_(green_max, alpha=2.0).add_(blue_max, alpha=4.0)  # in [-1, 5)
    hue = sextant.div_(6.0)
    hue.sub_(hue.floor())  # wrap [-1/6, 0) to [5/6, 1); floor is much faster than remainder here
    return hue, value, chroma


def _rgb_from_hue_value_chroma(hue: Tensor, value: Tensor, chroma: Tensor) -> Tensor:
    """Inverse of `_hue_value_chroma`: channel n is v - c * clamp(min(k, 4 - k), 0, 1), k = (n + 6h) mod 6.

    `hue` may lie outside [0, 1) (a shifted hue); the mod wraps it.
    """
    offsets = hue.new_tensor([5.0, 3.0, 1.0]).reshape(1, 3, 1, 1)  # R, G, B
    k = torch.add(offsets, hue.unsqueeze(1), alpha=6.0)  # [B, 3, H, W]
    scratch = torch.div(k, 6.0).floor_()
    k.sub_(scratch, alpha=6.0)
    ramp = torch.minimum(k, torch.mul(k, -1.0, out=scratch).add_(4.0), out=scratch).clamp_(0.0, 1.0)
    return ramp.mul_(chroma.unsqueeze(1)).neg_().add_(value.unsqueeze(1))


def rgb_to_hsv(x: Tensor) -> Tensor:
    """RGB in [0, 1] -> HSV with hue in turns [0, 1), as colorsys does, batched; [B, 3, H, W]."""
    hue, value, chroma = _hue_value_chroma(x)
    # s = chroma / value, and 0 for black (where chroma is 0 too).
    saturation = chroma / (value + torch.eq(value, 0.0, out=torch.empty_like(value)))
    return torch.stack([hue, saturation, value], dim=1)


def hsv_to_rgb(hsv: Tensor) -> Tensor:
    """HSV (hue in turns) -> RGB, the inverse of `rgb_to_hsv`; [B, 3, H, W]."""
    hue, saturation, value = hsv.unbind(1)
    return _rgb_from_hue_value_chroma(hue, value, value * saturation)


def adjust_hue(x: Tensor, shift: Tensor) -> Tensor:
    """Rotates the hue of each RGB image by a per-sample shift in turns (1.0 = a full turn = identity).

    Goes through HSV without materialising saturation: the inverse only needs value and chroma.
    Greyscale images have no hue, so they are returned unchanged.
    """
    if x.shape[1] == 1:
        return x
    hue, value, chroma = _hue_value_chroma(x)
    hue.add_(shift.reshape(-1, 1, 1))
    return _rgb_from_hue_value_chroma(hue, value, chroma).clamp_(0.0, 1.0)


def solarize(x: Tensor, threshold: float) -> Tensor:
    """Inverts the pixels at or above `threshold` (x -> 1 - x), as BYOL's solarization."""
    return _choose(_indicator(x, threshold), 1.0 - x, x)


# ---------------------------------------------------------------------------------------------
# CIE Lab (D65), for colourisation: L = lightness in [0, 100], a/b = the two chroma axes.

_RGB_TO_XYZ = ((0.4124564, 0.3575761, 0.1804375),
               (0.2126729, 0.7151522, 0.0721750),
               (0.0193339, 0.1191920, 0.9503041))
_D65_WHITE = (0.95047, 1.0, 1.08883)
_EPS = (6 / 29) ** 3


def rgb_to_lab(x: Tensor) -> Tensor:
    """sRGB in [0, 1], [B, 3, H, W] -> CIE Lab (D65 white), [B, 3, H, W]: L in [0, 100], a, b ~ [-110, 110]."""
    x = x.float().clamp(0, 1)
    linear = torch.where(x <= 0.04045, x / 12.92, ((x + 0.055) / 1.055) ** 2.4)
    matrix = torch.tensor(_RGB_TO_XYZ, device=x.device) / torch.tensor(_D65_WHITE, device=x.device).unsqueeze(1)
    xyz = torch.einsum("ij,bjhw->bihw", matrix, linear)  # [B, 3, H, W], white-normalised X/Xn, Y/Yn, Z/Zn
    f = torch.where(xyz > _EPS, xyz.clamp_min(_EPS).pow(1 / 3), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
    fx, fy, fz = f.unbind(1)
    return torch.stack([116 * fy - 16, 500 * (fx - fy), 200 * (fy - fz)], dim=1)


def lab_to_rgb(lab: Tensor) -> Tensor:
    """The inverse of `rgb_to_lab`; colours outside the sRGB gamut are clipped to [0, 1]."""
    L, a, b = lab.float().unbind(1)
    fy = (L + 16) / 116
    f = torch.stack([fy + a / 500, fy, fy - b / 200], dim=1)  # [B, 3, H, W]
    xyz = torch.where(f > 6 / 29, f.pow(3), 3 * (6 / 29) ** 2 * (f - 4 / 29))
    xyz = xyz * torch.tensor(_D65_WHITE, device=lab.device).view(1, 3, 1, 1)
    matrix = torch.linalg.inv(torch.tensor(_RGB_TO_XYZ, dtype=torch.float64)).float().to(lab.device)
    linear = torch.einsum("ij,bjhw->bihw", matrix, xyz).clamp(0, 1)
    return torch.where(linear <= 0.0031308, 12.92 * linear, 1.055 * linear.clamp_min(1e-12).pow(1 / 2.4) - 0.055).clamp(0, 1)


def lightness_as_grey(lab: Tensor) -> Tensor:
    """The grey sRGB image [B, 3, H, W] with the lightness of `lab` and no chroma (colourisation's input)."""
    return lab_to_rgb(torch.cat([lab[:, :1], torch.zeros_like(lab[:, 1:])], dim=1))
