"""`write_report(study_dir, out=None)`: the study's tables and figures as report.md,
report.html (self-contained; PNGs beside it, linked by relative path) and the PNG figures,
in <study>/report or in `out` (the study may then be on any pyarrow filesystem, s3://...:
its Parquet tables are read through the store, nothing is written there).

Whatever is missing (no measures yet, no corruptions, no landscapes) is stated in the
report instead of failing; only a folder without trials.parquet is an error.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from qgen_ray import schema
from qgen_ray.analysis import figures, search
from qgen_ray.analysis.claims import claims_table, corruption_claims
from qgen_ray.analysis.paper_numbers import CITATION, TITLES, paper_settings
from qgen_ray.analysis.render import (
    Block,
    Bullets,
    Heading,
    Image,
    Paragraph,
    Table,
    format_cell,
    to_html,
    to_markdown,
)
from qgen_ray.analysis.study_tables import OPTIONAL_TABLES, POPULATION_KEYS, StudyTables, load_study
from qgen_ray.analysis.tables import GAPS, tables_for
from qgen_ray.errors import UserError

REPORT_MD = "report.md"
REPORT_HTML = "report.html"

# Per follow-up table: what its absence is called and what it leaves out of the report.
MISSING = {
    "measures": (
        "no measures yet",
        "Tables 2-3 and the correlation tables are left out; run the measures job",
    ),
    "corruptions": ("no corruptions", "Tables 4-6 are left out; run the corruption job"),
    "landscapes": ("no landscapes", "Figure 2 is left out; run the landscape job"),
    "steps": ("no learned step sizes", "Figure 1 is left out"),
    "history": ("no training history", "the training curves are left out"),
}


def _missing(study: StudyTables) -> list[str]:
    items = list(study.notes)
    for name, (what, consequence) in MISSING.items():
        if not study.has(name):
            file = OPTIONAL_TABLES[name]
            items.append(f"{what} ({file} absent or without finished models): {consequence}")
    if not len(study.ok):
        items.append("no model has status ok yet: only the trial counts are reported")
    return items


def _header(study: StudyTables) -> list[Block]:
    meta = study.meta
    facts = [f"study folder: {study.path}", f"axes: {', '.join(study.axes) or 'none'}"]
    facts += [f"{k}: {meta[k]}" for k in ("dataset", "model", "created_at") if k in meta]
    blocks: list[Block] = [Heading(f"QGen report: {study.name}", 1), Bullets(facts)]
    provenance = meta.get("provenance") or {}
    if provenance:
        blocks += [Heading("Provenance", 3), Bullets([f"{k}: {v}" for k, v in provenance.items()])]
    return blocks


def _table3_display(table3: pd.DataFrame) -> pd.DataFrame:
    """Measures as rows, precisions as columns, cells "mean ± std"."""
    keys = [*POPULATION_KEYS, "measure"]
    cells = table3.assign(
        cell=[f"{format_cell(m)} ± {format_cell(s)}" for m, s in zip(table3["mean"], table3["std"])]
    )
    wide = cells.pivot(index=keys, columns="precision", values="cell")
    wide.columns = [str(c) for c in wide.columns]
    unconverged = table3.groupby(keys)["unconverged"].sum().rename("unconverged searches")
    return wide.join(unconverged).reset_index()


def _correlation_display(table: pd.DataFrame) -> pd.DataFrame:
    """tau, tau-b, Psi, and per axis "psi (groups used / groups)"."""
    axes = [c.removeprefix("psi_") for c in table.columns if c.startswith("psi_")]
    out = table[[*POPULATION_KEYS, "measure", "n", "tau"]].copy()
    bounds = zip(table["tau_low"], table["tau_high"])
    out["tau 95% CI"] = [f"[{format_cell(lo)}, {format_cell(hi)}]" for lo, hi in bounds]
    out["tau_b"] = table["tau_b"]
    for axis in axes:
        used, dropped = table[f"groups_{axis}"], table[f"dropped_{axis}"]
        out[f"ψ {axis} (groups)"] = [
            f"{format_cell(p)} ({u}/{u + d})"
            for p, u, d in zip(table[f"psi_{axis}"], used, dropped)
        ]
    out["Ψ"] = table["Psi"]
    bounds = zip(table["Psi_low"], table["Psi_high"])
    out["Ψ 95% CI"] = [f"[{format_cell(lo)}, {format_cell(hi)}]" for lo, hi in bounds]
    return out


def _correlation_blocks(tables: dict[str, pd.DataFrame]) -> list[Block]:
    blocks: list[Block] = [
        Heading("Correlation with the generalization gap"),
        Paragraph(
            "Each measure is oriented so that larger predicts a larger gap (table below). "
            "tau: the pairwise-sign Kendall coefficient over all ok models of the population "
            "(ties count 0), with a seeded 95% bootstrap interval over models; tau_b: "
            "scipy's tie-corrected tau. ψ axis: the mean tau over the "
            "groups of models that differ only in that axis, with (groups used / groups); a "
            "group with fewer than 2 models or a constant measure or gap has no tau and is "
            "dropped. Ψ: the mean of the defined ψ (Jiang et al. 2019), with a seeded 95% "
            "bootstrap interval over models (the same resampling as tau's)."
        ),
        Table("Orientation of each measure.", tables["orientation"]),
    ]
    for gap in GAPS:
        table = tables[f"correlation_{gap}"]
        blocks.append(
            Table(f"Kendall correlation of each measure with {gap}.", _correlation_display(table))
        )
        if table.attrs.get("notes"):
            blocks.append(Bullets(table.attrs["notes"]))
    return blocks


def _measure_blocks(tables: dict[str, pd.DataFrame]) -> list[Block]:
    if "table2" not in tables:
        return []
    blocks: list[Block] = [Heading("Table 2: weight norm per precision")]
    if len(tables["table2"]):
        blocks.append(Table("L2 norm of all weights: mean and std over models.", tables["table2"]))
    else:
        blocks.append(Paragraph("No weight_norm rows in measures.parquet."))
    blocks += [
        Heading("Table 3: measures per precision"),
        Table(
            "Every measure as measured (not oriented), mean ± std over models; "
            "<name>.flatness is 1/sigma^2 or 1/alpha^2 of its search.",
            _table3_display(tables["table3"]),
        ),
    ]
    if len(tables.get("table3_paper_scale", [])):
        scaled = tables["table3_paper_scale"].assign(unconverged=0)
        blocks.append(Table(
            "Table 3 on the paper's scale: each bound as sqrt(bound / m), m the training-set "
            "size (the reference implementation of Dziugaite et al. 2020, which QGen follows), "
            "mean ± std over models; read these against the paper's Table 3.",
            _table3_display(scaled).drop(columns=["unconverged searches"]),
        ))  # fmt: skip
    return blocks + _correlation_blocks(tables)


def _corruption_blocks(study: StudyTables, tables: dict[str, pd.DataFrame]) -> list[Block]:
    if "table4" not in tables:
        return []
    what = "mean gap = loss on the corrupted test set - loss on the clean training set"
    paired = claims_table(study, corruption_claims(study))
    return [
        Heading("Tables 4-6: corrupted data"),
        Table(
            "Paired per corruption (mean over severities) and per severity (mean over "
            "corruptions): each quantized model against its FP32 twin and the next higher "
            "precision, tested as in the Claims section with Holm's correction within this "
            "table.",
            _claims_display(paired).drop(columns=["source", "the paper says"]),
        ),
        Table(f"Table 4: by corruption and precision ({what}).", tables["table4"]),
        Table(f"Table 5: by severity and precision ({what}).", tables["table5"]),
        Table(
            f"Table 6: per precision, over every corruption and severity ({what}).",
            tables["table6"],
        ),
    ]


def _figure_blocks(study: StudyTables, out_dir: Path) -> list[Block]:
    drawn: list[figures.FigureFile] = []
    for name, draw in (
        ("steps", figures.figure_steps),
        ("landscapes", figures.figure_landscapes),
        ("history", figures.figure_training_curves),
    ):
        if study.has(name):
            drawn += draw(study, out_dir)
    if not drawn:
        return []
    return [Heading("Figures")] + [Image(f.caption, f.path.name) for f in drawn]


def _claims_display(claims: pd.DataFrame) -> pd.DataFrame:
    """claim | the paper says | this study | effect [95% CI] | n | p | p (Holm) | verdict."""
    effect = [
        f"{format_cell(d)} [{format_cell(lo)}, {format_cell(hi)}]"
        for d, lo, hi in zip(claims["median_diff"], claims["ci_low"], claims["ci_high"])
    ]
    return pd.DataFrame({
        "claim": claims["claim"], "source": claims["source"],
        "comparison": claims["comparison"], "the paper says": claims["paper"],
        "median ratio": claims["median_ratio"], "median difference [95% CI]": effect,
        "pairs (unpaired)": [f"{n} ({u})" for n, u in zip(claims["n"], claims["unpaired"])],
        "p": claims["p"], "p (Holm)": claims["p_holm"], "verdict": claims["verdict"],
    })  # fmt: skip


def _predictors(tables: dict[str, pd.DataFrame]) -> str:
    """Section 4 in one sentence: the measures whose Kendall tau with gap_loss has a 95%
    bootstrap interval above 0 (they predict the gap), per population."""
    table = tables.get("correlation_gap_loss")
    if table is None or table.empty:
        return ""
    above = table[table["tau_low"] > 0]
    named = "; ".join(f"{m} (tau {format_cell(t)}, n {n})"
                      for m, t, n in zip(above["measure"], above["tau"], above["n"]))  # fmt: skip
    return (
        "Section 4 (which measures predict the generalization gap): "
        + (f"Kendall tau with gap_loss is above 0 at 95% for {named}." if named else
           "no measure's Kendall tau with gap_loss has a 95% interval above 0 here.")
    )  # fmt: skip


def _claims_blocks(study: StudyTables, out_dir: Path, tables: dict) -> list[Block]:
    """The Claims section: the paired tests, a plain summary, the forest plot."""
    claims = claims_table(study)
    if claims.empty:
        return []
    tested = claims[~claims["verdict"].str.startswith(("described", "no pairs"))]
    counts = tested["verdict"].str.split(" ").str[0].value_counts()
    summary = (
        f"{len(tested)} paired comparisons tested: {counts.get('supported', 0)} support the "
        f"paper, {counts.get('contradicted', 0)} contradict it, "
        f"{counts.get('inconclusive', 0)} cannot be decided from this study."
    )
    for verdict in ("supported", "contradicted"):
        hits = tested[tested["verdict"] == verdict]
        if len(hits):
            items = sorted({f"{c} ({k})" for c, k in zip(hits["claim"], hits["comparison"])})
            summary += f" {verdict.capitalize()}: " + "; ".join(items) + "."
    blocks: list[Block] = [
        Heading("Claims: does the paper hold here?"),
        Paragraph(
            "Each quantized model against its FP32 twin (same optimizer, learning rate, weight "
            "decay, width, depth, seed), and each precision against the next higher one: the "
            "median paired difference (lower minus higher precision) with a seeded 95% "
            "bootstrap interval, the Wilcoxon signed-rank p and Holm's correction over every "
            "tested row. Supported / contradicted: Holm p < 0.05 with the interval on the "
            "paper's / the other side of 0; otherwise inconclusive. Plain measures are "
            "described only (the paper expects them to disagree)."
        ),
        Table("The paper's claims, tested on this study's twins.", _claims_display(claims)),
        Paragraph(summary),
    ]
    if predictors := _predictors(tables):
        blocks.append(Paragraph(predictors))
    blocks += [Image(f.caption, f.path.name) for f in figures.figure_claims(claims, out_dir)]
    return blocks


WIDE_QUANTITIES = 5  # paper tables with up to this many quantities get one row per precision


def _paper_display(name: str, table: pd.DataFrame) -> pd.DataFrame:
    """paper | this study per row (one row per precision when there are few quantities,
    else per precision and quantity); Table 4 averaged over severities (both sides over the
    same matched cells) to keep one row per corruption and precision."""
    keys = ["paper_model", "precision", "quantity"]
    if name == "table4":
        keys = ["paper_model", "corruption", "precision"]
        table = table.groupby(keys, sort=False, as_index=False).agg(
            paper=("paper", "mean"), ours=("this study", "mean"), n=("n", "min"),
            severities=("severity", "nunique"),
        ).rename(columns={"ours": "this study"})  # fmt: skip
        return table[[*keys, "severities", "paper", "this study", "n"]]
    if table["quantity"].nunique() > WIDE_QUANTITIES:
        return table[[*keys, "paper", "this study", "n"]]
    wide = table.pivot_table(index=keys[:2], columns="quantity", values=["paper", "this study"],
                             sort=False, observed=True)  # fmt: skip
    quantities = list(dict.fromkeys(table["quantity"]))
    out = pd.DataFrame(index=wide.index)
    for q in quantities:
        out[f"{q} paper"], out[f"{q} this study"] = wide[("paper", q)], wide[("this study", q)]
    out["n"] = table.groupby(keys[:2], sort=False)["n"].min()
    return out.reset_index()


def _paper_blocks(study: StudyTables, tables: dict[str, pd.DataFrame]) -> list[Block]:
    """The paper's published numbers beside this study's, for the settings both have."""
    names = [n for n in TITLES if f"paper_{n}" in tables]
    blocks: list[Block] = [Heading("The paper's numbers beside this study's")]
    if not names:
        ours = sorted({f"{d}/{m}" for d, m in study.ok[POPULATION_KEYS].itertuples(index=False)})
        return blocks + [Paragraph(
            f"No setting of this study ({', '.join(ours)}) is one the paper reports "
            f"({', '.join(paper_settings())}), so there is no number to set beside ours."
        )]  # fmt: skip
    blocks.append(Paragraph(
        f"Source: {CITATION}. Each row: the paper's number for a setting (dataset, model, "
        "precision; depth x width where the paper names them), this study's mean over its ok "
        "models of that setting, and how many (n). The paper's CIFAR NiN rows of Table 1 pool "
        "its NiN grid as ours does; Table 3 compares the paper-scale bounds, sqrt(bound / m)."
    ))  # fmt: skip
    for name in names:
        blocks.append(Table(f"{TITLES[name]}: paper | this study.",
                            _paper_display(name, tables[f"paper_{name}"])))  # fmt: skip
    return blocks


def _search_blocks(study: StudyTables, out_dir: Path) -> list[Block]:
    """A search study: its choice per bit width, history and Pareto front, importances."""
    spec = study.meta["search"]
    blocks: list[Block] = [
        Heading("Search"),
        Paragraph(
            f"Optuna (TPE, seeded) through Ray Tune chose each model from the space "
            f"{', '.join(f'{k}: {v}' for k, v in spec['space'].items())}; objectives "
            f"{', '.join(spec['objectives'])} on a validation split of "
            f"{spec['val_fraction']:g} of the training set (stratified, seeded); "
            f"{'ASHA stopped weak models early' if spec['asha'] else 'no early stopping'}. "
            "The test set was read only after the search, for the models that finished."
        ),
        Table(
            "Per precision: models finished (ok) and stopped early, and the ok model with the "
            "lowest validation loss, with its test numbers (measured after the search).",
            search.best_per_precision(study),
        ),
    ]
    for target, what in (("val_loss", "the validation loss"), ("gap_loss", "the gap")):
        found = search.importances(study, target)
        if len(found):
            blocks.append(Table(
                f"Hyperparameter importance for {what} ({target}; fANOVA over the "
                f"{int(found['n'].iloc[0])} ok models, seeded).", found.drop(columns=["n"])
            ))  # fmt: skip
        else:
            blocks.append(Paragraph(f"No importances for {target}: fewer than 4 ok models "
                                    "or nothing varied."))  # fmt: skip
    return blocks + [Image(f.caption, f.path.name) for f in search.figure_search(study, out_dir)]


def report_blocks(study: StudyTables, out_dir: Path) -> list[Block]:
    """The report's content; draws the figures into `out_dir` on the way."""
    tables = tables_for(study)
    blocks = _header(study)
    if search.is_search(study):
        blocks += _search_blocks(study, out_dir)
    elif len(study.ok):
        blocks += _claims_blocks(study, out_dir, tables)
    if len(study.ok):
        blocks += _paper_blocks(study, tables)
    blocks += [
        Heading("Trials"),
        Table(
            f"Models per status; only the {len(study.ok)} with status ok are analysed.",
            tables["status"],
        ),
    ]
    missing = _missing(study)
    if missing:
        blocks += [Heading("Missing"), Bullets(missing)]
    if not len(study.ok):
        return blocks
    blocks += [
        Heading("Table 1: accuracy, loss and generalization gap per precision"),
        Table(
            "Means over models; gap_loss = test_loss - train_loss, gap_acc = train_acc - "
            "test_acc; accuracies are fractions.",
            tables["table1"],
        ),
    ]
    blocks += _measure_blocks(tables)
    blocks += _figure_blocks(study, out_dir)
    blocks += _corruption_blocks(study, tables)
    return blocks


def write_report(study_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write report.md, report.html and the PNGs into `out` (default <study>/report; a
    study on an object store, s3://..., needs a local `out`); return report.md's path."""
    remote = "://" in str(study_dir) and not str(study_dir).startswith("file://")
    if out is None and remote:
        raise UserError(
            f"{study_dir} is not a local folder: pass --out DIR, a local folder for the report"
        )
    if out is not None and Path(out).exists() and not Path(out).is_dir():
        raise UserError(f"--out {out} is a file: pass a folder for the report")
    study = load_study(study_dir)
    out_dir = Path(out) if out is not None else Path(study.path) / schema.REPORT_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    blocks = report_blocks(study, out_dir)
    (out_dir / REPORT_HTML).write_text(to_html(blocks, f"QGen report: {study.name}"))
    md = out_dir / REPORT_MD
    md.write_text(to_markdown(blocks))
    return md
