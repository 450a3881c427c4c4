"""Read a study folder's tables for analysis: trials.parquet (required), study.json and the
optional follow-up tables. Never touches checkpoints, Ray or torch.

Only rows with status == "ok" enter the analysis; follow-up tables are restricted to those
models and joined with their hyperparameters (and a `precision` label) on `model_id`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from qgen_ray import schema
from qgen_ray.analysis.precision import with_precision
from qgen_ray.errors import UserError

# Trials are analysed per population: one dataset and one model family. These keys are
# never granulated-Kendall axes.
POPULATION_KEYS = ["dataset", "model"]

# The follow-up tables a report uses, by attribute name of `StudyTables`.
OPTIONAL_TABLES = {
    "history": schema.HISTORY,
    "steps": schema.STEPS,
    "measures": schema.MEASURES,
    "corruptions": schema.CORRUPTIONS,
    "landscapes": schema.LANDSCAPES,
}


@dataclass
class StudyTables:
    """A study's tables as read from its folder. Optional tables are None when absent."""

    path: Path | str  # a local folder, or the URI of a study on a pyarrow filesystem
    name: str
    meta: dict  # study.json ({} when the file is absent)
    axes: list[str]  # granulated-Kendall axes (study.json "axes", or inferred)
    trials: pd.DataFrame  # every row of trials.parquet, with `precision`
    history: pd.DataFrame | None = None
    steps: pd.DataFrame | None = None
    measures: pd.DataFrame | None = None
    corruptions: pd.DataFrame | None = None
    landscapes: pd.DataFrame | None = None
    notes: list[str] = field(default_factory=list)  # what was absent or inferred

    @property
    def ok(self) -> pd.DataFrame:
        """The finished models (status == "ok"): the only ones analysed."""
        return self.trials[self.trials["status"] == schema.STATUS_OK]

    def has(self, name: str) -> bool:
        """Whether the optional table `name` ("measures", ...) has rows for an ok model."""
        table = getattr(self, name)
        return table is not None and bool(table["model_id"].isin(self.ok["model_id"]).any())

    def joined(self, table: pd.DataFrame) -> pd.DataFrame:
        """`table` restricted to ok models, with their hyperparameters and precision."""
        keys = [c for c in [*schema.HPARAM_COLUMNS, "precision"] if c in self.ok.columns]
        hp = self.ok[["model_id", *keys]]
        own = [c for c in table.columns if c not in keys or c == "model_id"]
        return table[own].merge(hp, on="model_id", how="inner")


def infer_axes(trials: pd.DataFrame) -> list[str]:
    """Axes of a study without study.json: hyperparameter columns with more than one value
    among ok rows, less the population keys. `method` is left out when `bits` varies:
    in every study the method follows from the precision (fp32 <=> 32 bits)."""
    ok = trials[trials["status"] == schema.STATUS_OK]
    axes = [
        c
        for c in schema.HPARAM_COLUMNS
        if c in ok.columns and c not in POPULATION_KEYS and ok[c].nunique(dropna=False) > 1
    ]
    if "bits" in axes and "method" in axes:
        axes.remove("method")
    return axes


def _one_grid(land: pd.DataFrame, notes: list[str]) -> pd.DataFrame:
    """Landscapes on one grid only: when models were computed on grids of different
    sizes, keep the most common one and say which models were left out."""
    sizes = land.groupby("model_id").size()
    if sizes.nunique() <= 1:
        return land
    common = int(sizes.value_counts().idxmax())
    left_out = sizes[sizes != common]
    notes.append(
        f"landscapes on {sizes.nunique()} grid sizes: Figure 2 averages the {common}-point "
        f"grid of {int((sizes == common).sum())} models and leaves out {len(left_out)} "
        f"(e.g. {left_out.index[0]}, {int(left_out.iloc[0])} points); recompute them with "
        "`qgen landscape --models ... --steps N`"
    )
    return land[land["model_id"].isin(sizes.index[sizes == common])]


def load_study(study_dir: str | Path) -> StudyTables:
    """Read `study_dir` (a folder, or a URI such as s3://bucket/studies/nin). A study
    without trials.parquet (or trial folders to rebuild it from) is a UserError; a damaged
    table is set aside and rebuilt or read as missing."""
    from qgen_ray.loaders import load_trials
    from qgen_ray.store import StudyStore

    store = StudyStore(str(study_dir))
    path = Path(store.root) if store.is_local else store.uri
    if not store.exists(schema.TRIALS) and not store.trial_ids():
        raise UserError(
            f"no {schema.TRIALS} in {path}: run the study first (python studies/{store.name}.py)"
        )
    trials = with_precision(load_trials(store.uri))
    notes: list[str] = []
    meta = store.read_record(schema.STUDY_JSON, "axes are inferred from the trials") or {}
    if "axes" in meta:
        axes = [a for a in meta["axes"] if a not in POPULATION_KEYS]
    else:
        axes = infer_axes(trials)
        notes.append(
            f"no axes in {schema.STUDY_JSON}: inferred from trials.parquet as {', '.join(axes)}"
        )
    missing_cols = [a for a in axes if a not in trials.columns]
    if missing_cols:
        raise UserError(
            f"{schema.STUDY_JSON} in {path} names axes {missing_cols} that {schema.TRIALS} "
            "lacks: fix the axes list or re-collect the study"
        )
    tables = {name: store.read_table(file) for name, file in OPTIONAL_TABLES.items()}
    if tables["landscapes"] is not None:
        tables["landscapes"] = _one_grid(tables["landscapes"], notes)
    return StudyTables(
        path=path,
        name=str(meta.get("study", store.name)),
        meta=meta,
        axes=axes,
        trials=trials,
        notes=notes,
        **tables,
    )
