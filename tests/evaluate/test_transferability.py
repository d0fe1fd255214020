"""Transferability scores: LogME parity with the paper's equations, ranking sanity, budgets, Kendall tau."""

import math
import time

import numpy as np
import pytest
from scipy.stats import kendalltau

from selfsup.errors import SelfsupError
from selfsup.evaluate import transferability
from selfsup.evaluate.transferability import (
    format_ranking,
    kendall_tau,
    knn_score,
    linear_cv_score,
    logme,
    score_accuracy_tau,
    score_bases,
)


def _naive_logme(F: np.ndarray, labels: np.ndarray, tol: float = 1e-3, max_iter: int = 1000) -> float:
    """LogME from the paper's equations (You et al. 2021, Algorithm 1), with dense D x D matrices.

    For each class's one-hot column y: A = alpha I + beta F^T F, m = beta A^-1 F^T y,
    gamma = sum beta sigma_i / (alpha + beta sigma_i) (sigma_i eigenvalues of F^T F),
    alpha <- gamma / m^T m, beta <- (N - gamma) / ||F m - y||^2 until alpha / beta settles; then
    L = N/2 log beta + D/2 log alpha - N/2 log 2 pi - beta/2 ||F m - y||^2 - alpha/2 m^T m - 1/2 log|A|,
    divided by N and averaged over classes. The 1e-5 guards the reference adds to the update
    denominators are kept so the iterates are the same sequence.
    """
    N, D = F.shape
    gram = F.T @ F
    sigma = np.linalg.eigvalsh(gram)
    evidences = []
    for c in np.unique(labels):
        y = (labels == c).astype(np.float64)

        def posterior_mean(alpha, beta):
            A = alpha * np.eye(D) + beta * gram
            return beta * np.linalg.solve(A, F.T @ y), A

        alpha, beta = 1.0, 1.0
        for _ in range(max_iter):
            lam = alpha / beta
            m, _ = posterior_mean(alpha, beta)
            gamma = np.sum(beta * sigma / (alpha + beta * sigma))
            alpha = gamma / (m @ m + 1e-5)
            beta = (N - gamma) / (np.sum((F @ m - y) ** 2) + 1e-5)
            if abs(alpha / beta - lam) / lam <= tol:
                break
        m, A = posterior_mean(alpha, beta)
        sign, log_det = np.linalg.slogdet(A)
        assert sign > 0
        evidence = (N / 2 * math.log(beta) + D / 2 * math.log(alpha) - N / 2 * math.log(2 * math.pi)
                    - beta / 2 * np.sum((F @ m - y) ** 2) - alpha / 2 * (m @ m) - log_det / 2)
        evidences.append(evidence / N)
    return float(np.mean(evidences))


def _separable(num_items: int = 90, num_classes: int = 3, dim: int = 16, signal: float = 3.0, seed: int = 0):
    """Features whose first dimensions encode the class (scaled by `signal`) plus Gaussian noise."""
    rng = np.random.default_rng(seed)
    labels = np.arange(num_items) % num_classes
    x = rng.normal(size=(num_items, dim))
    x[np.arange(num_items), labels] += signal
    return x, labels


@pytest.mark.parametrize("N, D", [(200, 16), (40, 96), (64, 64)])
def test_logme_matches_paper_equations(N, D):
    rng = np.random.default_rng(N + D)
    F = rng.normal(size=(N, D))
    labels = rng.integers(0, 4, N)
    # Same stopping rule: the same iterates, so agreement is to round-off.
    assert logme(F, labels) == pytest.approx(_naive_logme(F, labels), abs=1e-8)
    # The default tolerance is converged: the fixed point iterated far tighter moves it < 1e-4.
    assert logme(F, labels) == pytest.approx(_naive_logme(F, labels, tol=1e-10, max_iter=5000), abs=1e-4)
    # max_iter=11 reproduces the reference implementation's truncation.
    assert logme(F, labels, max_iter=11) == pytest.approx(_naive_logme(F, labels, max_iter=11), abs=1e-8)


def test_logme_rank_deficient_features_count_every_zero_eigenvalue():
    # N > D, but duplicated columns make rank(F) = 6 < D = 12: the 6 zero eigenvalues of F^T F
    # still each put log(alpha) into log|A| (the term the reference's fast path drops for N < D).
    rng = np.random.default_rng(3)
    base = rng.normal(size=(120, 6))
    F = np.concatenate([base, base @ rng.normal(size=(6, 6))], axis=1)
    labels = rng.integers(0, 3, 120)
    assert logme(F, labels) == pytest.approx(_naive_logme(F, labels), abs=1e-6)


def test_logme_ranks_informative_features_above_random():
    informative, labels = _separable(signal=3.0)
    weak, _ = _separable(signal=1.0, seed=1)
    random = np.random.default_rng(2).normal(size=informative.shape)
    scores = [logme(x, labels) for x in (informative, weak, random)]
    assert scores[0] > scores[1] > scores[2]


def test_logme_invariances():
    x, labels = _separable(num_items=60, dim=24)  # N > D
    wide, wide_labels = _separable(num_items=30, dim=48)  # N < D
    perm = np.random.default_rng(0).permutation(len(x))
    assert logme(x[perm], labels[perm]) == pytest.approx(logme(x, labels), abs=1e-10)
    # Class ids are names: other values, same partition, same score.
    assert logme(x, labels * 7 + 3) == pytest.approx(logme(x, labels), abs=1e-12)
    # An orthogonal rotation of feature space leaves a Gaussian-prior linear model's evidence unchanged.
    q, _ = np.linalg.qr(np.random.default_rng(1).normal(size=(48, 48)))
    assert logme(wide @ q, wide_labels) == pytest.approx(logme(wide, wide_labels), abs=1e-8)
    # float32 features (what extract_features returns) are promoted, not truncated.
    assert logme(x.astype(np.float32), labels) == pytest.approx(logme(x.astype(np.float32).astype(np.float64), labels))


def test_bad_input_is_rejected():
    x, labels = _separable(num_items=30)
    with pytest.raises(SelfsupError, match="at least two classes"):
        logme(x, np.zeros(30, dtype=int))
    with pytest.raises(SelfsupError, match="30 rows but there are 29 labels"):
        logme(x, labels[:29])
    bad = x.copy()
    bad[4, 2] = np.nan
    with pytest.raises(SelfsupError, match="NaN or infinite values in 1 of 30 rows"):
        logme(bad, labels)
    with pytest.raises(SelfsupError, match="integer class indices"):
        logme(x, labels.astype(float))
    with pytest.raises(SelfsupError, match=r"\[N, D\]"):
        logme(x[:, 0], labels)
    with pytest.raises(SelfsupError, match="all zero"):
        logme(np.zeros((30, 4)), labels)
    with pytest.raises(SelfsupError, match=r"classes 1, 2 have a single labelled example"):
        knn_score(x[:4], np.array([0, 0, 1, 2]))


def test_knn_and_linear_cv_scores_prefer_informative_features():
    informative, labels = _separable(num_items=60, signal=4.0)
    random = np.random.default_rng(5).normal(size=informative.shape)
    assert knn_score(informative, labels, k=5, folds=3) > 0.9 > 0.6 > knn_score(random, labels, k=5, folds=3)
    good = linear_cv_score(informative, labels, folds=3, c_grid=(1.0,))
    bad = linear_cv_score(random, labels, folds=3, c_grid=(1.0,))
    assert good > 0.9 and bad < 0.6


def _candidates():
    strong, labels = _separable(num_items=60, signal=4.0, dim=12)
    weak, _ = _separable(num_items=60, signal=1.5, dim=20, seed=1)
    random = np.random.default_rng(9).normal(size=(60, 8))
    # Given worst first so the ranking has to reorder them.
    return {"random": random, "weak": weak, "strong": strong}, labels


def test_score_bases_ranks_and_times_every_score():
    candidates, labels = _candidates()
    results = score_bases(candidates, labels, folds=3, k=5, c_grid=(0.1, 1.0))
    assert [r["name"] for r in results] == ["strong", "weak", "random"]
    for r, rank in zip(results, (1, 2, 3)):
        assert r["skipped"] == {}
        assert r["ranks"] == {"logme": rank, "knn": rank, "linear_cv": rank}
        assert all(r["seconds"][s] > 0 for s in ("logme", "knn", "linear_cv"))
    assert results[0]["scores"]["logme"] == pytest.approx(logme(candidates["strong"], labels))
    table = format_ranking(results)
    assert table.splitlines()[0].split() == ["base", "logme", "knn", "linear_cv"]
    assert "(#1," in table and "skipped" not in table
    # Validation against post-adaptation accuracy: a score ordering bases as adaptation does -> tau 1.
    taus = score_accuracy_tau(results, {"strong": 0.9, "weak": 0.7, "random": 0.4})
    assert taus["logme"] == pytest.approx(1.0)
    # Two bases are never "ranked": tau is +1 or -1 by which came first, so it is not given.
    assert score_accuracy_tau(results, {"strong": 0.9, "weak": 0.7}) == {"logme": None, "knn": None, "linear_cv": None}


def test_tiny_budget_skips_the_expensive_score_and_says_so():
    candidates, labels = _candidates()
    # linear_cv goes second so that it is the *estimate*, not time already spent, that skips it.
    results = score_bases(candidates, labels, scores=("logme", "linear_cv"), budget_s=0.05, folds=3)
    for r in results:
        assert r["scores"]["logme"] is not None  # ~1 ms each
        assert r["scores"]["linear_cv"] is None and r["seconds"]["linear_cv"] is None
        assert r["ranks"]["linear_cv"] is None
        assert r["skipped"]["linear_cv"].startswith("over budget: estimated")
    assert [r["name"] for r in results][0] == "strong"
    assert "skipped" in format_ranking(results)
    assert "linear_cv: over budget" in format_ranking(results)
    nothing = score_bases(candidates, labels, scores=("logme",), budget_s=0.0)
    assert all(r["scores"]["logme"] is None and "over budget" in r["skipped"]["logme"] for r in nothing)


def test_budget_running_out_part_way_ranks_no_base(monkeypatch):
    candidates, labels = _candidates()
    calls = []

    def slow_first_logme(features, labels):
        calls.append(len(features))
        if len(calls) == 1:
            time.sleep(0.2)  # the first base overruns the whole budget
        return float(features.shape[1])

    monkeypatch.setattr(transferability, "logme", slow_first_logme)
    results = score_bases(candidates, labels, scores=("logme",), budget_s=0.1)
    assert len(calls) == 1
    computed = [r for r in results if r["scores"]["logme"] is not None]
    assert [r["name"] for r in computed] == ["random"]
    assert all(r["ranks"]["logme"] is None for r in results)
    assert all("over budget" in r["skipped"]["logme"] for r in results if r["name"] != "random")
    assert "logme: computed for 1 of 3 bases, so not ranked" in format_ranking(results)


def test_score_bases_rejects_bad_requests():
    candidates, labels = _candidates()
    with pytest.raises(SelfsupError, match="unknown score"):
        score_bases(candidates, labels, scores=("logme", "hscore"))
    with pytest.raises(SelfsupError, match="budget_s"):
        score_bases(candidates, labels, budget_s=-1.0)
    with pytest.raises(SelfsupError, match="features of 'short'"):
        score_bases({**candidates, "short": candidates["weak"][:50]}, labels)


@pytest.mark.parametrize("seed", range(5))
def test_kendall_tau_matches_scipy(seed):
    rng = np.random.default_rng(seed)
    a, b = rng.normal(size=12), rng.normal(size=12)
    assert kendall_tau(a, b) == pytest.approx(kendalltau(a, b).statistic, abs=1e-12)
    # Heavy ties in both: tau-b's tie correction.
    a, b = rng.integers(0, 3, 15), rng.integers(0, 4, 15)
    assert kendall_tau(a, b) == pytest.approx(kendalltau(a, b).statistic, abs=1e-12)


def test_kendall_tau_edge_cases():
    assert kendall_tau([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert kendall_tau([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert math.isnan(kendall_tau([1, 1, 1], [1, 2, 3]))
    with pytest.raises(SelfsupError, match="equal length"):
        kendall_tau([1, 2, 3], [1, 2])
    with pytest.raises(SelfsupError, match="at least 2"):
        kendall_tau([1], [1])
