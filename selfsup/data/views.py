"""Batched image augmentations that turn one batch of images into SimCLR-style views.

Views are made on the training device, for the whole batch at once, because per-image Python
pipelines (PIL or per-sample tensor ops) cost more than the model at 32 px. Every random choice
is drawn per sample from an explicit `torch.Generator`, so the same generator state gives
bit-identical views (which is what makes resume bit-identical) and the global RNG is never touched.

The pipeline follows SimCLR (Chen et al. 2020, arXiv:2002.05709) and its torchvision recipe:
random resized crop -> horizontal flip -> colour jitter -> greyscale -> Gaussian blur -> solarize
(the last two off by default, as SimCLR does at 32 px; BYOL turns them on). Deviations from
torchvision, all deliberate:

- crop + flip are one bilinear `grid_sample` per batch, with no antialiasing: at 32 px the crop is
  always upsampled, so this matches crop-then-resize; when a crop is much larger than the output
  it aliases where torchvision's antialiased resize would not.
- the order of the four colour-jitter operations is drawn once per batch, not once per image.

The per-pixel colour operations themselves are in `selfsup.nn.colour`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from selfsup.nn.colour import (
    _choose,
    _per_sample,
    adjust_brightness,
    adjust_contrast,
    adjust_hue,
    adjust_saturation,
    solarize,
    to_grayscale,
)
from selfsup.errors import SelfsupError

# torchvision's RandomResizedCrop tries this many boxes before falling back to a centre crop.
_NUM_CROP_TRIES = 10


@dataclass
class ViewsConfig:
    num_views: int = 2  # augmented views made of every image (SimCLR/BYOL: 2)
    crop_scale: tuple[float, float] = (0.2, 1.0)  # random-resized-crop area, as a fraction of the image area
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)  # crop aspect ratio (width / height), sampled log-uniformly
    flip_p: float = 0.5  # probability of a horizontal flip
    jitter_p: float = 0.8  # probability that colour jitter is applied to an image
    brightness: float = 0.4  # brightness factor drawn from [1 - b, 1 + b]
    contrast: float = 0.4  # contrast factor drawn from [1 - c, 1 + c]
    saturation: float = 0.4  # saturation factor drawn from [1 - s, 1 + s] (no-op on greyscale images)
    hue: float = 0.1  # hue shift drawn from [-h, h] turns, h <= 0.5 (no-op on greyscale images)
    grayscale_p: float = 0.2  # probability of converting an image to greyscale (kept at 3 channels)
    blur_p: float = 0.0  # probability of Gaussian blur (SimCLR drops blur at 32 px)
    blur_sigma: tuple[float, float] = (0.1, 2.0)  # blur sigma range in pixels of the output view
    solarize_p: float = 0.0  # probability of solarizing an image (BYOL: 0.2 on its second view)
    solarize_threshold: float = 0.5  # pixels at or above this intensity (in [0, 1]) are inverted
    view_blur_p: list[float] | None = None  # per-view blur probability for the num_views views (BYOL/DINO: [1.0, 0.1]); None = blur_p
    view_solarize_p: list[float] | None = None  # per-view solarize probability (BYOL/DINO: [0.0, 0.2]); None = solarize_p
    num_local: int = 0  # extra small crops per image (DINO's multi-crop), made after the num_views global views
    local_size: int | None = None  # side of the local crops in pixels; None = half the image size
    local_crop_scale: tuple[float, float] = (0.05, 0.4)  # area fraction of the local crops
    local_blur_p: float = 0.5  # blur probability of the local crops (DINO: 0.5)

    def __post_init__(self) -> None:
        # YAML has no tuples: a config file gives lists for the range fields.
        for name in ("crop_scale", "crop_ratio", "blur_sigma", "local_crop_scale"):
            value = getattr(self, name)
            if isinstance(value, list):
                setattr(self, name, tuple(value))


def validate_views_config(cfg: ViewsConfig) -> None:
    """Raises SelfsupError naming the `views.<field>` key whose value is out of range."""

    def number(name: str, value: object) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise SelfsupError(f"`views.{name}` must be a finite number, got {value!r}")
        return float(value)

    def pair(name: str) -> tuple[float, float]:
        value = getattr(cfg, name)
        if not isinstance(value, (tuple, list)) or len(value) != 2:
            raise SelfsupError(f"`views.{name}` must be two numbers [min, max], got {value!r}")
        low, high = (number(name, v) for v in value)
        return low, high

    if isinstance(cfg.num_views, bool) or not isinstance(cfg.num_views, int) or cfg.num_views < 1:
        raise SelfsupError(f"`views.num_views` must be an integer >= 1, got {cfg.num_views!r}")
    for name in ("flip_p", "jitter_p", "grayscale_p", "blur_p", "solarize_p", "solarize_threshold"):
        value = number(name, getattr(cfg, name))
        if not 0.0 <= value <= 1.0:
            raise SelfsupError(f"`views.{name}` must be in [0, 1], got {value}")
    for name in ("brightness", "contrast", "saturation"):
        value = number(name, getattr(cfg, name))
        if value < 0:
            raise SelfsupError(f"`views.{name}` must be >= 0 (0 turns it off), got {value}")
    hue = number("hue", cfg.hue)
    if not 0.0 <= hue <= 0.5:
        raise SelfsupError(f"`views.hue` must be in [0, 0.5] (a fraction of a full hue turn), got {hue}")
    low, high = pair("crop_scale")
    if not 0.0 < low <= high <= 1.0:
        raise SelfsupError(f"`views.crop_scale` must satisfy 0 < min <= max <= 1 (fractions of the image area), got {cfg.crop_scale!r}")
    low, high = pair("crop_ratio")
    if not 0.0 < low <= high:
        raise SelfsupError(f"`views.crop_ratio` must satisfy 0 < min <= max (width / height), got {cfg.crop_ratio!r}")
    low, high = pair("blur_sigma")
    if not 0.0 < low <= high:
        raise SelfsupError(f"`views.blur_sigma` must satisfy 0 < min <= max (pixels), got {cfg.blur_sigma!r}")
    for name in ("view_blur_p", "view_solarize_p"):
        values = getattr(cfg, name)
        if values is None:
            continue
        if len(values) != cfg.num_views:
            raise SelfsupError(f"`views.{name}` needs one probability per view (num_views={cfg.num_views}), got {values!r}")
        if not all(0.0 <= number(name, v) <= 1.0 for v in values):
            raise SelfsupError(f"`views.{name}` probabilities must be in [0, 1], got {values!r}")
    if isinstance(cfg.num_local, bool) or not isinstance(cfg.num_local, int) or cfg.num_local < 0:
        raise SelfsupError(f"`views.num_local` must be an integer >= 0, got {cfg.num_local!r}")
    if cfg.local_size is not None and (isinstance(cfg.local_size, bool) or cfg.local_size < 1):
        raise SelfsupError(f"`views.local_size` must be a positive integer or null, got {cfg.local_size!r}")
    low, high = pair("local_crop_scale")
    if not 0.0 < low <= high <= 1.0:
        raise SelfsupError(f"`views.local_crop_scale` must satisfy 0 < min <= max <= 1, got {cfg.local_crop_scale!r}")
    if not 0.0 <= number("local_blur_p", cfg.local_blur_p) <= 1.0:
        raise SelfsupError(f"`views.local_blur_p` must be in [0, 1], got {cfg.local_blur_p}")


# --------------------------------------------------------------------------------------------
# blur (the colour operations live in `colour.py`)


def blur_kernel_size(image_size: int) -> int:
    """Odd kernel size ~10% of the image side (SimCLR's choice), at least 3, small enough to reflect-pad."""
    size = max(3, int(round(0.1 * image_size)))
    if size % 2 == 0:
        size += 1
    # Reflect padding needs pad < side; shrink the kernel for tiny images.
    while size > 1 and size // 2 >= image_size:
        size -= 2
    return size


def gaussian_blur(x: Tensor, sigma: Tensor, kernel_size: int) -> Tensor:
    """Separable Gaussian blur with a per-sample sigma and reflect padding, one grouped conv per axis.

    The batch is folded into the channels ([1, B*C, H, W]) so that every image gets its own kernel
    while the whole batch still runs as a single convolution per axis.
    """
    B, C, H, W = x.shape
    half = kernel_size // 2
    taps = torch.arange(-half, half + 1, device=x.device, dtype=x.dtype)  # [K]
    kernel = torch.exp(-0.5 * (taps / sigma.to(x.dtype).reshape(-1, 1)) ** 2)  # [B, K]
    kernel = kernel / kernel.sum(dim=1, keepdim=True)
    kernel = kernel.repeat_interleave(C, dim=0)  # [B*C, K], sample-major like the folded channels
    folded = F.pad(x.reshape(1, B * C, H, W), (half, half, half, half), mode="reflect")  # [1, B*C, H+2p, W+2p]
    folded = F.conv2d(folded, kernel.reshape(B * C, 1, 1, kernel_size), groups=B * C)  # [1, B*C, H+2p, W]
    folded = F.conv2d(folded, kernel.reshape(B * C, 1, kernel_size, 1), groups=B * C)  # [1, B*C, H, W]
    return folded.reshape(B, C, H, W)


# --------------------------------------------------------------------------------------------
# random geometry


def _uniform(shape: tuple[int, ...], low: float, high: float, generator: torch.Generator, device: torch.device) -> Tensor:
    """Uniform [low, high) draws from `generator` (on its own device), moved to `device`."""
    u = torch.rand(shape, generator=generator, device=generator.device)
    return (u * (high - low) + low).to(device)


def _coin(num: int, p: float, generator: torch.Generator, device: torch.device) -> Tensor:
    """[num] floats, each 1.0 with probability p and 0.0 otherwise, from `generator` (see `_choose`)."""
    return (_uniform((num,), 0.0, 1.0, generator, device) < p).float()


def sample_crop_boxes(num: int, height: int, width: int, scale: tuple[float, float], ratio: tuple[float, float],
                      generator: torch.Generator) -> Tensor:
    """Crop boxes [num, 4] as (top, left, box_height, box_width) in pixels, sampled as torchvision's
    RandomResizedCrop: area fraction uniform in `scale`, aspect ratio log-uniform in `ratio`, the first
    of 10 tries that fits the image, else a centre crop clamped to the ratio range.

    The 10 tries are drawn for every sample at once, so the draw count does not depend on the data.
    """
    device = generator.device
    area = float(height * width)
    area_frac = _uniform((num, _NUM_CROP_TRIES), scale[0], scale[1], generator, device)
    log_ratio = _uniform((num, _NUM_CROP_TRIES), math.log(ratio[0]), math.log(ratio[1]), generator, device)
    aspect = torch.exp(log_ratio.double())
    target = area_frac.double() * area
    box_w = torch.sqrt(target * aspect).round()  # [num, tries]
    box_h = torch.sqrt(target / aspect).round()
    fits = (box_w > 0) & (box_w <= width) & (box_h > 0) & (box_h <= height)
    first = fits.to(torch.uint8).argmax(dim=1, keepdim=True)  # index of the first fitting try (0 if none)
    box_w = box_w.gather(1, first).squeeze(1)  # [num]
    box_h = box_h.gather(1, first).squeeze(1)

    # The centre-crop fallback, identical for every sample that needs it.
    in_ratio = width / height
    if in_ratio < min(ratio):
        fallback_w, fallback_h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        fallback_w, fallback_h = int(round(height * max(ratio))), height
    else:
        fallback_w, fallback_h = width, height
    any_fit = fits.any(dim=1)
    box_w = torch.where(any_fit, box_w, torch.full_like(box_w, fallback_w))
    box_h = torch.where(any_fit, box_h, torch.full_like(box_h, fallback_h))

    # Uniform integer offsets in [0, side - box]; the clamp guards u * n rounding up to n.
    u_top = torch.rand(num, generator=generator, device=device, dtype=torch.float64)
    u_left = torch.rand(num, generator=generator, device=device, dtype=torch.float64)
    top = torch.minimum((u_top * (height - box_h + 1)).floor(), height - box_h)
    left = torch.minimum((u_left * (width - box_w + 1)).floor(), width - box_w)
    top = torch.where(any_fit, top, torch.div(height - box_h, 2, rounding_mode="floor"))
    left = torch.where(any_fit, left, torch.div(width - box_w, 2, rounding_mode="floor"))
    return torch.stack([top, left, box_h, box_w], dim=1)


def crop_flip_resize(x: Tensor, boxes: Tensor, flip: Tensor, size: int) -> Tensor:
    """Crops each image to its box, flips it horizontally where flip == 1, and resizes it to
    size x size, all as one bilinear `grid_sample` (border padding, so edges match `F.interpolate`).

    The sampling grid is built directly (x and y are separable) rather than with `F.affine_grid`,
    whose batched matmul costs more than the resampling itself at 32 px.
    """
    B, C, H, W = x.shape
    boxes = boxes.to(device=x.device, dtype=torch.float64)
    top, left, box_h, box_w = boxes.unbind(1)
    # With align_corners=False, pixel edge p maps to 2p/side - 1: the box [left, left + box_w]
    # has centre (2*left + box_w)/W - 1 and half-width box_w/W; a flip negates the half-width.
    sign = 1.0 - 2.0 * flip.to(device=x.device, dtype=torch.float64)
    scale_x = (box_w / W * sign).to(x.dtype).reshape(B, 1)
    scale_y = (box_h / H).to(x.dtype).reshape(B, 1)
    centre_x = ((2 * left + box_w) / W - 1).to(x.dtype).reshape(B, 1)
    centre_y = ((2 * top + box_h) / H - 1).to(x.dtype).reshape(B, 1)
    # Output pixel centres in normalised coordinates, as affine_grid uses them.
    base = (torch.arange(size, device=x.device, dtype=x.dtype) * 2 + 1) / size - 1  # [S]
    grid_x = torch.addcmul(centre_x, scale_x, base)  # [B, S]
    grid_y = torch.addcmul(centre_y, scale_y, base)
    # Clamp to the box's outermost pixel centres: crop-then-resize repeats the crop's edge pixels
    # rather than blending in the pixels just outside the box.
    half_pixel_x = (1.0 / W) * (box_w - 1).clamp(min=0).to(x.dtype).reshape(B, 1)
    half_pixel_y = (1.0 / H) * (box_h - 1).clamp(min=0).to(x.dtype).reshape(B, 1)
    grid_x = torch.maximum(torch.minimum(grid_x, centre_x + half_pixel_x), centre_x - half_pixel_x)
    grid_y = torch.maximum(torch.minimum(grid_y, centre_y + half_pixel_y), centre_y - half_pixel_y)
    grid = torch.empty(B, size, size, 2, device=x.device, dtype=x.dtype)
    grid[..., 0] = grid_x.unsqueeze(1)  # [B, 1, S]: x varies along columns
    grid[..., 1] = grid_y.unsqueeze(2)  # [B, S, 1]: y varies along rows
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


# --------------------------------------------------------------------------------------------
# the pipeline


def _check_images(images: Tensor, what: str) -> None:
    if images.dtype != torch.uint8 or images.dim() != 4:
        raise SelfsupError(f"{what} expects uint8 images [B, C, H, W], got {images.dtype} of shape {tuple(images.shape)}")
    if images.shape[1] not in (1, 3):
        raise SelfsupError(f"{what} expects 1 (grey) or 3 (RGB) channels, got {images.shape[1]}; set `data.channels` to 1 or 3")


def _norm_stats(mean: Sequence[float], std: Sequence[float], num_channels: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """(scale, shift) [1, C, 1, 1] so that x * scale + shift == (x - mean) / std."""
    if len(mean) != num_channels or len(std) != num_channels:
        raise SelfsupError(f"normalisation mean {list(mean)} and std {list(std)} need one value per channel ({num_channels})")
    if any(s <= 0 for s in std):
        raise SelfsupError(f"normalisation std must be positive, got {list(std)}")
    mean_t = torch.tensor(mean, dtype=torch.float64)
    std_t = torch.tensor(std, dtype=torch.float64)
    scale = (1.0 / std_t).float().reshape(1, -1, 1, 1).to(device)
    shift = (-mean_t / std_t).float().reshape(1, -1, 1, 1).to(device)
    return scale, shift


def normalise(images: Tensor, mean: Sequence[float], std: Sequence[float], image_size: int | None = None) -> Tensor:
    """The evaluation path: uint8 images -> float normalised with mean/std, no augmentation.

    Resizes to image_size x image_size (bilinear, antialiased when shrinking) when the size differs.
    """
    _check_images(images, "normalise")
    B, C, H, W = images.shape
    x = images.float().div_(255.0)
    if image_size is not None and (H, W) != (image_size, image_size):
        if image_size < 1:
            raise SelfsupError(f"image_size must be at least 1, got {image_size}")
        shrinking = image_size < H or image_size < W
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False, antialias=shrinking)
    scale, shift = _norm_stats(mean, std, C, x.device)
    return torch.addcmul(shift, x, scale)


class ImageViews:
    """Turns a batch of uint8 images into `num_views` augmented global views plus `num_local` small
    local crops (DINO's multi-crop), normalised float, in that order.

    Per view: random resized crop + horizontal flip (one grid_sample), colour jitter (brightness,
    contrast, saturation, hue in one random order per batch — torchvision draws the order per image),
    greyscale, Gaussian blur, solarize; every parameter drawn per sample from the caller's generator.
    """

    def __init__(self, cfg: ViewsConfig, image_size: int, mean: Sequence[float], std: Sequence[float]):
        validate_views_config(cfg)
        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
            raise SelfsupError(f"`data.image_size` must be an integer >= 1, got {image_size!r}")
        if len(mean) != len(std) or len(mean) not in (1, 3):
            raise SelfsupError(f"normalisation mean {list(mean)} and std {list(std)} need 1 or 3 values each, one per channel")
        self.cfg = cfg
        self.image_size = image_size
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.local_size = cfg.local_size or max(1, image_size // 2)
        self.blur_kernel_size = {image_size: blur_kernel_size(image_size), self.local_size: blur_kernel_size(self.local_size)}
        self._stats: dict[torch.device, tuple[Tensor, Tensor]] = {}

    def __call__(self, images: Tensor, generator: torch.Generator) -> list[Tensor]:
        """uint8 [B, C, H, W] on any device -> `num_views` float32 [B, C, S, S] views, normalised."""
        _check_images(images, "ImageViews")
        B, C, H, W = images.shape
        if C != len(self.mean):
            raise SelfsupError(f"images have {C} channels but normalisation mean/std have {len(self.mean)}; "
                               "set `data.channels` to match the dataset's statistics")
        if images.device not in self._stats:
            self._stats[images.device] = _norm_stats(self.mean, self.std, C, images.device)
        scale, shift = self._stats[images.device]
        x = images.float().div_(255.0)
        cfg = self.cfg
        recipes = [dict(blur_p=(cfg.view_blur_p or [cfg.blur_p] * cfg.num_views)[i],
                        solarize_p=(cfg.view_solarize_p or [cfg.solarize_p] * cfg.num_views)[i])
                   for i in range(cfg.num_views)]
        # Local crops (DINO multi-crop): small, never solarized.
        recipes += [dict(size=self.local_size, crop_scale=cfg.local_crop_scale, blur_p=cfg.local_blur_p, solarize_p=0.0)
                    for _ in range(cfg.num_local)]
        views = []
        for recipe in recipes:
            view = self.one_view(x, generator, **recipe)
            assert view.data_ptr() != x.data_ptr(), "one_view must return a fresh tensor: it is normalised in place"
            views.append(torch.addcmul(shift, view, scale, out=view))
        return views

    def one_view(self, x: Tensor, generator: torch.Generator, *, size: int | None = None,
                 crop_scale: tuple[float, float] | None = None, blur_p: float | None = None,
                 solarize_p: float | None = None) -> Tensor:
        """Float images in [0, 1] [B, C, H, W] -> one augmented view in [0, 1] [B, C, S, S], not normalised.

        The keyword arguments override the config for this view (per-view recipes, local crops).
        """
        cfg = self.cfg
        size = size or self.image_size
        crop_scale = crop_scale or cfg.crop_scale
        blur_p = cfg.blur_p if blur_p is None else blur_p
        solarize_p = cfg.solarize_p if solarize_p is None else solarize_p
        B, C, H, W = x.shape
        device = x.device
        boxes = sample_crop_boxes(B, H, W, crop_scale, cfg.crop_ratio, generator)
        flip = _coin(B, cfg.flip_p, generator, device)
        x = crop_flip_resize(x, boxes, flip, size)
        if cfg.jitter_p > 0:
            x = self._jitter(x, generator)
        if cfg.grayscale_p > 0 and C == 3:
            apply = _per_sample(_coin(B, cfg.grayscale_p, generator, device))
            x = _choose(apply, to_grayscale(x), x)  # [B, 3, S, S]: grey broadcast over the channels
        if blur_p > 0:
            apply = _per_sample(_coin(B, blur_p, generator, device))
            sigma = _uniform((B,), cfg.blur_sigma[0], cfg.blur_sigma[1], generator, device)
            kernel = self.blur_kernel_size.get(size) or blur_kernel_size(size)
            x = _choose(apply, gaussian_blur(x, sigma, kernel), x)
        if solarize_p > 0:
            apply = _per_sample(_coin(B, solarize_p, generator, device))
            x = _choose(apply, solarize(x, cfg.solarize_threshold), x)
        return x

    def _jitter(self, x: Tensor, generator: torch.Generator) -> Tensor:
        """Colour jitter on a per-sample coin flip; all factors are drawn even for skipped samples,
        so the draw count (and thus every later draw) does not depend on the coin flips."""
        cfg = self.cfg
        B, C, H, W = x.shape
        device = x.device
        apply = _coin(B, cfg.jitter_p, generator, device)
        ops = []
        if cfg.brightness > 0:
            factor = _uniform((B,), max(0.0, 1 - cfg.brightness), 1 + cfg.brightness, generator, device)
            ops.append((adjust_brightness, factor))
        if cfg.contrast > 0:
            factor = _uniform((B,), max(0.0, 1 - cfg.contrast), 1 + cfg.contrast, generator, device)
            ops.append((adjust_contrast, factor))
        if cfg.saturation > 0 and C == 3:
            factor = _uniform((B,), max(0.0, 1 - cfg.saturation), 1 + cfg.saturation, generator, device)
            ops.append((adjust_saturation, factor))
        if cfg.hue > 0 and C == 3:
            shift = _uniform((B,), -cfg.hue, cfg.hue, generator, device)
            ops.append((adjust_hue, shift))
        if not ops:
            return x
        order = torch.randperm(len(ops), generator=generator, device=generator.device).tolist()
        jittered = x
        for index in order:
            op, factor = ops[index]
            jittered = op(jittered, factor)
        if cfg.jitter_p >= 1:
            return jittered
        return _choose(_per_sample(apply), jittered, x)
