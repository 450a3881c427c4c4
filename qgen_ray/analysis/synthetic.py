"""A synthetic study folder in the real on-disk formats (schema.py), for tests and for a
demo report without training anything. The numbers only mimic the paper's trends (lower
precision: higher training loss, smaller gap, larger learned steps, flatter landscape)."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pandas as pd

from qgen_ray import schema
from qgen_ray.measures.formulas import paper_scale

# optimizer -> its learning rates (conditional, as in the NiN grid)
LEARNING_RATES = {"sgd": [0.1, 0.01], "adam": [1e-3, 1e-4]}
WIDTHS = [8, 10]
BITS = [32, 8, 4, 2]
EPOCHS = 12
LAYERS = ["conv0", "block1.conv1", "block1.conv2", "block2.conv1", "block2.conv2", "head"]
CORRUPTIONS = ["gaussian_noise", "fog", "jpeg_compression"]
SEVERITIES = [1, 2, 3, 4, 5]
LANDSCAPE_POINTS = 21
SEARCHED_MEASURES = ["pacbayes_mag_init", "pacbayes_orig", "sharpness_mag_orig"]


def _trials(rng: np.random.Generator, dataset: str, depth: int) -> pd.DataFrame:
    rows = []
    grid = [(o, lr) for o, lrs in LEARNING_RATES.items() for lr in lrs]
    for (optimizer, lr), width, bits in itertools.product(grid, WIDTHS, BITS):
        quant = {32: 0.0, 8: 0.01, 4: 0.08, 2: 0.3}[bits]
        train_loss = 0.05 + quant + 0.02 * width / 10 + abs(rng.normal(0, 0.01))
        test_loss = 0.5 + 0.1 * (lr in (0.01, 1e-4)) + rng.normal(0, 0.02)
        train_acc = 1.0 - train_loss / 3 - abs(rng.normal(0, 0.01))
        test_acc = 1.0 - test_loss / 3 + rng.normal(0, 0.01)
        rows.append(
            dict(
                dataset=dataset,
                model="nin",
                optimizer=optimizer,
                lr=lr,
                weight_decay=0.0,
                width=width,
                depth=depth,
                bits=bits,
                method="fp32" if bits == 32 else "lsq",
                seed=0,
                epochs=EPOCHS,
                batch_size=128,
                status=schema.STATUS_OK,
                reason="",
                train_loss=train_loss,
                train_acc=train_acc,
                test_loss=test_loss,
                test_acc=test_acc,
                gap_loss=test_loss - train_loss,
                gap_acc=train_acc - test_acc,
                best_epoch=EPOCHS,
                epochs_run=EPOCHS,
                num_train=1000,
                num_params=50_000 * width,
                seconds=1.0,
                finished_at="2024-01-01T00:00:00Z",
                device="cpu",
                torch_version="synthetic",
                qgen_version="synthetic",
                git_rev="synthetic",
            )
        )
    trials = pd.DataFrame(rows)
    trials.insert(0, "model_id", [f"m{i:03d}" for i in range(len(trials))])
    trials["init_ckpt"] = "trials/" + trials["model_id"] + "/" + schema.INIT_CKPT
    trials["final_ckpt"] = "trials/" + trials["model_id"] + "/" + schema.FINAL_CKPT
    failed = trials.iloc[[0]].assign(
        model_id="failed0",
        status=schema.STATUS_FAILED,
        reason="synthetic failure",
        train_loss=np.nan,
    )
    return pd.concat([trials, failed], ignore_index=True)[schema.TRIALS_COLUMNS]


def _history(trials: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for t in trials.itertuples():
        for epoch in range(1, EPOCHS + 1):
            loss = t.train_loss + 2.2 * np.exp(-epoch / 3)
            rows.append((t.model_id, epoch, loss, 1 - loss / 3, t.lr, 1.0))
    return pd.DataFrame(rows, columns=schema.HISTORY_COLUMNS)


def _steps(trials: pd.DataFrame, rng: np.random.Generator) -> pd.DataFrame:
    rows = []
    for t in trials[trials["bits"] < 32].itertuples():
        for i, layer in enumerate(LAYERS):
            layer_bits = 8 if i in (0, len(LAYERS) - 1) else t.bits  # LSQ: ends at 8 bits
            step = 0.02 * 2.0 ** (8 - layer_bits) / 4 * (1 + 0.1 * i) * rng.uniform(0.9, 1.1)
            rows.append((t.model_id, layer, i, layer_bits, step))
    return pd.DataFrame(rows, columns=schema.STEPS_COLUMNS)


def _measures(trials: pd.DataFrame, rng: np.random.Generator) -> pd.DataFrame:
    rows = []
    for t in trials.itertuples():
        norm = 40.0 * (t.bits / 32) ** 0.5 * t.width / 10
        exact = (t.model_id, "weight_norm", norm, np.nan, np.nan, True, "exact", 0, 0.1, np.nan)
        rows.append(exact)
        for k, name in enumerate(SEARCHED_MEASURES):
            sigma = 0.05 / (1 + 4 * t.gap_loss + rng.normal(0, 0.2 + 0.3 * k)) ** 2
            sigma = abs(sigma)
            bound = norm**2 / (4 * sigma**2) / 1e6 + np.log(t.num_train / sigma) + 10
            rows.append(
                (
                    t.model_id,
                    name,
                    bound,
                    sigma,
                    1 / sigma**2,
                    bool(k != 2 or t.width == 8),
                    "fast",
                    40_000,
                    2.0,
                    paper_scale(bound, t.num_train),
                )
            )
    return pd.DataFrame(rows, columns=schema.MEASURES_COLUMNS)


def _corruptions(trials: pd.DataFrame, rng: np.random.Generator) -> pd.DataFrame:
    rows = []
    for t, name, severity in itertools.product(trials.itertuples(), CORRUPTIONS, SEVERITIES):
        loss = t.test_loss + 0.3 * severity * (1 + CORRUPTIONS.index(name)) * rng.uniform(0.9, 1)
        rows.append((t.model_id, name, severity, loss, 1 - loss / 4, loss - t.train_loss))
    return pd.DataFrame(rows, columns=schema.CORRUPTIONS_COLUMNS)


def _landscapes(trials: pd.DataFrame) -> pd.DataFrame:
    axis = np.linspace(-1, 1, LANDSCAPE_POINTS)
    x, y = np.meshgrid(axis, axis)
    frames = []
    first_per_bits = trials.groupby("bits").head(1)  # one model per precision
    for t in first_per_bits.itertuples():
        curvature = {32: 6.0, 8: 5.5, 4: 3.5, 2: 2.0}[t.bits]
        loss = t.train_loss + curvature * (x**2 + 0.6 * y**2) + 0.3 * np.sin(3 * x) * y
        frames.append(
            pd.DataFrame(
                {
                    "model_id": t.model_id,
                    "x": x.ravel(),
                    "y": y.ravel(),
                    "loss": loss.ravel(),
                    "accuracy": 1 - loss.ravel() / 8,
                }
            )
        )
    return pd.concat(frames, ignore_index=True)[schema.LANDSCAPES_COLUMNS]


def write_synthetic_study(
    path: str | Path,
    seed: int = 0,
    *,
    measures: bool = True,
    corruptions: bool = True,
    landscapes: bool = True,
    dataset: str = "synthetic",
    depth: int = 2,
) -> Path:
    """Write study.json and every Parquet table of a 32-model synthetic study (plus one
    failed trial) into `path`; the optional tables can be left out. `dataset` and the NiN
    `depth` label the models (e.g. "cifar10", 4 to match a setting of the paper)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    trials = _trials(rng, dataset, depth)
    ok = trials[trials["status"] == schema.STATUS_OK]
    study = {
        "study": path.name,
        "axes": ["optimizer", "lr", "width", "bits"],
        "dataset": dataset,
        "model": "nin",
        "created_at": "2024-01-01T00:00:00Z",
        "provenance": {"generator": "qgen_ray.analysis.synthetic", "seed": seed},
    }
    (path / schema.STUDY_JSON).write_text(json.dumps(study, indent=2))
    tables = {schema.TRIALS: trials, schema.HISTORY: _history(ok), schema.STEPS: _steps(ok, rng)}
    if measures:
        tables[schema.MEASURES] = _measures(ok, rng)
    if corruptions:
        tables[schema.CORRUPTIONS] = _corruptions(ok, rng)
    if landscapes:
        tables[schema.LANDSCAPES] = _landscapes(ok)
    for name, frame in tables.items():
        frame.to_parquet(path / name, index=False)
    return path
