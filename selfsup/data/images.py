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
"""

from __future__ import annotations

import csv
import difflib
import json
import logging
import math
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError

from selfsup.errors import SelfsupError

logger = logging.getLogger("selfsup")

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
MANIFEST_KINDS = (".csv", ".jsonl")
# Pillow releases the GIL while decoding, so a few threads overlap decode with file I/O; more would
# only fight the other jobs on a small machine.
_MAX_DECODE_WORKERS = 4
# Bad-file summaries name this many files; a long list hides the pattern instead of showing it.
_NUM_NAMED = 5
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

    `source` is a built-in dataset name (see `builtin.BUILTIN`), a folder of images (sub-folders
    become classes when the folder holds nothing but them), a .csv/.jsonl manifest with a `path`
    column, or a .npz file with `x` (and optionally `y`). A built-in name wins over a folder of the
    same name in the working directory; write "./mnist" to mean the folder.

    `on_bad="error"` stops at the first file that cannot be decoded; `"skip"` drops such files,
    logs a summary, and still fails if more than `max_bad_fraction` of them are bad.
    """
    from selfsup.data.builtin import BUILTIN, load_builtin  # builtin imports this module

    source = os.fspath(source)
    if not isinstance(image_size, int) or image_size < 1:
        raise SelfsupError(f"image_size must be a positive integer, got {image_size!r}")
    if channels not in (1, 3):
        raise SelfsupError(f"channels must be 1 (greyscale) or 3 (RGB), got {channels!r}")
    if on_bad not in ("error", "skip"):
        raise SelfsupError(f"on_bad_file must be 'error' or 'skip', got {on_bad!r}")
    if not 0.0 <= max_bad_fraction <= 1.0:
        raise SelfsupError(f"max_bad_fraction must lie in [0, 1], got {max_bad_fraction!r}")

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


def split_holdout(data: ImageSet, fraction: float, seed: int) -> tuple[ImageSet, ImageSet]:
    """Split off a held-out part, stratified by label so that every class keeps its proportion.

    Each class (unlabelled rows, -1, count as one more class) sends round(fraction * n) of its n
    rows to the holdout, at least 1 when fraction > 0 and n >= 2 and never all of them, so that a
    rare class is both trained on and evaluated. Both parts keep the source order; the same seed
    gives the same split.
    """
    if not 0.0 <= fraction < 1.0:
        raise SelfsupError(f"holdout fraction must lie in [0, 1), got {fraction!r}")
    if fraction == 0.0 or len(data) == 0:
        return data, data.subset([])
    generator = torch.Generator().manual_seed(seed)
    if data.labels is None:
        strata = [torch.arange(len(data))]
    else:
        strata = [(data.labels == label).nonzero().flatten() for label in data.labels.unique().tolist()]
    held: list[torch.Tensor] = []
    for members in strata:
        num_members = len(members)
        if num_members < 2:
            continue
        num_held = min(max(1, math.floor(fraction * num_members + 0.5)), num_members - 1)
        order = torch.randperm(num_members, generator=generator)
        held.append(members[order[:num_held]])
    is_held = torch.zeros(len(data), dtype=torch.bool)
    if held:
        is_held[torch.cat(held)] = True
    return data.subset(~is_held), data.subset(is_held)


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


# ---------------------------------------------------------------------------------------------
# Decoding files


class _BadFile(Exception):
    """A file that cannot become an image; carries the reason a user reads."""


@dataclass
class _BadFilePolicy:
    on_bad: str
    max_bad_fraction: float


def _decode(path: Path, image_size: int, channels: int) -> np.ndarray:
    """One file -> uint8 [channels, S, S], or _BadFile with a reason."""
    try:
        if path.stat().st_size == 0:
            raise _BadFile("empty file (0 bytes)")
        with Image.open(path) as im:
            limit = Image.MAX_IMAGE_PIXELS
            width, height = im.size
            if limit is not None and width * height > limit:
                raise _BadFile(f"image is {width}x{height} = {width * height} pixels, over Pillow's "
                               f"limit Image.MAX_IMAGE_PIXELS = {limit}")
            # JPEG can decode at a reduced scale directly; the result stays >= S on both sides
            im.draft(None, (image_size, image_size))
            im.load()
            im = ImageOps.exif_transpose(im)
            im = _to_mode(im, "L" if channels == 1 else "RGB")
    except _BadFile:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise _BadFile(f"image over Pillow's pixel limit Image.MAX_IMAGE_PIXELS ({err})") from None
    except UnidentifiedImageError:
        raise _BadFile("not an image Pillow can read (unrecognised or corrupt header)") from None
    except FileNotFoundError:
        raise _BadFile("file not found") from None
    except PermissionError:
        raise _BadFile("permission denied") from None
    except OSError as err:
        reason = "truncated image file" if "truncated" in str(err) else "cannot decode"
        raise _BadFile(f"{reason} ({err})") from None
    except Exception as err:  # corrupt data reaches odd corners of Pillow's decoders
        raise _BadFile(f"cannot decode ({type(err).__name__}: {err})") from None
    width, height = im.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    # Cropping the centred square first and resizing it equals "shorter side to S, then centre
    # crop"; the crop sits on whole source pixels so that images_from_array can match it exactly.
    im = im.crop((left, top, left + side, top + side))
    im = im.resize((image_size, image_size), Image.Resampling.BILINEAR)
    array = np.asarray(im, dtype=np.uint8)
    return array[None] if channels == 1 else array.transpose(2, 0, 1)  # [C, S, S]


def _to_mode(im: Image.Image, mode: str) -> Image.Image:
    """Convert to L or RGB, keeping 16-bit and transparent images meaningful."""
    if im.mode.startswith("I;16") or im.mode == "I":
        # Pillow's convert would clip 16-bit values at 255; scale the range instead
        wide = np.asarray(im).astype(np.int64)
        im = Image.fromarray((np.clip(wide, 0, 65535) // 257).astype(np.uint8), "L")
    elif im.mode == "F":
        values = np.nan_to_num(np.asarray(im, dtype=np.float64))
        scale = 255.0 if values.max(initial=0.0) <= 1.0 else 1.0
        im = Image.fromarray(np.clip(values * scale, 0, 255).round().astype(np.uint8), "L")
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        im = Image.alpha_composite(background, rgba)
    return im.convert(mode)


def _decode_all(
    items: list[tuple[Path, str]],
    image_size: int,
    channels: int,
    policy: _BadFilePolicy,
    progress: bool,
) -> tuple[list[int], np.ndarray, list[str]]:
    """Decode (path, display name) pairs; returns the kept row numbers, their pixels, bad names.

    The pixel-limit warning is made an error for the duration: catch_warnings is not thread-safe,
    so it is entered once here, around the whole pool, instead of inside each worker.
    """
    num_items = len(items)
    kept: list[int] = []
    arrays: list[np.ndarray] = []
    bad: list[str] = []
    # abort as soon as the bad fraction is certain to exceed the limit, not after decoding all
    max_bad = math.floor(policy.max_bad_fraction * num_items + 1e-9)  # 1e-9: 0.29 * 100 is 28.999...
    bar = _progress_bar(num_items) if progress else None
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        pool = ThreadPoolExecutor(max_workers=min(_MAX_DECODE_WORKERS, os.cpu_count() or 1))
        try:
            if bar is not None:
                bar[0].start()
            jobs = [pool.submit(_decode, path, image_size, channels) for path, _ in items]
            for row, job in enumerate(jobs):
                try:
                    arrays.append(job.result())
                    kept.append(row)
                except _BadFile as err:
                    name = items[row][1]
                    if policy.on_bad == "error":
                        raise SelfsupError(f"{name}: {err}; fix or remove it, "
                                           "or pass data.on_bad_file=skip") from None
                    bad.append(f"{name} ({err})")
                    if len(bad) > max_bad:
                        raise SelfsupError(
                            f"at least {len(bad)} of {num_items} image files "
                            f"({len(bad) / num_items:.1%}) cannot be decoded, over the limit "
                            f"data.max_bad_fraction={policy.max_bad_fraction:g}; first: "
                            f"{'; '.join(bad[:_NUM_NAMED])}. Fix or remove them, or raise the limit"
                        ) from None
                if bar is not None:
                    bar[0].advance(bar[1])
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
            if bar is not None:
                bar[0].stop()
    if bad:
        more = f" and {len(bad) - _NUM_NAMED} more" if len(bad) > _NUM_NAMED else ""
        logger.warning("skipped %d of %d image files that cannot be decoded: %s%s",
                       len(bad), num_items, "; ".join(bad[:_NUM_NAMED]), more)
    if not kept:
        raise SelfsupError("no usable images: every file failed to decode")
    return kept, np.stack(arrays), bad


def _progress_bar(total: int) -> tuple[object, object]:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    bar = Progress(TextColumn("decoding images"), BarColumn(), MofNCompleteColumn(),
                   TimeRemainingColumn(), transient=True)
    return bar, bar.add_task("decode", total=total)


# ---------------------------------------------------------------------------------------------
# Folders


def _load_folder(root: Path, image_size: int, channels: int, policy: _BadFilePolicy,
                 progress: bool) -> ImageSet:
    """A folder tree; hidden files and folders (".name") are ignored, symlinked folders not followed."""
    relative: list[str] = []
    for folder, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for filename in filenames:
            if not filename.startswith(".") and filename.lower().endswith(IMAGE_EXTENSIONS):
                relative.append((Path(folder) / filename).relative_to(root).as_posix())
    relative.sort()
    if not relative:
        raise SelfsupError(f"{root}: no image files found (looked for {', '.join(IMAGE_EXTENSIONS)})")

    # Labelled only when the images all sit in >= 2 class sub-folders: one sub-folder is a way
    # of storing files, not a labelling.
    tops = [rel.split("/")[0] if "/" in rel else None for rel in relative]
    classes = sorted({top for top in tops if top is not None})
    is_labelled = None not in tops and len(classes) >= 2

    items = [(root / rel, str(root / rel)) for rel in relative]
    kept, pixels, bad = _decode_all(items, image_size, channels, policy, progress)
    labels = None
    if is_labelled:
        class_index = {name: i for i, name in enumerate(classes)}
        labels = torch.tensor([class_index[tops[row]] for row in kept], dtype=torch.long)
    return ImageSet(images=torch.from_numpy(pixels), ids=[relative[row] for row in kept],
                    labels=labels, classes=classes if is_labelled else None, groups={},
                    source=str(root), num_skipped=len(bad))


# ---------------------------------------------------------------------------------------------
# Manifests


def _read_manifest_rows(manifest: Path) -> tuple[list[tuple[int, dict]], list[str]]:
    """(line number, row) pairs and the column names, from a .csv or .jsonl manifest."""
    rows: list[tuple[int, dict]] = []
    try:
        with open(manifest, encoding="utf-8-sig", newline="") as fh:
            if manifest.suffix.lower() == ".csv":
                reader = csv.DictReader(fh)
                columns = [c.strip() for c in reader.fieldnames or []]
                reader.fieldnames = columns
                for row in reader:
                    rows.append((reader.line_num, row))
            else:
                columns = []
                for line_number, line in enumerate(fh, start=1):
                    if not line.strip():
                        continue
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as err:
                        raise SelfsupError(f"{manifest}:{line_number}: not valid JSON ({err})") from None
                    if not isinstance(row, dict):
                        raise SelfsupError(f"{manifest}:{line_number}: expected a JSON object "
                                           f"like {{\"path\": ...}}, got {type(row).__name__}")
                    columns += [key for key in row if key not in columns]
                    rows.append((line_number, row))
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise SelfsupError(f"{manifest}: cannot read manifest ({err})") from None
    if "path" not in columns:
        raise SelfsupError(f"{manifest}: no 'path' column; columns are: {', '.join(columns) or '(none)'}")
    return rows, columns


def _cell(row: dict, column: str) -> str:
    """A cell as text; missing and null cells are empty, integers are written out."""
    value = row.get(column)
    if value is None:
        return ""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value).strip()


def _sorted_classes(names: set[str]) -> list[str]:
    """Class names in sorted order: numerically when every name is an integer, so "10" follows "9"."""
    if all(name.lstrip("-").isdigit() for name in names):
        return sorted(names, key=int)
    return sorted(names)


def _load_manifest(manifest: Path, image_size: int, channels: int, policy: _BadFilePolicy,
                   label_column: str, group_columns: list[str] | None, progress: bool) -> ImageSet:
    rows, columns = _read_manifest_rows(manifest)
    if not rows:
        raise SelfsupError(f"{manifest}: the manifest lists no images")
    if group_columns is None:
        group_columns = ["group"] if "group" in columns else []
    missing = [c for c in group_columns if c not in columns]
    if missing:
        raise SelfsupError(f"{manifest}: no group column {', '.join(missing)}; "
                           f"columns are: {', '.join(columns)}")

    root = manifest.parent.resolve()
    items: list[tuple[Path, str]] = []
    ids: list[str] = []
    for line_number, row in rows:
        written = _cell(row, "path")
        where = f"{manifest}:{line_number}"
        if not written:
            raise SelfsupError(f"{where}: empty 'path'")
        candidate = Path(written) if Path(written).is_absolute() else manifest.parent / written
        # resolve() follows symlinks, so a link inside the folder pointing elsewhere is caught too
        resolved = candidate.resolve()
        if not resolved.is_relative_to(root):
            raise SelfsupError(f"{where}: path '{written}' resolves to {resolved}, outside the "
                               f"manifest's folder {root}; manifest paths must stay inside it")
        if Path(written).is_absolute():
            ids.append(resolved.relative_to(root).as_posix())
        else:
            ids.append(Path(os.path.normpath(written)).as_posix())
        items.append((resolved, f"{manifest.parent / written} (listed at {where})"))

    kept, pixels, bad = _decode_all(items, image_size, channels, policy, progress)
    rows = [rows[row] for row in kept]
    labels, classes = None, None
    if label_column in columns:
        names = [_cell(row, label_column) for _, row in rows]
        classes = _sorted_classes({name for name in names if name})
        class_index = {name: i for i, name in enumerate(classes)}
        labels = torch.tensor([class_index[name] if name else -1 for name in names], dtype=torch.long)
    groups = {column: [_cell(row, column) for _, row in rows] for column in group_columns}
    return ImageSet(images=torch.from_numpy(pixels), ids=[ids[row] for row in kept], labels=labels,
                    classes=classes, groups=groups, source=str(manifest), num_skipped=len(bad))


# ---------------------------------------------------------------------------------------------
# Array files


def _load_npz(path: Path, image_size: int, channels: int, label_column: str,
              group_columns: list[str] | None) -> ImageSet:
    """A .npz with images `x`, optional int labels `y` (or an array named `label_column`; -1 marks
    an unlabelled row) and optional 1-D group arrays named in `group_columns` (default: `group`).

    `x` is [N, H, W], [N, H, W, C] or [N, C, H, W] with C in (1, 3) (channels-last is assumed when
    the last axis could be either). Accepted values: uint8; other integers within 0-255; floats
    within [0, 1] (scaled by 255; an array whose values all lie in [0, 1] is read this way) or
    within [0, 255].
    """
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {key: archive[key] for key in archive.files}
    except Exception as err:  # zip, pickle and header errors all mean "not a usable .npz"
        raise SelfsupError(f"{path}: cannot read as a .npz archive ({type(err).__name__}: {err})") from None
    if "x" not in arrays:
        raise SelfsupError(f"{path}: no array 'x' holding the images; arrays present: "
                           f"{', '.join(arrays) or '(none)'}")
    x = arrays["x"]
    if x.ndim == 3:
        x = x[:, None]  # [N, 1, H, W]
    elif x.ndim == 4 and x.shape[3] in (1, 3):
        x = x.transpose(0, 3, 1, 2)  # [N, C, H, W]
    elif not (x.ndim == 4 and x.shape[1] in (1, 3)):
        raise SelfsupError(f"{path}: 'x' has shape {list(arrays['x'].shape)}; expected [N, H, W], "
                           "[N, H, W, C] or [N, C, H, W] with C = 1 or 3")
    N = x.shape[0]
    if N == 0:
        raise SelfsupError(f"{path}: 'x' holds no images")
    x = np.ascontiguousarray(_to_uint8(x, path))

    labels, classes = None, None
    y_key = "y" if "y" in arrays else (label_column if label_column in arrays else None)
    if y_key is not None:
        y = arrays[y_key]
        if y.shape != (N,) or not np.issubdtype(y.dtype, np.integer) or (y < -1).any():
            raise SelfsupError(f"{path}: '{y_key}' must be {N} integer labels >= 0 (-1 = unlabelled), "
                               f"got shape {list(y.shape)} of {y.dtype}")
        labels = torch.from_numpy(y.astype(np.int64))
        classes = [str(i) for i in range(int(y.max()) + 1)]
    if group_columns is None:
        group_columns = ["group"] if "group" in arrays else []
    groups: dict[str, list[str]] = {}
    for column in group_columns:
        if column not in arrays or arrays[column].shape != (N,):
            raise SelfsupError(f"{path}: group column '{column}' must be an array of {N} values; "
                               f"arrays present: {', '.join(arrays)}")
        groups[column] = [str(value) for value in arrays[column].tolist()]
    return ImageSet(images=images_from_array(x, image_size, channels),
                    ids=[f"{path.stem}:{i}" for i in range(N)], labels=labels, classes=classes,
                    groups=groups, source=str(path))


def _to_uint8(x: np.ndarray, path: Path) -> np.ndarray:
    if x.dtype == np.uint8:
        return x
    if np.issubdtype(x.dtype, np.integer):
        if x.min() < 0 or x.max() > 255:
            raise SelfsupError(f"{path}: integer 'x' must lie in 0-255, found {x.min()}..{x.max()}")
        return x.astype(np.uint8)
    if np.issubdtype(x.dtype, np.floating):
        if not np.isfinite(x).all():
            raise SelfsupError(f"{path}: 'x' contains NaN or infinite values")
        low, high = float(x.min()), float(x.max())
        if low < 0 or high > 255:
            raise SelfsupError(f"{path}: float 'x' must lie in [0, 1] or [0, 255], found {low:g}..{high:g}")
        scale = 255.0 if high <= 1.0 else 1.0
        return np.round(x.astype(np.float32) * scale).astype(np.uint8)
    raise SelfsupError(f"{path}: 'x' has dtype {x.dtype}; use uint8, integers in 0-255 or floats")
