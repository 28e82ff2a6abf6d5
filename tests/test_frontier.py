"""kvlab.eval.frontier on a hand-made grid: the Pareto frontier and the comparison at a byte budget read the numbers."""

import math

import pandas as pd
import pytest

from kvlab.eval import frontier


def _grid():
    rows = [("pca", "pca", 0.25, 0.26, 0.45, None, None), ("pca", "pca", 0.125, 0.13, 0.40, None, None),
            ("h2o", "h2o", 0.25, 0.30, 0.55, None, None), ("h2o", "h2o", 0.125, 0.20, 0.50, None, None),
            ("pca x h2o", "composed", 0.25, 0.24, 0.57, 0.5, 0.5),
            ("pca x h2o", "composed", 0.125, 0.125, 0.56, 0.5, 0.25)]
    return pd.DataFrame(rows, columns=["family", "method", "budget_nominal", "budget_measured", "avg_acc",
                                       "feature_budget", "token_budget"])


def test_pareto_keeps_only_undominated_points():
    front = frontier.pareto(_grid())
    assert list(front["avg_acc"]) == [0.56, 0.57]  # every single method is dominated here


def test_accuracy_at_interpolates_in_log_bytes():
    grid = _grid()
    assert frontier.accuracy_at(grid, "pca", 0.13) == pytest.approx(0.40)
    mid = math.exp((math.log(0.2) + math.log(0.3)) / 2)
    assert frontier.accuracy_at(grid, "h2o", mid) == pytest.approx(0.525)
    assert math.isnan(frontier.accuracy_at(grid, "h2o", 0.125))  # h2o never held that few bytes
    assert frontier.accuracy_at(grid, "pca", 0.12) == pytest.approx(0.40)  # within 10 % of a point
    with pytest.raises(ValueError, match="no family 'x'"):
        frontier.accuracy_at(grid, "x", 0.1)


def test_compare_at_and_target():
    table = frontier.compare_at(_grid(), 0.125, full_acc=0.6)
    assert list(table["family"])[0] == "pca x h2o" and table["composed"].iloc[0]
    out = frontier.target_met(table)
    assert out["composition_acc"] == pytest.approx(0.56) and out["keeps_share"]
    assert out["best_single"] == "pca" and out["beats_every_single"] and out["singles_not_reaching"] == ["h2o"]
    worse = _grid()
    worse.loc[1, "avg_acc"] = 0.58
    out = frontier.target_met(frontier.compare_at(worse, 0.125, full_acc=0.7))
    assert not out["beats_every_single"] and not out["keeps_share"]
    one_axis = _grid()
    one_axis.loc[5, ["feature_budget", "token_budget"]] = [1.0, 0.125]  # the search kept every feature: it is H2O
    table = frontier.compare_at(one_axis, 0.125, full_acc=0.6)
    assert table.loc[table.family == "pca x h2o", "single_axis"].item()
    out = frontier.target_met(table, n=100)
    assert out["single_axis"] and not out["beats_every_single"] and out["margin"] > 0
    assert out["stderr_of_margin"] == pytest.approx((2 * 0.56 * 0.44 / 100) ** 0.5)
