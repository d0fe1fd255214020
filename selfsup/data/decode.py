"""Decoding image files with Pillow, and the policy for files that cannot be decoded.

Each file becomes uint8 [channels, S, S]: its centred square is cropped on whole source pixels and
resized to S (bilinear), after EXIF orientation is applied. Colour: greyscale is ITU-R 601 luma as
Pillow computes it, transparent pixels are composited onto white, 16-bit and float images are
scaled to 8 bits. A file that cannot become an image raises `_BadFile` with a reason a user can
act on; `_decode_all` turns those into an error naming the file, or (on_bad="skip") drops them,
logs a summary and still fails once more than `max_bad_fraction` of the files are bad.

That policy (`_decode_files`, `_BadFile`, `_BadFilePolicy`) is shared with audio files
(`audio.py`), which name their files differently in its messages (`_FileKind`). `DecodedStream` is
the same policy over a stream of inputs (`data shard` checks every file of a source larger than
memory); `decode_image_bytes` decodes an image held in memory (a shard member) like a file.
"""

from __future__ import annotations

import io
import logging
import math
import os
import warnings
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from selfsup.errors import SelfsupError

logger = logging.getLogger("selfsup")
T = TypeVar("T")

# Pillow releases the GIL while decoding, so a few threads overlap decode with file I/O; more would
# only fight the other jobs on a small machine.
_MAX_DECODE_WORKERS = 4
# Bad-file summaries name this many files; a long list hides the pattern instead of showing it.
_NUM_NAMED = 5
# Inputs submitted ahead per decoding thread: enough to keep the threads busy, few enough that a
# source larger than memory streams through.
_IN_FLIGHT = 8


class _BadFile(Exception):
    """A file that cannot be decoded (an image, a clip); carries the reason a user reads."""


@dataclass
class _BadFilePolicy:
    on_bad: str
    max_bad_fraction: float


def check_bad_file_settings(on_bad: str, max_bad_fraction: float) -> None:
    """The `data.on_bad_file` / `data.max_bad_fraction` pair every source loader takes, checked once."""
    if on_bad not in ("error", "skip"):
        raise SelfsupError(f"on_bad_file must be 'error' or 'skip', got {on_bad!r}")
    if not 0.0 <= max_bad_fraction <= 1.0:
        raise SelfsupError(f"max_bad_fraction must lie in [0, 1], got {max_bad_fraction!r}")


def _decode(path: Path, image_size: int, channels: int) -> np.ndarray:
    """One file -> uint8 [channels, S, S], or _BadFile with a reason."""
    return _decode_image(path, image_size, channels)


def decode_image_bytes(data: bytes, image_size: int, channels: int) -> np.ndarray:
    """An encoded image held in memory (a shard member) -> uint8 [channels, S, S], or _BadFile with a
    reason: the same geometry, colour rules and checks as a file (`_decode`). The caller makes the
    pixel-limit warning an error (`pixel_limit_is_error`), as `_decode_all` does around its pool."""
    return _decode_image(io.BytesIO(data), image_size, channels)


@contextmanager
def pixel_limit_is_error() -> Iterator[None]:
    """Pillow's DecompressionBombWarning made an error (which `_decode_image` reports as `_BadFile`).
    catch_warnings is not thread-safe, so it is entered once around a pool or a loop, never per image."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        yield


def _decode_image(source: Path | io.BytesIO, image_size: int, channels: int) -> np.ndarray:
    """A file or an in-memory encoded image -> uint8 [channels, S, S], or _BadFile with a reason."""
    try:
        size = source.getbuffer().nbytes if isinstance(source, io.BytesIO) else source.stat().st_size
        if size == 0:
            raise _BadFile("empty file (0 bytes)")
        with Image.open(source) as im:
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


@dataclass(frozen=True)
class _FileKind:
    """How the files of one kind are named in the bad-file messages and the progress bar."""

    files: str  # "image files"
    nothing: str  # the error when every file is bad: "no usable images"
    title: str  # the progress bar's title: "decoding images"


IMAGE_FILES = _FileKind("image files", "no usable images", "decoding images")


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
    with pixel_limit_is_error():
        kept, arrays, bad = _decode_files(items, lambda path: _decode(path, image_size, channels), policy, progress,
                                          IMAGE_FILES)
    return kept, np.stack(arrays), bad


def _decode_files(
    items: list[tuple[Path, str]],
    decode: Callable[[Path], T],
    policy: _BadFilePolicy,
    progress: bool,
    kind: _FileKind,
) -> tuple[list[int], list[T], list[str]]:
    """Decode (path, display name) pairs with `decode` (which raises `_BadFile`) a few at a time;
    returns the kept row numbers, their decoded values and the bad files' names with reasons.

    Shared by images and audio: on_bad="error" stops at the first bad file, naming it; "skip" drops
    bad files, logs a summary, and still fails once more than `max_bad_fraction` of them are bad.
    """
    decoded = DecodedStream(items, len(items), decode, policy, progress, kind)
    kept: list[int] = []
    values: list[T] = []
    for row, value in decoded:
        kept.append(row)
        values.append(value)
    return kept, values, decoded.bad


@dataclass
class DecodedStream(Generic[T]):
    """(row, decoded value) of the kept inputs of `items` ((input, display name) pairs, any iterable
    of `num_items`), in order, decoded by `decode` on a few threads with a bounded number in flight,
    so that a source larger than memory streams through (`data shard` checks every file this way).

    The bad-file policy is `_decode_files`' (on_bad="error" stops at the first bad input, naming it;
    "skip" drops it, and fails once more than `max_bad_fraction` of `num_items` are bad); after the
    last row, `bad` holds the skipped names with reasons, and a summary is logged.
    """

    items: Iterable[tuple[Any, str]]
    num_items: int
    decode: Callable[[Any], T]
    policy: _BadFilePolicy
    progress: bool
    kind: _FileKind
    bad: list[str] = field(default_factory=list)

    def __iter__(self) -> Iterator[tuple[int, T]]:
        num_items, policy, bad = self.num_items, self.policy, self.bad
        # abort as soon as the bad fraction is certain to exceed the limit, not after decoding all
        max_bad = math.floor(policy.max_bad_fraction * num_items + 1e-9)  # 1e-9: 0.29 * 100 is 28.999...
        num_threads = min(_MAX_DECODE_WORKERS, os.cpu_count() or 1)
        bar = _progress_bar(num_items, self.kind.title) if self.progress else None
        pool = ThreadPoolExecutor(max_workers=num_threads)
        jobs: deque[tuple[int, str, Future]] = deque()
        num_kept = 0
        try:
            if bar is not None:
                bar[0].start()
            pending = enumerate(self.items)
            while True:
                while len(jobs) < _IN_FLIGHT * num_threads:  # keep the threads busy, memory bounded
                    nxt = next(pending, None)
                    if nxt is None:
                        break
                    row, (value, name) = nxt
                    jobs.append((row, name, pool.submit(self.decode, value)))
                if not jobs:
                    break
                row, name, job = jobs.popleft()
                try:
                    decoded = job.result()
                except _BadFile as err:
                    if policy.on_bad == "error":
                        raise SelfsupError(f"{name}: {err}; fix or remove it, "
                                           "or pass data.on_bad_file=skip") from None
                    bad.append(f"{name} ({err})")
                    if len(bad) > max_bad:
                        raise SelfsupError(
                            f"at least {len(bad)} of {num_items} {self.kind.files} "
                            f"({len(bad) / max(num_items, 1):.1%}) cannot be decoded, over the limit "
                            f"data.max_bad_fraction={policy.max_bad_fraction:g}; first: "
                            f"{'; '.join(bad[:_NUM_NAMED])}. Fix or remove them, or raise the limit"
                        ) from None
                else:
                    num_kept += 1
                    yield row, decoded
                finally:
                    if bar is not None:
                        bar[0].advance(bar[1])
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
            if bar is not None:
                bar[0].stop()
        if bad:
            more = f" and {len(bad) - _NUM_NAMED} more" if len(bad) > _NUM_NAMED else ""
            logger.warning("skipped %d of %d %s that cannot be decoded: %s%s",
                           len(bad), num_items, self.kind.files, "; ".join(bad[:_NUM_NAMED]), more)
        if not num_kept:
            raise SelfsupError(f"{self.kind.nothing}: every file failed to decode")


def _progress_bar(total: int, title: str) -> tuple[object, object]:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    bar = Progress(TextColumn(title), BarColumn(), MofNCompleteColumn(),
                   TimeRemainingColumn(), transient=True)
    return bar, bar.add_task("decode", total=total)
