"""Representation diagnostics: parity with naive loops from the papers' equations, and known extremes."""

import json
import math

import numpy as np
import pytest
import torch

from selfsup.errors import SelfsupError
from selfsup.evaluate import representation
from selfsup.evaluate.representation import (
    alignment,
    effective_rank,
    format_diagnostics,
    group_predictability,
    knn_chance_agreement,
    knn_label_agreement,
    representation_diagnostics,
    uniformity,
)


def _normalise(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


def _naive_alignment(a: np.ndarray, b: np.ndarray, alpha: float) -> float:
    """Wang & Isola 2020 eq. 2, one pair at a time."""
    total = 0.0
    for i in range(len(a)):
        total += np.linalg.norm(_normalise(a[i]) - _normalise(b[i])) ** alpha
    return total / len(a)


def _naive_uniformity(z: np.ndarray, t: float) -> float:
    """Wang & Isola 2020 eq. 3 over every unordered pair of distinct rows."""
    total, count = 0.0, 0
    for i in range(len(z)):
        for j in range(i + 1, len(z)):
            total += math.exp(-t * np.sum((_normalise(z[i]) - _normalise(z[j])) ** 2))
            count += 1
    return math.log(total / count)


def _naive_knn_agreement(z: np.ndarray, labels: np.ndarray, k: int) -> float:
    """For each point, sort every other point by cosine similarity and count label matches in the top k."""
    fractions = []
    for i in range(len(z)):
        sims = [(float(_normalise(z[i]) @ _normalise(z[j])), j) for j in range(len(z)) if j != i]
        top = [j for _, j in sorted(sims, reverse=True)[:k]]
        fractions.append(np.mean([labels[j] == labels[i] for j in top]))
    return float(np.mean(fractions))


def _blobs(num_classes: int, per_class: int, dim: int, spread: float, seed: int = 0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(num_classes, dim)) * spread
    y = np.repeat(np.arange(num_classes), per_class)
    return centres[y] + rng.normal(size=(len(y), dim)), y


@pytest.mark.parametrize("alpha", [2.0, 1.0, 0.5])
def test_alignment_matches_naive_loop(alpha):
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(17, 6)), rng.normal(size=(17, 6))
    assert alignment(a, b, alpha=alpha) == pytest.approx(_naive_alignment(a, b, alpha), rel=1e-10)


def test_alignment_is_zero_for_identical_and_rescaled_pairs():
    z = np.random.default_rng(1).normal(size=(30, 8))
    assert alignment(z, z) == 0.0
    assert alignment(z, 3.0 * z) == pytest.approx(0.0, abs=1e-12)  # on the sphere, scale is irrelevant
    assert alignment(z, -z) == pytest.approx(4.0)  # antipodal: ||2 u||^2


@pytest.mark.parametrize("t", [2.0, 0.7])
def test_uniformity_matches_naive_loop(t):
    z = np.random.default_rng(2).normal(size=(25, 5))
    assert uniformity(z, t=t) == pytest.approx(_naive_uniformity(z, t), rel=1e-10)


def test_uniformity_is_zero_when_collapsed_and_negative_when_spread():
    collapsed = np.ones((40, 16)) * np.linspace(0.5, 2.0, 40)[:, None]  # one direction, any length
    assert uniformity(collapsed) == pytest.approx(0.0, abs=1e-12)
    spread = np.random.default_rng(3).normal(size=(400, 64))
    # Uniform on a high-dimensional sphere: ||u - v||^2 ~ 2, so log E exp(-2 * 2) ~ -4.
    assert -4.2 < uniformity(spread) < -3.5


def test_uniformity_subsample_is_seeded_and_close_to_the_full_value():
    z = np.random.default_rng(4).normal(size=(300, 8))
    full = uniformity(z)
    a, b = uniformity(z, max_rows=100, seed=0), uniformity(z, max_rows=100, seed=1)
    assert a == uniformity(z, max_rows=100, seed=0)
    assert a != b
    assert abs(a - full) < 0.15 and abs(b - full) < 0.15


@pytest.mark.parametrize("rank", [1, 4, 8])
def test_effective_rank_of_rank_k_data_is_about_k(rank):
    rng = np.random.default_rng(rank)
    basis = np.linalg.qr(rng.normal(size=(32, rank)))[0].T  # [rank, 32] orthonormal rows
    z = rng.normal(size=(3000, rank)) @ basis  # [3000, 32], rank `rank`
    assert effective_rank(z) == pytest.approx(rank, rel=0.08)


def test_knn_agreement_matches_naive_loop_across_chunks(monkeypatch):
    z = np.random.default_rng(5).normal(size=(40, 6))
    y = np.random.default_rng(6).integers(0, 3, size=40)
    expected = _naive_knn_agreement(z, y, k=5)
    assert knn_label_agreement(z, y, k=5) == pytest.approx(expected, rel=1e-12)
    monkeypatch.setattr(representation, "KNN_CHUNK", 7)  # rows split over several chunks
    assert knn_label_agreement(z, y, k=5) == pytest.approx(expected, rel=1e-12)


def test_knn_agreement_is_one_for_separated_blobs_and_chance_for_random_labels():
    z, y = _blobs(num_classes=3, per_class=50, dim=8, spread=10.0)
    assert knn_label_agreement(z, y, k=10) == 1.0
    assert knn_label_agreement(z, [f"class-{c}" for c in y], k=10) == 1.0  # any label type
    rng = np.random.default_rng(7)
    z_random, y_random = rng.normal(size=(600, 16)), rng.integers(0, 3, size=600)
    chance = knn_chance_agreement(y_random)
    assert chance == pytest.approx(1 / 3, abs=0.01)
    assert knn_label_agreement(z_random, y_random, k=10) == pytest.approx(chance, abs=0.04)


def test_group_predictability_detects_a_planted_group_direction():
    rng = np.random.default_rng(8)
    groups = rng.choice(["site-a", "site-b", "site-c"], size=300)
    z = rng.normal(size=(300, 16))
    direction = {"site-a": 0, "site-b": 1, "site-c": 2}
    z[np.arange(300), [direction[g] for g in groups]] += 4.0  # each site shifts its own coordinate
    result = group_predictability(z, groups)
    assert result["balanced_accuracy"] > 0.95
    assert result["chance"] == pytest.approx(1 / 3) and result["num_groups"] == 3 and result["folds"] == 5
    assert result["note"] is None and result["num_dropped"] == 0


def test_group_predictability_is_near_chance_for_random_groups():
    rng = np.random.default_rng(9)
    z, groups = rng.normal(size=(300, 16)), rng.choice(["a", "b", "c"], size=300)
    result = group_predictability(torch.from_numpy(z).float(), groups)
    assert abs(result["balanced_accuracy"] - 1 / 3) < 0.1


def test_small_groups_are_merged_or_dropped():
    rng = np.random.default_rng(10)
    z = rng.normal(size=(60, 4))
    base = ["a"] * 27 + ["b"] * 27
    merged = group_predictability(z, base + ["c"] * 3 + ["d"] * 3)  # 3 + 3 >= 5: one "(other)" group
    assert merged["num_groups"] == 3 and merged["merged"] == ["c", "d"] and merged["num_dropped"] == 0
    assert "merged into (other)" in merged["note"] and merged["num_rows"] == 60
    dropped = group_predictability(z[:57], base + ["c"] * 3)  # 3 < 5 even merged: left out
    assert dropped["num_groups"] == 2 and dropped["num_dropped"] == 3 and "dropped" in dropped["note"]
    with pytest.raises(SelfsupError, match="fewer than 2 groups"):
        group_predictability(z, ["a"] * 58 + ["b"] * 2)


def test_a_collapsed_representation_is_flagged_in_the_summary():
    """Embeddings that all point the same way (normalised std far below 1) are called collapsed in the
    summary, with the training-time thresholds, not left as one number among others (issue 17)."""
    rng = np.random.default_rng(0)
    collapsed = np.ones((60, 16)) + 1e-3 * rng.normal(size=(60, 16))
    d = representation_diagnostics(collapsed)
    assert d["normalised_std"] < 0.05 and "normalised std" in d["collapse"]
    text = format_diagnostics(d)
    assert text.splitlines()[1].startswith("COLLAPSED:") and "normalised std" in text.splitlines()[1]
    one_direction = np.outer(rng.normal(size=60), rng.normal(size=16))  # rank one, but spread along it
    assert "effective rank" in representation_diagnostics(one_direction)["collapse"]
    json.dumps(d)


def test_diagnostics_combine_what_applies_and_serialise():
    z, y = _blobs(num_classes=3, per_class=40, dim=8, spread=6.0)
    plain = representation_diagnostics(z)
    assert set(plain) == {"num_rows", "dim", "uniformity", "effective_rank", "normalised_std", "collapse"}
    assert plain["collapse"] is None and "COLLAPSED" not in format_diagnostics(plain)
    assert plain["effective_rank"] == pytest.approx(effective_rank(z))
    rng = np.random.default_rng(11)
    views = z + 0.1 * rng.normal(size=z.shape)
    full = representation_diagnostics(
        torch.from_numpy(z),
        labels=y,
        groups={"site": rng.choice(["x", "y"], size=len(z)).tolist(), "constant": ["k"] * len(z)},
        pairs=(z, views),
        k=5,
    )
    assert full["alignment"] == pytest.approx(alignment(z, views)) and full["num_pairs"] == len(z)
    assert full["knn_label_agreement"] == pytest.approx(knn_label_agreement(z, y, k=5))
    assert full["groups"]["site"]["num_groups"] == 2
    assert "fewer than 2 groups" in full["groups"]["constant"]["skipped"]
    by_index = representation_diagnostics(z, pairs=(np.arange(0, 40), np.arange(40, 80)))
    assert by_index["alignment"] == pytest.approx(alignment(z[:40], z[40:80]))
    json.dumps(full)
    text = format_diagnostics(full)
    for word in ("uniformity", "alignment", "kNN agreement", "group 'site'", "group 'constant': skipped"):
        assert word in text


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda z: alignment(z, z[:-1]), "same shape"),
        (lambda z: uniformity(z[0]), r"\[N, D\] matrix"),
        (lambda z: uniformity(np.full((3, 2), np.inf)), "NaN or infinite"),
        (lambda z: knn_label_agreement(z, np.zeros(len(z) - 1)), "one per example"),
        (lambda z: knn_label_agreement(z, np.zeros(len(z)), k=len(z)), "lower k"),
        (lambda z: group_predictability(z, ["a", "b"] * (len(z) // 2), folds=1), "folds"),
        (lambda z: representation_diagnostics(z, pairs=(np.array([0, 99]), np.array([1, 2]))), r"\[0, 20\)"),
        (lambda z: representation_diagnostics(z, pairs=(z,)), "tuple"),
    ],
)
def test_bad_input_raises_actionable_error(call, message):
    z = np.random.default_rng(12).normal(size=(20, 4))
    with pytest.raises(SelfsupError, match=message):
        call(z)
