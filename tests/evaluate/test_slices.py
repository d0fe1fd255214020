"""Slice discovery: a planted high-error blob is found, uniform errors report nothing, bad input fails clearly."""

import json

import numpy as np
import pytest
import torch
from scipy.stats import hypergeom

from selfsup.errors import SelfsupError
from selfsup.evaluate.slices import default_num_clusters, discover_slices, format_slices
from selfsup.evaluate.stats import holm

NUM_BLOBS, BLOB_SIZE, DIM = 6, 100, 32
PLANTED = 2  # the blob whose members the model gets wrong 60 % of the time


def _blobs(seed: int = 0, dim: int = DIM) -> tuple[np.ndarray, np.ndarray]:
    """[600, dim] embeddings of 6 well-separated Gaussian blobs and the blob of each row."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(NUM_BLOBS, dim)) * 3.0
    blob = np.repeat(np.arange(NUM_BLOBS), BLOB_SIZE)
    return centres[blob] + rng.normal(size=(len(blob), dim)), blob


def _planted_errors(blob: np.ndarray, seed: int = 0) -> np.ndarray:
    """correct flags: exactly 60 errors in the planted blob, exactly 5 in every other blob."""
    rng = np.random.default_rng(seed + 100)
    correct = np.ones(len(blob), dtype=bool)
    for b in range(NUM_BLOBS):
        rows = np.flatnonzero(blob == b)
        correct[rng.choice(rows, size=60 if b == PLANTED else 5, replace=False)] = False
    return correct


IDS = [f"img-{i:04d}" for i in range(NUM_BLOBS * BLOB_SIZE)]


def test_planted_high_error_blob_is_the_one_slice_found():
    x, blob = _blobs()
    correct = _planted_errors(blob)
    result = discover_slices(x, correct, IDS, num_clusters=NUM_BLOBS, num_examples=5)
    assert len(result["slices"]) == 1
    s = result["slices"][0]
    members = np.array(s["member_indices"])
    assert sorted(members.tolist()) == np.flatnonzero(blob == PLANTED).tolist()
    assert s["size"] == BLOB_SIZE and s["num_errors"] == 60 and s["error_rate"] == pytest.approx(0.6)
    assert s["overall_error_rate"] == pytest.approx(85 / 600)
    assert s["rest_error_rate"] == pytest.approx(25 / 500)
    assert s["lift"] == pytest.approx(0.6 / (85 / 600))
    assert s["p_holm"] <= 0.05 and s["p_holm"] >= s["p_value"]
    # Examples: misclassified members, in the order of member_indices (nearest the centroid first).
    assert len(s["example_ids"]) == 5
    wrong_members = [i for i in members if not correct[i]]
    assert s["example_ids"] == [IDS[i] for i in wrong_members[:5]]
    # Every cluster is summarised, and the result survives JSON.
    assert len(result["clusters"]) == NUM_BLOBS
    assert sum(c["size"] for c in result["clusters"]) == len(x)
    json.dumps(result)


def test_members_are_sorted_nearest_the_centroid_first():
    x, blob = _blobs()
    s = discover_slices(x, _planted_errors(blob), IDS, num_clusters=NUM_BLOBS)["slices"][0]
    members = s["member_indices"]
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    distance = np.linalg.norm(xn[members] - xn[members].mean(axis=0), axis=1)
    assert np.all(np.diff(distance) >= -1e-9)


def test_p_value_is_the_one_sided_hypergeometric_tail():
    # Fisher's one-sided exact test: P(X >= errors in the cluster) with X hypergeometric over the
    # N rows, num_errors "successes", size draws.
    x, blob = _blobs()
    correct = _planted_errors(blob)
    result = discover_slices(x, correct, IDS, num_clusters=NUM_BLOBS)
    for c in result["clusters"]:
        expected = hypergeom.sf(c["num_errors"] - 1, len(x), int((~correct).sum()), c["size"])
        assert c["p_value"] == pytest.approx(expected, rel=1e-9, abs=1e-300)


def test_default_cluster_count_still_finds_the_blob_and_nothing_else():
    x, blob = _blobs()
    result = discover_slices(x, _planted_errors(blob), IDS)
    assert result["settings"]["num_clusters"] == default_num_clusters(len(x)) == 17
    assert result["slices"]
    for s in result["slices"]:
        assert np.mean(blob[s["member_indices"]] == PLANTED) > 0.9
    found = {i for s in result["slices"] for i in s["member_indices"]}
    assert len(found & set(np.flatnonzero(blob == PLANTED))) >= 50
    rates = [s["error_rate"] for s in result["slices"]]
    assert rates == sorted(rates, reverse=True)


def test_pca_path_for_wide_embeddings():
    x, blob = _blobs(dim=96)
    result = discover_slices(torch.from_numpy(x).float(), torch.from_numpy(_planted_errors(blob)), IDS,
                             num_clusters=NUM_BLOBS)
    assert result["settings"]["pca_dim"] == 50
    assert [sorted(s["member_indices"]) for s in result["slices"]] == [np.flatnonzero(blob == PLANTED).tolist()]


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_uniform_errors_report_no_slice(seed):
    x, _ = _blobs(seed)
    correct = np.random.default_rng(seed + 7).random(len(x)) >= 0.1
    for num_clusters in (NUM_BLOBS, None):
        result = discover_slices(x, correct, IDS, num_clusters=num_clusters, seed=seed)
        assert result["slices"] == []
        assert "no cluster" in format_slices(result)


def test_no_errors_at_all_reports_no_slice():
    x, _ = _blobs()
    result = discover_slices(x, np.ones(len(x), dtype=bool), IDS, num_clusters=NUM_BLOBS)
    assert result["slices"] == [] and all(c["p_value"] == 1.0 for c in result["clusters"])


def test_small_clusters_are_not_tested():
    x, blob = _blobs()
    result = discover_slices(x, _planted_errors(blob), IDS, num_clusters=NUM_BLOBS, min_size=BLOB_SIZE + 1)
    assert result["slices"] == [] and result["settings"]["num_tested"] == 0
    assert all(c["p_value"] is None and c["p_holm"] is None for c in result["clusters"])


def test_holm_matches_hand_computation():
    # sorted: 0.005*4 = 0.02, 0.01*3 = 0.03, 0.03*2 = 0.06, 0.04*1 = 0.04 -> running max 0.06
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])


def test_format_lists_slice_and_examples():
    x, blob = _blobs()
    result = discover_slices(x, _planted_errors(blob), IDS, num_clusters=NUM_BLOBS)
    text = format_slices(result)
    s = result["slices"][0]
    assert "60.0%" in text and s["example_ids"][0] in text and "Holm" in text


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(embeddings=np.zeros(600)), r"\[N, D\] matrix"),
        (dict(correct=np.ones(599, dtype=bool)), "one flag per embedding row"),
        (dict(correct=np.full(600, 2)), "other than 0/1"),
        (dict(correct=np.full(600, 0.5)), "booleans"),
        (dict(ids=IDS[:-1]), "599 ids for 600"),
        (dict(num_clusters=301), r"lower num_clusters \(--clusters\) to at most 300"),
        (dict(num_clusters=1), "integer >= 2"),
        (dict(alpha=0.0), r"alpha .* \(0, 1\)"),
        (dict(min_size=0), "min_size"),
        (dict(num_examples=-1), "num_examples"),
    ],
)
def test_bad_input_raises_actionable_error(change, message):
    x, blob = _blobs()
    kwargs = dict(embeddings=x, correct=_planted_errors(blob), ids=IDS, num_clusters=NUM_BLOBS) | change
    with pytest.raises(SelfsupError, match=message):
        discover_slices(**kwargs)


def test_nan_embeddings_and_tiny_sets_are_refused():
    x, blob = _blobs()
    x[3, 1] = np.nan
    with pytest.raises(SelfsupError, match="NaN or infinite values in 1 of 600"):
        discover_slices(x, _planted_errors(blob), IDS)
    with pytest.raises(SelfsupError, match="at least 4"):
        discover_slices(np.eye(3), np.ones(3, dtype=bool), ["a", "b", "c"])
