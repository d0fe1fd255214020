"""Label leverage: how many labels pretraining is worth.

`selfsup leverage` adapts the pretrained base and the same architecture trained from scratch on
a ladder of label counts (e.g. 10, 30, 100, 300, 1000 per task, a few seeds each). For each
count N it asks: how many labels does the from-scratch model need to reach the accuracy the
pretrained one reaches with N? The ratio needed / N is the leverage — "pretraining is worth 8x
the labels at N=100". When the from-scratch model never reaches that accuracy within the ladder,
the answer is "more than the ladder holds" (None here) — more than the data holds when the ladder
ends at every label — which is itself the headline for few-label problems.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from selfsup.errors import SelfsupError

BEYOND_DATA = "more than the ladder holds"  # = more than the data holds when the top rung is every label
AT_MOST_FIRST = "at most: scratch already reaches it at the smallest label count"


def _check_ladder(ladder: Sequence[int]) -> list[int]:
    """The ladder as a list of strictly increasing positive integers."""
    counts = list(ladder)
    if not counts:
        raise SelfsupError("the label ladder is empty: give label counts such as [10, 100, 1000]")
    for n in counts:
        if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
            raise SelfsupError(f"label counts must be positive integers, got {n!r} in the ladder {counts}")
    if any(b <= a for a, b in zip(counts, counts[1:])):
        raise SelfsupError(f"the label ladder must be strictly increasing, got {counts}")
    return [int(n) for n in counts]


def _check_curve(name: str, accuracies: Sequence[float], num_points: int) -> list[float]:
    """One finite accuracy per ladder point."""
    values = [float(a) for a in accuracies]
    if len(values) != num_points:
        raise SelfsupError(f"{name} has {len(values)} accuracies for a ladder of {num_points} label counts")
    if not all(math.isfinite(v) for v in values):
        raise SelfsupError(f"{name} holds NaN or infinite accuracies: {values}; a run failed, rerun it")
    return values


def labels_needed(ladder: Sequence[int], scratch_acc: Sequence[float], target: float) -> float | None:
    """Label count at which the from-scratch accuracy curve first reaches `target`; None if never.

    The curve is the ladder points joined by straight lines in log(label count), and the answer
    is where it first crosses `target` (a ladder count exactly when a point equals it). Log, not
    linear, because accuracy grows roughly linearly in the logarithm of the label count (each
    doubling buys a similar gain) and ladders are geometric: interpolating linearly in N between
    100 and 1000 would put the half-way accuracy at 550 labels instead of ~316, overstating the
    labels needed and so the leverage.

    None means the curve stays below `target` over the whole ladder: the from-scratch model needs
    more labels than the data holds. When the first ladder point already reaches `target` the
    answer is that first count, an upper bound (nothing is known below the ladder). Between
    points the curve is only assumed monotone piecewise; a dip later on does not matter, since the
    first crossing is returned.
    """
    counts = _check_ladder(ladder)
    accuracy = _check_curve("scratch_acc", scratch_acc, len(counts))
    if not math.isfinite(target):
        raise SelfsupError(f"target accuracy must be a finite number, got {target!r}")
    if accuracy[0] >= target:
        return float(counts[0])
    for (n_lo, a_lo), (n_hi, a_hi) in zip(zip(counts, accuracy), zip(counts[1:], accuracy[1:])):
        if a_hi >= target:
            if a_hi == target:  # exact hit: no log/exp round-off on a ladder count
                return float(n_hi)
            frac = (target - a_lo) / (a_hi - a_lo)  # a_lo < target < a_hi, so 0 < frac < 1
            return math.exp(math.log(n_lo) + frac * (math.log(n_hi) - math.log(n_lo)))
    return None


def _mean_std(
    name: str, curve: Sequence[float] | Sequence[Sequence[float]], num_points: int
) -> tuple[list[float], list[float], list[int]]:
    """Per-point mean, sample std (ddof=1; 0 with one seed) and number of seeds.

    A curve is either one accuracy per point or, per point, a list of accuracies over seeds
    (points may have different numbers of seeds).
    """
    points = list(curve)
    if len(points) != num_points:
        raise SelfsupError(f"{name} has {len(points)} points for a ladder of {num_points} label counts")
    means, stds, counts = [], [], []
    for i, point in enumerate(points):
        seeds = [point] if isinstance(point, numbers.Real) else list(point)
        if not seeds:
            raise SelfsupError(f"{name}[{i}] has no accuracies: every label count needs at least one run")
        values = np.asarray(_check_curve(f"{name}[{i}]", seeds, len(seeds)))
        means.append(float(values.mean()))
        stds.append(float(values.std(ddof=1)) if len(values) > 1 else 0.0)
        counts.append(len(values))
    return means, stds, counts


def leverage_table(
    ladder: Sequence[int],
    pretrained_acc: Sequence[float] | Sequence[Sequence[float]],
    scratch_acc: Sequence[float] | Sequence[Sequence[float]],
) -> list[dict]:
    """One row per label count N: both accuracies, the labels scratch needs to match, the leverage.

    Accuracies are one value per ladder point or a list over seeds per point; the curves compared
    are the seed means. Each row: ``{"num_labels", "pretrained_acc", "pretrained_std",
    "pretrained_seeds", "scratch_acc", "scratch_std", "scratch_seeds", "scratch_labels_needed",
    "leverage", "note"}``. `scratch_labels_needed` is `labels_needed` at the pretrained mean (None:
    more than the ladder holds) and `leverage` is needed / N (None with it). A leverage below 1
    means the from-scratch model does better at N (pretraining hurt); `note` says when the number
    is a bound.
    """
    counts = _check_ladder(ladder)
    pre_mean, pre_std, pre_seeds = _mean_std("pretrained_acc", pretrained_acc, len(counts))
    scr_mean, scr_std, scr_seeds = _mean_std("scratch_acc", scratch_acc, len(counts))
    rows = []
    for i, n in enumerate(counts):
        needed = labels_needed(counts, scr_mean, pre_mean[i])
        if needed is None:
            note = BEYOND_DATA
        elif scr_mean[0] >= pre_mean[i]:
            note = AT_MOST_FIRST
        else:
            note = ""
        rows.append(
            {
                "num_labels": n,
                "pretrained_acc": pre_mean[i],
                "pretrained_std": pre_std[i],
                "pretrained_seeds": pre_seeds[i],
                "scratch_acc": scr_mean[i],
                "scratch_std": scr_std[i],
                "scratch_seeds": scr_seeds[i],
                "scratch_labels_needed": needed,
                "leverage": None if needed is None else needed / n,
                "note": note,
            }
        )
    return rows


def format_leverage(table: Sequence[dict]) -> str:
    """Plain-text leverage table: N, both accuracies (mean +- std, %), labels needed, leverage."""
    header = ["labels", "pretrained", "scratch", "scratch needs", "leverage"]
    body = []
    for row in table:
        needed, leverage = row["scratch_labels_needed"], row["leverage"]
        prefix = "<= " if row["note"] == AT_MOST_FIRST else ""
        body.append(
            [
                str(row["num_labels"]),
                f"{row['pretrained_acc'] * 100:.1f} +- {row['pretrained_std'] * 100:.1f}",
                f"{row['scratch_acc'] * 100:.1f} +- {row['scratch_std'] * 100:.1f}",
                BEYOND_DATA if needed is None else f"{prefix}{needed:.0f}",
                "-" if leverage is None else f"{prefix}{leverage:.1f}x",
            ]
        )
    widths = [max(len(line[col]) for line in [header, *body]) for col in range(len(header))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(line, widths)).rstrip() for line in [header, *body])


def plot_leverage(table: Sequence[dict], path: str | Path, metric: str = "accuracy") -> Path:
    """Write a PNG of both accuracy curves against label count (log x axis), with leverage notes.

    Error bars are the std over seeds. For each N a dashed horizontal arrow runs from the
    pretrained point to where the from-scratch curve reaches the same accuracy, labelled with
    the leverage; when it never does, the arrow runs to the plot's right edge, labelled "more
    than the data holds". Uses matplotlib's Agg canvas directly, so the global pyplot backend
    and figure state are left alone.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import NullFormatter

    if not table:
        raise SelfsupError("the leverage table is empty: nothing to plot")
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise SelfsupError(f"plot_leverage writes a PNG; give a path ending in .png, got {str(path)!r}")
    counts = [row["num_labels"] for row in table]
    fig = Figure(figsize=(6.4, 4.2), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for key, label, colour in (("pretrained", "pretrained", "C0"), ("scratch", "from scratch", "C1")):
        ax.errorbar(counts, [row[f"{key}_acc"] for row in table], yerr=[row[f"{key}_std"] for row in table],
                    marker="o", capsize=3, color=colour, label=label)
    ax.set_xscale("log")
    right = counts[-1] * 1.6
    ax.set_xlim(counts[0] / 1.6, right)
    for row in table:
        n, acc, needed = row["num_labels"], row["pretrained_acc"], row["scratch_labels_needed"]
        end = right if needed is None else needed
        text = BEYOND_DATA if needed is None else f"{row['leverage']:.1f}x"
        if row["note"] == AT_MOST_FIRST:
            text = f"<={text}"
        ax.annotate("", xy=(end, acc), xytext=(n, acc),
                    arrowprops={"arrowstyle": "->", "linestyle": "--", "color": "grey", "lw": 0.8})
        ax.annotate(text, xy=(math.sqrt(n * end), acc), xytext=(0, 3), textcoords="offset points",
                    ha="center", va="bottom", fontsize=7, color="dimgrey")
    ax.set_xlabel("labelled examples (log scale)")
    # Ticks at the ladder's own counts: log-axis minor labels (3x10^1, 4x10^1, ...) overlap.
    ax.set_xticks(counts, [str(n) for n in counts])
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_ylabel(metric.replace("_", " "))
    ax.set_title("label leverage: labels from scratch needs to match pretrained")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path
