"""Subgroup audit: exact metrics on hand-made rows, ECE by hand, counts and "(missing)", small-group
flags, bootstrap coverage, planted-gap detection, Holm, and reading predict's CSV."""

import csv
import json

import numpy as np
import pytest
from scipy.stats import fisher_exact
from sklearn.metrics import f1_score

from selfsup.errors import SelfsupError
from selfsup.evaluate.subgroups import (
    MISSING,
    _metrics_on_rows,
    accuracy,
    expected_calibration_error,
    format_subgroups,
    macro_f1,
    metrics_with_ci,
    subgroup_report,
)
from selfsup.evaluate.predictions import Predictions, read_predictions
from selfsup.evaluate.stats import holm


def _preds(labels, predictions, groups, confidence=None, source="<test>"):
    n = len(labels)
    conf = np.full(n, 0.9) if confidence is None else np.asarray(confidence, dtype=float)
    return Predictions([str(i) for i in range(n)], list(labels), list(predictions), conf, None,
                       sorted(set(labels) | set(predictions)), groups, source)


def _planted(acc_by_group: dict[str, tuple[int, int]]) -> Predictions:
    """Rows with exactly `right` of `n` correct per group: deterministic accuracies, no sampling luck."""
    labels, preds, site = [], [], []
    for g, (right, n) in acc_by_group.items():
        labels += ["a"] * n
        preds += ["a"] * right + ["b"] * (n - right)
        site += [g] * n
    return _preds(labels, preds, {"site": site})


# --- metrics -------------------------------------------------------------------------------------


def test_accuracy_and_macro_f1_by_hand():
    # a: TP 1, 2 true, 1 predicted -> F1 2/3; b: TP 2, 2 true, 3 predicted -> F1 4/5; macro 11/15.
    assert accuracy(["a", "a", "b", "b"], ["a", "b", "b", "b"]) == 0.75
    assert macro_f1(["a", "a", "b", "b"], ["a", "b", "b", "b"]) == pytest.approx(11 / 15, abs=1e-12)
    # A class only ever predicted (c) counts with F1 0; a class absent from both does not count.
    assert macro_f1(["a", "b"], ["a", "c"]) == pytest.approx((1 + 0 + 0) / 3, abs=1e-12)


def test_macro_f1_and_the_batched_resamples_match_sklearn():
    rng = np.random.default_rng(1)
    label, pred = rng.integers(0, 5, 300), rng.integers(0, 6, 300)
    pred[:150] = label[:150]
    conf = rng.random(300)
    rows = rng.integers(0, 300, size=(7, 300))
    batched = _metrics_on_rows(label, pred, conf, rows, 6, 15)
    for b in range(7):
        r = rows[b]
        assert batched["macro_f1"][b] == pytest.approx(f1_score(label[r], pred[r], average="macro"), abs=1e-12)
        assert batched["accuracy"][b] == pytest.approx(np.mean(label[r] == pred[r]), abs=1e-12)
        assert batched["ece"][b] == pytest.approx(expected_calibration_error(conf[r], label[r] == pred[r]), abs=1e-12)


def test_ece_against_a_hand_computation():
    conf = [0.95, 0.85, 0.15, 0.62, 0.68]
    correct = [1, 0, 0, 1, 0]
    # 10 bins: (0.9,1]: {0.95 right} |1-0.95|=0.05; (0.8,0.9]: {0.85 wrong} 0.85; (0.1,0.2]: {0.15 wrong} 0.15;
    # (0.6,0.7]: {0.62 right, 0.68 wrong} acc 0.5, conf 0.65 -> 0.15 * 2 rows.
    hand = (0.05 + 0.85 + 0.15 + 2 * 0.15) / 5
    assert expected_calibration_error(conf, correct, num_bins=10) == pytest.approx(hand, abs=1e-12)
    # Bins are ((m-1)/M, m/M]: 0.2 falls in (0, 0.2] and 0.3 in (0.2, 0.4] -> (0.8 + 0.3) / 2. Half-open
    # the other way, [0.2, 0.4) would hold both and give |0.5 - 0.25| = 0.25.
    assert expected_calibration_error([0.2, 0.3], [1, 0], num_bins=5) == pytest.approx(0.55, abs=1e-12)
    # Perfectly calibrated rows: 4 at confidence 0.75, 3 of them right.
    assert expected_calibration_error([0.75] * 4, [1, 1, 1, 0]) == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(SelfsupError, match=r"\[0, 1\]"):
        expected_calibration_error([1.2], [1])


def test_bootstrap_interval_covers_the_truth_about_as_often_as_it_claims():
    rng = np.random.default_rng(7)
    hits, widths = 0, []
    for _ in range(200):
        label = np.zeros(200, dtype=np.int64)
        pred = (rng.random(200) >= 0.8).astype(np.int64)  # right with probability 0.8
        ci = metrics_with_ci(label, pred, np.full(200, 0.8), 2, num_bootstrap=400, confidence_level=0.95,
                             rng=rng)["accuracy"]
        assert ci["low"] <= ci["value"] <= ci["high"]
        hits += ci["low"] <= 0.8 <= ci["high"]
        widths.append(ci["high"] - ci["low"])
    assert 0.90 <= hits / 200 <= 0.99, hits
    # Coverage over 200 draws cannot tell 95% from 98%; the width can: 2 * 1.96 * sqrt(0.8 * 0.2 / 200).
    assert np.mean(widths) == pytest.approx(2 * 1.96 * np.sqrt(0.8 * 0.2 / 200), rel=0.05)


def test_holm_by_hand():
    # Sorted 0.01, 0.02, 0.04 -> 3*0.01=0.03, 2*0.02=0.04, 1*0.04=0.04; the 0.5 stays 0.5 (x1, monotone).
    assert holm([0.04, 0.01, 0.5, 0.02]) == pytest.approx([0.08, 0.04, 0.5, 0.06])
    assert holm([0.3, 0.3]) == pytest.approx([0.6, 0.6])


# --- the report ----------------------------------------------------------------------------------


def test_per_group_metrics_are_exact_and_counts_sum_to_n_with_a_missing_group():
    pred = _preds(labels=["a", "a", "b", "b", "a", "b", "a"],
                  predictions=["a", "b", "b", "b", "a", "a", "a"],
                  groups={"site": ["x", "x", "x", "x", "y", "", ""]},
                  confidence=[0.9, 0.6, 0.8, 0.7, 1.0, 0.55, 0.95])
    report = subgroup_report(pred, min_n=1, num_bootstrap=50)
    col = report["columns"]["site"]
    by = {g["group"]: g for g in col["groups"]}
    assert sum(g["n"] for g in col["groups"]) == report["n"] == 7
    assert by[MISSING]["n"] == 2 and by["x"]["n"] == 4 and by["y"]["n"] == 1
    assert by["x"]["accuracy"]["value"] == 0.75
    assert by["x"]["macro_f1"]["value"] == pytest.approx(11 / 15)
    # x in 15 bins: 0.9 right, 0.6 wrong, 0.8 right, 0.7 right land in separate bins -> (0.1+0.6+0.2+0.3)/4.
    assert by["x"]["ece"]["value"] == pytest.approx((0.1 + 0.6 + 0.2 + 0.3) / 4)
    assert by[MISSING]["accuracy"]["value"] == 0.5
    assert report["overall"]["accuracy"]["value"] == pytest.approx(5 / 7)
    assert by[MISSING]["gap_to_overall"] == pytest.approx(0.5 - 5 / 7)
    assert [g["group"] for g in col["groups"]] == [MISSING, "x", "y"]  # accuracy ascending
    assert col["worst"] == MISSING and col["best"] == "y"
    assert col["gap_worst_to_best"] == pytest.approx(-0.5)
    json.dumps(report, allow_nan=False)


def test_text_table_gives_small_groups_wilson_intervals_and_every_group_its_majority_baseline():
    """The printed table reads as the report's plot does (Wilson for small groups, whose bootstrap interval is a
    point when every row is right), and beside each accuracy the accuracy of always answering the group's most
    common label: 0.5 on four even classes beats that baseline, 0.9 on a group that is all one class does not."""
    from selfsup.evaluate.subgroups import wilson_interval

    labels = list("abcd" * 10) + ["a"] * 40 + ["b"] * 3
    predictions = list("abxx" * 10) + ["a"] * 36 + ["b"] * 4 + ["b"] * 3
    site = ["mixed"] * 40 + ["same"] * 40 + ["tiny"] * 3
    report = subgroup_report(_preds(labels, predictions, {"site": site}), min_n=10, num_bootstrap=50)
    by = {g["group"]: g for g in report["columns"]["site"]["groups"]}
    assert by["mixed"]["accuracy"]["value"] == 0.5 and by["mixed"]["majority_baseline"]["accuracy"] == 0.25
    assert by["same"]["majority_baseline"] == {"class": "a", "accuracy": 1.0} and by["same"]["accuracy"]["value"] == 0.9
    assert by["tiny"]["majority_baseline"] == {"class": "b", "accuracy": 1.0}
    assert report["overall"]["majority_baseline"] == {"class": "a", "accuracy": 50 / 83}
    text = format_subgroups(report)
    low, high = wilson_interval(3, 3)
    tiny = next(line for line in text.splitlines() if line.strip().startswith("tiny"))
    assert f"1.000 [{low:.3f}, {high:.3f}] W" in tiny and "[1.000, 1.000]" not in tiny
    header = next(line for line in text.splitlines() if line.strip().startswith("group"))
    assert "majority" in header and "Wilson" in text
    mixed = next(line for line in text.splitlines() if line.strip().startswith("mixed"))
    assert "0.250" in mixed and mixed.index("0.500") < mixed.index("0.250")
    assert "majority 0.602 (a)" in text.splitlines()[1]


def test_small_groups_are_flagged_kept_and_not_named_worst():
    pred = _planted({"big1": (90, 100), "big2": (80, 100), "tiny": (1, 5)})
    col = subgroup_report(pred, min_n=30, num_bootstrap=50)["columns"]["site"]
    by = {g["group"]: g for g in col["groups"]}
    assert set(by) == {"big1", "big2", "tiny"} and by["tiny"]["small"] and not by["big2"]["small"]
    assert col["groups"][0]["group"] == "tiny"  # still listed first: it has the lowest accuracy
    assert col["worst"] == "big2" and col["best"] == "big1"
    # With no group reaching min_n the worst is chosen among all.
    col = subgroup_report(pred, min_n=1000, num_bootstrap=50)["columns"]["site"]
    assert col["worst"] == "tiny" and col["worst_among"].startswith("all groups")


def test_a_planted_worse_group_is_worst_and_significant():
    pred = _planted({"A": (270, 300), "B": (272, 300), "C": (180, 300), "D": (268, 300)})
    report = subgroup_report(pred, num_bootstrap=100)
    col = report["columns"]["site"]
    assert col["worst"] == "C"
    assert col["worst_vs_rest"]["significant"] and col["worst_vs_rest"]["p_holm"] < 1e-6
    assert col["worst_vs_rest"]["rest_accuracy"] == pytest.approx(810 / 900)
    assert col["gap_worst_to_overall"] == pytest.approx(0.6 - 990 / 1200)
    assert col["gap_worst_to_best"] == pytest.approx(0.6 - 272 / 300)
    # Against a rest that contains C, the other groups look better than their rest; any of them
    # called significant must be so in that direction, never flagged as worse.
    others = [g for g in col["groups"] if g["group"] != "C" and g["significant"]]
    assert all(g["accuracy"]["value"] > g["rest_accuracy"] for g in others)
    text = format_subgroups(report)
    assert "worst: C (n=300)" in text and "significant" in text and "*" in text


def test_equal_groups_are_not_significant():
    report = subgroup_report(_planted({"A": (255, 300), "B": (255, 300), "C": (255, 300)}), num_bootstrap=100)
    col = report["columns"]["site"]
    assert all(g["p_value"] == pytest.approx(1.0) and not g["significant"] for g in col["groups"])
    assert not col["worst_vs_rest"]["significant"]
    assert "not significant" in format_subgroups(report)


def test_a_modest_gap_in_one_of_many_groups_needs_the_holm_correction():
    # 12 groups of 100, eleven at 0.88. At 80/100 the raw Fisher p is ~0.027 (< 0.05) but Holm
    # multiplies the smallest of 12 p-values by 12 -> ~0.33: not significant. At 70/100 it stays so.
    for right, significant in ((80, False), (70, True)):
        groups = {f"g{i:02d}": (88, 100) for i in range(11)} | {"low": (right, 100)}
        col = subgroup_report(_planted(groups), num_bootstrap=50)["columns"]["site"]
        low = col["groups"][0]
        raw = fisher_exact([[right, 100 - right], [968, 132]]).pvalue
        assert raw < 0.05 and low["group"] == "low" and low["p_value"] == pytest.approx(raw)
        assert low["p_holm"] == pytest.approx(min(1.0, 12 * raw))
        assert low["significant"] is significant and col["worst_vs_rest"]["significant"] is significant
    assert raw < 1e-4


def test_pairs_cross_two_columns_and_keep_missing_values():
    pred = _preds(["a"] * 6, ["a", "b", "a", "a", "b", "a"],
                  {"site": ["s1", "s1", "s2", "s2", "", "s1"], "sex": ["f", "m", "f", "", "m", "f"]})
    report = subgroup_report(pred, group_columns=["site"], pairs=[("site", "sex")], min_n=1, num_bootstrap=20)
    assert list(report["columns"]) == ["site", "site×sex"]
    col = report["columns"]["site×sex"]
    assert {g["group"]: g["n"] for g in col["groups"]} == {"s1 | f": 2, "s1 | m": 1, "s2 | f": 1,
                                                            f"s2 | {MISSING}": 1, f"{MISSING} | m": 1}
    assert sum(g["n"] for g in col["groups"]) == 6


def test_unlabelled_rows_are_set_aside_and_unknown_columns_listed():
    pred = _preds(["a", "", "b"], ["a", "a", "a"], {"site": ["x", "y", "x"]})
    report = subgroup_report(pred, min_n=1, num_bootstrap=20)
    assert report["n"] == 2 and report["num_unlabelled"] == 1
    assert [g["group"] for g in report["columns"]["site"]["groups"]] == ["x"]
    with pytest.raises(SelfsupError, match=r"no group column 'scanner'.*\['site'\]"):
        subgroup_report(pred, group_columns=["scanner"])
    with pytest.raises(SelfsupError, match="two different columns"):
        subgroup_report(pred, pairs=[("site", "site")])
    with pytest.raises(SelfsupError, match="<test>: none of its 2 rows has a label"):
        _preds(["", ""], ["a", "b"], {}).labelled()


def test_the_same_seed_gives_the_same_intervals():
    pred = _planted({"A": (40, 50), "B": (30, 50)})
    assert subgroup_report(pred, num_bootstrap=50, seed=3) == subgroup_report(pred, num_bootstrap=50, seed=3)
    assert subgroup_report(pred, num_bootstrap=50, seed=3) != subgroup_report(pred, num_bootstrap=50, seed=4)


# --- reading predict's CSV -----------------------------------------------------------------------


def _write(path, header, rows):
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)
    return path


HEADER = ["id", "label", "prediction", "confidence", "site", "scanner", "p_cat", "p_dog"]
ROWS = [["r0", "cat", "cat", "0.900000", "s1", "ge", "0.900000", "0.100000"],
        ["r1", "", "dog", "0.700000", "s2", "", "0.300000", "0.700000"],
        ["r2", "dog", "cat", "0.600000", "", "ph, v2", "0.600000", "0.400000"]]


def test_read_predictions_round_trips_predicts_format(tmp_path):
    pred = read_predictions(_write(tmp_path / "p.csv", HEADER, ROWS))
    assert pred.ids == ["r0", "r1", "r2"] and pred.labels == ["cat", "", "dog"]
    assert pred.predictions == ["cat", "dog", "cat"] and pred.classes == ["cat", "dog"]
    np.testing.assert_allclose(pred.confidence, [0.9, 0.7, 0.6])
    np.testing.assert_allclose(pred.probs, [[0.9, 0.1], [0.3, 0.7], [0.6, 0.4]])
    assert pred.groups == {"site": ["s1", "s2", ""], "scanner": ["ge", "", "ph, v2"]}
    kept = pred.labelled()
    assert kept.ids == ["r0", "r2"] and kept.groups["site"] == ["s1", ""] and kept.probs.shape == (2, 2)
    only = read_predictions(tmp_path / "p.csv", group_columns=["scanner"])
    assert list(only.groups) == ["scanner"]
    # Without p_ columns the classes are the labels and predictions seen.
    bare = read_predictions(_write(tmp_path / "b.csv", HEADER[:5], [r[:5] for r in ROWS]))
    assert bare.probs is None and bare.classes == ["cat", "dog"] and list(bare.groups) == ["site"]


@pytest.mark.parametrize("bad_row, message", [
    (["r9", "cat", "cat", "0.9", "s1", "ge", "0.9"], r":3: 7 cells, but the header has 8"),
    (["r9", "cat", "cat", "high", "s1", "ge", "0.9", "0.1"], r":3: confidence is 'high', not a number"),
    (["r9", "cat", "cat", "1.5", "s1", "ge", "0.9", "0.1"], r":3: confidence is 1.5, outside \[0, 1\]"),
    (["r9", "cat", "cat", "0.9", "s1", "ge", "nan", "0.1"], r":3: p_cat is nan, outside \[0, 1\]"),
    (["r9", "cat", "", "0.9", "s1", "ge", "0.9", "0.1"], r":3: the prediction is empty"),
])
def test_a_malformed_row_names_the_file_and_line(tmp_path, bad_row, message):
    path = _write(tmp_path / "p.csv", HEADER, [ROWS[0], bad_row])
    with pytest.raises(SelfsupError, match=str(path).replace("\\", "\\\\") + message):
        read_predictions(path)


def test_bad_files_and_unknown_group_columns(tmp_path):
    with pytest.raises(SelfsupError, match="no such predictions file"):
        read_predictions(tmp_path / "absent.csv")
    path = _write(tmp_path / "p.csv", ["id", "label", "confidence", "site"], [["r0", "a", "0.5", "x"]])
    with pytest.raises(SelfsupError, match=r"p\.csv:1: the header lacks \['prediction'\]"):
        read_predictions(path)
    path = _write(tmp_path / "q.csv", HEADER, ROWS)
    with pytest.raises(SelfsupError, match=r"q\.csv: no group column 'sex'; the group columns are \['site', 'scanner'\]"):
        read_predictions(path, group_columns=["sex"])


def test_wilson_interval_matches_reference_values_and_never_collapses():
    from selfsup.evaluate.subgroups import wilson_interval

    assert wilson_interval(0, 1) == pytest.approx((0.0, 0.7935), abs=1e-4)  # z^2 / (1 + z^2) at 95 %
    assert wilson_interval(8, 10) == pytest.approx((0.4902, 0.9433), abs=1e-4)
    low, high = wilson_interval(30, 30)
    assert high == pytest.approx(1.0) and 0.88 < low < 0.89
    with pytest.raises(SelfsupError):
        wilson_interval(0, 0)
