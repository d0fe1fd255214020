"""Subgroup audit: how a classifier does on each group of its rows, and whether the worst is real.

A single accuracy hides the group it fails: 92% overall can be 95% on four sites and 70% on the
fifth. `selfsup evaluate` reads the predictions CSV written by `selfsup predict` and reports, for
every group column (site, scanner, sex, ...) and every requested pair of columns, each group's
accuracy, macro-F1 and calibration error (ECE) with percentile-bootstrap intervals, its gap to the
overall accuracy, and whether its accuracy differs from the rest of the rows after a correction for
having tested every group of the column.

Two rules keep the audit honest. Rows with an empty group value form a group "(missing)" instead
of vanishing, so a column's counts always sum to the number of evaluated rows. Groups smaller than
`min_n` are flagged "small", never dropped: a tiny group with bad accuracy is exactly what an audit
must show, but it is not allowed to be named the worst group while groups of a trustworthy size
exist, because its accuracy is mostly noise; its interval in the table is Wilson's, as in the
report's plot, since the bootstrap's collapses to a point when every row is right (or wrong).

Beside each group's accuracy stands its majority-class baseline: the accuracy of always answering
that group's most common true label. Groups differ in how varied their labels are, and 0.5 on a
group of four even classes is a better model than 0.9 on a group that is nine tenths one class.
"""

from __future__ import annotations

import math
import numbers
import zlib
from collections.abc import Sequence

import numpy as np
from scipy.stats import fisher_exact, norm

from selfsup.errors import SelfsupError
from selfsup.evaluate.predictions import Predictions, choose_group_columns
from selfsup.evaluate.stats import holm

MISSING = "(missing)"
PAIR_JOIN = "×"
VALUE_JOIN = " | "
METRICS = ("accuracy", "macro_f1", "ece")
# Cap on index cells per bootstrap block: 1000 resamples of 10k rows would otherwise be an 80 MB
# index matrix plus as many gathered copies; blocks keep memory flat at any N.
_BLOCK_CELLS = 2_000_000


# --- metrics --------------------------------------------------------------------------------------
# One vectorised code path serves both the point estimates (a single "resample" that is every row
# once) and the bootstrap, so the interval is always around the estimate it reports.


def _metrics_on_rows(label: np.ndarray, pred: np.ndarray, conf: np.ndarray, rows: np.ndarray,
                     num_classes: int, num_bins: int) -> dict[str, np.ndarray]:
    """Accuracy, macro-F1 and ECE of each row-set in `rows` [B, n] (indices into the arrays).

    Per-class counts come from one np.bincount over all B row-sets at once, each offset by
    b * num_classes (or num_bins) so the row-sets land in disjoint slots of one flat histogram."""
    B, n = rows.shape
    lab, prd, cnf = label[rows], pred[rows], conf[rows]  # [B, n] each
    correct = lab == prd
    accuracy = correct.mean(axis=1)

    offset = np.arange(B)[:, None] * num_classes
    num_true = np.bincount((lab + offset).ravel(), minlength=B * num_classes).reshape(B, num_classes)
    num_pred = np.bincount((prd + offset).ravel(), minlength=B * num_classes).reshape(B, num_classes)
    tp = np.bincount((lab + offset)[correct], minlength=B * num_classes).reshape(B, num_classes)
    # F1_c = 2TP / (2TP + FP + FN) = 2TP / (#true c + #predicted c); averaged over the classes that
    # occur in the labels or predictions of this row-set, as sklearn's f1_score(average="macro") does.
    present = (num_true + num_pred) > 0
    f1 = np.divide(2 * tp, num_true + num_pred, out=np.zeros((B, num_classes)), where=present)
    macro_f1 = f1.sum(axis=1) / present.sum(axis=1)

    # Guo et al. 2017: bins ((m-1)/M, m/M]; sum_m |B_m|/n * |acc_m - conf_m| = sum_m |sum(correct) -
    # sum(conf)| / n over the rows in bin m, which needs no division by empty bins.
    bins = np.clip(np.ceil(cnf * num_bins).astype(np.int64) - 1, 0, num_bins - 1)
    slot = (bins + np.arange(B)[:, None] * num_bins).ravel()
    sum_conf = np.bincount(slot, weights=cnf.ravel(), minlength=B * num_bins).reshape(B, num_bins)
    sum_correct = np.bincount(slot, weights=correct.ravel(), minlength=B * num_bins).reshape(B, num_bins)
    ece = np.abs(sum_correct - sum_conf).sum(axis=1) / n
    return {"accuracy": accuracy, "macro_f1": macro_f1, "ece": ece}


def _encode(labels: Sequence[str], predictions: Sequence[str], classes: Sequence[str] = ()) -> tuple[np.ndarray, np.ndarray, int]:
    """Class indices for labels and predictions over `classes` plus any other name they use (a label
    the model never saw is a class it always gets wrong)."""
    names = _class_names(labels, predictions, classes)
    index = {c: i for i, c in enumerate(names)}
    return (np.array([index[c] for c in labels], dtype=np.int64),
            np.array([index[c] for c in predictions], dtype=np.int64), len(names))


def _class_names(labels: Sequence[str], predictions: Sequence[str], classes: Sequence[str] = ()) -> list[str]:
    """The class of each index `_encode` gives: `classes`, then any other name used, sorted."""
    return list(dict.fromkeys([*classes, *sorted(set(labels) | set(predictions))]))


def majority_baseline(label: np.ndarray, names: Sequence[str]) -> dict[str, float | str]:
    """{"class", "accuracy"}: the most common true label of encoded rows and the accuracy of always
    answering it (ties go to the class listed first), the floor a model of these rows must beat."""
    counts = np.bincount(label, minlength=len(names))
    top = int(np.argmax(counts))
    return {"class": names[top], "accuracy": float(counts[top] / len(label))}


def _check_same_length(**arrays: Sequence) -> int:
    sizes = {k: len(v) for k, v in arrays.items()}
    if len(set(sizes.values())) != 1 or 0 in sizes.values():
        raise SelfsupError(f"metrics need equally long, non-empty inputs, got lengths {sizes}")
    return next(iter(sizes.values()))


def accuracy(labels: Sequence[str], predictions: Sequence[str]) -> float:
    """Fraction of rows whose prediction equals the label."""
    n = _check_same_length(labels=labels, predictions=predictions)
    lab, prd, c = _encode(labels, predictions)
    return float(_metrics_on_rows(lab, prd, np.zeros(n), np.arange(n)[None], c, 1)["accuracy"][0])


def macro_f1(labels: Sequence[str], predictions: Sequence[str]) -> float:
    """Unweighted mean F1 over the classes present in these labels or predictions, so a rare class
    counts as much as a common one (a group's accuracy can hide that it never gets its rare class)."""
    n = _check_same_length(labels=labels, predictions=predictions)
    lab, prd, c = _encode(labels, predictions)
    return float(_metrics_on_rows(lab, prd, np.zeros(n), np.arange(n)[None], c, 1)["macro_f1"][0])


def expected_calibration_error(confidence: np.ndarray, correct: np.ndarray, num_bins: int = 15) -> float:
    """ECE with `num_bins` equal-width bins ((m-1)/M, m/M] (Guo et al. 2017, arXiv:1706.04599):
    the row-weighted mean gap between accuracy and mean confidence inside each bin."""
    conf = np.asarray(confidence, dtype=np.float64)
    hit = np.asarray(correct, dtype=bool)
    n = _check_same_length(confidence=conf, correct=hit)
    _check_bins(num_bins)
    if not np.all((conf >= 0) & (conf <= 1)):
        raise SelfsupError(f"confidences must lie in [0, 1], got values from {conf.min()} to {conf.max()}")
    # Encode correctness as label 1 vs prediction 1/0 so the shared code path computes it.
    lab = np.ones(n, dtype=np.int64)
    return float(_metrics_on_rows(lab, hit.astype(np.int64), conf, np.arange(n)[None], 2, num_bins)["ece"][0])


def _check_bins(num_bins: int) -> None:
    if isinstance(num_bins, bool) or not isinstance(num_bins, numbers.Integral) or num_bins < 1:
        raise SelfsupError(f"num_bins must be a positive integer, got {num_bins!r}")


def metrics_with_ci(label: np.ndarray, pred: np.ndarray, conf: np.ndarray, num_classes: int, *,
                    num_bootstrap: int, confidence_level: float, rng: np.random.Generator,
                    num_bins: int = 15) -> dict[str, dict[str, float]]:
    """Accuracy, macro-F1 and ECE of encoded rows, each with a percentile-bootstrap interval from
    `num_bootstrap` resamples of the rows with replacement (resampled in blocks, see _BLOCK_CELLS)."""
    n = len(label)
    whole = _metrics_on_rows(label, pred, conf, np.arange(n)[None], num_classes, num_bins)
    block = max(1, min(num_bootstrap, _BLOCK_CELLS // n))
    draws: dict[str, list[np.ndarray]] = {m: [] for m in METRICS}
    for start in range(0, num_bootstrap, block):
        rows = rng.integers(0, n, size=(min(block, num_bootstrap - start), n))
        for m, values in _metrics_on_rows(label, pred, conf, rows, num_classes, num_bins).items():
            draws[m].append(values)
    tail = (1 - confidence_level) / 2
    out = {}
    for m in METRICS:
        low, high = np.quantile(np.concatenate(draws[m]), [tail, 1 - tail])
        out[m] = {"value": float(whole[m][0]), "low": float(low), "high": float(high)}
    return out


# --- significance ---------------------------------------------------------------------------------


def wilson_interval(successes: int, n: int, confidence_level: float = 0.95) -> tuple[float, float]:
    """Wilson's score interval for a proportion (Wilson 1927). Unlike the percentile bootstrap it does
    not collapse to a point when a small group is all right or all wrong: 0 of 1 right gives
    [0, 0.79] at 95 %, where the bootstrap gives [0, 0]."""
    if n <= 0:
        raise SelfsupError("a proportion's interval needs at least one row")
    z = float(norm.ppf(0.5 + confidence_level / 2))
    p = successes / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


def group_vs_rest_p(correct_in: int, n_in: int, correct_all: int, n_all: int) -> float | None:
    """Two-sided p-value that a group's accuracy differs from that of the other rows, by Fisher's
    exact test on the 2x2 table (group, rest) x (right, wrong); None when the group is every row.

    Fisher rather than a two-proportion z test because the audit exists for small groups, where the
    z test's normal approximation fails (a group of 12 with 11 right, or 100% accuracy, gives it a
    zero or undefined variance); Fisher is exact at any size, errs on the conservative side, and
    scipy computes it in milliseconds even for tens of thousands of rows. The group is compared
    with the rest, not with the overall accuracy, because the overall accuracy contains the group
    itself and would shrink every difference toward zero."""
    n_rest = n_all - n_in
    if n_rest == 0:
        return None
    correct_rest = correct_all - correct_in
    table = [[correct_in, n_in - correct_in], [correct_rest, n_rest - correct_rest]]
    return float(fisher_exact(table, alternative="two-sided").pvalue)


# --- the report -----------------------------------------------------------------------------------


def _rng(seed: int, *keys: str) -> np.random.Generator:
    """A stream per (column, group), so adding a column or a group leaves the others' intervals as
    they were; crc32 because Python's str hash changes between processes."""
    return np.random.default_rng([seed, *(zlib.crc32(k.encode()) for k in keys)])


def _check_settings(min_n: int, num_bootstrap: int, confidence_level: float, alpha: float, seed: int,
                    num_bins: int) -> None:
    for name, value, low in (("min_n", min_n, 1), ("num_bootstrap", num_bootstrap, 1), ("seed", seed, 0)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
            raise SelfsupError(f"{name} must be an integer >= {low}, got {value!r}")
    for name, value in (("confidence_level", confidence_level), ("alpha", alpha)):
        if not 0.0 < value < 1.0:
            raise SelfsupError(f"{name} must lie strictly between 0 and 1, got {value!r}")
    _check_bins(num_bins)


def _columns(pred: Predictions, group_columns: Sequence[str] | None,
             pairs: Sequence[tuple[str, str]]) -> dict[str, list[str]]:
    """Name -> per-row group value for every audited column, empty values already "(missing)"."""
    chosen = choose_group_columns(pred.source, list(pred.groups), group_columns)
    values = {g: [v if v != "" else MISSING for v in pred.groups[g]] for g in pred.groups}
    columns = {g: values[g] for g in chosen}
    for pair in pairs:
        if len(pair) != 2 or pair[0] == pair[1]:
            raise SelfsupError(f"a pair of group columns must name two different columns, got {pair!r}")
        a, b = choose_group_columns(pred.source, list(pred.groups), list(pair))
        columns[f"{a}{PAIR_JOIN}{b}"] = [f"{x}{VALUE_JOIN}{y}" for x, y in zip(values[a], values[b])]
    return columns


def subgroup_report(pred: Predictions, group_columns: Sequence[str] | None = None,
                    pairs: Sequence[tuple[str, str]] = (), min_n: int = 30, num_bootstrap: int = 1000,
                    confidence_level: float = 0.95, alpha: float = 0.05, seed: int = 0,
                    num_bins: int = 15) -> dict:
    """Per-group accuracy, macro-F1 and ECE with bootstrap intervals, gaps and significance, as a
    JSON-serialisable dict (layout in the module's tests and `format_subgroups`).

    Only labelled rows are evaluated; how many were set aside is reported as "num_unlabelled".
    `group_columns` picks columns (default: all); `pairs` adds crossed columns named "a×b" whose
    groups are "x | y", since a model can fail on one site's one scanner while both margins look
    fine. Every group is tested against the rest of its column's rows (Fisher's exact test,
    `group_vs_rest_p`) and called significant when its Holm-adjusted p (`holm`, over the groups of
    that column) is below `alpha`."""
    _check_settings(min_n, num_bootstrap, confidence_level, alpha, seed, num_bins)
    columns = _columns(pred, group_columns, pairs)
    rows = pred.labelled()
    keep = np.array([label != "" for label in pred.labels])
    columns = {name: [v for v, k in zip(values, keep) if k] for name, values in columns.items()}
    label, guess, num_classes = _encode(rows.labels, rows.predictions, rows.classes)
    names = _class_names(rows.labels, rows.predictions, rows.classes)
    conf = rows.confidence
    correct = label == guess
    n = len(rows)
    settings = dict(min_n=int(min_n), num_bootstrap=int(num_bootstrap), confidence_level=float(confidence_level),
                    alpha=float(alpha), seed=int(seed), num_bins=int(num_bins), test="Fisher exact, two-sided, group vs rest",
                    correction="Holm within each column", interval="percentile bootstrap over rows",
                    small_interval="Wilson score interval for groups with n < min_n",
                    baseline="majority: accuracy of always answering the rows' most common true label")
    overall = metrics_with_ci(label, guess, conf, num_classes, num_bootstrap=num_bootstrap,
                              confidence_level=confidence_level, rng=_rng(seed), num_bins=num_bins)
    overall["majority_baseline"] = majority_baseline(label, names)
    report = {"source": pred.source, "n": n, "num_unlabelled": len(pred) - n, "settings": settings,
              "overall": overall, "columns": {}}
    for name, values in columns.items():
        report["columns"][name] = _column(name, np.array(values, dtype=object), label, guess, conf, correct,
                                          names, overall["accuracy"]["value"], settings)
    return report


def _column(name: str, values: np.ndarray, label: np.ndarray, guess: np.ndarray, conf: np.ndarray,
            correct: np.ndarray, names: list[str], overall_accuracy: float, settings: dict) -> dict:
    """One column's groups (worst first), its worst and best group and the gaps between them."""
    num_classes = len(names)
    n_all, correct_all = len(values), int(correct.sum())
    groups = []
    for group in sorted(set(values)):
        idx = np.flatnonzero(values == group)
        metrics = metrics_with_ci(label[idx], guess[idx], conf[idx], num_classes,
                                  num_bootstrap=settings["num_bootstrap"],
                                  confidence_level=settings["confidence_level"],
                                  rng=_rng(settings["seed"], name, group), num_bins=settings["num_bins"])
        n_in, correct_in = len(idx), int(correct[idx].sum())
        metrics["accuracy"]["wilson"] = list(wilson_interval(correct_in, n_in, settings["confidence_level"]))
        rest = n_all - n_in
        groups.append({"group": group, "n": n_in, "small": n_in < settings["min_n"], **metrics,
                       "majority_baseline": majority_baseline(label[idx], names),
                       "gap_to_overall": metrics["accuracy"]["value"] - overall_accuracy,
                       "rest_accuracy": (correct_all - correct_in) / rest if rest else None,
                       "p_value": group_vs_rest_p(correct_in, n_in, correct_all, n_all)})
    assert sum(g["n"] for g in groups) == n_all, f"column {name!r}: group sizes do not sum to the row count"
    tested = [g for g in groups if g["p_value"] is not None]
    for g, p in zip(tested, holm([g["p_value"] for g in tested])):
        g["p_holm"] = p
    for g in groups:
        g.setdefault("p_holm", None)
        g["significant"] = g["p_holm"] is not None and g["p_holm"] < settings["alpha"]
    # Worst first; among equal accuracies the larger group first, as it is the better-founded finding.
    groups.sort(key=lambda g: (g["accuracy"]["value"], -g["n"], g["group"]))
    eligible = [g for g in groups if not g["small"]] or groups
    worst = eligible[0]
    best = max(eligible, key=lambda g: (g["accuracy"]["value"], g["n"]))
    return {
        "groups": groups,
        "worst": worst["group"],
        "best": best["group"],
        "worst_among": "groups with n >= min_n" if eligible is not groups else "all groups (none reaches min_n)",
        "gap_worst_to_best": worst["accuracy"]["value"] - best["accuracy"]["value"],
        "gap_worst_to_overall": worst["accuracy"]["value"] - overall_accuracy,
        "worst_vs_rest": {k: worst[k] for k in ("group", "n", "rest_accuracy", "p_value", "p_holm", "significant")}
                         | {"accuracy": worst["accuracy"]["value"]},
    }


# --- terminal table -------------------------------------------------------------------------------


def _p(p: float | None) -> str:
    return "-" if p is None else "<0.001" if p < 0.001 else f"{p:.3f}"


def _ci(m: dict) -> str:
    return f"{m['value']:.3f} [{m['low']:.3f}, {m['high']:.3f}]"


def _accuracy_cell(g: dict) -> str:
    """A group's accuracy with its interval: Wilson's (marked W) for a small group, as the report's plot shows."""
    wilson = g["accuracy"].get("wilson")
    if g["small"] and wilson is not None:
        return f"{g['accuracy']['value']:.3f} [{wilson[0]:.3f}, {wilson[1]:.3f}] W"
    return _ci(g["accuracy"])


def _majority(g: dict) -> str:
    baseline = g.get("majority_baseline")
    return "-" if baseline is None else f"{baseline['accuracy']:.3f}"


def format_subgroups(report: dict) -> str:
    """The report as plain-text tables, one per column, worst group first, then a line naming the
    worst group, its gaps and whether its difference from the rest is significant. A small group's
    interval is Wilson's (W); "majority" is the group's majority-class baseline."""
    s, o = report["settings"], report["overall"]
    level = f"{100 * s['confidence_level']:g}%"
    baseline = o.get("majority_baseline")
    lines = [f"{report['source']}: {report['n']} labelled rows"
             + (f" ({report['num_unlabelled']} unlabelled rows not evaluated)" if report["num_unlabelled"] else ""),
             f"overall  accuracy {_ci(o['accuracy'])}  macro-F1 {_ci(o['macro_f1'])}  ECE {_ci(o['ece'])}"
             + (f"  majority {baseline['accuracy']:.3f} ({baseline['class']})" if baseline else ""),
             f"[{level} {s['interval']}, {s['num_bootstrap']} resamples; p: {s['test']}, {s['correction']}; "
             f"* = p (Holm) < {s['alpha']:g}; small = n < {s['min_n']}, its interval Wilson's (W), as the bootstrap's "
             "collapses to a point when every row is right or wrong; majority = accuracy of always answering the "
             "group's most common label, the floor its accuracy must beat]"]
    head = ["group", "n", f"accuracy [{level} CI]", "majority", "macro-F1", "ECE", "gap", "p (Holm)", "flags"]
    for name, col in report["columns"].items():
        table = [head] + [[g["group"], str(g["n"]), _accuracy_cell(g), _majority(g), f"{g['macro_f1']['value']:.3f}",
                           f"{g['ece']['value']:.3f}", f"{g['gap_to_overall']:+.3f}", _p(g["p_holm"]),
                           " ".join(f for f, on in (("*", g["significant"]), ("small", g["small"])) if on)]
                          for g in col["groups"]]
        widths = [max(len(r[i]) for r in table) for i in range(len(head))]
        lines += ["", name]
        for r in table:
            cells = [r[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(r[1:-1], widths[1:-1])] + [r[-1]]
            lines.append("  " + "  ".join(cells).rstrip())
        w = col["worst_vs_rest"]
        worst = next((g for g in col["groups"] if g["group"] == w["group"]), {})
        floor = f" (majority baseline {_majority(worst)})" if worst.get("majority_baseline") else ""
        verdict = ("no other rows to compare with" if w["p_value"] is None else
                   f"vs the rest ({w['rest_accuracy']:.3f}): p (Holm) {_p(w['p_holm'])}, "
                   + ("significant" if w["significant"] else "not significant"))
        lines.append(f"  worst: {w['group']} (n={w['n']}) accuracy {w['accuracy']:.3f}{floor}, "
                     f"{col['gap_worst_to_overall']:+.3f} vs overall, {col['gap_worst_to_best']:+.3f} vs best "
                     f"({col['best']}); {verdict}"
                     + ("" if col["worst_among"].startswith("groups with") else "; no group reaches min_n"))
    return "\n".join(lines)
