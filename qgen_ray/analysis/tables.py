"""The paper's tables from a study's Parquet tables, as numeric DataFrames.

    status        models per trial status (only "ok" rows are analysed)
    table1        per dataset, model, precision: mean train/test accuracy and loss, gaps, n
    table2        weight norm (measure "weight_norm") per precision: mean, std, n
    table3        every measure per precision: mean, std, n, unconverged searches
    table3_paper_scale
                  every bound as the paper prints it, sqrt(bound / m): mean, std, n
    orientation   the sign applied to each measure before correlating, and why
    correlation_gap_loss / correlation_gap_acc
                  Kendall tau, tau-b, psi_i per axis (with groups used / dropped) and Psi;
                  tau and Psi with seeded 95% bootstrap intervals over models
    table4/5/6    mean corruption gap by corruption x precision, severity x precision,
                  and per precision (corruptions.parquet)
    paper_table1..4
                  the paper's published numbers beside this study's means, for the
                  settings both have (analysis.paper_numbers; absent when none matches)

Each table exists only when its input does. Precision columns and rows follow FP32, int8,
int4, int2. `build_tables(study_dir)` is the entry point for notebooks.
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from qgen_ray.analysis.correlation import (
    conditional_levels,
    granulated_kendall_by_axis,
    kendall_tau,
    kendall_tau_b,
    kendall_tau_interval,
    psi_interval,
)
from qgen_ray.analysis.orientation import (
    FLATNESS_SUFFIX,
    convergence_frame,
    measure_frame,
    orientation_table,
    oriented,
)
from qgen_ray.analysis.paper_numbers import beside_paper
from qgen_ray.analysis.study_tables import POPULATION_KEYS, StudyTables, load_study
from qgen_ray.measures.formulas import paper_scale

BY_PRECISION = [*POPULATION_KEYS, "precision"]
TABLE1_COLUMNS = ["train_acc", "test_acc", "train_loss", "test_loss", "gap_loss", "gap_acc"]
GAPS = ["gap_loss", "gap_acc"]
WEIGHT_NORM = "weight_norm"
# The columns a correlation table always has (psi_/groups_/dropped_<axis> come per axis).
CORRELATION_COLUMNS = [
    *POPULATION_KEYS, "measure", "n", "tau", "tau_low", "tau_high", "tau_b", "Psi",
    "Psi_low", "Psi_high",
]  # fmt: skip


def status_table(study: StudyTables) -> pd.DataFrame:
    counts = study.trials["status"].value_counts()
    return counts.rename_axis("status").reset_index(name="models")


def table1(study: StudyTables) -> pd.DataFrame:
    """Paper Table 1: means per dataset, model and precision, and the number of models."""
    grouped = study.ok.groupby(BY_PRECISION, observed=True)
    out = grouped[TABLE1_COLUMNS].mean()
    out.insert(0, "n", grouped.size())
    return out.reset_index()


def _mean_std(frame: pd.DataFrame, keys: list[str], value: str) -> pd.DataFrame:
    grouped = frame.groupby(keys, observed=True)[value]
    out = pd.DataFrame({"n": grouped.count(), "mean": grouped.mean(), "std": grouped.std()})
    return out.reset_index()


def table2(study: StudyTables) -> pd.DataFrame:
    """Paper Table 2: the L2 norm of all weights per precision."""
    norms = study.joined(study.measures[study.measures["measure"] == WEIGHT_NORM])
    return _mean_std(norms, BY_PRECISION, "value")


def _measures_long(study: StudyTables) -> pd.DataFrame:
    """One row per ok model and measure column: hyperparameters, value, converged."""
    values = measure_frame(study.measures).rename_axis("model_id")
    flags = convergence_frame(study.measures).rename_axis("model_id")
    long = values.reset_index().melt("model_id", var_name="measure", value_name="value")
    conv = flags.reset_index().melt("model_id", var_name="measure", value_name="converged")
    long = long.merge(conv, on=["model_id", "measure"]).dropna(subset=["value"])
    return study.joined(long)


def table3(study: StudyTables) -> pd.DataFrame:
    """Paper Table 3: every measure (as measured) per precision, mean and std over models,
    with the number of its searches that missed their tolerance."""
    long = _measures_long(study)
    out = _mean_std(long, [*POPULATION_KEYS, "measure", "precision"], "value")
    unconverged = long.groupby([*POPULATION_KEYS, "measure", "precision"], observed=True)[
        "converged"
    ].agg(lambda s: int(s.eq(False).sum()))
    return out.merge(unconverged.rename("unconverged").reset_index())


def table3_paper_scale(study: StudyTables) -> pd.DataFrame:
    """Table 3 as the paper prints it: every bound (not the weight norm, not the
    flatness columns) as sqrt(bound / m), mean and std over models per precision."""
    long = _measures_long(study)
    long = long[~long["measure"].str.endswith(FLATNESS_SUFFIX) & (long["measure"] != WEIGHT_NORM)]
    m = study.ok.set_index("model_id")["num_train"] if "num_train" in study.ok else None
    if m is None or long.empty:
        return pd.DataFrame(columns=[*POPULATION_KEYS, "measure", "precision", "n", "mean", "std"])
    scaled = [paper_scale(v, int(m[i])) for v, i in zip(long["value"], long["model_id"])]
    long = long.assign(value=scaled)
    return _mean_std(long, [*POPULATION_KEYS, "measure", "precision"], "value")


def _population_axes(models: pd.DataFrame, axes: list[str]) -> list[str]:
    return [a for a in axes if models[a].nunique(dropna=False) > 1]


def correlation_table(study: StudyTables, gap: str) -> pd.DataFrame:
    """Per population and measure: n models, tau, tau-b, psi_<axis>, groups_<axis> (used),
    dropped_<axis> (groups with no defined tau) and Psi, against `gap`. Notes on axes
    regrouped by level are in `.attrs["notes"]`."""
    measures = oriented(measure_frame(study.measures))
    rows: list[dict] = []
    notes: list[str] = []
    for key, population in study.ok.groupby(POPULATION_KEYS, dropna=False):
        models = population.merge(measures, left_on="model_id", right_index=True, how="inner")
        axes = _population_axes(models, study.axes)
        models, level_notes = conditional_levels(models, axes)
        notes += [f"{key[0]}/{key[1]}: {n}" for n in level_notes]
        for measure in measures.columns:
            usable = models.dropna(subset=[measure, gap])
            row: dict = dict(zip(POPULATION_KEYS, key))
            row.update(measure=measure, n=len(usable))
            row["tau"] = kendall_tau(usable[measure], usable[gap])
            row["tau_low"], row["tau_high"] = kendall_tau_interval(usable[measure], usable[gap])
            row["tau_b"] = kendall_tau_b(usable[measure], usable[gap])
            by_axis = granulated_kendall_by_axis(usable, measure, gap, axes)
            for axis, r in by_axis.items():
                row.update({f"psi_{axis}": r.psi, f"groups_{axis}": r.groups})
                row[f"dropped_{axis}"] = r.dropped
            defined = [r.psi for r in by_axis.values() if not math.isnan(r.psi)]
            row["Psi"] = sum(defined) / len(defined) if defined else math.nan
            row["Psi_low"], row["Psi_high"] = psi_interval(usable, measure, gap, axes)
            rows.append(row)
    out = pd.DataFrame(rows, columns=None if rows else CORRELATION_COLUMNS)
    out.attrs["notes"] = notes
    return out


def _gap_by(study: StudyTables, index: list[str]) -> pd.DataFrame:
    """Mean corruption gap with `index` as rows and precisions as columns."""
    gaps = study.joined(study.corruptions)
    wide = gaps.pivot_table(
        index=index, columns="precision", values="gap", aggfunc="mean", observed=True
    )
    wide.columns = [str(c) for c in wide.columns]
    return wide.reset_index()


def table4(study: StudyTables) -> pd.DataFrame:
    """Corruption gap (corrupted-test loss - clean-train loss) by corruption and precision."""
    return _gap_by(study, [*POPULATION_KEYS, "corruption"])


def table5(study: StudyTables) -> pd.DataFrame:
    """Corruption gap by severity and precision."""
    return _gap_by(study, [*POPULATION_KEYS, "severity"])


def table6(study: StudyTables) -> pd.DataFrame:
    """Corruption gap per precision over every corruption and severity."""
    return _gap_by(study, POPULATION_KEYS)


def tables_for(study: StudyTables) -> dict[str, pd.DataFrame]:
    """Every table whose inputs `study` has, in report order."""
    tables = {"status": status_table(study), "table1": table1(study)}
    if study.has("measures"):
        tables["table2"] = table2(study)
        tables["table3"] = table3(study)
        tables["table3_paper_scale"] = table3_paper_scale(study)
        tables["orientation"] = orientation_table(list(measure_frame(study.measures).columns))
        for gap in GAPS:
            tables[f"correlation_{gap}"] = correlation_table(study, gap)
    if study.has("corruptions"):
        tables.update(table4=table4(study), table5=table5(study), table6=table6(study))
    tables.update({f"paper_{name}": table for name, table in beside_paper(study).items()})
    return tables


def build_tables(study_dir: str | Path) -> dict[str, pd.DataFrame]:
    """All tables of the study in `study_dir` (see the module docstring for the keys)."""
    return tables_for(load_study(study_dir))
