"""The paper's published numbers as data, and this study's means beside them."""

from __future__ import annotations

import pandas as pd
import pytest

from qgen_ray import schema
from qgen_ray.analysis import write_report
from qgen_ray.analysis.paper_numbers import beside_paper, beside_table, paper_table
from qgen_ray.analysis.study_tables import load_study
from qgen_ray.analysis.synthetic import write_synthetic_study
from qgen_ray.data.corruptions import CORRUPTIONS

PRECISIONS = ["FP32", "int8", "int4", "int2"]


def test_the_paper_tables_are_complete_and_consistent():
    t1 = paper_table("table1")
    assert len(t1) == 20 and set(t1["precision"]) == set(PRECISIONS)
    # the printed gap is test - train loss (to the paper's rounding): the columns line up
    assert (t1["test_loss"] - t1["train_loss"] - t1["gap_loss"]).abs().max() < 0.011
    assert t1["test_acc"].between(0, 1).all() and t1["train_acc"].between(0, 1).all()
    row = t1[(t1["dataset"] == "cifar10") & (t1["precision"] == "FP32")].iloc[0]
    assert row["test_acc"] == pytest.approx(0.8805) and row["gap_loss"] == pytest.approx(0.302)
    assert len(paper_table("table2")) == 40 and len(paper_table("table3")) == 44
    t4 = paper_table("table4")
    assert len(t4) == 2 * 15 * 5 * 4 and set(t4["corruption"]) == set(CORRUPTIONS)
    assert set(t4["model"]) == {"resnet18", "resnet50"} and (t4["gap"] > 0).all()
    for name in ("table1", "table2", "table3", "table4"):  # every setting is one of ours
        table = paper_table(name)
        assert set(table["dataset"]) <= {"cifar10", "cifar100", "imagenet"}
        assert set(table["precision"]) == set(PRECISIONS)


@pytest.fixture(scope="module")
def cifar_study(tmp_path_factory):
    """The synthetic study labelled CIFAR-10 NiN of depth 4 (widths 8 and 10)."""
    return write_synthetic_study(
        tmp_path_factory.mktemp("paper") / "cifar", dataset="cifar10", depth=4
    )


def test_a_matching_study_gets_the_paper_beside_its_own_means(cifar_study):
    study = load_study(cifar_study)
    t1 = beside_table(study, "table1")
    assert len(t1) == 4 * 5  # precisions x quantities
    row = t1[(t1["precision"] == "FP32") & (t1["quantity"] == "test_acc")].iloc[0]
    fp32 = study.ok[study.ok["bits"] == 32]
    assert row["paper"] == pytest.approx(0.8805)
    assert row["this study"] == pytest.approx(fp32["test_acc"].mean()) and row["n"] == len(fp32)
    # Tables 2-3 name depth x width: only NiN (4x10) matches (our widths are 8 and 10)
    t2 = beside_table(study, "table2")
    assert set(t2["paper_model"]) == {"NiN (4x10)"} and (t2["n"] == 4).all()
    int2 = study.ok[(study.ok["bits"] == 2) & (study.ok["width"] == 10)]["model_id"]
    norms = study.measures[study.measures["measure"] == "weight_norm"]
    ours = norms[norms["model_id"].isin(int2)]["value"].mean()
    assert t2[t2["precision"] == "int2"].iloc[0]["this study"] == pytest.approx(ours)
    t3 = beside_table(study, "table3")  # on the paper's scale, sqrt(bound / m)
    assert set(t3["quantity"]) <= set(schema.MEASURES_COLUMNS) | {
        "pacbayes_mag_init", "pacbayes_orig", "sharpness_mag_orig"
    } and len(t3) == 3 * 4  # fmt: skip


def test_depth_that_the_paper_does_not_name_matches_only_pooled_rows(tmp_path):
    study = load_study(write_synthetic_study(tmp_path / "d2", dataset="cifar10", depth=2))
    tables = beside_paper(study)
    assert set(tables) == {"table1"}  # NiN (4x..) / (5x..) rows need depth 4 / 5


def test_table4_is_matched_per_corruption_and_severity(tmp_path):
    path = write_synthetic_study(tmp_path / "imagenet")
    trials = pd.read_parquet(path / schema.TRIALS)
    trials = trials.assign(dataset="imagenet", model="resnet18", width=None, depth=None)
    trials.to_parquet(path / schema.TRIALS, index=False)
    t4 = beside_table(load_study(path), "table4")
    assert len(t4) == 3 * 5 * 4  # the synthetic study's 3 corruptions x 5 severities
    cell = t4[(t4["corruption"] == "gaussian_noise") & (t4["severity"] == 1)
              & (t4["precision"] == "FP32")].iloc[0]  # fmt: skip
    assert cell["paper_model"] == "ResNet-18" and cell["paper"] == pytest.approx(1.067)
    report = write_report(path).read_text()
    assert "Table 4: ImageNet-C gap by corruption and severity: paper | this study." in report


def test_the_report_sets_the_paper_beside_the_study_or_says_why_not(cifar_study, tmp_path):
    text = write_report(cifar_study, out=tmp_path / "out").read_text()
    section = text[text.index("## The paper's numbers beside this study's") :]
    assert "arXiv:2404.11769" in section
    assert "| NiN | FP32 | 0.9761 |" in section  # Table 1, paper's train_acc first
    digits = write_report(write_synthetic_study(tmp_path / "synthetic")).read_text()
    assert "No setting of this study (synthetic/nin) is one the paper reports" in digits
