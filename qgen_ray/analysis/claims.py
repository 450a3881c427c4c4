"""The paper's claims as paired tests on a study's tables.

The grid is paired by construction: every quantized model has an FP32 twin with the same
dataset, model, optimizer, learning rate, weight decay, width, depth and seed (`TWIN_KEY`),
and the quantized precisions are twins of each other too. A claim compares one value per
model (or per model and layer) between twins: int8 / int4 / int2 against FP32, and each
precision against the next higher one. For each comparison: the number of pairs, the
median paired difference (lower minus higher precision) and the median ratio, a 95%
bootstrap confidence interval of the median difference (`scipy.stats.bootstrap`,
percentile, seeded: the same tables give the same numbers), the two-sided Wilcoxon
signed-rank p-value, Holm's correction over every directional comparison of the report,
and a verdict:

    supported      Holm p < 0.05 and the interval lies on the side the paper states
    contradicted   Holm p < 0.05 and the interval lies on the other side
    inconclusive   otherwise (with fewer than 6 pairs a two-sided Wilcoxon test cannot
                   reach 0.05 at all: the verdict then says so)

Rows without a direction (the plain sharpness / PAC-Bayes bounds, which the paper says may
disagree with the magnitude-aware ones) are described, not tested, and stay out of Holm.
A model without its twin is dropped and counted (`unpaired`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats

from qgen_ray import schema
from qgen_ray.analysis.precision import precision_label
from qgen_ray.analysis.study_tables import StudyTables

TWIN_KEY = [c for c in schema.HPARAM_COLUMNS if c not in ("bits", "method")]
ALPHA = 0.05
BOOTSTRAP_RESAMPLES = 2000
SEED = 0
MIN_PAIRS_FOR_05 = 6  # the smallest n whose exact two-sided Wilcoxon p can be < 0.05
LOWER, HIGHER = "lower", "higher"

CLAIMS_COLUMNS = [
    "claim", "source", "comparison", "paper", "n", "unpaired", "median_diff", "ci_low",
    "ci_high", "median_ratio", "reference", "p", "p_holm", "verdict",
]  # fmt: skip


@dataclass(frozen=True)
class Claim:
    """One statement of the paper: which value, where it comes from, which way it goes
    at lower precision (None: described only), and whether FP32 takes part."""

    name: str
    source: str
    paper: str
    values: Callable[[StudyTables], pd.DataFrame | None]  # model_id, [unit], value
    direction: str | None
    against_fp32: bool = True


def _trial_column(column: str):
    def values(study: StudyTables) -> pd.DataFrame:
        return study.ok[["model_id", column]].rename(columns={column: "value"})

    return values


def _measure(name: str):
    def values(study: StudyTables) -> pd.DataFrame | None:
        if not study.has("measures"):
            return None
        rows = study.measures[study.measures["measure"] == name]
        return rows[["model_id", "value"]] if len(rows) else None

    return values


def _steps(study: StudyTables) -> pd.DataFrame | None:
    """One learned step per model and layer: paired per layer."""
    if not study.has("steps"):
        return None
    return study.steps[["model_id", "layer", "step"]].rename(
        columns={"layer": "unit", "step": "value"}
    )


def _landscape_rise(study: StudyTables) -> pd.DataFrame | None:
    """Figure 2's statistic: the mean loss rise over the grid, mean(loss) - loss at the
    centre (the trained weights). Lower is flatter."""
    if not study.has("landscapes"):
        return None
    land = study.landscapes.assign(r=study.landscapes["x"].abs() + study.landscapes["y"].abs())
    # the grid point nearest (0, 0) per model (a float grid holds 0 only approximately)
    centre = land.loc[land.groupby("model_id")["r"].idxmin(), ["model_id", "loss"]]
    mean = land.groupby("model_id", as_index=False)["loss"].mean()
    out = mean.merge(centre, on="model_id", suffixes=("", "_centre"))
    return out.assign(value=out["loss"] - out["loss_centre"])[["model_id", "value"]]


def _corruption_gap(study: StudyTables) -> pd.DataFrame | None:
    """Tables 4-6's statistic per model: the mean gap over every corruption and severity."""
    if not study.has("corruptions"):
        return None
    gap = study.corruptions.groupby("model_id", as_index=False)["gap"].mean()
    return gap.rename(columns={"gap": "value"})


MAGNITUDE_AWARE = [
    "pacbayes_mag_init", "pacbayes_mag_orig", "sharpness_mag_init", "sharpness_mag_orig",
]  # fmt: skip
PLAIN = ["pacbayes_init", "pacbayes_orig", "sharpness_init", "sharpness_orig"]

CLAIMS = [
    Claim("generalization gap (loss) is smaller", "Table 1", "lower at fewer bits",
          _trial_column("gap_loss"), LOWER),
    Claim("generalization gap (accuracy) is smaller", "Table 1", "lower at fewer bits",
          _trial_column("gap_acc"), LOWER),
    Claim("training loss is higher", "Table 1", "higher at fewer bits",
          _trial_column("train_loss"), HIGHER),
    Claim("learned step Δ is larger (per layer)", "Figure 1", "larger at fewer bits",
          _steps, HIGHER, against_fp32=False),
    Claim("weight norm is smaller", "Table 2", "lower when quantized",
          _measure("weight_norm"), LOWER),
    *[Claim(f"{m} is lower (flatter)", "Table 3", "lower when quantized", _measure(m), LOWER)
      for m in MAGNITUDE_AWARE],
    *[Claim(f"{m} (plain)", "Table 3", "may say the opposite", _measure(m), None)
      for m in PLAIN],
    Claim("loss landscape is flatter (mean loss rise)", "Figure 2", "flatter when quantized",
          _landscape_rise, LOWER),
    Claim("gap on corrupted data is smaller", "Tables 4-6", "lower when quantized",
          _corruption_gap, LOWER),
]  # fmt: skip


def _corruption_cell(column: str, value):
    """The gap per model on one corruption (mean over severities) or one severity (mean
    over corruptions)."""

    def values(study: StudyTables) -> pd.DataFrame | None:
        rows = study.corruptions[study.corruptions[column] == value]
        gap = rows.groupby("model_id", as_index=False)["gap"].mean()
        return gap.rename(columns={"gap": "value"})

    return values


def corruption_claims(study: StudyTables) -> list[Claim]:
    """Tables 4-6 per corruption and per severity: one claim each, for a family of its own
    (`claims_table(study, corruption_claims(study))` applies Holm within it)."""
    if not study.has("corruptions"):
        return []
    table = study.corruptions
    names = list(dict.fromkeys(table["corruption"]))
    return [
        *[Claim(f"gap on {c} is smaller", "Table 4", "lower when quantized",
                _corruption_cell("corruption", c), LOWER) for c in names],
        *[Claim(f"gap at severity {v} is smaller", "Table 5", "lower when quantized",
                _corruption_cell("severity", v), LOWER)
          for v in sorted(table["severity"].unique())],
    ]  # fmt: skip


def _comparisons(bits: list[int], against_fp32: bool) -> list[tuple[int, int]]:
    """(lower, higher) precision pairs: each quantized one against FP32, and each
    quantized one against the next higher quantized one."""
    quantized = sorted(b for b in bits if b < 32)
    out = [(b, 32) for b in quantized] if against_fp32 and 32 in bits else []
    return out + list(zip(quantized, quantized[1:]))


def pair_values(study: StudyTables, values: pd.DataFrame, low: int, high: int):
    """(lower-precision values, higher-precision values, unpaired count), aligned pairs of
    twins (per unit when the values have one)."""
    keyed = values.merge(study.ok[["model_id", "bits", *TWIN_KEY]], on="model_id")
    key = [*TWIN_KEY, *(["unit"] if "unit" in values else [])]
    a = keyed[keyed["bits"] == low].set_index(key)["value"]
    b = keyed[keyed["bits"] == high].set_index(key)["value"]
    both = a.index.intersection(b.index)
    unpaired = len(a) + len(b) - 2 * len(both)
    return a.loc[both].to_numpy(float), b.loc[both].to_numpy(float), unpaired


def paired_test(low: np.ndarray, high: np.ndarray) -> dict:
    """n, median difference (low - high) with its 95% bootstrap interval, median ratio,
    the median |high| (`reference`, the forest plot's scale), Wilcoxon signed-rank p
    (two-sided)."""
    diff = low - high
    n = len(diff)
    out = {"n": n, "median_diff": np.nan, "ci_low": np.nan, "ci_high": np.nan,
           "median_ratio": np.nan, "reference": np.nan, "p": np.nan}  # fmt: skip
    if n == 0:
        return out
    out["reference"] = float(np.median(np.abs(high)))  # the scale the forest plot uses
    out["median_diff"] = float(np.median(diff))
    positive = (low > 0) & (high > 0)
    if positive.any():
        out["median_ratio"] = float(np.median(low[positive] / high[positive]))
    if n >= 2 and np.ptp(diff) > 0:
        rng = np.random.default_rng(SEED)
        ci = stats.bootstrap((diff,), np.median, confidence_level=0.95, method="percentile",
                             n_resamples=BOOTSTRAP_RESAMPLES, rng=rng)  # fmt: skip
        out["ci_low"], out["ci_high"] = (
            float(ci.confidence_interval.low),
            float(ci.confidence_interval.high),
        )
    elif n >= 1:
        out["ci_low"] = out["ci_high"] = out["median_diff"]
    out["p"] = 1.0 if not np.any(diff) else float(stats.wilcoxon(diff).pvalue)
    return out


def holm(p: pd.Series) -> pd.Series:
    """Holm's step-down adjusted p-values (NaN stays NaN)."""
    valid = p.dropna().sort_values()
    m = len(valid)
    adjusted = np.minimum(1.0, np.maximum.accumulate((m - np.arange(m)) * valid.to_numpy()))
    return pd.Series(adjusted, index=valid.index).reindex(p.index)


def verdict(row: pd.Series, direction: str | None) -> str:
    if direction is None:
        if row["n"] == 0 or np.isnan(row["median_diff"]):
            return "no pairs"
        diff = row["median_diff"]
        return "described: " + (LOWER if diff < 0 else HIGHER if diff > 0 else "equal")
    if row["n"] == 0:
        return "no pairs"
    if row["n"] < MIN_PAIRS_FOR_05:
        pairs = f"{row['n']} pair{'s' if row['n'] != 1 else ''}"
        return f"inconclusive ({pairs} cannot reach p < 0.05)"
    side = HIGHER if row["ci_low"] > 0 else LOWER if row["ci_high"] < 0 else None
    if not row["p_holm"] < ALPHA or side is None:
        return "inconclusive"
    return "supported" if side == direction else "contradicted"


def claims_table(study: StudyTables, claims: list[Claim] = CLAIMS) -> pd.DataFrame:
    """One row per claim and comparison (CLAIMS_COLUMNS); Holm over the directional rows."""
    bits = sorted(study.ok["bits"].unique().tolist()) if len(study.ok) else []
    rows, directions = [], []
    for claim in claims:
        values = claim.values(study)
        if values is None or not len(values):
            continue
        for low, high in _comparisons(bits, claim.against_fp32):
            a, b, unpaired = pair_values(study, values, low, high)
            comparison = f"{precision_label(low)} vs {precision_label(high)}"
            rows.append({"claim": claim.name, "source": claim.source,
                         "comparison": comparison, "paper": claim.paper,
                         "unpaired": unpaired, **paired_test(a, b)})  # fmt: skip
            directions.append(claim.direction)
    table = pd.DataFrame(
        rows, columns=[c for c in CLAIMS_COLUMNS if c not in ("p_holm", "verdict")]
    )
    tested = pd.Series([d is not None for d in directions], index=table.index, dtype=bool)
    table["p_holm"] = holm(table["p"].where(tested))
    table["verdict"] = [verdict(row, d) for (_, row), d in zip(table.iterrows(), directions)]
    return table[CLAIMS_COLUMNS]


__all__ = [
    "CLAIMS",
    "CLAIMS_COLUMNS",
    "Claim",
    "claims_table",
    "corruption_claims",
    "holm",
    "paired_test",
    "pair_values",
]
