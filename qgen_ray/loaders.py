"""Public loaders for notebooks: a study's trials as a DataFrame, a trained model ready
for evaluation, a dataset as the models saw it in evaluation."""

from __future__ import annotations

import pandas as pd
from torch import nn

from qgen_ray import schema
from qgen_ray.errors import UserError
from qgen_ray.spec import TrainSpec
from qgen_ray.store import StudyStore

CHECKPOINTS = {"final": schema.FINAL_CKPT, "init": schema.INIT_CKPT}


def open_study(study_dir: str) -> StudyStore:
    """The store of an existing study; one clear line when there is none."""
    store = StudyStore(str(study_dir))
    if not store.exists(schema.TRIALS) and not store.trial_ids():
        raise UserError(
            f"no trials in {study_dir}: run the study first (python studies/<name>.py) "
            "or point at the folder <storage>/<study>"
        )
    return store


def load_trials(study_dir: str) -> pd.DataFrame:
    """One row per model (schema.TRIALS_COLUMNS); collected from the trial folders if
    the table is missing."""
    store = open_study(study_dir)
    table = store.read_table(schema.TRIALS)
    if table is None:
        from qgen_ray.pipeline.collect import collect

        table = collect(store)
    return table


def load_model(study_dir: str, model_id: str, which: str = "final") -> nn.Module:
    """The model `model_id` with its kept ("final") or initial ("init") weights, in eval
    mode on the CPU, still quantized (use `qgen_ray.quant.materialize` for w_hat)."""
    from qgen_ray.train import build_model

    if which not in CHECKPOINTS:
        raise UserError(f"unknown checkpoint {which!r}; valid: {', '.join(CHECKPOINTS)}")
    store = open_study(study_dir)
    trial = store.trial(model_id)
    if not trial.has_result():
        raise UserError(f"no finished model {model_id!r} in {study_dir}; see load_trials()")
    result = trial.read_result()
    if not trial.has(CHECKPOINTS[which]):
        raise UserError(f"model {model_id} has no {which} checkpoint (status {result['status']})")
    spec = TrainSpec.from_dict(result["spec"])
    model = build_model(spec, result["num_classes"], result["in_channels"], result["image_size"])
    model.load_state_dict(trial.load(CHECKPOINTS[which]))
    return model.eval()
