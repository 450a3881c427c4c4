"""Kendall's tau (pairwise-sign form), scipy's tau-b, and the granulated coefficient."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pandas as pd
import pytest

from qgen_ray.analysis import correlation, granulated_kendall, kendall_tau, kendall_tau_b
from qgen_ray.analysis.correlation import conditional_levels, granulated_kendall_by_axis


def brute_force_tau(x: list[float], y: list[float]) -> float:
    """The definition, one ordered pair at a time."""
    n = len(x)
    total = 0
    for i, j in itertools.permutations(range(n), 2):
        total += np.sign(x[i] - x[j]) * np.sign(y[i] - y[j])
    return total / (n * (n - 1))


def test_tau_hand_worked():
    # pairs (1,2): +1*+1, (1,3): +1*+1, (2,3): +1*-1 -> (1 + 1 - 1) / 3
    assert kendall_tau([1, 2, 3], [1, 3, 2]) == pytest.approx(1 / 3)
    # a tie in x counts 0: (1,2): 0, (1,3): 1, (2,3): 1 -> 2/3
    assert kendall_tau([1, 1, 2], [1, 2, 3]) == pytest.approx(2 / 3)
    assert kendall_tau([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert kendall_tau([5, 5, 5], [1, 2, 3]) == 0.0


def test_tau_b_is_scipys_tie_corrected_value():
    # C - D = 2, n0 = 3 pairs, one tied in x: 2 / sqrt((3 - 1) * (3 - 0))
    assert kendall_tau_b([1, 1, 2], [1, 2, 3]) == pytest.approx(2 / math.sqrt(6))


@pytest.mark.parametrize("n", [2, 3, 17, 60])
def test_tau_matches_brute_force_with_ties(n, monkeypatch):
    monkeypatch.setattr(correlation, "CHUNK", 7)  # several chunks, the last one partial
    rng = np.random.default_rng(n)
    x = rng.integers(0, 5, n).astype(float).tolist()  # many ties
    y = rng.normal(size=n).round(1).tolist()
    assert kendall_tau(x, y) == pytest.approx(brute_force_tau(x, y), abs=1e-12)


def test_tau_undefined_cases():
    assert math.isnan(kendall_tau([1.0], [2.0]))
    assert math.isnan(kendall_tau([1.0, np.nan, 3.0], [1.0, 2.0, 3.0]))
    with pytest.raises(ValueError, match="equal lengths"):
        kendall_tau([1, 2], [1, 2, 3])


# Hand-worked granulated example, hparams = [lr, bits], measure m, gap g:
#
#   model  lr     bits  m  g
#   a      0.1    32    3  0.9
#   b      0.1    8     2  0.5
#   c      0.1    4     1  0.7
#   d      0.01   32    5  0.4
#   e      0.01   8     5  0.6
#   f      0.01   4     4  0.2
#   g      0.001  32    7  0.1
#
# psi_lr: groups share bits and differ in lr.
#   bits 32 {a, d, g}: a-d (-1)(+1), a-g (-1)(+1), d-g (-1)(+1) -> tau = -1
#   bits 8  {b, e}:    (2-5 <0)(0.5-0.6 <0) = +1             -> tau = +1
#   bits 4  {c, f}:    (1-4 <0)(0.7-0.2 >0) = -1             -> tau = -1
#   psi_lr = -1/3 over 3 groups, none dropped.
# psi_bits: groups share lr and differ in bits.
#   lr 0.1  {a, b, c}: a-b +1, a-c +1, b-c (+1)(-1) = -1     -> tau = 1/3
#   lr 0.01 {d, e, f}: d-e 0 (m tied), d-f +1, e-f +1        -> tau = 2/3
#   lr 0.001 {g}: a single model, dropped
#   psi_bits = (1/3 + 2/3) / 2 = 1/2 over 2 groups, 1 dropped.
# Psi = (-1/3 + 1/2) / 2 = 1/12.
HAND = pd.DataFrame(
    {
        "lr": [0.1, 0.1, 0.1, 0.01, 0.01, 0.01, 0.001],
        "bits": [32, 8, 4, 32, 8, 4, 32],
        "m": [3, 2, 1, 5, 5, 4, 7],
        "g": [0.9, 0.5, 0.7, 0.4, 0.6, 0.2, 0.1],
    }
)


def test_granulated_kendall_hand_worked():
    psi, Psi = granulated_kendall(HAND, "m", "g", ["lr", "bits"])
    assert psi == pytest.approx({"lr": -1 / 3, "bits": 1 / 2})
    assert Psi == pytest.approx(1 / 12)
    by_axis = granulated_kendall_by_axis(HAND, "m", "g", ["lr", "bits"])
    assert (by_axis["lr"].groups, by_axis["lr"].dropped) == (3, 0)
    assert (by_axis["bits"].groups, by_axis["bits"].dropped) == (2, 1)


def test_granulated_drops_constant_groups_and_missing_rows():
    # psi_bits: lr 0.1 has a constant gap -> dropped; lr 0.01: one row has no measure,
    # which leaves a single model -> dropped. No group is left: psi_bits is NaN.
    df = pd.DataFrame(
        {
            "lr": [0.1, 0.1, 0.01, 0.01],
            "bits": [32, 4, 32, 4],
            "m": [1.0, 2.0, np.nan, 3.0],
            "g": [0.5, 0.5, 0.1, 0.2],
        }
    )
    by_axis = granulated_kendall_by_axis(df, "m", "g", ["lr", "bits"])
    assert (by_axis["bits"].groups, by_axis["bits"].dropped) == (0, 2)
    # psi_lr: bits 32 keeps one model (dropped); bits 4 {(2, .5), (3, .2)}: tau = -1.
    # Psi averages the defined psi only: -1.
    psi, Psi = granulated_kendall(df, "m", "g", ["lr", "bits"])
    assert math.isnan(psi["bits"]) and psi["lr"] == -1.0 and Psi == -1.0
    # with bits the only axis, the 3 rows with a measure form one group:
    # (1, .5)-(2, .5): 0, (1, .5)-(3, .2): -1, (2, .5)-(3, .2): -1 -> tau = -2/3
    by_axis = granulated_kendall_by_axis(df, "m", "g", ["bits"])
    assert by_axis["bits"].psi == pytest.approx(-2 / 3)
    assert (by_axis["bits"].groups, by_axis["bits"].dropped) == (1, 0)


def test_conditional_levels_pair_learning_rates_across_optimizers():
    models = pd.DataFrame(
        {
            "optimizer": ["sgd", "sgd", "adam", "adam", "rmsprop", "rmsprop"],
            "lr": [0.1, 0.01, 1e-3, 1e-4, 1e-3, 1e-4],
            "bits": [32, 4, 32, 4, 32, 4],  # the same values under every optimizer
        }
    )
    out, notes = conditional_levels(models, ["optimizer", "lr", "bits"])
    assert out["lr"].tolist() == [2, 1, 2, 1, 2, 1]  # rank within the optimizer
    assert out["bits"].tolist() == models["bits"].tolist()
    assert out["optimizer"].tolist() == models["optimizer"].tolist()
    assert notes == ["lr depends on optimizer: grouped by its level within optimizer"]


def test_conditional_levels_leave_unequal_nesting_alone():
    # method follows from bits but fp32 has one bit width and lsq three: not a level grid
    models = pd.DataFrame({"method": ["fp32", "lsq", "lsq", "lsq"], "bits": [32, 8, 4, 2]})
    out, notes = conditional_levels(models, ["method", "bits"])
    assert out.equals(models) and notes == []


def test_tau_of_unsigned_and_two_point_inputs():
    # uint8 differences would wrap around (1 - 2 = 255) unless taken as floats
    small = np.array([3, 1, 2], dtype=np.uint8)
    assert kendall_tau(small, np.array([3.0, 1.0, 2.0])) == 1.0
    assert kendall_tau([3.0, 1.0, 2.0], small) == 1.0
    assert kendall_tau_b([1, 2], [3, 4]) == 1.0  # two values: defined


def test_a_group_with_a_constant_measure_or_no_rows_has_no_tau():
    # bits 32: the measure is constant (the pairwise tau would say 0): dropped, not a 0
    df = pd.DataFrame(
        {
            "lr": [0.1, 0.01, 0.1, 0.01],
            "bits": [32, 32, 4, 4],
            "m": [1.0, 1.0, 1.0, 2.0],
            "g": [0.1, 0.2, 0.3, 0.4],
        }
    )
    by_axis = granulated_kendall_by_axis(df, "m", "g", ["lr", "bits"])
    assert (by_axis["lr"].psi, by_axis["lr"].groups, by_axis["lr"].dropped) == (1.0, 1, 1)
    # a single axis and no row with a measure: no group at all, none dropped
    empty = granulated_kendall_by_axis(df.assign(m=np.nan), "m", "g", ["lr"])["lr"]
    assert math.isnan(empty.psi) and (empty.groups, empty.dropped) == (0, 0)


def test_a_missing_axis_value_is_a_group_of_its_own():
    # models without a weight decay value (NaN) still pair with each other over lr
    df = pd.DataFrame(
        {
            "lr": [0.1, 0.01, 0.1, 0.01],
            "wd": [np.nan, np.nan, 5e-4, 5e-4],
            "m": [1.0, 2.0, 1.0, 2.0],
            "g": [0.2, 0.1, 0.1, 0.2],
        }
    )
    by_axis = granulated_kendall_by_axis(df, "m", "g", ["lr", "wd"])
    assert (by_axis["lr"].psi, by_axis["lr"].groups) == (0.0, 2)  # -1 and +1
    models = pd.DataFrame({"opt": ["sgd", "sgd", None, None], "lr": [0.1, 0.01, 1e-3, 1e-4]})
    out, notes = conditional_levels(models, ["opt", "lr"])
    assert out["lr"].tolist() == [2, 1, 2, 1] and len(notes) == 1


def test_conditional_levels_with_two_parents_and_any_axis_order():
    models = pd.DataFrame(
        {"lr": [0.1, 0.01, 1e-3, 1e-4], "optimizer": ["sgd", "sgd", "adam", "adam"]}
    )
    out, notes = conditional_levels(models, ["lr", "optimizer"])  # lr listed first
    assert out["lr"].tolist() == [2, 1, 2, 1]
    assert notes == ["lr depends on optimizer: grouped by its level within optimizer"]


def test_tau_interval_covers_tau_excludes_zero_only_for_a_real_relation_and_is_seeded():
    from qgen_ray.analysis.correlation import kendall_tau_interval

    rng = np.random.default_rng(0)
    x = rng.normal(size=200)
    related, unrelated = x + rng.normal(0, 0.5, 200), rng.normal(size=200)
    low, high = kendall_tau_interval(x, related)
    assert 0.3 < low < kendall_tau(x, related) < high < 1.0
    low0, high0 = kendall_tau_interval(x, unrelated)
    assert low0 < 0 < high0 and high0 - low0 < 0.25  # ~ ±2 se of tau at n = 200
    assert kendall_tau_interval(x, related) == (low, high)
    assert all(np.isnan(kendall_tau_interval([1, 2], [2, 1])))


def test_psi_resamples_equal_granulated_kendall_of_the_resampled_models():
    from qgen_ray.analysis.correlation import granulated_kendall, psi_interval, psi_resamples

    rng = np.random.default_rng(3)
    n = 60
    df = pd.DataFrame({"a": rng.integers(0, 3, n), "b": rng.integers(0, 3, n),
                       "c": rng.integers(0, 2, n), "m": rng.normal(size=n)})  # fmt: skip
    df["g"] = df["m"] + rng.normal(0, 1, n)  # continuous: no ties between distinct models
    axes = ["a", "b", "c"]
    draws = rng.integers(0, n, (20, n))
    counts = np.stack([np.bincount(d, minlength=n) for d in draws], axis=1).astype(float)
    fast = psi_resamples(df, "m", "g", axes, counts)
    slow = [granulated_kendall(df.iloc[d], "m", "g", axes)[1] for d in draws]
    np.testing.assert_allclose(fast, slow, atol=1e-12)
    low, high = psi_interval(df, "m", "g", axes)
    psi = granulated_kendall(df, "m", "g", axes)[1]
    assert low < psi < high and high - low < 1
    assert psi_interval(df, "m", "g", axes) == (low, high)  # seeded
