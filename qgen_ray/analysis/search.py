"""A search study's results (study.json has "search"): the best model per bit width, the
Pareto front of validation loss against weight memory, the optimization history, and
Optuna's hyperparameter importances for the validation loss and the generalization gap.

Only trials.parquet is read. The importances are fANOVA's (`optuna.importance`, seeded)
over the models that finished training (status ok), with the hyperparameters as they were
trained (precision as bits, lr and weight decay on a log scale); a model stopped early by
ASHA has no final numbers and is only counted.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from qgen_ray import schema
from qgen_ray.analysis.figures import DPI, FigureFile, _save
from qgen_ray.analysis.precision import precision_color, precision_label
from qgen_ray.analysis.study_tables import StudyTables

BEST_COLUMNS = [
    "precision", "ok", "stopped", "model_id", "optimizer", "lr", "weight_decay", "width",
    "val_loss", "val_acc", "test_loss", "test_acc", "gap_loss", "weight_bits",
]  # fmt: skip
PARAMS = ["bits", "optimizer", "lr", "weight_decay", "width", "depth"]
IMPORTANCE_SEED = 0


def is_search(study: StudyTables) -> bool:
    return "search" in study.meta and "val_loss" in study.trials


def best_per_precision(study: StudyTables) -> pd.DataFrame:
    """Per precision: models ok / stopped, and the ok model with the lowest val_loss (the
    search's choice; its test numbers were measured after the search)."""
    trials = study.trials
    rows = []
    for precision, group in trials.groupby("precision", observed=True, sort=True):
        ok = group[group["status"] == schema.STATUS_OK].dropna(subset=["val_loss"])
        row = {"precision": str(precision), "ok": len(ok),
               "stopped": int((group["status"] == schema.STATUS_STOPPED).sum())}  # fmt: skip
        if len(ok):
            best = ok.loc[ok["val_loss"].idxmin()]
            row.update({c: best[c] for c in BEST_COLUMNS[3:] if c in best})
        rows.append(row)
    return pd.DataFrame(rows, columns=BEST_COLUMNS)


def pareto_front(frame: pd.DataFrame, x: str = "weight_bits", y: str = "val_loss") -> pd.Series:
    """Whether each row is on the front: no other row is at most as large in both `x` and
    `y` and smaller in one."""
    values = frame[[x, y]].to_numpy(float)
    on = np.ones(len(values), dtype=bool)
    for i, (xi, yi) in enumerate(values):
        dominated = (
            (values[:, 0] <= xi)
            & (values[:, 1] <= yi)
            & ((values[:, 0] < xi) | (values[:, 1] < yi))
        )
        on[i] = not dominated.any()
    return pd.Series(on, index=frame.index)


def importances(study: StudyTables, target: str) -> pd.DataFrame:
    """fANOVA importance of each varying hyperparameter for `target` over the ok models
    (columns parameter, importance, n); empty below 4 models or without variation."""
    import optuna

    ok = study.trials[study.trials["status"] == schema.STATUS_OK].dropna(subset=[target])
    params = [p for p in PARAMS if p in ok and ok[p].nunique(dropna=True) > 1]
    if len(ok) < 4 or not params or ok[target].nunique() < 2:
        return pd.DataFrame(columns=["parameter", "importance", "n"])
    dists = {}
    for p in params:
        values = ok[p]
        if p in ("lr", "weight_decay"):
            positive = values[values > 0]
            low = float(positive.min()) if len(positive) else 1e-12
            dists[p] = optuna.distributions.FloatDistribution(
                math.log10(low) - 1, math.log10(float(values.max()))
            )
        else:
            dists[p] = optuna.distributions.CategoricalDistribution(
                sorted(values.dropna().unique().tolist(), key=str)
            )
    ot = optuna.create_study(direction="minimize")
    for _, row in ok.iterrows():
        point = {}
        for p in params:
            v = row[p]
            if p in ("lr", "weight_decay"):
                point[p] = math.log10(v) if v > 0 else dists[p].low
            else:
                point[p] = v.item() if hasattr(v, "item") else v
        ot.add_trial(optuna.trial.create_trial(params=point, distributions=dists,
                                               value=float(row[target])))  # fmt: skip
    evaluator = optuna.importance.FanovaImportanceEvaluator(seed=IMPORTANCE_SEED)
    found = optuna.importance.get_param_importances(ot, evaluator=evaluator)
    return pd.DataFrame(
        {"parameter": list(found), "importance": list(found.values()), "n": len(ok)}
    )


def figure_search(study: StudyTables, out_dir: Path) -> list[FigureFile]:
    """The optimization history (val_loss per finished model, in finishing order, with the
    running best) beside the Pareto front of val_loss against weight memory."""
    done = study.trials.dropna(subset=["val_loss"]).sort_values("finished_at")
    if done.empty:
        return []
    fig = Figure(figsize=(11.0, 4.5), dpi=DPI)
    history, front_ax = fig.subplots(1, 2)
    order = np.arange(1, len(done) + 1)
    for bits in sorted(done["bits"].unique(), reverse=True):
        mask = (done["bits"] == bits).to_numpy()
        stopped = mask & (done["status"] == schema.STATUS_STOPPED).to_numpy()
        finished = mask & ~stopped
        history.scatter(order[finished], done["val_loss"].to_numpy()[finished], s=18,
                        color=precision_color(bits),
                        label=precision_label(bits) if finished.any() else None)  # fmt: skip
        history.scatter(order[stopped], done["val_loss"].to_numpy()[stopped], s=18,
                        facecolors="none", edgecolors=precision_color(bits),
                        label=None if finished.any() else precision_label(bits))  # fmt: skip
    ok = done[done["status"] == schema.STATUS_OK]
    running = ok["val_loss"].cummin()
    history.step(order[(done["status"] == schema.STATUS_OK).to_numpy()], running, where="post",
                 color="black", linewidth=1, label="best so far (ok)")  # fmt: skip
    history.set(xlabel="model, in finishing order", ylabel="validation loss",
                title="Optimization history (open: stopped early)")  # fmt: skip
    history.legend(fontsize=8)
    if len(ok) and "weight_bits" in ok:
        on = pareto_front(ok)
        for bits in sorted(ok["bits"].unique(), reverse=True):
            rows = ok[ok["bits"] == bits]
            front_ax.scatter(rows["weight_bits"] / 8e3, rows["val_loss"], s=18,
                             color=precision_color(bits), label=precision_label(bits))  # fmt: skip
        front = ok[on].sort_values("weight_bits")
        front_ax.step(front["weight_bits"] / 8e3, front["val_loss"], where="post",
                      color="black", linewidth=1, label="Pareto front")  # fmt: skip
        front_ax.set_xscale("log")
        front_ax.set(xlabel="weight memory (kB, as stored)", ylabel="validation loss",
                     title="Validation loss against model size")  # fmt: skip
        front_ax.legend(fontsize=8)
    fig.tight_layout()
    path = _save(fig, out_dir / "search.png")
    caption = (
        f"Search: validation loss of the {len(done)} models in finishing order with the "
        f"running best, and against weight memory with the Pareto front ({len(ok)} ok)."
    )
    return [FigureFile(path, caption)]


__all__ = ["best_per_precision", "figure_search", "importances", "is_search", "pareto_front"]
