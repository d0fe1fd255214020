"""Label-budget subsets: exact per-class counts, coverage, determinism and nesting."""

import logging
import math

import numpy as np
import pytest
import torch

from selfsup.adapt.sampling import k_shot, stratified_fraction
from selfsup.errors import SelfsupError


def _labels(counts: dict[int, int], seed: int = 0) -> np.ndarray:
    """Shuffled labels with the given number of examples per class."""
    labels = np.concatenate([np.full(n, c) for c, n in counts.items()])
    return np.random.default_rng(seed).permutation(labels)


def _per_class(labels: np.ndarray, idx: np.ndarray) -> dict[int, int]:
    values, counts = np.unique(labels[idx], return_counts=True)
    return {int(v): int(n) for v, n in zip(values, counts)}


COUNTS = {3: 100, 7: 50, 42: 20, 5: 7}  # non-contiguous class ids on purpose


@pytest.mark.parametrize("fraction", [0.01, 0.1, 0.3, 0.5, 0.77])
def test_stratified_fraction_keeps_rounded_share_of_every_class(fraction: float) -> None:
    labels = _labels(COUNTS)
    idx = stratified_fraction(labels, fraction, seed=0)
    expected = {c: max(1, math.floor(fraction * n + 0.5)) for c, n in COUNTS.items()}
    assert _per_class(labels, idx) == expected
    assert idx.dtype == np.int64
    assert np.all(np.diff(idx) > 0), "indices must be sorted and unique"
    assert idx.min() >= 0 and idx.max() < len(labels)


def test_one_percent_of_small_ten_class_set_covers_every_class() -> None:
    labels = _labels({c: 10 for c in range(10)})
    idx = stratified_fraction(labels, 0.01, seed=3)
    assert _per_class(labels, idx) == {c: 1 for c in range(10)}


def test_full_fraction_returns_everything() -> None:
    labels = _labels(COUNTS)
    np.testing.assert_array_equal(stratified_fraction(labels, 1.0, seed=5), np.arange(len(labels)))


def test_seeded_determinism_and_seed_dependence() -> None:
    labels = _labels(COUNTS)
    a = stratified_fraction(labels, 0.2, seed=11)
    np.testing.assert_array_equal(a, stratified_fraction(labels, 0.2, seed=11))
    assert not np.array_equal(a, stratified_fraction(labels, 0.2, seed=12))


def test_tensor_and_array_labels_give_the_same_subset() -> None:
    labels = _labels(COUNTS)
    np.testing.assert_array_equal(
        stratified_fraction(torch.from_numpy(labels), 0.2, seed=4), stratified_fraction(labels, 0.2, seed=4)
    )


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_subsets_are_nested_across_fractions(seed: int) -> None:
    labels = _labels(COUNTS, seed=seed)
    fractions = [0.01, 0.05, 0.1, 0.25, 0.5, 0.9, 1.0]
    subsets = [set(stratified_fraction(labels, f, seed).tolist()) for f in fractions]
    for smaller, larger in zip(subsets, subsets[1:]):
        assert smaller <= larger
        assert len(smaller) <= len(larger)


@pytest.mark.parametrize("fraction", [0.0, -0.1, 1.5, float("nan"), float("inf"), True, "0.5", None])
def test_bad_fraction_is_rejected(fraction) -> None:
    with pytest.raises(SelfsupError, match="fraction"):
        stratified_fraction(_labels(COUNTS), fraction, seed=0)


def test_bad_labels_are_rejected() -> None:
    with pytest.raises(SelfsupError, match="1-D"):
        stratified_fraction(np.zeros((4, 3)), 0.5, seed=0)
    with pytest.raises(SelfsupError, match="empty"):
        stratified_fraction(np.array([], dtype=np.int64), 0.5, seed=0)


def test_k_shot_counts_and_short_classes_warning(caplog: pytest.LogCaptureFixture) -> None:
    labels = _labels({0: 10, 1: 5, 2: 2})
    with caplog.at_level(logging.WARNING, logger="selfsup.adapt.sampling"):
        idx = k_shot(labels, 3, seed=0)
    assert _per_class(labels, idx) == {0: 3, 1: 3, 2: 2}
    assert np.all(np.diff(idx) > 0)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "2 (2)" in warnings[0].getMessage()


def test_k_shot_no_warning_when_every_class_is_large_enough(caplog: pytest.LogCaptureFixture) -> None:
    labels = _labels({0: 10, 1: 5})
    with caplog.at_level(logging.WARNING, logger="selfsup.adapt.sampling"):
        idx = k_shot(torch.from_numpy(labels), 5, seed=1)
    assert _per_class(labels, idx) == {0: 5, 1: 5}
    assert not caplog.records


def test_k_shot_nested_deterministic_and_validated() -> None:
    labels = _labels(COUNTS)
    one, five = set(k_shot(labels, 1, seed=9).tolist()), set(k_shot(labels, 5, seed=9).tolist())
    assert one <= five
    np.testing.assert_array_equal(k_shot(labels, 5, seed=9), k_shot(labels, 5, seed=9))
    for bad in (0, -2, 1.5, True):
        with pytest.raises(SelfsupError, match="k"):
            k_shot(labels, bad, seed=0)
