"""write_report on a synthetic study with and without the optional tables; the figures are
read back and checked to be real images of the expected size."""

from __future__ import annotations

import json

import matplotlib.image
import numpy as np
import pandas as pd
import pytest

from qgen_ray import schema
from qgen_ray.analysis import figures, write_report
from qgen_ray.analysis.render import markdown_table
from qgen_ray.analysis.synthetic import BITS, write_synthetic_study
from qgen_ray.errors import UserError


@pytest.fixture(scope="module")
def full_report(tmp_path_factory):
    study = write_synthetic_study(tmp_path_factory.mktemp("studies") / "synthetic_full")
    return write_report(study)


def assert_real_image(path, width_in: float, height_in: float):
    image = matplotlib.image.imread(path)
    assert image.shape[:2] == (round(height_in * figures.DPI), round(width_in * figures.DPI))
    rgba = np.ascontiguousarray((image * 255).astype(np.uint8))  # PNGs read as RGBA floats
    colours = np.unique(rgba.view(np.uint32))
    assert len(colours) > 50, f"{path.name} is (nearly) a single colour"
    assert (image[..., :3] < 0.5).mean() > 0.005, f"{path.name} has no dark ink (text, lines)"


def test_full_report_has_every_section(full_report):
    text = full_report.read_text()
    assert full_report.name == "report.md" and full_report.parent.name == schema.REPORT_DIR
    for heading in ("## Table 1", "## Table 2", "## Table 3", "## Correlation", "## Figures",
                    "## Tables 4-6"):  # fmt: skip
        assert heading in text
    assert "| synthetic | nin | weight_norm | " in text and " ± " in text  # Table 3 cells
    assert "Kendall correlation of each measure with gap_loss." in text
    assert "Kendall correlation of each measure with gap_acc." in text
    assert "lr depends on optimizer" in text  # the conditional learning rates are said
    assert "no measures yet" not in text and "## Missing" not in text
    # Table 1 lists the precisions in the paper's order
    order = [text.index(f"| synthetic | nin | {p} |") for p in ("FP32", "int8", "int4", "int2")]
    assert order == sorted(order)


def _section_rows(text: str, heading: str) -> list[list[str]]:
    """The body rows of the first Markdown table after `heading`, as lists of cells."""
    lines = text[text.index(heading) :].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


def test_report_numbers_are_the_tables_own(full_report):
    """Tables 1 and 2 recomputed from the Parquet tables with pandas: per precision the
    mean of each column over the ok models (Table 1) and the weight norm's mean and std
    (Table 2), equal to the report's cells at their 4 significant digits."""
    study = full_report.parent.parent
    text = full_report.read_text()
    trials = pd.read_parquet(study / schema.TRIALS)
    ok = trials[trials["status"] == schema.STATUS_OK]
    names = {32: "FP32", 8: "int8", 4: "int4", 2: "int2"}
    columns = ["train_acc", "test_acc", "train_loss", "test_loss", "gap_loss", "gap_acc"]
    table1 = {row[2]: row for row in _section_rows(text, "## Table 1")}
    for bits, group in ok.groupby("bits"):
        row = table1[names[bits]]
        assert int(row[3]) == len(group)
        for cell, column in zip(row[4:], columns):
            assert float(cell) == pytest.approx(group[column].mean(), rel=5e-4), column
    measures = pd.read_parquet(study / schema.MEASURES)
    norms = measures[measures["measure"] == "weight_norm"].merge(ok[["model_id", "bits"]])
    table2 = {row[2]: row for row in _section_rows(text, "## Table 2")}
    for bits, group in norms.groupby("bits"):
        row = table2[names[bits]]
        assert int(row[3]) == len(group)
        assert float(row[4]) == pytest.approx(group["value"].mean(), rel=5e-4)
        assert float(row[5]) == pytest.approx(group["value"].std(), rel=5e-4)


def test_full_report_figures_are_linked_and_real(full_report):
    folder = full_report.parent
    text = full_report.read_text()
    pngs = sorted(p.name for p in folder.glob("*.png"))
    assert pngs == ["claims_forest.png", "fig1_steps_synthetic_nin.png",
                    "fig2_landscape_synthetic_nin.png", "training_synthetic_nin.png"]  # fmt: skip
    for name in pngs:
        assert f"]({name})" in text
    assert_real_image(folder / pngs[1], *figures.FIGURE_SIZES["steps"])
    w, h = figures.LANDSCAPE_PANEL
    assert_real_image(folder / pngs[2], w * len(BITS) + 1.0, 2 * h)
    assert_real_image(folder / pngs[3], *figures.FIGURE_SIZES["curves"])


def test_full_report_html_is_self_contained(full_report):
    page = (full_report.parent / "report.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    assert page.count("<table") >= 10  # status, 1, 2, 3, orientation, 2 correlations, 4-6
    assert '<img src="fig1_steps_synthetic_nin.png"' in page
    assert "<script" not in page and "http" not in page  # nothing fetched from elsewhere


def test_report_without_optional_tables(tmp_path):
    study = write_synthetic_study(
        tmp_path / "bare", measures=False, corruptions=False, landscapes=False
    )
    (study / schema.HISTORY).unlink()
    (study / schema.STEPS).unlink()
    text = write_report(study).read_text()
    assert "## Missing" in text
    for said in ("no measures yet", "no corruptions", "no landscapes", "no learned step sizes",
                 "no training history"):  # fmt: skip
        assert said in text
    assert "## Table 1" in text
    for absent in ("## Table 2", "## Correlation", "## Figures", "## Tables 4-6"):
        assert absent not in text
    # the claims' forest plot is the only figure: Table 1's claims need no optional table
    assert [p.name for p in (study / schema.REPORT_DIR).glob("*.png")] == ["claims_forest.png"]
    assert (study / schema.REPORT_DIR / "report.html").is_file()


def test_report_when_no_model_finished(tmp_path):
    study = write_synthetic_study(tmp_path / "early", corruptions=False, landscapes=False)
    trials = pd.read_parquet(study / schema.TRIALS)
    trials.assign(status=schema.STATUS_FAILED).to_parquet(study / schema.TRIALS)
    (study / schema.STUDY_JSON).unlink()
    text = write_report(study).read_text()
    assert "no model has status ok yet" in text and "## Table 1" not in text
    assert "no axes in study.json" in text
    assert not list((study / schema.REPORT_DIR).glob("*.png"))


def test_report_without_trials_is_a_user_error(tmp_path):
    (tmp_path / "demo").mkdir()
    (tmp_path / "demo" / schema.STUDY_JSON).write_text(json.dumps({"study": "demo"}))
    with pytest.raises(UserError, match=r"no trials.parquet in .*demo: run the study first "
                       r"\(python studies/demo.py\)"):  # fmt: skip
        write_report(tmp_path / "demo")


def test_markdown_table():
    frame = pd.DataFrame({"name": ["a|b", "c"], "x": [1.23456789, np.nan], "n": [3, 4]})
    assert markdown_table(frame) == (
        "| name | x | n |\n|---|---:|---:|\n| a\\|b | 1.235 | 3 |\n| c | – | 4 |"
    )
