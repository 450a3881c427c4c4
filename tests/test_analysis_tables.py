"""The paper's tables on a small hand-made study with known answers."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from qgen_ray import schema
from qgen_ray.analysis import build_tables, precision_label
from qgen_ray.analysis.orientation import measure_frame, oriented
from qgen_ray.analysis.precision import precision_order
from qgen_ray.analysis.study_tables import infer_axes, load_study
from qgen_ray.errors import UserError

# Four ok models (lr x bits), a failed and a diverged one that must not count anywhere.
#   id  lr    bits  train_loss test_loss gap_loss train_acc test_acc gap_acc
#   m1  0.1   32    0.1        0.5       0.4      0.9       0.8      0.1
#   m2  0.01  32    0.3        0.6       0.3      0.8       0.7      0.1
#   m3  0.1   4     0.4        0.5       0.1      0.7       0.6      0.1
#   m4  0.01  4     0.6        0.7       0.1      0.6       0.6      0.0
OK_ROWS = [
    ("m1", 0.1, 32, 0.1, 0.5, 0.4, 0.9, 0.8, 0.1),
    ("m2", 0.01, 32, 0.3, 0.6, 0.3, 0.8, 0.7, 0.1),
    ("m3", 0.1, 4, 0.4, 0.5, 0.1, 0.7, 0.6, 0.1),
    ("m4", 0.01, 4, 0.6, 0.7, 0.1, 0.6, 0.6, 0.0),
]
RESULT = ["model_id", "lr", "bits", "train_loss", "test_loss", "gap_loss", "train_acc",
          "test_acc", "gap_acc"]  # fmt: skip


def trial_rows() -> pd.DataFrame:
    ok = pd.DataFrame(OK_ROWS, columns=RESULT).assign(status=schema.STATUS_OK)
    bad = pd.DataFrame(
        [("f1", 0.1, 4, np.nan, np.nan, np.nan, np.nan, np.nan, np.nan, schema.STATUS_FAILED),
         ("d1", 0.1, 8, np.inf, 9.0, 9.0, 0.1, 0.1, 0.0, schema.STATUS_DIVERGED)],
        columns=[*RESULT, "status"],
    )  # fmt: skip
    rows = pd.concat([ok, bad], ignore_index=True)
    fixed = dict(dataset="cifar10", model="nin", optimizer="sgd", weight_decay=0.0, width=8,
                 depth=2, seed=0, epochs=3, batch_size=128, reason="", best_epoch=3,
                 epochs_run=3, num_train=100, num_params=1000, seconds=1.0, finished_at="",
                 init_ckpt="", final_ckpt="", device="cpu", torch_version="",
                 qgen_version="", git_rev="")  # fmt: skip
    rows = rows.assign(**fixed, method=np.where(rows["bits"] == 32, "fp32", "lsq"))
    return rows[schema.TRIALS_COLUMNS]


def measure_rows() -> pd.DataFrame:
    # weight_norm: no search. pacbayes_orig: sigma 0.1, 0.05, 0.2, 0.5 -> 1/sigma^2 =
    # 100, 400, 25, 4; m4's search did not converge. f1 (failed) must be ignored.
    rows = [
        ("m1", "weight_norm", 10.0, np.nan, np.nan, True, "exact"),
        ("m2", "weight_norm", 14.0, np.nan, np.nan, True, "exact"),
        ("m3", "weight_norm", 3.0, np.nan, np.nan, True, "exact"),
        ("m4", "weight_norm", 5.0, np.nan, np.nan, True, "exact"),
        ("f1", "weight_norm", 99.0, np.nan, np.nan, True, "exact"),
        ("m1", "pacbayes_orig", 50.0, 0.1, 100.0, True, "fast"),
        ("m2", "pacbayes_orig", 40.0, 0.05, 400.0, True, "fast"),
        ("m3", "pacbayes_orig", 20.0, 0.2, 25.0, True, "fast"),
        ("m4", "pacbayes_orig", 30.0, 0.5, 4.0, False, "fast"),
    ]
    frame = pd.DataFrame(rows, columns=schema.MEASURES_COLUMNS[:7])
    return frame.assign(forward_images=0, seconds=1.0, paper_scale=np.nan)[schema.MEASURES_COLUMNS]


def corruption_rows() -> pd.DataFrame:
    rows = [
        ("m1", "fog", 1, 1.0), ("m1", "fog", 2, 2.0), ("m1", "snow", 1, 3.0),
        ("m1", "snow", 2, 4.0), ("m3", "fog", 1, 0.5), ("m3", "fog", 2, 1.5),
        ("m3", "snow", 1, 2.5), ("m3", "snow", 2, 2.5), ("f1", "fog", 1, 100.0),
    ]  # fmt: skip
    frame = pd.DataFrame(rows, columns=["model_id", "corruption", "severity", "gap"])
    return frame.assign(loss=frame["gap"] + 0.1, accuracy=0.5)[schema.CORRUPTIONS_COLUMNS]


@pytest.fixture
def study_dir(tmp_path):
    path = tmp_path / "hand"
    path.mkdir()
    (path / schema.STUDY_JSON).write_text(json.dumps({"study": "hand", "axes": ["lr", "bits"]}))
    trial_rows().to_parquet(path / schema.TRIALS)
    measure_rows().to_parquet(path / schema.MEASURES)
    corruption_rows().to_parquet(path / schema.CORRUPTIONS)
    return path


def test_precision_labels_and_order():
    assert [precision_label(b) for b in (32, 8, 4, 2)] == ["FP32", "int8", "int4", "int2"]
    assert precision_order([2, 32, 8, 4, 4, np.nan]) == ["FP32", "int8", "int4", "int2"]


def test_table1_means_of_ok_models_only(study_dir):
    t1 = build_tables(study_dir)["table1"]
    assert t1["precision"].astype(str).tolist() == ["FP32", "int4"]  # no ok int8 model
    fp32, int4 = t1.iloc[0], t1.iloc[1]
    assert fp32["n"] == 2 and int4["n"] == 2
    assert fp32[["train_loss", "test_loss", "gap_loss"]].tolist() == pytest.approx(
        [0.2, 0.55, 0.35]
    )
    assert fp32[["train_acc", "test_acc", "gap_acc"]].tolist() == pytest.approx([0.85, 0.75, 0.1])
    assert int4[["train_loss", "test_loss", "gap_loss"]].tolist() == pytest.approx([0.5, 0.6, 0.1])
    assert int4[["train_acc", "test_acc", "gap_acc"]].tolist() == pytest.approx([0.65, 0.6, 0.05])


def test_status_table_counts_every_row(study_dir):
    status = build_tables(study_dir)["status"].set_index("status")["models"]
    assert status.to_dict() == {"ok": 4, "failed": 1, "diverged": 1}


def test_table2_weight_norms(study_dir):
    t2 = build_tables(study_dir)["table2"]
    # FP32 {10, 14}: mean 12, sample std sqrt(8); int4 {3, 5}: mean 4, std sqrt(2)
    assert t2["precision"].astype(str).tolist() == ["FP32", "int4"]
    assert t2["n"].tolist() == [2, 2]
    assert t2["mean"].tolist() == pytest.approx([12.0, 4.0])
    assert t2["std"].tolist() == pytest.approx([math.sqrt(8), math.sqrt(2)])


def test_table3_every_measure_with_unconverged_searches(study_dir):
    t3 = build_tables(study_dir)["table3"].set_index(["measure", "precision"])
    assert set(t3.index.get_level_values("measure")) == {
        "pacbayes_orig", "pacbayes_orig.flatness", "weight_norm"}  # fmt: skip
    assert t3.loc[("pacbayes_orig", "FP32"), "mean"] == pytest.approx(45.0)
    assert t3.loc[("pacbayes_orig", "int4"), "std"] == pytest.approx(math.sqrt(50))
    assert t3.loc[("pacbayes_orig.flatness", "FP32"), "mean"] == pytest.approx(250.0)
    assert t3.loc[("pacbayes_orig.flatness", "int4"), "mean"] == pytest.approx(14.5)
    assert t3.loc[("pacbayes_orig", "int4"), "unconverged"] == 1
    assert t3.loc[("pacbayes_orig.flatness", "int4"), "unconverged"] == 1
    assert t3.loc[("pacbayes_orig", "FP32"), "unconverged"] == 0
    assert t3.loc[("weight_norm", "int4"), "unconverged"] == 0


def test_correlation_table_weight_norm_against_gap_loss(study_dir):
    corr = build_tables(study_dir)["correlation_gap_loss"].set_index("measure")
    row = corr.loc["weight_norm"]
    # (norm, gap): m1 (10, .4), m2 (14, .3), m3 (3, .1), m4 (5, .1)
    # pairs 1-2: -1, 1-3: +1, 1-4: +1, 2-3: +1, 2-4: +1, 3-4: 0 (gap tie) -> tau = 3/6
    assert row["n"] == 4
    assert row["tau"] == pytest.approx(0.5)
    assert row["tau_b"] == pytest.approx(3 / math.sqrt(6 * 5))  # one pair tied in the gap
    # psi_lr: FP32 {m1, m2}: -1; int4 {m3, m4}: gap constant, dropped
    assert (row["psi_lr"], row["groups_lr"], row["dropped_lr"]) == (-1.0, 1, 1)
    # psi_bits: lr .1 {m1, m3}: +1; lr .01 {m2, m4}: +1
    assert (row["psi_bits"], row["groups_bits"], row["dropped_bits"]) == (1.0, 2, 0)
    assert row["Psi"] == pytest.approx(0.0)


def test_correlation_table_against_gap_acc(study_dir):
    corr = build_tables(study_dir)["correlation_gap_acc"].set_index("measure")
    row = corr.loc["pacbayes_orig.flatness"]
    # (1/sigma^2, gap_acc): m1 (100, .1), m2 (400, .1), m3 (25, .1), m4 (4, 0)
    # pairs with m4: all +1 (3); the others tie in the gap -> tau = 3/6
    assert row["tau"] == pytest.approx(0.5)
    # psi_bits: lr .1 {m1, m3} gap constant (dropped); lr .01 {m2, m4}: +1
    assert (row["psi_bits"], row["groups_bits"], row["dropped_bits"]) == (1.0, 1, 1)
    # psi_lr: FP32 {m1, m2} constant gap (dropped); int4 {m3, m4}: (25 > 4)(.1 > 0) = +1
    assert (row["psi_lr"], row["groups_lr"], row["dropped_lr"]) == (1.0, 1, 1)


def test_corruption_tables(study_dir):
    tables = build_tables(study_dir)
    t4 = tables["table4"].set_index("corruption")
    assert list(t4.columns[-2:]) == ["FP32", "int4"]
    assert t4.loc["fog", ["FP32", "int4"]].tolist() == pytest.approx([1.5, 1.0])
    assert t4.loc["snow", ["FP32", "int4"]].tolist() == pytest.approx([3.5, 2.5])
    t5 = tables["table5"].set_index("severity")
    assert t5.loc[1, ["FP32", "int4"]].tolist() == pytest.approx([2.0, 1.5])
    assert t5.loc[2, ["FP32", "int4"]].tolist() == pytest.approx([3.0, 2.0])
    t6 = tables["table6"]
    assert t6[["FP32", "int4"]].iloc[0].tolist() == pytest.approx([2.5, 1.75])


def test_optional_tables_absent(study_dir):
    (study_dir / schema.MEASURES).unlink()
    (study_dir / schema.CORRUPTIONS).unlink()
    # cifar10 / nin is a setting of the paper: its Table 1 stands beside ours
    assert list(build_tables(study_dir)) == ["status", "table1", "paper_table1"]


def test_axes_inferred_without_study_json(study_dir):
    (study_dir / schema.STUDY_JSON).unlink()
    # method varies with bits (fp32 / lsq) and is left out; dataset, model, seed are fixed
    assert infer_axes(pd.read_parquet(study_dir / schema.TRIALS)) == ["lr", "bits"]
    study = load_study(study_dir)
    assert study.axes == ["lr", "bits"] and study.name == "hand"
    assert "inferred" in study.notes[0]


def test_no_trials_is_a_user_error(tmp_path):
    path = tmp_path / "nin_cifar10"
    path.mkdir()
    with pytest.raises(UserError) as err:
        build_tables(path)
    assert str(err.value) == (
        f"no trials.parquet in {path}: run the study first (python studies/nin_cifar10.py)"
    )


def test_measure_modes_are_kept_apart_and_orientation_applies():
    rows = pd.DataFrame(
        {
            "model_id": ["a", "a", "a", "b", "b"],
            "measure": ["sharpness_orig", "sharpness_orig", "sharpness_orig", "sigma", "sigma"],
            "value": [1.0, 2.0, 3.0, 0.5, 0.7],  # a's second "fast" row supersedes its first
            "flatness": [np.nan, np.nan, np.nan, np.nan, np.nan],
            "mode": ["fast", "fast", "faithful", "exact", "exact"],
        }
    )
    frame = measure_frame(rows)
    assert list(frame.columns) == ["sharpness_orig [faithful]", "sharpness_orig [fast]", "sigma"]
    assert frame.loc["a", "sharpness_orig [fast]"] == 2.0
    assert frame.loc["b", "sigma"] == 0.7  # the last row wins
    signed = oriented(frame)
    assert signed.loc["a", "sharpness_orig [faithful]"] == 3.0
    assert signed.loc["b", "sigma"] == -0.7  # larger sigma = flatter: negated
