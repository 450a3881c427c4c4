"""The paper's claims as paired tests, on hand-made tables whose answers are known."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from qgen_ray import schema
from qgen_ray.analysis.claims import CLAIMS, claims_table, holm, paired_test
from qgen_ray.analysis.precision import with_precision
from qgen_ray.analysis.study_tables import StudyTables

BITS = (32, 8, 4, 2)


def _study(groups: int = 12, seed: int = 0, drop: list[str] = ()) -> StudyTables:
    """`groups` twin groups (one seed each) at FP32 / int8 / int4 / int2, with
    gap_loss 0.2 lower when quantized (noise sd 0.01: holds), train_loss 0.3 lower when
    quantized (the paper says higher: contradicted), gap_acc pure noise (too noisy)."""
    rng = np.random.default_rng(seed)
    rows = []
    for g in range(groups):
        for bits in BITS:
            q = bits < 32
            rows.append({
                "model_id": f"m{g}-{bits}", "dataset": "digits", "model": "nin",
                "optimizer": "sgd", "lr": 0.1, "weight_decay": 0.0, "width": 1, "depth": 2,
                "bits": bits, "method": "lsq" if q else "fp32", "seed": g, "status": "ok",
                "gap_loss": 1.0 - 0.2 * q + rng.normal(0, 0.01),
                "train_loss": 1.0 - 0.3 * q + rng.normal(0, 0.01),
                "gap_acc": rng.normal(0, 0.05),
            })  # fmt: skip
    trials = pd.DataFrame(rows)
    trials = trials[~trials["model_id"].isin(drop)]
    return StudyTables(path=Path("."), name="hand", meta={}, axes=["seed"],
                       trials=with_precision(trials))  # fmt: skip


def _get(table, claim, comparison) -> pd.Series:
    hit = table[table["claim"].str.startswith(claim) & (table["comparison"] == comparison)]
    assert len(hit) == 1, (claim, comparison, table)
    return hit.iloc[0]


def test_a_claim_that_holds_one_that_is_contradicted_and_one_too_noisy_to_call():
    table = claims_table(_study())
    for comparison in ("int8 vs FP32", "int4 vs FP32", "int2 vs FP32"):
        held = _get(table, "generalization gap (loss)", comparison)
        assert held["n"] == 12 and held["verdict"] == "supported"
        assert held["ci_high"] < 0 and held["median_diff"] == pytest.approx(-0.2, abs=0.02)
        against = _get(table, "training loss", comparison)
        assert against["verdict"] == "contradicted" and against["ci_low"] < -0.25
        noisy = _get(table, "generalization gap (accuracy)", comparison)
        assert noisy["verdict"] == "inconclusive"
    between = _get(table, "generalization gap (loss)", "int2 vs int4")  # no effect there
    assert between["verdict"] == "inconclusive" and abs(between["median_diff"]) < 0.02


def test_twins_are_matched_and_a_model_without_its_twin_is_dropped_and_counted():
    table = claims_table(_study(drop=["m3-32"]))
    row = _get(table, "generalization gap (loss)", "int4 vs FP32")
    assert row["n"] == 11 and row["unpaired"] == 1  # m3-4 has no FP32 twin
    inner = _get(table, "generalization gap (loss)", "int2 vs int4")
    assert inner["n"] == 12 and inner["unpaired"] == 0


def test_few_pairs_cannot_be_called_and_say_why():
    table = claims_table(_study(groups=4))
    row = _get(table, "generalization gap (loss)", "int2 vs FP32")
    assert row["n"] == 4 and row["verdict"].startswith("inconclusive (4 pairs cannot reach")


def test_the_same_tables_give_byte_identical_claims():
    a, b = claims_table(_study()), claims_table(_study())
    assert a.to_csv(index=False) == b.to_csv(index=False)


def test_holm_and_the_paired_test_against_their_definitions():
    p = pd.Series([0.01, 0.04, np.nan, 0.03])
    # sorted 0.01, 0.03, 0.04 -> x3, x2, x1 -> 0.03, 0.06, 0.06 (monotone)
    assert holm(p).tolist()[:2] == pytest.approx([0.03, 0.06]) and np.isnan(holm(p)[2])
    assert holm(p)[3] == pytest.approx(0.06)
    low, high = np.array([1.0, 2.0, 3.0, 4.0, 5.0, 6.0]), np.array([2.0, 2.5, 4.0, 4.2, 6.0, 7.5])
    result = paired_test(low, high)
    assert result["n"] == 6 and result["median_diff"] == pytest.approx(np.median(low - high))
    assert result["p"] == pytest.approx(0.03125)  # exact: every difference negative
    assert result["median_ratio"] == pytest.approx(np.median(low / high))


def test_every_claim_of_the_issue_is_declared():
    sources = {c.source for c in CLAIMS}
    assert sources == {"Table 1", "Figure 1", "Table 2", "Table 3", "Figure 2", "Tables 4-6"}


def test_the_report_opens_with_the_claims_and_prints_table_3_on_the_paper_scale(tmp_path):
    from qgen_ray.analysis.report import write_report
    from qgen_ray.analysis.synthetic import write_synthetic_study
    from qgen_ray.analysis.tables import build_tables

    study = write_synthetic_study(tmp_path / "syn")
    md = write_report(study).read_text()
    assert md.index("## Claims") < md.index("## Trials") < md.index("## Table 1")
    assert "paired comparisons tested" in md and (study / "report" / "claims_forest.png").exists()
    assert "Kendall tau with gap_loss is above 0 at 95% for" in md  # built to predict it
    scaled = build_tables(study)["table3_paper_scale"]
    measures = pd.read_parquet(study / schema.MEASURES)
    trials = pd.read_parquet(study / schema.TRIALS).set_index("model_id")
    row = measures[measures["measure"] == "pacbayes_orig"].iloc[0]
    want = np.sqrt(row["value"] / trials.loc[row["model_id"], "num_train"])
    assert row["paper_scale"] == pytest.approx(want)
    assert "weight_norm" not in set(scaled["measure"])
    assert scaled["mean"].between(0, 100).all()  # the paper's values are ~1-30, not ~1e4
    assert "Table 3 on the paper's scale" in md
    assert md == write_report(study).read_text()  # reported twice: the same bytes


def test_the_landscape_statistic_is_the_mean_rise_over_the_grid_centred_on_float_zero():
    study = _study(groups=2)
    grid = np.linspace(-1, 1, 5, dtype=np.float32) + np.float32(3e-8)  # 0 is not exact
    rows = [{"model_id": m, "x": float(x), "y": float(y), "loss": 1.0 + b / 32 * (x**2 + y**2)}
            for m, b in zip(study.trials["model_id"], study.trials["bits"])
            for x in grid for y in grid]  # fmt: skip
    study.landscapes = pd.DataFrame(rows)
    table = claims_table(study)
    row = _get(table, "loss landscape", "int2 vs FP32")
    mean_rise = float(np.mean([[x**2 + y**2 for x in grid] for y in grid]))
    assert row["n"] == 2 and row["median_diff"] == pytest.approx((2 / 32 - 1) * mean_rise, rel=1e-4)


def test_corruption_claims_are_tested_per_corruption_and_severity_in_their_own_family():
    from qgen_ray.analysis.claims import corruption_claims

    study = _study()
    rng = np.random.default_rng(1)
    rows = []
    for model_id, bits in zip(study.ok["model_id"], study.ok["bits"]):
        q = bits < 32
        for severity in (1, 2, 3):
            # fog: quantized models' gap 0.3 lower (holds); snow: 0.3 higher (contradicted)
            rows += [
                {"model_id": model_id, "corruption": "fog", "severity": severity,
                 "gap": 1.0 - 0.3 * q + rng.normal(0, 0.01)},
                {"model_id": model_id, "corruption": "snow", "severity": severity,
                 "gap": 1.0 + 0.3 * q + rng.normal(0, 0.01)},
            ]  # fmt: skip
    study.corruptions = pd.DataFrame(rows)
    claims = corruption_claims(study)
    assert [c.name for c in claims] == [
        "gap on fog is smaller", "gap on snow is smaller",
        *[f"gap at severity {s} is smaller" for s in (1, 2, 3)],
    ]  # fmt: skip
    table = claims_table(study, claims)
    assert _get(table, "gap on fog", "int2 vs FP32")["verdict"] == "supported"
    assert _get(table, "gap on snow", "int2 vs FP32")["verdict"] == "contradicted"
    # per severity, fog and snow cancel: nothing to call
    assert _get(table, "gap at severity 2", "int4 vs FP32")["verdict"] == "inconclusive"
    assert len(table) == 5 * 5  # 5 claims x (3 against FP32 + 2 between quantized)
