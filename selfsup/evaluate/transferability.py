"""Transferability: rank candidate pretrained bases on a labelled sample before adapting any.

`selfsup select` embeds a small labelled sample with every candidate base (frozen) and ranks the
bases by cheap scores of those features, each timed, within an optional time budget:

- **logme** — LogME (You et al. 2021, "LogME: Practical Assessment of Pre-trained Models for
  Transfer Learning", arXiv:2102.11005): the log of the maximum marginal likelihood (evidence) of
  a Bayesian linear model from the features to each class's one-hot target, per example, averaged
  over classes. No training and no hyper-parameters: one eigendecomposition plus a few scalar
  fixed-point steps per class.
- **knn** — k-fold accuracy of the temperature-weighted cosine kNN (`selfsup.adapt.probes`).
- **linear_cv** — k-fold accuracy of the linear probe (`selfsup.adapt.probes`, which itself picks
  its regularisation by an inner cross-validation): the most faithful and the most expensive.

A score is only useful if it orders bases the way adaptation does; `kendall_tau` (tau-b) measures
that agreement against the accuracies the bases reach after adaptation (`score_accuracy_tau`), given
three bases or more: two bases have one pair, so their tau is +1 or -1 by which came first.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence

import numpy as np
import torch

from selfsup.adapt.probes import knn_accuracy, linear_probe_accuracy
from selfsup.errors import SelfsupError

SCORES = ("logme", "knn", "linear_cv")
MIN_TAU_BASES = 3  # with two bases, tau is +1 or -1 by the one pair's order: no ranking to validate

# LogME fixed point: stop when lambda = alpha / beta moves by at most 0.1 % relative, as the
# reference implementation does (thuml/LogME, `_fit_fixed_point`). The reference also stops after
# 11 updates ("should converge after at most 10 steps"); measured here, that holds for
# informative features, but on weak or random features, and above all when N < D (a few hundred
# labels, a 768-wide base), the fixed point converges linearly and slowly (100-400 steps), and 11
# steps left the score 0.004-0.07 per example below the fixed point (random features, N = D down
# to N = D / 4), as large as the gap between bases. So we iterate to the tolerance: each step is
# O(min(N, D) K), negligible next to the eigendecomposition (2000 x 768 features, 100 classes:
# 0.15 s in all). max_iter=11 reproduces the reference's truncation.
_LOGME_TOL = 1e-3
_LOGME_MAX_ITER = 1000
# Added to the denominators of the alpha and beta updates only (as the reference does), so a
# target the features fit exactly (residual 0) or do not see at all (m = 0) gives a large finite
# precision instead of a division by zero. It never enters the evidence itself.
_LOGME_EPS = 1e-5

# Cost model for the budget, in "work units" ~ multiply-adds plus fixed per-call overheads.
# Only used until a score has run once on a candidate; from then on its measured seconds per work
# unit replace the prior. The priors are deliberately pessimistic (a slow, shared 2-core CPU), so
# a budget errs on skipping rather than overrunning.
_PRIOR_SECONDS_PER_UNIT = 1e-9  # ~1 GFLOP/s effective for dense numpy/torch work
_FIT_OVERHEAD_UNITS = 5e6  # one scikit-learn logistic fit: ~4 ms measured on 40 x 12 inputs
_CALL_OVERHEAD_UNITS = 2e6  # one kNN fold / one LogME call: 0.2-2 ms of Python and dispatch measured
_LBFGS_ITERS = 100  # typical lbfgs iterations of a probe fit, for the work estimate


def _check_features(features: np.ndarray, labels: np.ndarray, name: str = "features") -> tuple[np.ndarray, np.ndarray]:
    """Validate a [N, D] feature matrix and its N integer labels; return float64 features, labels."""
    x = features.detach().cpu().numpy() if isinstance(features, torch.Tensor) else np.asarray(features)
    y = labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    if x.ndim != 2:
        raise SelfsupError(f"{name} must be a [N, D] matrix (one pooled vector per example), got shape {x.shape}")
    if y.ndim != 1:
        raise SelfsupError(f"labels must be one class index per example (1-D), got shape {y.shape}")
    if len(x) != len(y):
        raise SelfsupError(f"{name} has {len(x)} rows but there are {len(y)} labels: one row per labelled example")
    if x.shape[1] == 0:
        raise SelfsupError(f"{name} has no columns (D=0): the encoder produced empty embeddings")
    if not np.issubdtype(y.dtype, np.integer):
        raise SelfsupError(f"labels must be integer class indices, got dtype {y.dtype}")
    if not np.issubdtype(x.dtype, np.number) or np.iscomplexobj(x):
        raise SelfsupError(f"{name} must be real numbers, got dtype {x.dtype}")
    x = x.astype(np.float64, copy=False)
    if not np.isfinite(x).all():
        num_bad = int((~np.isfinite(x)).any(axis=1).sum())
        raise SelfsupError(
            f"{name} holds NaN or infinite values in {num_bad} of {len(x)} rows: the encoder diverged or the "
            "inputs were not normalised; re-extract the features"
        )
    num_classes = len(np.unique(y))
    if num_classes < 2:
        raise SelfsupError(
            f"the labelled sample holds {num_classes} class(es): ranking bases needs at least two classes"
        )
    return x, y


def _logme_from_eigen(
    sigma: np.ndarray, x: np.ndarray, y_sq: np.ndarray, num_examples: int, dim: int, tol: float, max_iter: int
) -> np.ndarray:
    """Maximum log evidence per target, divided by N, from the spectrum of F^T F.

    sigma: [k], the nonzero eigenvalues of F^T F (squared singular values of F); x: [k, K], the
    targets' coordinates on the k left singular vectors (x = U^T y); y_sq: [K], ||y||^2 per target.
    In that basis every quantity of the paper is a sum over k scalars: with t = alpha / beta,
    m^T m = sum sigma x^2 / (sigma + t)^2 and ||F m - y||^2 = sum x^2 t^2 / (sigma + t)^2 + (||y||^2 -
    ||x||^2), the last term being the part of y outside the column space of F. All K targets
    iterate together; a target stops updating once its own lambda has converged, so each one
    follows exactly the sequence it would follow alone.
    """
    N, D = num_examples, dim
    k = len(sigma)
    x_sq = x**2  # [k, K]
    sig = sigma[:, None]  # [k, 1]
    # The part of each target no linear function of the features can reach; clipped because
    # ||y||^2 - ||x||^2 is a difference of nearly equal numbers when y lies in the span of F.
    outside = np.maximum(y_sq - x_sq.sum(axis=0), 0.0)  # [K]

    def moments(t: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """gamma (effective number of well-determined weights), m^T m and ||F m - y||^2 at t, [K] each."""
        shrink = 1.0 / (sig + t)  # [k, K]
        gamma = (sig * shrink).sum(axis=0)
        m_sq = (sig * x_sq * shrink**2).sum(axis=0)
        residual = (x_sq * (t * shrink) ** 2).sum(axis=0) + outside
        return gamma, m_sq, residual

    num_targets = x.shape[1]
    alpha, beta = np.ones(num_targets), np.ones(num_targets)
    active = np.ones(num_targets, dtype=bool)
    for _ in range(max_iter):
        t = alpha / beta
        gamma, m_sq, residual = moments(t)
        alpha = np.where(active, gamma / (m_sq + _LOGME_EPS), alpha)
        beta = np.where(active, (N - gamma) / (residual + _LOGME_EPS), beta)
        active &= np.abs(alpha / beta - t) / t > tol
        if not active.any():
            break
    # The evidence at the final (alpha, beta), with m recomputed there. The reference reuses the
    # m of the previous step; the difference is second order in the tolerance.
    _, m_sq, residual = moments(alpha / beta)
    # log|A| with A = alpha I + beta F^T F (D x D): the D - k zero eigenvalues of F^T F each
    # contribute log(alpha). The reference fast path omits them, which is wrong when N < D
    # (thuml/LogME issue #23).
    log_det = np.log(alpha + beta * sig).sum(axis=0) + (D - k) * np.log(alpha)
    evidence = (
        N / 2 * np.log(beta)
        + D / 2 * np.log(alpha)
        - N / 2 * math.log(2 * math.pi)
        - beta / 2 * residual
        - alpha / 2 * m_sq
        - log_det / 2
    )
    return evidence / N


def logme(
    features: np.ndarray, labels: np.ndarray, tol: float = _LOGME_TOL, max_iter: int = _LOGME_MAX_ITER
) -> float:
    """LogME of frozen features for a classification sample (You et al. 2021, arXiv:2102.11005).

    Algorithm 1 of the paper: for each class, a Bayesian linear regression from the features to
    the class's one-hot column, with weight prior N(0, 1/alpha) and noise N(0, 1/beta); (alpha,
    beta) maximise the evidence by the MacKay fixed point gamma = sum beta sigma_i / (alpha + beta
    sigma_i), alpha = gamma / m^T m, beta = (N - gamma) / ||F m - y||^2, where sigma_i are the
    eigenvalues of F^T F. The score is the maximum log evidence divided by N, averaged over classes;
    higher is better. Values are comparable across bases on the same sample, not across samples.

    The eigendecomposition is computed once (of F^T F when N >= D, of F F^T when N < D, whichever
    is smaller) and shared by all classes, so each class costs O(min(N, D)) per iteration. Features
    are used as given (no centring or scaling), as in the paper. Classes are the distinct label
    values; a label index with no example is not a class (the reference would score an all-zero
    target for it).

    The fixed point stops when lambda = alpha / beta changes by at most `tol` (relative) or after
    `max_iter` steps (see _LOGME_MAX_ITER for why the default is not the reference's 11). Like
    any MacKay fixed point it finds a stationary point of the evidence, not necessarily the
    supremum (which, for uninformative features, can lie at alpha / beta -> infinity).
    """
    if not (math.isfinite(tol) and tol > 0):
        raise SelfsupError(f"LogME tol must be a positive number, got {tol!r}")
    if isinstance(max_iter, bool) or max_iter < 1:
        raise SelfsupError(f"LogME max_iter must be a positive integer, got {max_iter!r}")
    x, y = _check_features(features, labels)
    N, D = x.shape
    classes, inverse = np.unique(y, return_inverse=True)
    targets = np.zeros((N, len(classes)))  # [N, K] one-hot
    targets[np.arange(N), inverse] = 1.0
    if N >= D:
        sigma, v = np.linalg.eigh(x.T @ x)  # F^T F = V diag(sigma) V^T, ascending
        keep = sigma > sigma[-1] * max(N, D) * np.finfo(np.float64).eps
        sigma, v = sigma[keep], v[:, keep]
        # U^T y = diag(1 / s) V^T F^T y: the left singular vectors are never formed.
        coords = (v.T @ (x.T @ targets)) / np.sqrt(sigma)[:, None]  # [k, K]
    else:
        sigma, u = np.linalg.eigh(x @ x.T)  # F F^T = U diag(sigma) U^T shares the nonzero sigma
        keep = sigma > sigma[-1] * max(N, D) * np.finfo(np.float64).eps
        sigma, u = sigma[keep], u[:, keep]
        coords = u.T @ targets  # [k, K]
    if len(sigma) == 0:
        raise SelfsupError("features are all zero: LogME (and any probe) cannot tell the classes apart")
    return float(np.mean(_logme_from_eigen(sigma, coords, targets.sum(axis=0), N, D, tol, max_iter)))


def _folds(y: np.ndarray, num_folds: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Stratified folds, capped so every class has an example in every fold."""
    from sklearn.model_selection import StratifiedKFold

    if isinstance(num_folds, bool) or num_folds < 2:
        raise SelfsupError(f"folds must be an integer >= 2, got {num_folds!r}")
    values, counts = np.unique(y, return_counts=True)
    smallest = int(counts.min())
    if smallest < 2:
        single = values[counts < 2].tolist()
        shown = ", ".join(map(str, single[:10])) + (", ..." if len(single) > 10 else "")
        raise SelfsupError(
            f"{'classes' if len(single) > 1 else 'class'} {shown} {'have' if len(single) > 1 else 'has'} a single "
            "labelled example: cross-validated scores need at least 2 per class (one to fit, one to score); "
            "label more examples or leave those classes out (`selfsup select` leaves them out itself)"
        )
    splitter = StratifiedKFold(n_splits=min(num_folds, smallest), shuffle=True, random_state=seed)
    return list(splitter.split(np.zeros(len(y)), y))


def knn_score(features: np.ndarray, labels: np.ndarray, k: int = 20, folds: int = 5, seed: int = 0) -> float:
    """Stratified k-fold accuracy of the weighted cosine kNN (`selfsup.adapt.probes.knn_accuracy`).

    Folds are capped at the smallest class count. k is capped at the smallest class's count in
    each fold's training part, as `probe_suite` does, so a few-label class is not outvoted by
    neighbours that cannot be its own. Returns the pooled accuracy over all held-out examples.
    """
    x, y = _check_features(features, labels)
    if isinstance(k, bool) or k < 1:
        raise SelfsupError(f"k (neighbours) must be a positive integer, got {k!r}")
    xt, yt = torch.from_numpy(x).float(), torch.from_numpy(np.unique(y, return_inverse=True)[1]).long()
    num_classes = int(yt.max()) + 1
    num_correct = 0.0
    for fit_idx, val_idx in _folds(y, folds, seed):
        fit_y = yt[fit_idx]
        smallest = int(torch.bincount(fit_y, minlength=num_classes)[torch.unique(fit_y)].min())
        accuracy = knn_accuracy(
            xt[fit_idx], fit_y, xt[val_idx], yt[val_idx], k=min(k, smallest), num_classes=num_classes
        )
        num_correct += accuracy * len(val_idx)
    return num_correct / len(y)


def linear_cv_score(
    features: np.ndarray,
    labels: np.ndarray,
    folds: int = 5,
    seed: int = 0,
    c_grid: Sequence[float] = (0.01, 0.1, 1.0, 10.0),
) -> float:
    """Stratified k-fold accuracy of the linear probe (`selfsup.adapt.probes.linear_probe_accuracy`).

    Each outer fold's probe picks C from `c_grid` by its own inner cross-validation on the fold's
    training part, so no held-out example influences its own prediction. Folds are capped at the
    smallest class count. Returns the pooled accuracy over all held-out examples.
    """
    x, y = _check_features(features, labels)
    xt, yt = torch.from_numpy(x).float(), torch.from_numpy(np.unique(y, return_inverse=True)[1]).long()
    num_correct = 0.0
    for fit_idx, val_idx in _folds(y, folds, seed):
        accuracy, _ = linear_probe_accuracy(
            xt[fit_idx], yt[fit_idx], xt[val_idx], yt[val_idx], seed=seed, c_grid=c_grid
        )
        num_correct += accuracy * len(val_idx)
    return num_correct / len(y)


def _work_units(score: str, num_examples: int, dim: int, num_classes: int, folds: int, num_c: int) -> float:
    """Rough multiply-add count of one score on one candidate, plus fixed per-call overheads."""
    N, D, K = num_examples, dim, num_classes
    if score == "logme":
        small = min(N, D)
        # Gram product, eigendecomposition, projections, ~100 fixed-point steps of ~10 ops per eigenvalue.
        return N * D * small + 10 * small**3 + N * D * K + 1000 * K * small + _CALL_OVERHEAD_UNITS
    if score == "knn":
        return N * N * D + folds * _CALL_OVERHEAD_UNITS
    # linear_cv: per outer fold, an inner 3-fold search over the C grid plus the final fit.
    num_fits = folds * (3 * num_c + 1)
    return num_fits * (_LBFGS_ITERS * N * D * K + _FIT_OVERHEAD_UNITS)


def score_bases(
    candidates: Mapping[str, np.ndarray],
    labels: np.ndarray,
    scores: Sequence[str] = SCORES,
    budget_s: float | None = None,
    k: int = 20,
    folds: int = 5,
    seed: int = 0,
    c_grid: Sequence[float] = (0.01, 0.1, 1.0, 10.0),
) -> list[dict]:
    """Score every candidate base's frozen features on one labelled sample, timed, within a budget.

    Scores run one at a time in the order given, each over all candidates. Before each (score,
    candidate) the cost is estimated — from a pessimistic prior cost model until the score has run
    once, then from its measured seconds per unit of work — and the score is skipped if the
    estimate exceeds what is left of `budget_s` (None: no budget). A score whose estimated total
    over all candidates does not fit is skipped for every candidate, so a ranking is never built
    from the few bases that happened to come first.

    Returns one dict per candidate, best first by the first score computed for every candidate:
    ``{"name", "scores": {score: value | None}, "seconds": {score: s | None},
    "skipped": {score: reason}, "ranks": {score: rank | None}}``; rank 1 is the best (highest)
    value, tied values share the better rank. A score that some candidate lacks (the budget ran
    out part-way) keeps its values but ranks no candidate.
    """
    unknown = [s for s in scores if s not in SCORES]
    if unknown or not scores:
        raise SelfsupError(f"unknown score(s) {unknown!r}; choose from {list(SCORES)}")
    if len(set(scores)) != len(scores):
        raise SelfsupError(f"scores lists a score twice: {list(scores)!r}")
    if not candidates:
        raise SelfsupError("no candidate bases to score: give at least one")
    if budget_s is not None and not (math.isfinite(budget_s) and budget_s >= 0):
        raise SelfsupError(f"budget_s must be a non-negative number of seconds or None, got {budget_s!r}")
    # Validate every candidate before spending any time, so a bad one fails fast.
    checked = {name: _check_features(feats, labels, name=f"features of {name!r}") for name, feats in candidates.items()}
    num_classes = len(np.unique(next(iter(checked.values()))[1]))

    if any(s != "logme" for s in scores):
        # scikit-learn's first import takes ~1.5 s here; it is a one-off, not the cost of a score,
        # so it happens before the clock starts and never counts against the first candidate.
        import sklearn.linear_model  # noqa: F401
        import sklearn.model_selection  # noqa: F401
        import sklearn.preprocessing  # noqa: F401

    start = time.perf_counter()
    results = {
        name: {"name": name, "scores": {}, "seconds": {}, "skipped": {}, "ranks": {}} for name in candidates
    }

    def work(score: str, name: str) -> float:
        N, D = checked[name][0].shape
        return _work_units(score, N, D, num_classes, folds, len(c_grid))

    for score in scores:
        rate = _PRIOR_SECONDS_PER_UNIT
        estimate_all = sum(work(score, name) for name in candidates) * rate
        left = None if budget_s is None else budget_s - (time.perf_counter() - start)
        skip_all = left is not None and estimate_all > left
        measured_units = measured_seconds = 0.0
        for name, (x, y) in checked.items():
            result = results[name]
            left = None if budget_s is None else budget_s - (time.perf_counter() - start)
            estimate = work(score, name) * rate
            if skip_all or (left is not None and estimate > left):
                total = f", {estimate_all:.3g} s for all candidates" if skip_all else ""
                result["skipped"][score] = (
                    f"over budget: estimated {estimate:.3g} s{total}, {max(left, 0.0):.3g} s left of {budget_s:g} s"
                )
                result["scores"][score] = result["seconds"][score] = None
                continue
            began = time.perf_counter()
            if score == "logme":
                value = logme(x, y)
            elif score == "knn":
                value = knn_score(x, y, k=k, folds=folds, seed=seed)
            else:
                value = linear_cv_score(x, y, folds=folds, seed=seed, c_grid=c_grid)
            seconds = time.perf_counter() - began
            result["scores"][score], result["seconds"][score] = value, seconds
            measured_units += work(score, name)
            measured_seconds += seconds
            rate = measured_seconds / measured_units
        values = [r["scores"][score] for r in results.values()]
        complete = all(v is not None for v in values)
        for r in results.values():
            # A ranking of only the bases that happened to fit the budget would read as a verdict
            # on all of them, so a score missing for any base ranks none (its values are kept).
            value = r["scores"][score]
            r["ranks"][score] = 1 + sum(v > value for v in values) if complete else None

    def order(result: dict) -> tuple:
        ranks = [result["ranks"][s] for s in scores if result["ranks"][s] is not None]
        return (0, ranks[0]) if ranks else (1, 0)

    return sorted(results.values(), key=order)


def format_ranking(results: Sequence[dict]) -> str:
    """A plain-text table of `score_bases` results: one row per base, each score with its cost.

    Cells read "value (#rank, seconds)"; a skipped score shows "skipped", and the reasons follow
    the table, as does a note for a score computed for only some bases (and so not ranked).
    """
    if not results:
        return "(no candidates)"
    scores = list(results[0]["scores"])
    header = ["base"] + scores
    body = []
    notes = []
    for r in results:
        row = [r["name"]]
        for s in scores:
            if r["scores"][s] is None:
                row.append("skipped")
                notes.append(f"{r['name']} {s}: {r['skipped'].get(s, 'not computed')}")
            else:
                rank = "unranked" if r["ranks"][s] is None else f"#{r['ranks'][s]}"
                row.append(f"{r['scores'][s]:.4f} ({rank}, {r['seconds'][s]:.3g} s)")
        body.append(row)
    for s in scores:
        num_done = sum(r["scores"][s] is not None for r in results)
        if 0 < num_done < len(results):
            notes.append(f"{s}: computed for {num_done} of {len(results)} bases, so not ranked")
    widths = [max(len(line[col]) for line in [header, *body]) for col in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in [header, *body]]
    return "\n".join(lines + notes)


def kendall_tau(a: Sequence[float], b: Sequence[float]) -> float:
    """Kendall's tau-b rank correlation of two equally long sequences, in [-1, 1].

    tau-b = (concordant - discordant) / sqrt((n0 - ties_a) (n0 - ties_b)) over all n0 = n(n-1)/2
    pairs, where a pair tied in one sequence is neither concordant nor discordant; this is the
    variant that stays in [-1, 1] with ties (and what scipy.stats.kendalltau computes by default).
    NaN when either sequence is constant: no ordering to agree with. O(n^2): n is a number of bases.
    """
    x = np.asarray(a, dtype=np.float64)
    y = np.asarray(b, dtype=np.float64)
    if x.ndim != 1 or y.ndim != 1 or len(x) != len(y):
        raise SelfsupError(f"kendall_tau needs two 1-D sequences of equal length, got shapes {x.shape} and {y.shape}")
    if len(x) < 2:
        raise SelfsupError(f"kendall_tau needs at least 2 items to compare, got {len(x)}")
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise SelfsupError("kendall_tau got NaN or infinite values; drop the bases that have no score")
    i, j = np.triu_indices(len(x), k=1)
    dx = np.sign(x[i] - x[j])
    dy = np.sign(y[i] - y[j])
    num_pairs = len(i)
    untied_x = num_pairs - int(np.sum(dx == 0))
    untied_y = num_pairs - int(np.sum(dy == 0))
    if untied_x == 0 or untied_y == 0:
        return float("nan")
    return float(np.sum(dx * dy) / math.sqrt(untied_x * untied_y))


def score_accuracy_tau(results: Sequence[dict], accuracy: Mapping[str, float]) -> dict[str, float | None]:
    """Kendall tau-b between each score and the accuracy each base reached after adaptation.

    Only bases with both a score and an accuracy count; a score with fewer than MIN_TAU_BASES (3) such
    bases gets None, since two bases cannot be ranked meaningfully (their tau is +1 or -1 by the order
    of one pair). This is how a transferability score is validated: tau = 1 means it orders the bases
    exactly as adaptation does.
    """
    if not results:
        return {}
    taus: dict[str, float | None] = {}
    for score in results[0]["scores"]:
        pairs = [(r["scores"][score], accuracy[r["name"]]) for r in results
                 if r["scores"].get(score) is not None and r["name"] in accuracy]
        taus[score] = kendall_tau(*zip(*pairs)) if len(pairs) >= MIN_TAU_BASES else None
    return taus
