"""Image sources: turn a folder, a manifest, an array file or a built-in name into decoded images.

Every source ends up as an `ImageSet`: uint8 images at one square resolution held in memory, plus
labels and subgroup columns when the source has them. Decoding happens once, up front, so that a
broken file is found before training starts rather than hours into it, and so that training reads
tensors instead of paying Pillow on every epoch.

Geometry: every image is resized so that its *shorter* side equals `image_size` (bilinear, with
antialiasing when shrinking) and then centre-cropped to a square, so aspect ratios are never
squashed. It is done as "crop the centred square on whole source pixels, then resize", so that
files (through Pillow) and arrays (through torch) agree to within one grey level.

Colour: images are converted to greyscale (`channels=1`, ITU-R 601 luma as Pillow computes it) or
RGB (`channels=3`, greyscale replicated); transparent pixels are composited onto white; 16-bit
images are scaled to 8 bits.

Each kind of file source is read in `sources.py`; Pillow decoding and the bad-file policy
(`on_bad`, `max_bad_fraction`) are in `decode.py`.
"""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from selfsup.data.decode import _BadFilePolicy, check_bad_file_settings
from selfsup.errors import SelfsupError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
MANIFEST_KINDS = (".csv", ".jsonl")
# Arrays are resized in chunks so a large set never needs one float copy of itself.
_RESIZE_CHUNK = 1024


@dataclass
class ImageSet:
    """Decoded images held in memory at one resolution, with optional labels and subgroup columns.

    `images` is uint8 [N, C, S, S]; `ids` names each row (a path relative to the data root for
    files, "name:index" for arrays); `labels` is int64 [N] indexing `classes` (-1 marks an
    unlabelled row of a partially labelled manifest) or None; `groups` maps a subgroup column to one
    string per row; `num_skipped` counts files dropped under on_bad="skip".
    """

    images: torch.Tensor
    ids: list[str]
    labels: torch.Tensor | None
    classes: list[str] | None
    groups: dict[str, list[str]] = field(default_factory=dict)
    source: str = ""
    num_skipped: int = 0

    def __post_init__(self) -> None:
        N = self.images.shape[0]
        assert self.images.dtype == torch.uint8 and self.images.ndim == 4, self.images.shape
        assert len(self.ids) == N
        assert self.labels is None or self.labels.shape == (N,)
        assert all(len(values) == N for values in self.groups.values())

    def __len__(self) -> int:
        return len(self.ids)

    def subset(self, index: torch.Tensor | list[int]) -> ImageSet:
        """The rows at `index`, in the order given (a boolean mask selects rows in order)."""
        index = torch.as_tensor(index)
        if index.dtype == torch.bool:
            index = index.nonzero().flatten()
        index = index.to(torch.long).flatten()
        rows = index.tolist()
        return ImageSet(
            images=self.images[index],
            ids=[self.ids[i] for i in rows],
            labels=None if self.labels is None else self.labels[index],
            classes=self.classes,
            groups={name: [values[i] for i in rows] for name, values in self.groups.items()},
            source=self.source,
            num_skipped=self.num_skipped,
        )


def load_image_source(
    source: str,
    image_size: int,
    channels: int = 3,
    *,
    on_bad: str = "error",
    max_bad_fraction: float = 0.01,
    label_column: str = "label",
    group_columns: list[str] | None = None,
    progress: bool = False,
) -> ImageSet:
    """Load every image a source names, decoded and resized, with its labels and subgroups.

    `source` is a built-in dataset name (see `builtins.BUILTIN`), a folder of images (sub-folders
    become classes when the folder holds nothing but them), a .csv/.jsonl manifest with a `path`
    column, or a .npz file with `x` (and optionally `y`). A built-in name wins over a folder of the
    same name in the working directory; write "./mnist" to mean the folder.

    `on_bad="error"` stops at the first file that cannot be decoded; `"skip"` drops such files,
    logs a summary, and still fails if more than `max_bad_fraction` of them are bad.
    """
    # builtins and sources import this module (for ImageSet, images_from_array), so they are imported here
    from selfsup.data.builtins import BUILTIN, load_builtin
    from selfsup.data.sources import _load_folder, _load_manifest, _load_npz

    source = os.fspath(source)
    if not isinstance(image_size, int) or image_size < 1:
        raise SelfsupError(f"image_size must be a positive integer, got {image_size!r}")
    if channels not in (1, 3):
        raise SelfsupError(f"channels must be 1 (greyscale) or 3 (RGB), got {channels!r}")
    check_bad_file_settings(on_bad, max_bad_fraction)

    if source in BUILTIN:
        return load_builtin(source, image_size, channels)
    path = Path(source).expanduser()
    policy = _BadFilePolicy(on_bad, max_bad_fraction)
    if path.is_dir():
        return _load_folder(path, image_size, channels, policy, progress)
    suffix = path.suffix.lower()
    if path.is_file() and suffix in MANIFEST_KINDS:
        return _load_manifest(path, image_size, channels, policy, label_column, group_columns, progress)
    if path.is_file() and suffix == ".npz":
        return _load_npz(path, image_size, channels, label_column, group_columns)

    accepted = (
        f"a built-in dataset ({', '.join(BUILTIN)}), a folder of images, "
        f"a .csv or .jsonl manifest, or a .npz file with an array 'x'"
    )
    if path.is_file():
        raise SelfsupError(f"{source}: unsupported kind of file '{suffix}'; an image source is {accepted}")
    hint = difflib.get_close_matches(source, list(BUILTIN), n=1)
    did_you_mean = f" (did you mean '{hint[0]}'?)" if hint else ""
    raise SelfsupError(f"{source}: no such file or folder{did_you_mean}; an image source is {accepted}")


def images_from_array(x: np.ndarray, image_size: int, channels: int) -> torch.Tensor:
    """Resize uint8 [N, C, H, W] images (C = 1 or 3) to uint8 [N, channels, S, S] in batches.

    Same geometry and colour rules as decoded files (shorter side to S, centre crop, Pillow's luma
    weights), so an array and a folder of the same pictures give the same tensors up to rounding.
    """
    N, C, H, W = x.shape
    assert x.dtype == np.uint8 and C in (1, 3), (x.dtype, x.shape)
    S = image_size
    side = min(H, W)
    top, left = (H - side) // 2, (W - side) // 2
    out = torch.empty((N, channels, S, S), dtype=torch.uint8)
    for start in range(0, N, _RESIZE_CHUNK):
        chunk = torch.from_numpy(x[start : start + _RESIZE_CHUNK, :, top : top + side, left : left + side])
        chunk = chunk.float()  # [n, C, side, side]
        if C == 3 and channels == 1:
            weights = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
            chunk = (chunk * weights).sum(dim=1, keepdim=True)  # [n, 1, side, side]
        if side != S:
            # antialias makes shrinking average over the footprint like Pillow instead of aliasing
            chunk = F.interpolate(chunk, size=(S, S), mode="bilinear", align_corners=False,
                                  antialias=S < side)  # [n, 1 or 3, S, S]
        # greyscale is replicated after resizing: the same result for a third of the work
        out[start : start + len(chunk)] = chunk.round().clamp(0, 255).to(torch.uint8)  # broadcasts 1 -> 3
    return out
