"""Frozen-feature probes: how much a representation knows, measured with few labels.

A pretrained encoder is judged by what a *cheap* classifier can read off its frozen features:

- **kNN** (Wu et al. 2018, arXiv:1805.01978; the variant DINO reports, arXiv:2104.14294): cosine
  similarity to the training features, the k nearest vote for their class with weight
  exp(similarity / T). No fitting and no hyper-parameters to tune, so it is the quick signal
  during pretraining.
- **Linear probe**: multinomial logistic regression on standardised features, its inverse
  regularisation C chosen by cross-validation on the training labels only. The standard protocol
  for "linearly decodable" (SimCLR, BYOL, MAE all report it).

`probe_suite` runs both over a range of label fractions (nested subsets from
`selfsup.adapt.sampling`) and `format_table` prints the label-efficiency table that compares
feature sets (raw pixels, a random encoder, a pretrained one).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

if TYPE_CHECKING:  # scikit-learn is imported lazily: importing it took ~1.5 s here
    from sklearn.linear_model import LogisticRegression

from selfsup.adapt.sampling import stratified_fraction
from selfsup.errors import SelfsupError
from selfsup.nn.knn import check_split as _check_split, knn_accuracy  # noqa: F401 (knn_accuracy: one of the probes)

logger = logging.getLogger(__name__)

PROBES = ("linear", "knn")
# Cross-validation folds for choosing C; a class needs this many examples to appear in every fold.
_NUM_CV_FOLDS = 3
# C used when the training subset is too small to cross-validate (the scikit-learn default).
_FALLBACK_C = 1.0
# Below this many multiply-adds per logistic-loss gradient (examples x width x classes), BLAS runs
# single-threaded: at 4,000 x 512 x 10 one thread was 10-20x faster than two on a shared 2-core
# machine (thread wake-ups dominate such small products). Larger problems keep all BLAS threads
# (the 2**27 cut-off is a judgement, not measured: this machine cannot time large fits fairly).
_SERIAL_BLAS_MAX_WORK = 2**27
# Non-convergence is reported at WARNING once per process, then at DEBUG: a probe suite fits
# dozens of models and one line is enough to tell the user to raise max_iter.
_convergence_warned = False
# Too few labels of a class to choose C by cross-validation: said once per process (then at DEBUG),
# in selfsup's words rather than scikit-learn's "The least populated class in y has only 1 members".
_tiny_class_said = False
# The settings that raise the solver's iterations, named in its warning: the run config's key by
# default (pretraining's and the demo's probes); `selfsup probe` and `adapt` pass their flag.
MAX_ITER_KNOB = "probe.max_iter"
DEFAULT_C_GRID = (0.01, 0.1, 1.0, 10.0)
DEFAULT_MAX_ITER = 1000


@torch.no_grad()
def extract_features(
    embed: Callable[[Tensor], Tensor],
    inputs: Tensor,
    batch_size: int = 512,
    device: str | torch.device = "cpu",
    autocast_dtype: torch.dtype | None = None,
    preprocess: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """Embed every input in batches and return the features as float32 on the CPU, [N, D].

    Each batch is moved to `device` and then passed through `preprocess` (so normalisation or a
    dtype conversion runs on the accelerator, and only the raw, often smaller, batch is copied).
    `autocast_dtype` (e.g. torch.bfloat16) runs `embed` under autocast. The caller puts a module
    in eval mode first: batch-norm or dropout in train mode would make features batch-dependent.
    """
    if isinstance(batch_size, bool) or batch_size < 1:
        raise SelfsupError(f"batch_size must be a positive integer, got {batch_size!r}")
    num_inputs = len(inputs)
    if num_inputs == 0:
        raise SelfsupError("extract_features got no inputs: the dataset or split is empty")
    device = torch.device(device)
    autocast = (
        torch.autocast(device_type=device.type, dtype=autocast_dtype)
        if autocast_dtype is not None
        else contextlib.nullcontext()
    )
    feature_batches = []
    for start in range(0, num_inputs, batch_size):
        batch = inputs[start : start + batch_size].to(device)
        num_batch = len(batch)
        if preprocess is not None:
            batch = preprocess(batch)
        with autocast:
            features = embed(batch)
        if features.ndim != 2 or features.shape[0] != num_batch:
            raise SelfsupError(
                f"embed must return one pooled feature vector per input, [B, D] with B={num_batch}, "
                f"got shape {tuple(features.shape)}; pass encoder.embed, not encoder.forward"
            )
        feature_batches.append(features.float().cpu())
    return torch.cat(feature_batches)


def _fit_logistic(
    x: np.ndarray, y: np.ndarray, c: float, max_iter: int, seed: int, model: LogisticRegression | None = None,
    knob: str = MAX_ITER_KNOB,
) -> LogisticRegression:
    """Fit (or warm-start `model` at a new C) multinomial logistic regression; returns the model.

    Non-convergence is detected from n_iter_ rather than sklearn's warning (which is silenced),
    so it is reported once instead of once per fit, naming `knob`: the setting that raises max_iter
    where the probe was asked for.
    """
    global _convergence_warned
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    if model is None:
        model = LogisticRegression(C=c, solver="lbfgs", max_iter=max_iter, random_state=seed, warm_start=True)
    else:
        model.set_params(C=c)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        # a few labels of many classes (a 10 % probe of a long-tailed set) is a classification
        # problem still: sklearn's "could represent a regression problem" is noise here
        warnings.filterwarnings("ignore", message="The number of unique classes is greater than 50%")
        warnings.filterwarnings("ignore", message="The least populated class")  # selfsup says it: _fallback_c
        model.fit(x, y)
    if int(np.max(model.n_iter_)) >= max_iter:
        level = logging.DEBUG if _convergence_warned else logging.WARNING
        _convergence_warned = True
        logger.log(
            level,
            "linear probe: logistic regression (C=%g, %d examples) stopped at max_iter=%d before converging; "
            "accuracy may be slightly underestimated, raise it with %s if it matters (reported once)",
            c,
            len(x),
            max_iter,
            knob,
        )
    return model


def _select_c(x: np.ndarray, y: np.ndarray, c_grid: Sequence[float], max_iter: int, seed: int,
              knob: str = MAX_ITER_KNOB) -> tuple[float, float, float]:
    """(the C with the best stratified k-fold accuracy on the training set, that accuracy, the mean
    held-out log-loss at that C); ties go to the smaller C.

    Each fold standardises with its own training part, as the final probe does, so the held-out
    fold is scored exactly the way the test set will be. C values are fitted in increasing order
    with warm starts: neighbouring C have nearby solutions, so each fit starts close to its optimum.
    """
    from sklearn.model_selection import StratifiedKFold
    from sklearn.preprocessing import StandardScaler

    ascending = sorted(c_grid)
    num_correct, loss_sum = np.zeros(len(ascending)), np.zeros(len(ascending))
    folds = StratifiedKFold(n_splits=_NUM_CV_FOLDS, shuffle=True, random_state=seed)
    for fit_idx, val_idx in folds.split(x, y):
        scaler = StandardScaler().fit(x[fit_idx])
        x_fit, x_val = scaler.transform(x[fit_idx]), scaler.transform(x[val_idx])
        model = None
        for i, c in enumerate(ascending):
            model = _fit_logistic(x_fit, y[fit_idx], c, max_iter, seed, model, knob)
            probs = model.predict_proba(x_val)  # [n, classes], columns in model.classes_ order
            num_correct[i] += np.sum(model.classes_[probs.argmax(axis=1)] == y[val_idx])
            truth = np.searchsorted(model.classes_, y[val_idx])  # every class is in every fold (>= 3 each)
            loss_sum[i] -= np.sum(np.log(np.clip(probs[np.arange(len(val_idx)), truth], 1e-15, None)))
    # argmax returns the first maximum, i.e. the strongest regularisation among equals.
    best = int(np.argmax(num_correct))
    return float(ascending[best]), float(num_correct[best] / len(y)), float(loss_sum[best] / len(y))


@dataclass
class LinearFit:
    """A fitted linear probe: standardisation with the training statistics, then logistic regression."""

    scaler: object  # sklearn StandardScaler: mean_, scale_ (1 for a constant feature)
    model: object  # sklearn LogisticRegression: coef_ [classes or 1, D], intercept_, classes_
    c: float  # the inverse L2 strength used
    cv_accuracy: float | None  # out-of-fold accuracy at c; None when c was not cross-validated
    cv_loss: float | None  # out-of-fold mean log-loss at c; None likewise

    def predict(self, x: np.ndarray) -> np.ndarray:
        return self.model.predict(self.scaler.transform(x))


def fit_linear_probe(
    x: np.ndarray, y: np.ndarray, seed: int = 0, c_grid: Sequence[float] = DEFAULT_C_GRID,
    max_iter: int = DEFAULT_MAX_ITER, knob: str = MAX_ITER_KNOB,
) -> LinearFit:
    """The linear probe fitted on training features `x` [N, D] and labels `y` [N] (numpy): C from
    `c_grid` by stratified 3-fold cross-validation when every class has 3 examples, else C=1.0 (or the
    grid's only value). `linear_probe_accuracy` scores it; `adapt --mode head` uses it as its head."""
    from sklearn.preprocessing import StandardScaler
    from threadpoolctl import threadpool_limits  # installed with scikit-learn

    if len(c_grid) == 0 or not all(math.isfinite(c) and c > 0 for c in c_grid):
        raise SelfsupError(f"c_grid must be a non-empty list of positive numbers, got {list(c_grid)!r}")
    if isinstance(max_iter, bool) or max_iter < 1:
        raise SelfsupError(f"max_iter must be a positive integer, got {max_iter!r}")
    classes, counts = np.unique(y, return_counts=True)
    if len(classes) < 2:
        raise SelfsupError(
            f"the linear probe's training set holds a single class ({classes[0].item()!r}): a classifier "
            "needs at least two; use a larger label fraction or check the labels"
        )
    N_train, D = x.shape
    serial = N_train * D * len(classes) <= _SERIAL_BLAS_MAX_WORK
    cv_accuracy = cv_loss = None
    with threadpool_limits(limits=1 if serial else None):
        if len(c_grid) == 1:
            chosen_c = float(c_grid[0])
        elif counts.min() >= _NUM_CV_FOLDS:
            chosen_c, cv_accuracy, cv_loss = _select_c(x, y, c_grid, max_iter, seed, knob)
        else:
            chosen_c = _fallback_c(classes, counts)
        scaler = StandardScaler().fit(x)
        model = _fit_logistic(scaler.transform(x), y, chosen_c, max_iter, seed, knob=knob)
    return LinearFit(scaler, model, chosen_c, cv_accuracy, cv_loss)


def _fallback_c(classes: np.ndarray, counts: np.ndarray) -> float:
    """C when some class has too few labels to cross-validate, said once in selfsup's own words."""
    global _tiny_class_said
    level = logging.DEBUG if _tiny_class_said else logging.INFO
    _tiny_class_said = True
    smallest = int(np.argmin(counts))
    logger.log(level, "linear probe: class %s has only %d training label(s), fewer than the %d that choosing C by "
               "cross-validation needs; C=%g is used where a class is this small (reported once)",
               classes[smallest].item(), int(counts[smallest]), _NUM_CV_FOLDS, _FALLBACK_C)
    return _FALLBACK_C


def linear_probe_accuracy(
    train_x: Tensor,
    train_y: Tensor,
    test_x: Tensor,
    test_y: Tensor,
    seed: int = 0,
    c_grid: Sequence[float] = DEFAULT_C_GRID,
    max_iter: int = DEFAULT_MAX_ITER,
    knob: str = MAX_ITER_KNOB,
) -> tuple[float, float]:
    """Test accuracy of a multinomial logistic-regression probe, and the C it used.

    Features are standardised with the *training* mean and variance only (the test set must not
    leak into the probe). C is chosen from `c_grid` by stratified 3-fold cross-validation on the
    training set when every class has at least 3 training examples; with fewer (e.g. a 1 % label
    budget) cross-validation is meaningless and C=1.0 is used instead (or the only grid value, if
    the grid has one).
    """
    _check_split("train", train_x, train_y)
    _check_split("test", test_x, test_y)
    if train_x.shape[1] != test_x.shape[1]:
        raise SelfsupError(
            f"train and test features differ in width ({train_x.shape[1]} vs {test_x.shape[1]}): "
            "were they extracted by the same encoder?"
        )
    fit = fit_linear_probe(train_x.detach().float().cpu().numpy(), train_y.detach().cpu().numpy(), seed, c_grid,
                           max_iter, knob)
    accuracy = float(np.mean(fit.predict(test_x.detach().float().cpu().numpy()) == test_y.detach().cpu().numpy()))
    chosen_c = fit.c
    return accuracy, chosen_c


@dataclass
class ProbeResult:
    """One cell of the label-efficiency table."""

    features: str  # which representation was probed: "raw", "random", or the method's name
    label_fraction: float  # share of the training labels the probe was given
    probe: str  # "knn" or "linear"
    accuracy: float  # on the full test set, in [0, 1]
    num_labels: int  # training examples the probe actually used

    def as_dict(self) -> dict:
        """Plain dict for metrics.jsonl and reports."""
        return dataclasses.asdict(self)


def probe_suite(
    name: str,
    train_x: Tensor,
    train_y: Tensor,
    test_x: Tensor,
    test_y: Tensor,
    fractions: Sequence[float] = (0.01, 0.1, 1.0),
    seed: int = 0,
    k: int = 20,
    probes: Sequence[str] = ("linear", "knn"),
    c_grid: Sequence[float] = DEFAULT_C_GRID,
    max_iter: int = DEFAULT_MAX_ITER,
    knob: str = MAX_ITER_KNOB,
) -> list[ProbeResult]:
    """Run every probe at every label fraction of the training set, scored on the full test set.

    kNN uses min(k, the smallest class count in the subset) neighbours; the linear probe's solver
    takes `c_grid` and `max_iter` (`knob` names the setting that raises it). The subsets come from `stratified_fraction` with one seed, so they are nested across
    fractions and identical across feature sets probed with the same labels and seed.
    """
    unknown = [p for p in probes if p not in PROBES]
    if unknown or not probes:
        raise SelfsupError(f"unknown probe(s) {unknown!r}; choose from {list(PROBES)}")
    if not fractions:
        raise SelfsupError("fractions is empty: give at least one label fraction, e.g. [1.0]")
    _check_split("train", train_x, train_y)
    _check_split("test", test_x, test_y)
    # Sample every subset up front so a bad fraction fails before any probe spends time.
    subsets = [stratified_fraction(train_y, fraction, seed) for fraction in fractions]
    # One class count for every subset: a small subset may lack the highest class index.
    num_classes = int(max(train_y.max(), test_y.max())) + 1
    results = []
    for fraction, subset in zip(fractions, subsets):
        index = torch.from_numpy(subset)
        sub_x, sub_y = train_x[index], train_y[index]
        for probe in probes:
            if probe == "linear":
                accuracy, _ = linear_probe_accuracy(sub_x, sub_y, test_x, test_y, seed=seed, c_grid=c_grid,
                                                    max_iter=max_iter, knob=knob)
            else:
                # With a few labels per class, k=20 neighbours would mostly be other classes' few
                # examples: cap k at the smallest class's count in the subset.
                smallest = int(torch.bincount(sub_y)[torch.unique(sub_y)].min())
                accuracy = knn_accuracy(sub_x, sub_y, test_x, test_y, k=min(k, smallest), num_classes=num_classes)
            results.append(ProbeResult(name, float(fraction), probe, accuracy, len(subset)))
    return results


def _fraction_label(fraction: float) -> str:
    """0.01 -> '1 %', 0.005 -> '0.5 %'; %g also hides float noise such as 0.07 * 100."""
    return f"{fraction * 100:g} %"


def format_table(results: list[ProbeResult]) -> str:
    """A plain-text table: one row per (features, probe), one column per label fraction.

    Accuracies are percentages with one decimal; a missing cell shows '-'. Rows keep the order in
    which they first appear in `results`; columns are sorted by fraction.
    """
    if not results:
        return "(no probe results)"
    rows: dict[tuple[str, str], dict[float, float]] = {}
    for result in results:
        cells = rows.setdefault((result.features, result.probe), {})
        if result.label_fraction in cells:
            raise SelfsupError(
                f"two results for features={result.features!r}, probe={result.probe!r}, "
                f"label fraction {result.label_fraction}: give each run a distinct features name"
            )
        cells[result.label_fraction] = result.accuracy
    fractions = sorted({result.label_fraction for result in results})
    header = ["features", "probe"] + [_fraction_label(f) for f in fractions]
    body = [
        [features, probe] + [f"{cells[f] * 100:.1f}" if f in cells else "-" for f in fractions]
        for (features, probe), cells in rows.items()
    ]
    widths = [max(len(line[col]) for line in [header, *body]) for col in range(len(header))]

    def render(line: list[str]) -> str:
        # Names read left-aligned, numbers right-aligned so decimals line up.
        names = [cell.ljust(width) for cell, width in zip(line[:2], widths[:2])]
        numbers = [cell.rjust(width) for cell, width in zip(line[2:], widths[2:])]
        return "  ".join(names + numbers).rstrip()

    return "\n".join(render(line) for line in [header, *body])
