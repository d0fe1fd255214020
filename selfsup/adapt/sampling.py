"""Label-budget subsets: which labelled examples a few-label experiment may use.

Label-efficiency curves ("accuracy with 1 %, 10 %, 100 % of the labels") are only comparable
across feature sets and probes when every one of them sees the *same* labelled examples, so the
subsets here are a pure function of (labels, budget, seed).

Both samplers draw one random permutation per class and take a prefix of it. Two consequences:

- **Stratified**: every class keeps its share of the budget and at least one example, so a 1 %
  subset of a small 10-class set still contains every class (a plain random 1 % could miss some,
  making the probe unable to ever predict them).
- **Nested**: for one seed, the subset at a smaller budget is contained in the subset at a larger
  one. A curve over fractions then measures the effect of *adding* labels rather than the
  resampling noise of an unrelated subset at each point, so it is monotone in expectation and
  much less noisy at the same number of seeds.
"""

from __future__ import annotations

import logging
import math
import numbers

import numpy as np
from torch import Tensor

from selfsup.errors import SelfsupError

logger = logging.getLogger(__name__)


def _as_label_array(labels: Tensor | np.ndarray) -> np.ndarray:
    """Labels as a 1-D numpy array, rejecting shapes that cannot be one label per example."""
    array = labels.detach().cpu().numpy() if isinstance(labels, Tensor) else np.asarray(labels)
    if array.ndim != 1:
        raise SelfsupError(
            f"labels must be one label per example (a 1-D array), got shape {tuple(array.shape)}; "
            "pass class indices, not one-hot rows"
        )
    if array.size == 0:
        raise SelfsupError("labels is empty: there is nothing to sample a labelled subset from")
    return array


def _class_permutations(labels: np.ndarray, seed: int) -> list[np.ndarray]:
    """For each class (in sorted order), the indices of its examples in a seeded random order.

    The permutations depend only on (labels, seed) — never on the budget — which is what makes
    the prefixes taken by the samplers nested across budgets.
    """
    rng = np.random.default_rng(seed)
    classes, inverse = np.unique(labels, return_inverse=True)
    # A stable sort groups example indices by class while keeping them ascending within a class,
    # so the permutation below is the only source of randomness.
    order = np.argsort(inverse, kind="stable")
    counts = np.bincount(inverse, minlength=len(classes))
    members_per_class = np.split(order, np.cumsum(counts)[:-1])
    return [members[rng.permutation(len(members))] for members in members_per_class]


def stratified_fraction(labels: Tensor | np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Sorted indices of a seeded, stratified subset holding `fraction` of every class.

    Each class keeps round(fraction * count) examples (rounded half up) and at least one, so
    small fractions still cover every class; 1.0 returns every index. Subsets for the same labels
    and seed are nested: the one at a smaller fraction is contained in the one at a larger
    fraction (see the module docstring for why).
    """
    if (
        isinstance(fraction, bool)
        or not isinstance(fraction, numbers.Real)
        or not math.isfinite(fraction)
        or not 0.0 < fraction <= 1.0
    ):
        raise SelfsupError(
            f"label fraction must be a number in (0, 1] (e.g. 0.01 for 1 % of the labels), got {fraction!r}"
        )
    label_array = _as_label_array(labels)
    chosen = []
    for members in _class_permutations(label_array, seed):
        # Half-up rounding is monotone in the fraction, which the nesting guarantee relies on.
        num_keep = max(1, math.floor(fraction * len(members) + 0.5))
        chosen.append(members[:num_keep])
    return np.sort(np.concatenate(chosen)).astype(np.int64)


def k_shot(labels: Tensor | np.ndarray, k: int, seed: int) -> np.ndarray:
    """Sorted indices of a seeded subset with `k` examples of every class.

    A class with fewer than `k` examples contributes all of them (logged once per call, naming
    the classes), since dropping it would make the downstream model unable to predict it. Like
    `stratified_fraction`, subsets are nested across k for one seed.
    """
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
        raise SelfsupError(f"k (examples per class) must be a positive integer, got {k!r}")
    label_array = _as_label_array(labels)
    chosen = []
    short_classes = []
    classes = np.unique(label_array)
    for label, members in zip(classes, _class_permutations(label_array, seed)):
        if len(members) < k:
            short_classes.append(f"{label.item()!r} ({len(members)})")
        chosen.append(members[:k])
    if short_classes:
        logger.warning(
            "k_shot: %d class(es) have fewer than k=%d examples and contribute all they have: %s",
            len(short_classes),
            k,
            ", ".join(short_classes),
        )
    return np.sort(np.concatenate(chosen)).astype(np.int64)


def require_two_classes(labels: Tensor | np.ndarray, classes: list[str] | None, where: str) -> None:
    """Refuses training labels (class indices into `classes`, -1 unlabelled) that hold fewer than two classes.

    A classifier trained on one class answers it for every input, and scored on rows of that class it
    reaches an accuracy of 1.0 that means nothing; `adapt`, `leverage`, `select` and `evaluate` stop
    here instead, naming the class, usually a sign of the wrong label column or a filtered source.
    """
    array = labels.detach().cpu().numpy() if isinstance(labels, Tensor) else np.asarray(labels)
    present = np.unique(array[array >= 0])
    if len(present) >= 2:
        return
    names = [classes[i] if classes is not None and i < len(classes) else str(i) for i in present.tolist()]
    found = f"every labelled training row is of the class {names[0]!r}" if names else "no training row is labelled"
    raise SelfsupError(f"{where}: {found}; a classifier needs at least two classes (with one it always answers "
                       "it, and its accuracy of 1.0 means nothing): label rows of other classes, or check "
                       "data.label_column (the column holding the class)")
