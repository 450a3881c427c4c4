"""The one orientation table: every measure is signed so that larger predicts a larger
generalization gap (Jiang et al. 2019), and the per-model frame of oriented measures.

measures.parquet holds per model and measure a `value` (a bound, or the norm for
weight_norm) and, for the searched measures, `flatness` = 1/sigma^2 or 1/alpha^2. Both
already point the right way: a larger bound, a larger norm or a larger 1/sigma^2 (a sharper
minimum) each predict a larger gap. The searched sigma / alpha itself is "larger = flatter"
and would need negating; it is not analysed separately because flatness is a monotone
function of it (same rankings, opposite sign).
"""

from __future__ import annotations

import pandas as pd

FLATNESS_SUFFIX = ".flatness"

# measure name -> (sign, why). A sign of -1 marks a "larger = flatter" measure.
ORIENTATION: dict[str, tuple[int, str]] = {
    "pacbayes_init": (1, "PAC-Bayes bound, ||w - w0||^2 / (4 sigma^2) + ...: larger = worse"),
    "pacbayes_orig": (1, "PAC-Bayes bound, ||w||^2 / (4 sigma^2) + ...: larger = worse"),
    "pacbayes_mag_init": (1, "magnitude-aware PAC-Bayes bound (ref w - w0): larger = worse"),
    "pacbayes_mag_orig": (1, "magnitude-aware PAC-Bayes bound (ref w): larger = worse"),
    "sharpness_init": (1, "sharpness bound, ||w - w0||^2 log(2 omega) / (4 alpha^2) + ..."),
    "sharpness_orig": (1, "sharpness bound, ||w||^2 log(2 omega) / (4 alpha^2) + ..."),
    "sharpness_mag_init": (1, "magnitude-aware sharpness bound (ref w - w0): larger = worse"),
    "sharpness_mag_orig": (1, "magnitude-aware sharpness bound (ref w): larger = worse"),
    "weight_norm": (1, "L2 norm of all weights, a complexity measure: larger = worse"),
    "sigma": (-1, "a searched sigma: larger = flatter, negated"),
    "alpha": (-1, "a searched alpha: larger = flatter, negated"),
}
FLATNESS_REASON = "1/sigma^2 or 1/alpha^2 of the search: larger = sharper = worse"
UNKNOWN_REASON = "not in the orientation table: taken as a bound (schema: value is a bound)"


def orientation(column: str) -> tuple[int, str]:
    """(sign, why) for a column of `measure_frame`."""
    if column.endswith(FLATNESS_SUFFIX):
        return 1, FLATNESS_REASON
    base = column.split(" [")[0]  # drop a mode suffix such as " [fast]"
    return ORIENTATION.get(base, (1, UNKNOWN_REASON))


def _column_names(measures: pd.DataFrame) -> pd.Series:
    """A measure's column name; suffixed with its mode where one measure has several modes
    in the study (fast and faithful runs are then analysed side by side)."""
    modes = measures.groupby("measure")["mode"].transform("nunique")
    suffix = " [" + measures["mode"].astype(str) + "]"
    return measures["measure"].where(modes <= 1, measures["measure"] + suffix)


def measure_frame(measures: pd.DataFrame) -> pd.DataFrame:
    """One row per model_id, one column per measure (its `value`) and per searched measure
    `<name>.flatness`, as measured (not oriented). A model measured twice in the same mode
    keeps the last row written (follow-up tables are appended)."""
    return _wide(measures, "value", "flatness")


def convergence_frame(measures: pd.DataFrame) -> pd.DataFrame:
    """Same shape as `measure_frame`: whether the search behind each value converged (a
    flatness column shares its measure's search; measures without a search count as
    converged)."""
    flags = measures.assign(converged=measures["converged"].fillna(True).astype(bool))
    return _wide(flags, "converged", "converged")


def _wide(measures: pd.DataFrame, value: str, searched_value: str) -> pd.DataFrame:
    rows = measures.assign(column=_column_names(measures))
    rows = rows.drop_duplicates(subset=["model_id", "column"], keep="last")
    values = rows.pivot(index="model_id", columns="column", values=value)
    searched = rows[rows["flatness"].notna()]
    flat = searched.pivot(index="model_id", columns="column", values=searched_value)
    flat.columns = [f"{c}{FLATNESS_SUFFIX}" for c in flat.columns]
    wide = values.join(flat, how="outer")
    ordered = sorted(wide.columns, key=lambda c: (c.removesuffix(FLATNESS_SUFFIX), c))
    wide = wide[ordered]
    wide.columns.name = None
    return wide


def oriented(frame: pd.DataFrame) -> pd.DataFrame:
    """`frame` (from `measure_frame`) with each column multiplied by its orientation sign."""
    return frame * pd.Series({c: orientation(c)[0] for c in frame.columns})


def orientation_table(columns: list[str]) -> pd.DataFrame:
    """The sign and reason of each analysed measure column, for the report."""
    return pd.DataFrame(
        [(c, orientation(c)[0], orientation(c)[1]) for c in columns],
        columns=["measure", "sign", "why"],
    )
