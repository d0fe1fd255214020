"""Frozen-feature probes: parity with naive implementations and behaviour on known problems."""

import logging
import math
import warnings

import numpy as np
import pytest
import torch

from selfsup.adapt import probes
from selfsup.adapt.probes import (
    ProbeResult,
    extract_features,
    format_table,
    knn_accuracy,
    linear_probe_accuracy,
    probe_suite,
)
from selfsup.adapt.sampling import stratified_fraction
from selfsup.errors import SelfsupError


def _naive_knn_predict(train_x, train_y, test_x, k: int, temperature: float) -> torch.Tensor:
    """Wu et al. 2018 weighted vote, one query at a time in plain Python (float64)."""
    predictions = []
    for query in test_x.double():
        sims = []
        for j, row in enumerate(train_x.double()):
            cos = float(query @ row) / (float(query.norm()) * float(row.norm()))
            sims.append((cos, j))
        sims.sort(key=lambda pair: -pair[0])
        votes: dict[int, float] = {}
        for cos, j in sims[:k]:
            label = int(train_y[j])
            votes[label] = votes.get(label, 0.0) + math.exp(cos / temperature)
        # Ties go to the lowest class id, as torch.argmax does.
        predictions.append(max(sorted(votes), key=lambda label: votes[label]))
    return torch.tensor(predictions)


def _naive_1nn_predict(train_x, train_y, test_x) -> torch.Tensor:
    predictions = []
    for query in test_x.double():
        cos = [float(query @ row) / (float(query.norm()) * float(row.norm())) for row in train_x.double()]
        predictions.append(int(train_y[int(np.argmax(cos))]))
    return torch.tensor(predictions)


def _random_problem(num_train: int, num_test: int, dim: int, num_classes: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    train_x = torch.randn(num_train, dim, generator=g)
    train_y = torch.randint(0, num_classes, (num_train,), generator=g)
    test_x = torch.randn(num_test, dim, generator=g)
    test_y = torch.randint(0, num_classes, (num_test,), generator=g)
    return train_x, train_y, test_x, test_y


def _clusters(num_per_class: int, num_classes: int, dim: int, spread: float, seed: int):
    """Gaussian blobs (noise scale `spread`, noise drawn from `seed`) around fixed random centres,
    so calls with different seeds sample train and test sets of one problem."""
    centres = torch.randn(num_classes, dim, generator=torch.Generator().manual_seed(1234)) * 5
    y = torch.arange(num_classes).repeat_interleave(num_per_class)
    x = centres[y] + spread * torch.randn(len(y), dim, generator=torch.Generator().manual_seed(seed))
    return x, y


# --- kNN ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("k, temperature, chunk", [(5, 0.07, 7), (1, 0.07, 1024), (12, 0.5, 3)])
def test_knn_matches_naive_weighted_vote(k: int, temperature: float, chunk: int) -> None:
    train_x, train_y, test_x, _ = _random_problem(60, 25, 8, 4, seed=0)
    expected = _naive_knn_predict(train_x, train_y, test_x, k, temperature)
    # Labelling the test set with the naive predictions turns accuracy into a per-row parity check.
    assert knn_accuracy(train_x, train_y, test_x, expected, k=k, temperature=temperature, chunk=chunk) == 1.0
    # And the naive predictions are not trivially constant (the check above has teeth).
    assert len(expected.unique()) > 1


def test_knn_clips_k_to_train_size() -> None:
    train_x, train_y, test_x, _ = _random_problem(15, 20, 6, 3, seed=1)
    expected = _naive_knn_predict(train_x, train_y, test_x, 15, 0.1)
    assert knn_accuracy(train_x, train_y, test_x, expected, k=1000, temperature=0.1) == 1.0


def test_knn_perfect_on_separated_clusters_and_near_chance_on_random_labels() -> None:
    x, y = _clusters(40, 5, 16, spread=0.5, seed=2)
    test_x, test_y = _clusters(20, 5, 16, spread=0.5, seed=3)
    assert knn_accuracy(x, y, test_x, test_y, k=10) == 1.0

    train_x, train_y, test_x, test_y = _random_problem(400, 400, 16, 4, seed=4)
    accuracy = knn_accuracy(train_x, train_y, test_x, test_y, k=20)
    assert 0.15 < accuracy < 0.35  # chance is 0.25


def test_knn_tiny_temperature_is_one_nearest_neighbour() -> None:
    train_x, train_y, test_x, _ = _random_problem(80, 40, 8, 5, seed=5)
    one_nn = _naive_1nn_predict(train_x, train_y, test_x)
    assert knn_accuracy(train_x, train_y, test_x, one_nn, k=15, temperature=1e-4) == 1.0
    # A warm vote over 15 neighbours disagrees with 1-NN somewhere, so the check above can fail.
    assert knn_accuracy(train_x, train_y, test_x, one_nn, k=15, temperature=10.0) < 1.0


def test_knn_num_classes_and_bad_inputs() -> None:
    train_x, train_y, test_x, test_y = _random_problem(30, 10, 4, 3, seed=6)
    assert knn_accuracy(train_x, train_y, test_x, test_y, num_classes=10) == knn_accuracy(
        train_x, train_y, test_x, test_y
    )
    with pytest.raises(SelfsupError, match="num_classes"):
        knn_accuracy(train_x, train_y, test_x, test_y, num_classes=2)
    with pytest.raises(SelfsupError, match="width"):
        knn_accuracy(train_x, train_y, test_x[:, :3], test_y)
    with pytest.raises(SelfsupError, match="k"):
        knn_accuracy(train_x, train_y, test_x, test_y, k=0)
    with pytest.raises(SelfsupError, match="temperature"):
        knn_accuracy(train_x, train_y, test_x, test_y, temperature=0.0)
    with pytest.raises(SelfsupError, match="integer class"):
        knn_accuracy(train_x, train_y.float(), test_x, test_y)
    with pytest.raises(SelfsupError, match="train_y"):
        knn_accuracy(train_x, train_y[:-1], test_x, test_y)


# --- linear probe ------------------------------------------------------------------------------


def test_linear_probe_recovers_separable_problem() -> None:
    g = torch.Generator().manual_seed(7)
    w = torch.randn(10, 3, generator=g)
    x = torch.randn(300, 10, generator=g)
    y = (x @ w).argmax(dim=1)  # linearly separable by construction
    accuracy, chosen_c = linear_probe_accuracy(x[:200], y[:200], x[200:], y[200:], c_grid=(0.1, 10.0, 1000.0))
    assert accuracy >= 0.95
    assert chosen_c in (0.1, 10.0, 1000.0)


def test_linear_probe_falls_back_to_default_c_without_enough_examples_for_cv() -> None:
    x, y = _clusters(2, 3, 6, spread=0.3, seed=8)
    test_x, test_y = _clusters(5, 3, 6, spread=0.3, seed=8)
    accuracy, chosen_c = linear_probe_accuracy(x, y, test_x, test_y, c_grid=(0.01, 100.0))
    assert chosen_c == 1.0
    assert accuracy == 1.0


def test_linear_probe_standardises_with_train_statistics_only() -> None:
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    g = torch.Generator().manual_seed(9)
    y = torch.arange(2).repeat(100)
    x = torch.randn(200, 4, generator=g)
    x[:, 0] += 2.0 * y - 1.0  # the class lives in feature 0
    train_x, train_y, test_x, test_y = x[:120], y[:120], x[120:] + 3.0, y[120:]  # shifted test set

    accuracy, chosen_c = linear_probe_accuracy(train_x, train_y, test_x, test_y, c_grid=(1.0,))

    scaler = StandardScaler().fit(train_x.numpy())
    model = LogisticRegression(C=chosen_c, max_iter=1000).fit(scaler.transform(train_x.numpy()), train_y.numpy())
    with_train_stats = np.mean(model.predict(scaler.transform(test_x.numpy())) == test_y.numpy())
    with_test_stats = np.mean(
        model.predict(StandardScaler().fit_transform(test_x.numpy())) == test_y.numpy()
    )
    assert accuracy == pytest.approx(with_train_stats)
    # The shift moves everything to one side with train statistics; test statistics would hide it.
    assert with_test_stats > with_train_stats + 0.3


def test_linear_probe_rejects_single_class_and_bad_grid() -> None:
    x = torch.randn(10, 3)
    with pytest.raises(SelfsupError, match="single class"):
        linear_probe_accuracy(x, torch.zeros(10, dtype=torch.long), x, torch.zeros(10, dtype=torch.long))
    y = torch.arange(2).repeat(5)
    with pytest.raises(SelfsupError, match="c_grid"):
        linear_probe_accuracy(x, y, x, y, c_grid=(0.0, 1.0))
    with pytest.raises(SelfsupError, match="c_grid"):
        linear_probe_accuracy(x, y, x, y, c_grid=())


def test_linear_probe_reports_non_convergence_once(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(probes, "_convergence_warned", False)
    x, y = _clusters(10, 3, 8, spread=2.0, seed=10)
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.DEBUG, logger="selfsup.adapt.probes"):
        warnings.simplefilter("always")
        linear_probe_accuracy(x, y, x, y, max_iter=1)
        linear_probe_accuracy(x, y, x, y, max_iter=1)
    assert not [w for w in caught if "converge" in str(w.message).lower()]
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1
    assert len([r for r in caplog.records if r.levelno == logging.DEBUG]) >= 2


# --- feature extraction ------------------------------------------------------------------------


def test_extract_features_batches_preprocesses_and_returns_float32_cpu() -> None:
    torch.manual_seed(0)
    layer = torch.nn.Linear(4, 3)
    inputs = torch.randn(10, 4)
    batch_sizes = []

    def embed(batch: torch.Tensor) -> torch.Tensor:
        batch_sizes.append(len(batch))
        return layer(batch)

    features = extract_features(embed, inputs, batch_size=3, preprocess=lambda b: b * 2.0)
    assert batch_sizes == [3, 3, 3, 1]
    assert features.dtype == torch.float32 and features.device.type == "cpu"
    assert not features.requires_grad
    torch.testing.assert_close(features, layer(inputs * 2.0).detach())

    bf16 = extract_features(layer, inputs, batch_size=4, autocast_dtype=torch.bfloat16)
    assert bf16.dtype == torch.float32
    torch.testing.assert_close(bf16, layer(inputs).detach(), atol=0.05, rtol=0.05)


def test_extract_features_rejects_token_outputs() -> None:
    with pytest.raises(SelfsupError, match="embed"):
        extract_features(lambda b: b[:, None, :], torch.randn(5, 4))
    with pytest.raises(SelfsupError, match="batch_size"):
        extract_features(lambda b: b, torch.randn(5, 4), batch_size=0)


# --- suite and table ---------------------------------------------------------------------------


def test_probe_suite_runs_each_probe_on_nested_subsets() -> None:
    train_x, train_y = _clusters(30, 3, 8, spread=1.0, seed=11)
    test_x, test_y = _clusters(10, 3, 8, spread=1.0, seed=12)
    results = probe_suite("blobs", train_x, train_y, test_x, test_y, fractions=(0.1, 1.0), seed=3, k=5)
    assert [(r.label_fraction, r.probe) for r in results] == [
        (0.1, "linear"),
        (0.1, "knn"),
        (1.0, "linear"),
        (1.0, "knn"),
    ]
    assert [r.num_labels for r in results] == [9, 9, 90, 90]
    idx = torch.from_numpy(stratified_fraction(train_y, 0.1, seed=3))
    assert results[1].accuracy == knn_accuracy(train_x[idx], train_y[idx], test_x, test_y, k=5, num_classes=3)
    assert results[0].accuracy == linear_probe_accuracy(train_x[idx], train_y[idx], test_x, test_y, seed=3)[0]
    assert results[2].accuracy == 1.0 and results[3].accuracy == 1.0
    assert results[0].as_dict() == {
        "features": "blobs",
        "label_fraction": 0.1,
        "probe": "linear",
        "accuracy": results[0].accuracy,
        "num_labels": 9,
    }
    with pytest.raises(SelfsupError, match="unknown probe"):
        probe_suite("blobs", train_x, train_y, test_x, test_y, probes=("svm",))
    with pytest.raises(SelfsupError, match="fraction"):
        probe_suite("blobs", train_x, train_y, test_x, test_y, fractions=(0.5, 2.0))


def test_format_table_has_every_row_and_fraction() -> None:
    results = [
        ProbeResult(features, fraction, probe, accuracy, 10)
        for features, accuracy in (("raw", 0.5), ("simclr", 0.875))
        for fraction in (0.01, 0.1, 1.0)
        for probe in ("linear", "knn")
    ]
    results.append(ProbeResult("random", 1.0, "knn", 0.3333, 10))
    table = format_table(results)
    lines = table.splitlines()
    assert len(lines) == 1 + 5
    assert lines[0].split() == ["features", "probe", "1", "%", "10", "%", "100", "%"]
    assert lines[1].split() == ["raw", "linear", "50.0", "50.0", "50.0"]
    assert lines[4].split() == ["simclr", "knn", "87.5", "87.5", "87.5"]
    assert lines[5].split() == ["random", "knn", "-", "-", "33.3"]
    with pytest.raises(SelfsupError, match="two results"):
        format_table(results + [ProbeResult("raw", 0.1, "knn", 0.4, 10)])
