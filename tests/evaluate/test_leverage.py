"""Label leverage: log-space interpolation on hand-made curves, the table over seeds, the plot."""

import math

import pytest

from selfsup.errors import SelfsupError
from selfsup.evaluate.leverage import (
    AT_MOST_FIRST,
    BEYOND_DATA,
    format_leverage,
    labels_needed,
    leverage_table,
    plot_leverage,
)

LADDER = [10, 100, 1000]
SCRATCH = [0.5, 0.6, 0.7]


def test_exact_ladder_hits_return_the_count():
    assert labels_needed(LADDER, SCRATCH, 0.5) == 10.0
    assert labels_needed(LADDER, SCRATCH, 0.6) == 100.0
    assert labels_needed(LADDER, SCRATCH, 0.7) == 1000.0


def test_interpolation_is_linear_in_log_label_count():
    # Half-way between 0.5 (10 labels) and 0.6 (100): log10 n = 1.5 -> n = sqrt(10 * 100) = 31.62...,
    # not the 55 a linear-in-N interpolation would give.
    assert labels_needed(LADDER, SCRATCH, 0.55) == pytest.approx(31.6227766, rel=1e-8)
    # A quarter of the way from 0.6 (100) to 0.7 (1000): log10 n = 2.25 -> n = 177.827941...
    assert labels_needed(LADDER, SCRATCH, 0.625) == pytest.approx(177.827941, rel=1e-8)
    # Uneven rungs: 20 -> 80 labels, accuracy 0.4 -> 0.8, target 0.7 (frac 0.75): 20 * 4**0.75 = 56.5685...
    assert labels_needed([20, 80], [0.4, 0.8], 0.7) == pytest.approx(20 * 4**0.75, rel=1e-12)
    assert labels_needed([20, 80], [0.4, 0.8], 0.7) == pytest.approx(56.5685425, rel=1e-8)


def test_never_reaching_is_none_and_a_dip_does_not_hide_the_first_crossing():
    assert labels_needed(LADDER, SCRATCH, 0.71) is None
    # Non-monotone curve: the first crossing (between 10 and 100) counts, frac 0.75 -> 10**1.75.
    assert labels_needed(LADDER, [0.5, 0.7, 0.6], 0.65) == pytest.approx(10**1.75, rel=1e-12)
    # Below the first point: the first count, an upper bound.
    assert labels_needed(LADDER, SCRATCH, 0.3) == 10.0


def test_table_pretrained_better():
    table = leverage_table(LADDER, [0.6, 0.65, 0.75], SCRATCH)
    assert [row["num_labels"] for row in table] == LADDER
    # N=10: pretrained 0.6 = scratch at 100 -> leverage 10x.
    assert table[0]["scratch_labels_needed"] == 100.0 and table[0]["leverage"] == pytest.approx(10.0)
    # N=100: 0.65 is half-way (in log) from 100 to 1000 -> 316.2..., leverage 3.162...
    assert table[1]["scratch_labels_needed"] == pytest.approx(10**2.5)
    assert table[1]["leverage"] == pytest.approx(10**0.5)
    assert table[1]["note"] == ""
    # N=1000: 0.75 is never reached from scratch.
    assert table[2]["scratch_labels_needed"] is None and table[2]["leverage"] is None
    assert table[2]["note"] == BEYOND_DATA
    text = format_leverage(table)
    assert BEYOND_DATA in text and "10.0x" in text and "3.2x" in text


def test_table_pretrained_worse_everywhere_gives_leverage_below_one():
    table = leverage_table(LADDER, [0.4, 0.5, 0.6], SCRATCH)
    # N=10: scratch already beats 0.4 at the first rung: needed <= 10, flagged as a bound.
    assert table[0]["scratch_labels_needed"] == 10.0 and table[0]["note"] == AT_MOST_FIRST
    # N=100: 0.5 is scratch's accuracy at 10 labels -> 0.1x; N=1000: 0.6 at 100 -> 0.1x.
    assert table[1]["scratch_labels_needed"] == 10.0 and table[1]["leverage"] == pytest.approx(0.1)
    assert table[2]["scratch_labels_needed"] == 100.0 and table[2]["leverage"] == pytest.approx(0.1)
    assert table[2]["note"] == ""
    assert "<= 10" in format_leverage(table)


def test_table_over_seeds_uses_means_and_sample_stds():
    pretrained = [[0.60, 0.62, 0.64], [0.70, 0.72], [0.80]]
    scratch = [[0.50, 0.52], [0.60, 0.62], [0.70, 0.74]]
    table = leverage_table(LADDER, pretrained, scratch)
    assert [row["pretrained_acc"] for row in table] == pytest.approx([0.62, 0.71, 0.80])
    assert [row["pretrained_std"] for row in table] == pytest.approx([0.02, math.sqrt(2) * 0.01, 0.0])
    assert [row["pretrained_seeds"] for row in table] == [3, 2, 1]
    assert [row["scratch_acc"] for row in table] == pytest.approx([0.51, 0.61, 0.72])
    assert [row["scratch_std"] for row in table] == pytest.approx([math.sqrt(2) * 0.01, math.sqrt(2) * 0.01,
                                                                   2 * math.sqrt(2) * 0.01])
    # Needed labels come from the mean curves: 0.62 lies 1/11 of the way from 0.61 (100) to 0.72 (1000).
    assert table[0]["scratch_labels_needed"] == pytest.approx(100 * 10 ** (1 / 11))
    # 0.71 lies 10/11 of the way; 0.80 is never reached.
    assert table[1]["scratch_labels_needed"] == pytest.approx(100 * 10 ** (10 / 11), rel=1e-9)
    assert table[2]["scratch_labels_needed"] is None


def test_bad_input_is_rejected():
    with pytest.raises(SelfsupError, match="strictly increasing"):
        labels_needed([10, 10, 100], SCRATCH, 0.5)
    with pytest.raises(SelfsupError, match="positive integers"):
        labels_needed([0, 10, 100], SCRATCH, 0.5)
    with pytest.raises(SelfsupError, match="2 accuracies for a ladder of 3"):
        labels_needed(LADDER, SCRATCH[:2], 0.5)
    with pytest.raises(SelfsupError, match="NaN"):
        leverage_table(LADDER, [0.5, float("nan"), 0.7], SCRATCH)
    with pytest.raises(SelfsupError, match="no accuracies"):
        leverage_table(LADDER, [[0.5], [], [0.7]], SCRATCH)


def test_plot_writes_a_png(tmp_path):
    table = leverage_table(LADDER, [[0.6, 0.62], [0.65, 0.66], [0.75, 0.77]], [[0.5, 0.51], [0.6, 0.6], [0.7, 0.72]])
    path = plot_leverage(table, tmp_path / "plots" / "leverage.png")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    with pytest.raises(SelfsupError, match="ending in .png"):
        plot_leverage(table, tmp_path / "leverage.svg")
