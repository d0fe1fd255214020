"""Multiple-testing correction shared by the subgroup audit and slice discovery."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values (Holm 1979), in the order given.

    With p sorted ascending, adjusted p_(i) = max_{j <= i} min(1, (m - j) p_(j)) (j from 0). A column
    of 20 groups (or 20 clusters) gets 20 chances of a p < 0.05 by luck; Holm keeps the chance of any
    false "significant" among them at alpha, and unlike plain Bonferroni it does not charge the full
    m to every test once the smallest has been rejected.
    """
    p = np.asarray(p_values, dtype=np.float64)
    m = len(p)
    order = np.argsort(p, kind="stable")
    scaled = np.minimum(1.0, (m - np.arange(m)) * p[order])
    adjusted = np.empty(m)
    adjusted[order] = np.maximum.accumulate(scaled)
    return adjusted.tolist()
