"""The QGen paper's published numbers as data, and this study's beside them.

CSV files in `analysis/paper/`, one row per printed row (Tables 1-3) or cell (Table 4),
keyed in this package's vocabulary (`dataset`, `model`, `depth`, `width`, `precision`:
"cifar10", "nin", 4, 10, "int4") with the paper's own labels kept beside (`paper_dataset`,
`paper_model`). Numbers are as printed; only Table 1's accuracies are turned from percent
into fractions on reading (ours are fractions). Transcribed from the paper's text and
checked number for number against it, in order; the captions did not survive extraction,
so the column meanings follow the paper's text (docs/method.md §4.6).

    table1  CIFAR-10/100 NiN (pooled over the NiN grid), ImageNet DeiT-T, Swin-T, ResNet-18:
            train/test accuracy and loss, gap_loss
    table2  weight norm: CIFAR NiN (depth x width), ResNet-18/50; ImageNet ResNet-18/50
    table3  the eight sharpness / PAC-Bayes bounds on the paper's scale, sqrt(bound / m)
    table4  ImageNet-C gap (corrupted-test loss - clean-train loss), ResNet-18/50,
            15 corruptions x 5 severities

`beside_paper(study)` lines a study's means up against every paper row of the same
setting (dataset, model, precision; depth and width where the paper names them).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from qgen_ray.analysis.orientation import measure_frame
from qgen_ray.analysis.study_tables import StudyTables
from qgen_ray.measures.formulas import paper_scale

CITATION = (
    "AskariHemmat, Jeddi, Askari Hemmat, Lazarevich, Hoffman, Sah, Saboori, Savaria, David. "
    "QGen: On the Ability to Generalize in Quantization Aware Training. arXiv:2404.11769, 2024"
)
FOLDER = Path(__file__).with_name("paper")
SETTING = ["dataset", "model", "depth", "width", "precision"]
CELL = {"table4": ["corruption", "severity"]}  # keys beyond the setting
QUANTITIES = {
    "table1": ["train_acc", "test_acc", "train_loss", "test_loss", "gap_loss"],
    "table2": ["weight_norm"],
    "table3": [
        "pacbayes_init", "pacbayes_orig", "pacbayes_mag_init", "pacbayes_mag_orig",
        "sharpness_init", "sharpness_orig", "sharpness_mag_init", "sharpness_mag_orig",
    ],
    "table4": ["gap"],
}  # fmt: skip
TITLES = {
    "table1": "Table 1: accuracy (fractions), loss and gap_loss",
    "table2": "Table 2: weight norm",
    "table3": "Table 3: bounds on the paper's scale, sqrt(bound / m)",
    "table4": "Table 4: ImageNet-C gap by corruption and severity",
}
BESIDE_COLUMNS = ["paper_model", *SETTING, "quantity", "paper", "this study", "n"]


def paper_table(name: str) -> pd.DataFrame:
    """One of the paper's tables (see the module docstring), one row per printed row."""
    table = pd.read_csv(FOLDER / f"{name}.csv", dtype={"precision": str})
    if name == "table1":
        table[["train_acc", "test_acc"]] = table[["train_acc", "test_acc"]] / 100
    return table


def _ours(study: StudyTables, name: str) -> pd.DataFrame | None:
    """model_id, [cell keys], quantity, value: this study's per-model values of a table."""
    if name == "table1":
        frame = study.ok[["model_id", *QUANTITIES[name]]]
        return frame.melt("model_id", var_name="quantity", value_name="value")
    if name in ("table2", "table3") and study.has("measures"):
        values = measure_frame(study.measures).rename_axis("model_id").reset_index()
        long = values.melt("model_id", var_name="quantity", value_name="value")
        long = long[long["quantity"].isin(QUANTITIES[name])].dropna(subset=["value"])
        if name == "table3" and len(long):
            m = study.ok.set_index("model_id")["num_train"]
            long = long[long["model_id"].isin(m.index)]
            scaled = [paper_scale(v, int(m[i])) for v, i in zip(long["value"], long["model_id"])]
            long = long.assign(value=scaled)
        return long
    if name == "table4" and study.has("corruptions"):
        frame = study.corruptions[["model_id", *CELL[name], "gap"]]
        return frame.rename(columns={"gap": "value"}).assign(quantity="gap")
    return None


def beside_table(study: StudyTables, name: str) -> pd.DataFrame:
    """Every row of the paper's `name` whose setting this study has: the paper's number,
    this study's mean over its ok models of that setting, and how many (BESIDE_COLUMNS)."""
    cell = CELL.get(name, [])
    columns = [*BESIDE_COLUMNS[:-4], *cell, *BESIDE_COLUMNS[-4:]]
    ours = _ours(study, name)
    if ours is None or ours.empty:
        return pd.DataFrame(columns=columns)
    hp = study.ok[["model_id", *[c for c in SETTING if c in study.ok.columns]]].copy()
    hp["precision"] = hp["precision"].astype(str)
    ours = ours.merge(hp, on="model_id")
    paper = paper_table(name).melt(
        ["paper_dataset", "paper_model", *SETTING, *cell],
        value_vars=QUANTITIES[name], var_name="quantity", value_name="paper",
    )  # fmt: skip
    paper["row"] = range(len(paper))
    keys = ["dataset", "model", "precision", "quantity", *cell]
    both = paper.merge(ours, on=keys, suffixes=("", "_ours"))
    for axis in ("depth", "width"):  # the paper names them for some NiN rows only
        if f"{axis}_ours" in both:
            both = both[both[axis].isna() | (both[axis] == both[f"{axis}_ours"])]
        else:
            both = both[both[axis].isna()]
    if both.empty:
        return pd.DataFrame(columns=columns)
    grouped = both.groupby("row")["value"]
    out = paper.set_index("row").loc[grouped.mean().index]
    out["this study"], out["n"] = grouped.mean(), grouped.count()
    return out.reset_index(drop=True)[columns]


def beside_paper(study: StudyTables) -> dict[str, pd.DataFrame]:
    """`beside_table` for each of the paper's tables with at least one matching row."""
    tables = {name: beside_table(study, name) for name in QUANTITIES}
    return {name: table for name, table in tables.items() if len(table)}


def paper_settings() -> list[str]:
    """ "dataset/model" of every setting the paper reports (for a study matching none)."""
    settings = pd.concat([paper_table(name)[["dataset", "model"]] for name in QUANTITIES])
    return sorted({f"{d}/{m}" for d, m in settings.itertuples(index=False)})
