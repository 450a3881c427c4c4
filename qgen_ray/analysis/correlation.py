"""Rank correlation between a measure and the generalization gap (docs/method.md §4).

`kendall_tau` is the paper's pairwise-sign form (Jiang et al. 2019, eq. 2):

    tau = 1 / (n (n - 1)) * sum over ordered pairs i != j of sign(x_i - x_j) sign(y_i - y_j)

ties count 0, so unlike scipy's tau-b it is not rescaled for ties (`kendall_tau_b` gives
scipy's value beside it). `granulated_kendall` is Jiang et al.'s granulated coefficient:
for each hyperparameter axis i, psi_i is the mean tau over the groups of models that share
every other axis value (they differ only in axis i), and Psi is the mean of the psi_i.
A group with fewer than 2 models, or in which the measure or the gap is constant, has no
defined tau; it is dropped and counted (`AxisKendall.dropped`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
from numpy.typing import ArrayLike
from scipy import stats

# Rows of the pairwise sign matrix computed at once: bounds memory at CHUNK * n floats.
CHUNK = 1024


def kendall_tau(x: ArrayLike, y: ArrayLike) -> float:
    """The pairwise-sign Kendall tau of two equally long sequences; NaN for fewer than 2
    values or when any value is NaN (drop missing rows first)."""
    x = np.asarray(x, dtype=float).ravel()
    y = np.asarray(y, dtype=float).ravel()
    if x.shape != y.shape:
        raise ValueError(f"kendall_tau needs equal lengths, got {x.size} and {y.size}")
    n = x.size
    if n < 2:
        return math.nan
    total = 0.0
    for start in range(0, n, CHUNK):
        sx = np.sign(x[start : start + CHUNK, None] - x[None, :])
        sy = np.sign(y[start : start + CHUNK, None] - y[None, :])
        total += float(np.sum(sx * sy))  # the diagonal i == j adds sign(0) = 0
    return total / (n * (n - 1))


TAU_RESAMPLES = 1000  # bootstrap resamples of tau's interval (200 above 500 models)
TAU_SEED = 0


def kendall_tau_interval(x: ArrayLike, y: ArrayLike, confidence: float = 0.95) -> tuple:
    """A seeded percentile-bootstrap interval of `kendall_tau` over models (pairs (x_i, y_i)
    resampled with replacement); (NaN, NaN) below 3 models."""
    x = np.asarray(x, dtype=float).ravel()
    y = np.asarray(y, dtype=float).ravel()
    n = x.size
    if n < 3:
        return math.nan, math.nan
    rng = np.random.default_rng(TAU_SEED)
    draws = rng.integers(0, n, (TAU_RESAMPLES if n <= 500 else 200, n))
    taus = np.array([kendall_tau(x[i], y[i]) for i in draws])
    taus = taus[np.isfinite(taus)]
    tail = (1 - confidence) / 2 * 100
    return float(np.percentile(taus, tail)), float(np.percentile(taus, 100 - tail))


def kendall_tau_b(x: ArrayLike, y: ArrayLike) -> float:
    """scipy's tau-b (tie-corrected); NaN where it is undefined."""
    x = np.asarray(x, dtype=float).ravel()
    y = np.asarray(y, dtype=float).ravel()
    if x.size < 2:
        return math.nan
    return float(stats.kendalltau(x, y, variant="b").statistic)


@dataclass(frozen=True)
class AxisKendall:
    """psi_i of one axis: the mean tau over `groups` groups; `dropped` groups had none."""

    psi: float
    groups: int
    dropped: int


def _has_tau(group: pd.DataFrame, measure: str, gap: str) -> bool:
    return len(group) >= 2 and group[measure].nunique() > 1 and group[gap].nunique() > 1


def granulated_kendall_by_axis(
    df: pd.DataFrame, measure: str, gap: str, hparams: list[str]
) -> dict[str, AxisKendall]:
    """psi_i with its group counts for every axis in `hparams`. Rows where the measure or
    the gap is missing are left out before grouping."""
    data = df.dropna(subset=[measure, gap])
    result: dict[str, AxisKendall] = {}
    for axis in hparams:
        others = [h for h in hparams if h != axis]
        if others:
            groups = [g for _, g in data.groupby(others, dropna=False)]
        else:
            groups = [data] if len(data) else []
        taus = [kendall_tau(g[measure], g[gap]) for g in groups if _has_tau(g, measure, gap)]
        psi = float(np.mean(taus)) if taus else math.nan
        result[axis] = AxisKendall(psi=psi, groups=len(taus), dropped=len(groups) - len(taus))
    return result


def granulated_kendall(
    df: pd.DataFrame, measure: str, gap: str, hparams: list[str]
) -> tuple[dict[str, float], float]:
    """(psi, Psi): psi_i per hyperparameter axis and their mean Psi (Jiang et al. 2019).
    Psi averages the axes whose psi_i is defined; NaN when none is."""
    by_axis = granulated_kendall_by_axis(df, measure, gap, hparams)
    psi = {axis: r.psi for axis, r in by_axis.items()}
    defined = [v for v in psi.values() if not math.isnan(v)]
    return psi, (float(np.mean(defined)) if defined else math.nan)


def _groups(data: pd.DataFrame, others: list[str]) -> list[np.ndarray]:
    """Row positions of each group of models sharing every axis in `others`."""
    if not others:
        return [np.arange(len(data))]
    return [np.asarray(i) for i in data.groupby(others, dropna=False).indices.values()]


def psi_resamples(
    data: pd.DataFrame, measure: str, gap: str, hparams: list[str], counts: np.ndarray
) -> np.ndarray:
    """Psi of each bootstrap resample of `data`'s rows; `counts` (rows x resamples) says
    how often each row was drawn. A resampled group's tau is sum over ordered pairs of
    draws of sign(dx) sign(dy) / (k (k - 1)) (a row drawn twice pairs with itself as a tie,
    as `kendall_tau` counts it); a group counts when at least 2 distinct models of a group
    with a defined tau were drawn. Equal to `granulated_kendall` of the resampled frame
    whenever no two distinct models tie."""
    from scipy import sparse

    x, y = data[measure].to_numpy(float), data[gap].to_numpy(float)
    n, resamples = counts.shape
    psis = []
    for axis in hparams:
        groups = _groups(data, [h for h in hparams if h != axis])
        groups = [g for g in groups if _has_tau(data.iloc[g], measure, gap)]
        if not groups:
            continue
        rows = np.concatenate([np.repeat(g, len(g)) for g in groups])
        cols = np.concatenate([np.tile(g, len(g)) for g in groups])
        signs = np.sign(x[rows] - x[cols]) * np.sign(y[rows] - y[cols])
        pairs = sparse.csr_matrix((signs, (rows, cols)), shape=(n, n))
        member = np.concatenate(groups)
        of = np.concatenate([np.full(len(g), k) for k, g in enumerate(groups)])
        indicator = sparse.csr_matrix((np.ones(len(member)), (of, member)), shape=(len(groups), n))
        numerator = indicator @ (counts * (pairs @ counts))
        k = indicator @ counts
        distinct = indicator @ (counts > 0).astype(float)
        with np.errstate(invalid="ignore", divide="ignore"):
            tau = np.where(distinct >= 2, numerator / (k * (k - 1)), np.nan)
        used = np.isfinite(tau).sum(axis=0)
        psis.append(np.where(used > 0, np.nansum(tau, axis=0) / np.maximum(used, 1), np.nan))
    if not psis:
        return np.full(resamples, np.nan)
    stacked = np.vstack(psis)
    defined = np.isfinite(stacked).sum(axis=0)
    return np.where(defined > 0, np.nansum(stacked, axis=0) / np.maximum(defined, 1), np.nan)


def psi_interval(
    df: pd.DataFrame, measure: str, gap: str, hparams: list[str], confidence: float = 0.95
) -> tuple[float, float]:
    """A seeded percentile-bootstrap interval of Psi over models (rows resampled with
    replacement, `TAU_RESAMPLES` times); (NaN, NaN) below 3 models or without axes."""
    data = df.dropna(subset=[measure, gap]).reset_index(drop=True)
    n = len(data)
    if n < 3 or not hparams:
        return math.nan, math.nan
    rng = np.random.default_rng(TAU_SEED)
    draws = rng.integers(0, n, (TAU_RESAMPLES, n))
    counts = np.stack([np.bincount(d, minlength=n) for d in draws], axis=1).astype(float)
    psis = psi_resamples(data, measure, gap, hparams, counts)
    psis = psis[np.isfinite(psis)]
    if not len(psis):
        return math.nan, math.nan
    tail = (1 - confidence) / 2 * 100
    return float(np.percentile(psis, tail)), float(np.percentile(psis, 100 - tail))


def conditional_levels(models: pd.DataFrame, axes: list[str]) -> tuple[pd.DataFrame, list[str]]:
    """Replace an axis whose values depend on another axis by its level within that axis.

    In the NiN grid the learning rates depend on the optimizer (SGD {0.1, 0.05, 0.01},
    Adam/RMSProp {1e-3, 5e-4, 1e-4}): models "differing only in the optimizer" never share
    an exact learning rate, so psi_optimizer would have no groups. Our choice: an axis A is
    conditional on an axis B when the sets of A values differ between B values but each
    holds the same number (>= 2) of values; A is then replaced by its rank (1 = smallest)
    within B, so the groups pair SGD 0.1 with Adam 1e-3. Returns the frame and one note per
    replaced axis."""
    out = models.copy()
    notes: list[str] = []
    for a in axes:
        for b in axes:
            if a == b:
                continue
            value_sets = models.groupby(b, dropna=False)[a].agg(lambda s: frozenset(s.dropna()))
            sizes = {len(v) for v in value_sets}
            if len(value_sets) >= 2 and len(set(value_sets)) > 1 and len(sizes) == 1:
                if min(sizes) >= 2:
                    out[a] = models.groupby(b, dropna=False)[a].rank(method="dense")
                    notes.append(f"{a} depends on {b}: grouped by its level within {b}")
                    break
    return out, notes
