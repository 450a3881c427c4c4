"""The paper's figures as PNG files, drawn on matplotlib's Agg canvas (no pyplot, no
display, no change to the process's matplotlib backend).

    Figure 1   learned LSQ step size (bin width) per layer, one line per bit width, mean
               over models (steps.parquet)
    Figure 2   loss landscape per precision: surface (top) and contour (bottom) on shared
               axes, colour scale and contour levels (landscapes.parquet)
    curves     mean training loss and accuracy per epoch, one line per precision
               (history.parquet), shaded +- one standard deviation over models

One PNG per population (dataset and model family). Sizes are fixed (no tight bounding box)
so a figure is always FIGURE_SIZES[kind] inches at DPI dots per inch.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from qgen_ray.analysis.precision import precision_color, precision_label
from qgen_ray.analysis.study_tables import POPULATION_KEYS, StudyTables

DPI = 100
FIGURE_SIZES = {"steps": (8.0, 5.0), "curves": (11.0, 4.5)}
FOREST_ROW_INCHES = 0.28  # the claims' forest plot grows with its rows
LANDSCAPE_PANEL = (4.0, 4.25)  # inches per precision column (two rows: surface, contour)
MAX_LAYER_TICK_LABELS = 24  # more layers than this: ticks show indices, not names
CONTOUR_LEVELS = 20
KEPT_NOTE = "open marker:\nlayer kept at\nanother precision\n(LSQ: first and\nlast at 8 bits)"


@dataclass(frozen=True)
class FigureFile:
    path: Path
    caption: str


def _slug(*parts: object) -> str:
    return "_".join(re.sub(r"[^A-Za-z0-9.-]+", "-", str(p)) for p in parts)


def _populations(frame: pd.DataFrame):
    """(dataset, model, rows) per population, in sorted order."""
    for (dataset, model), rows in frame.groupby(POPULATION_KEYS, dropna=False):
        yield dataset, model, rows


def _bits_in_order(rows: pd.DataFrame) -> list[int]:
    return sorted({int(b) for b in rows["bits"]}, reverse=True)


def _save(fig: Figure, path: Path) -> Path:
    FigureCanvasAgg(fig)  # draw with Agg; pyplot (and its global backend) is never used
    fig.savefig(path, dpi=DPI)
    return path


def figure_steps(study: StudyTables, out_dir: Path) -> list[FigureFile]:
    """Figure 1: mean learned step size per layer and bit width (log scale). Open markers
    flag layers kept at another precision than the model's (LSQ: first and last at 8)."""
    steps = study.joined(study.steps.rename(columns={"bits": "layer_bits"}))
    files = []
    for dataset, model, rows in _populations(steps):
        fig = Figure(figsize=FIGURE_SIZES["steps"], dpi=DPI)
        ax = fig.add_subplot()
        names = rows.groupby("layer_index")["layer"].first()
        for bits in _bits_in_order(rows):
            at = rows[rows["bits"] == bits].assign(kept=lambda r: r["layer_bits"] != r["bits"])
            per_layer = at.groupby("layer_index").agg(
                step=("step", "mean"), kept=("kept", "any"), models=("model_id", "nunique")
            )
            n = int(per_layer["models"].max())
            color = precision_color(bits)
            label = f"{precision_label(bits)} ({n} models)"
            ax.plot(per_layer.index, per_layer["step"], "o-", color=color, label=label, ms=4)
            kept = per_layer[per_layer["kept"]]
            ax.plot(kept.index, kept["step"], "o", mfc="white", mec=color, ms=7)
        ax.set_yscale("log")
        ax.set_xlabel("layer")
        ax.set_ylabel("learned step size Δ (log scale)")
        ax.set_title(f"Figure 1: learned LSQ step size per layer, {dataset} / {model}")
        if len(names) <= MAX_LAYER_TICK_LABELS:
            ax.set_xticks(names.index, names.values, rotation=45, ha="right", fontsize=7)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(title="precision", loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
        ax.text(1.01, 0.0, KEPT_NOTE, transform=ax.transAxes, fontsize=7, va="bottom")
        fig.tight_layout()
        path = _save(fig, out_dir / f"fig1_steps_{_slug(dataset, model)}.png")
        files.append(
            FigureFile(
                path,
                f"Figure 1 ({dataset} / {model}): learned step size "
                "per layer, mean over models, one line per bit width.",
            )
        )
    return files


def _surface(rows: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean loss over the models on the (x, y) grid: X, Y, Z with Z[y, x]."""
    grid = rows.pivot_table(index="y", columns="x", values="loss", aggfunc="mean")
    x, y = np.meshgrid(grid.columns.to_numpy(float), grid.index.to_numpy(float))
    return x, y, grid.to_numpy(float)


def figure_landscapes(study: StudyTables, out_dir: Path) -> list[FigureFile]:
    """Figure 2: per precision the mean loss surface of the models that have one, drawn as
    a 3-D surface and a contour plot with the same axes, z range and levels throughout."""
    land = study.joined(study.landscapes)
    files = []
    for dataset, model, rows in _populations(land):
        order = _bits_in_order(rows)
        surfaces = {b: _surface(rows[rows["bits"] == b]) for b in order}
        zmin = min(float(np.nanmin(z)) for _, _, z in surfaces.values())
        zmax = max(float(np.nanmax(z)) for _, _, z in surfaces.values())
        levels = np.linspace(zmin, zmax if zmax > zmin else zmin + 1.0, CONTOUR_LEVELS)
        xlim = (float(rows["x"].min()), float(rows["x"].max()))
        ylim = (float(rows["y"].min()), float(rows["y"].max()))
        w, h = LANDSCAPE_PANEL
        fig = Figure(figsize=(w * len(order) + 1.0, 2 * h), dpi=DPI, layout="constrained")
        contour, contour_axes = None, []
        for col, bits in enumerate(order):
            x, y, z = surfaces[bits]
            n = rows.loc[rows["bits"] == bits, "model_id"].nunique()
            title = f"{precision_label(bits)} ({n} model{'s' if n > 1 else ''})"
            ax3 = fig.add_subplot(2, len(order), col + 1, projection="3d")
            ax3.plot_surface(x, y, z, cmap="viridis", vmin=zmin, vmax=zmax, linewidth=0)
            ax3.set(xlim=xlim, ylim=ylim, zlim=(zmin, zmax), title=title)
            ax3.set(xlabel="direction 1", ylabel="direction 2")
            ax3.set_zlabel("loss")
            ax2 = fig.add_subplot(2, len(order), len(order) + col + 1)
            contour = ax2.contourf(x, y, z, levels=levels, cmap="viridis")
            ax2.contour(x, y, z, levels=levels, colors="k", linewidths=0.3)
            ax2.set(xlim=xlim, ylim=ylim, xlabel="direction 1", title=title, aspect="equal")
            if col == 0:
                ax2.set_ylabel("direction 2")
            contour_axes.append(ax2)
        fig.suptitle(
            f"Figure 2: loss landscape, {dataset} / {model} (filter-normalized random directions)"
        )
        fig.colorbar(contour, ax=contour_axes, label="loss", shrink=0.9, format="%.3g")
        path = _save(fig, out_dir / f"fig2_landscape_{_slug(dataset, model)}.png")
        files.append(
            FigureFile(
                path,
                f"Figure 2 ({dataset} / {model}): loss surface (top) "
                "and contours (bottom) per precision, same axes and "
                "scale; several models at one precision are averaged.",
            )
        )
    return files


def figure_claims(claims: pd.DataFrame, out_dir: Path) -> list[FigureFile]:
    """The forest plot of the paired claims: per claim and comparison the median paired
    difference and its 95% interval, relative to the higher precision's median |value|
    (so claims in different units share one axis); marked by verdict."""
    rows = claims.dropna(subset=["median_diff", "reference"])
    rows = rows[(rows["reference"] > 0) & ~rows["verdict"].str.startswith("described")]
    if rows.empty:
        return []
    colors = {"supported": "tab:green", "contradicted": "tab:red"}
    fig = Figure(figsize=(9.0, 1.2 + FOREST_ROW_INCHES * len(rows)), dpi=DPI,
                 layout="constrained")  # fmt: skip
    ax = fig.add_subplot()
    y = np.arange(len(rows))[::-1]
    for yi, (_, r) in zip(y, rows.iterrows()):
        color = colors.get(r["verdict"], "tab:gray")
        ax.plot([r["ci_low"] / r["reference"], r["ci_high"] / r["reference"]], [yi, yi],
                color=color, linewidth=2)  # fmt: skip
        ax.plot(r["median_diff"] / r["reference"], yi, "o", color=color)
    ax.axvline(0.0, color="k", linewidth=0.8)
    ax.set_yticks(y, [f"{r['claim']} ({r['comparison']})" for _, r in rows.iterrows()], fontsize=7)
    ax.set_xlabel("paired median difference (lower - higher precision) / median |higher|")
    ax.set_title("Claims: green supported, red contradicted, grey inconclusive (95% CI)")
    path = _save(fig, out_dir / "claims_forest.png")
    caption = ("Forest plot of the claims: median paired difference with its 95% bootstrap "
               "interval, relative to the higher precision.")  # fmt: skip
    return [FigureFile(path, caption)]


def figure_training_curves(study: StudyTables, out_dir: Path) -> list[FigureFile]:
    """Mean training loss and accuracy per epoch and precision, +- one std over models."""
    history = study.joined(study.history)
    files = []
    for dataset, model, rows in _populations(history):
        fig = Figure(figsize=FIGURE_SIZES["curves"], dpi=DPI)
        ax_loss, ax_acc = fig.subplots(1, 2)
        for bits in _bits_in_order(rows):
            per_epoch = rows[rows["bits"] == bits].groupby("epoch")
            n = rows.loc[rows["bits"] == bits, "model_id"].nunique()
            for ax, col in ((ax_loss, "train_loss"), (ax_acc, "train_acc")):
                mean, std = per_epoch[col].mean(), per_epoch[col].std().fillna(0.0)
                color = precision_color(bits)
                ax.plot(mean.index, mean, color=color, label=f"{precision_label(bits)} ({n})")
                ax.fill_between(mean.index, mean - std, mean + std, color=color, alpha=0.15)
        ax_loss.set(xlabel="epoch", ylabel="training loss (mean over models)")
        ax_acc.set(xlabel="epoch", ylabel="training accuracy (mean over models)")
        if (rows["train_loss"] > 0).all():
            ax_loss.set_yscale("log")
        for ax in (ax_loss, ax_acc):
            ax.grid(True, alpha=0.3)
            ax.legend(title="precision (models)", fontsize=8)
        fig.suptitle(f"Training curves, {dataset} / {model} (shaded: ± one std)")
        fig.tight_layout()
        path = _save(fig, out_dir / f"training_{_slug(dataset, model)}.png")
        files.append(
            FigureFile(
                path,
                f"Training curves ({dataset} / {model}): mean training "
                "loss and accuracy per epoch and precision.",
            )
        )
    return files
