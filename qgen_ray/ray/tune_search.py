"""Ray Tune runs a search study: `OptunaSearch` (TPE, seeded; multi-objective for a Pareto
front), `ASHAScheduler` stopping weak models early on val_loss (single objective), and the
same store, resources and progress line as the grid studies.

The Optuna study is kept in the study folder as a journal file (`schema.OPTUNA_JOURNAL`),
read through the store into a local copy at start and written back (atomically) after
every finished model, so a killed search resumes with its whole history. A model is its
sampled point's `TrainSpec`: a point sampled again whose model already has a result is
reported from the store, never retrained. The budget counts models finished in the
Optuna study (complete or stopped early); a re-run trains only what is left of it.
"""

from __future__ import annotations

import dataclasses
import math
import tempfile
from datetime import datetime, timezone
from pathlib import Path

from ray import tune
from ray.tune.result import TIMESTEPS_TOTAL

from qgen_ray import schema
from qgen_ray.data.base import ImageData
from qgen_ray.pipeline.search import SearchStudy
from qgen_ray.provenance import provenance
from qgen_ray.ray.session import check_request
from qgen_ray.ray.tune_study import (
    ModelFailed,
    ProgressLine,
    failed_in_this_run,
    failed_result,
    new_run_id,
    placement,
    report_epoch,
    run_config,
)
from qgen_ray.spec import RunOptions, row_header
from qgen_ray.store import StudyStore


def _metrics(result: dict) -> dict:
    """What a finished model reports to Tune / Optuna (its stored numbers)."""
    return {k: result.get(k, math.nan) for k in ("val_loss", "val_acc", "weight_bits")}


def _report_final(result: dict, model_id: str) -> None:
    """A finished model's stored numbers to Tune / Optuna, at its last epoch."""
    report_epoch({**_metrics(result), "epoch": result.get("epochs_run", 0), "model_id": model_id})


def search_trial(config: dict, data: ImageData, study: SearchStudy, store_uri: str,
                 options: dict, run_id: str) -> None:  # fmt: skip
    """Tune trainable: train the model the sampled point names on the training set less
    its validation split, reporting val_loss each epoch; store its result. A model whose
    code raised is stored `failed` and ends as ERROR in Tune (Optuna: FAIL)."""
    import torch

    from qgen_ray.pipeline.collect import FINISHED
    from qgen_ray.pipeline.search import weight_bits
    from qgen_ray.train import build_model, train

    options = dict(options)
    torch.set_num_threads(max(1, int(options.pop("cpus", 1))))
    spec = study.spec(config)
    trial = StudyStore(store_uri).trial(spec.model_id)
    done = trial.result()
    if done is not None and done.get("status") in FINISHED:  # sampled again: never retrained
        _report_final(done, spec.model_id)
        return
    reason = failed_in_this_run([done], run_id)
    if reason is not None:  # Tune's retry of a code error
        raise ModelFailed(reason)
    search_data = data.with_validation(spec.val_fraction, spec.seed)  # no test split in it
    bits = weight_bits(build_model(spec, data.num_classes, data.in_channels, data.image_size))
    tag = {"model_id": spec.model_id, "weight_bits": bits}
    run = RunOptions(**options, validate_each_epoch=True)
    try:
        # every epoch but the last goes to ASHA; the last is reported once the result is
        # stored (ASHA ends a trial at max_t = epochs, which must not cut it short)
        def report(metrics: dict) -> None:
            if metrics["epoch"] < spec.epochs:
                report_epoch({**metrics, **tag})

        result = train(spec, search_data, trial, run, report=report)
        # the held-out split was the validation split: its numbers are val_*; test_* come
        # after the search (pipeline.search.evaluate_on_test)
        result["val_loss"], result["val_acc"] = result.pop("test_loss"), result.pop("test_acc")
        for column in ("test_loss", "test_acc", "gap_loss", "gap_acc"):
            result[column] = math.nan
    except Exception as err:  # noqa: BLE001 - recorded in the table, retried on re-run
        trial.write_result({**failed_result(spec, err), **_row_columns(tag, spec, run_id)})
        raise
    trial.write_result({**result, **_row_columns(tag, spec, run_id)})
    _report_final({**result, **tag}, spec.model_id)


def _row_columns(tag: dict, spec, run_id: str) -> dict:
    """The columns a search adds to a model's row, ok or failed."""
    return {**tag, "val_fraction": spec.val_fraction, **placement(run_id)}


class StoppedRows(tune.Callback):
    """A model that ASHA stopped has no result of its own: record it as `stopped` with its
    last validation numbers (before the progress line classifies it)."""

    def __init__(self, study: SearchStudy, store: StudyStore):
        self.study, self.store = study, store

    def on_trial_complete(self, iteration, trials, trial, **info):
        spec = self.study.spec(trial.config)
        record = self.store.trial(spec.model_id)
        if record.result() is not None:
            return
        last = trial.last_result or {}
        epoch = last.get("epoch", 0)
        record.write_result({
            **row_header(spec, schema.STATUS_STOPPED,
                         f"stopped early by ASHA after epoch {epoch} "
                         f"(val_loss {last.get('val_loss', math.nan):.4g})"),
            **_metrics(last), "epochs_run": epoch, "val_fraction": spec.val_fraction,
            "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "spec": spec.to_dict(), **provenance(),
        })  # fmt: skip


class SaveJournal(tune.Callback):
    """Write the local Optuna journal back into the store after every finished model."""

    def __init__(self, store: StudyStore, local: Path):
        self.store, self.local = store, local

    def save(self) -> None:
        if self.local.exists():
            self.store.write_bytes(schema.OPTUNA_JOURNAL, self.local.read_bytes())

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.save()

    def on_trial_error(self, iteration, trials, trial, **info):
        self.save()


def open_optuna_study(store: StudyStore, study: SearchStudy, local: Path):
    """The search's Optuna study from the store's journal (a fresh one on the first run).
    Trials left RUNNING by a killed driver are marked FAIL (one driver per study folder:
    `StudyStore.claimed`)."""
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    if store.exists(schema.OPTUNA_JOURNAL):
        local.write_bytes(store.read_bytes(schema.OPTUNA_JOURNAL))
    storage = JournalStorage(JournalFileBackend(str(local)))
    directions = ["minimize"] * len(study.objectives)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    ot = optuna.create_study(storage=storage, study_name=study.name, directions=directions,
                             load_if_exists=True)  # fmt: skip
    for t in ot.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        storage.set_trial_state_values(t._trial_id, optuna.trial.TrialState.FAIL)
    return ot, storage


def finished_trials(ot) -> int:
    import optuna

    return len(ot.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)))


def run_search(
    store: StudyStore,
    study: SearchStudy,
    data: ImageData,
    options: RunOptions,
    cpus_per_trial: float,
    gpus_per_trial: float,
    progress: bool = True,
    trackers: tuple[str, ...] = (),
) -> int:
    """Train models the sampler proposes until `study.budget` have finished; return how
    many this run trained or reported. `trackers`: `ray.tracking` names."""
    import optuna
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.optuna import OptunaSearch

    check_request(cpus_per_trial, gpus_per_trial, "--cpus-per-trial / --gpus-per-trial")
    local = Path(tempfile.mkdtemp(prefix="qgen-optuna-")) / schema.OPTUNA_JOURNAL
    ot, storage = open_optuna_study(store, study, local)
    done = finished_trials(ot)
    remaining = study.budget - done
    print(f"[{study.name}] search: {done}/{study.budget} models in the Optuna study, "
          f"{max(remaining, 0)} to go; store: {store.uri}", flush=True)  # fmt: skip
    if remaining <= 0:
        return 0
    single = len(study.objectives) == 1
    metric = "val_loss" if single else list(study.objectives)
    mode = "min" if single else ["min"] * len(study.objectives)
    # a resumed search draws new points: the seed moves on with the study's history
    sampler = optuna.samplers.TPESampler(seed=study.seed + len(ot.trials))
    searcher = OptunaSearch(space=study.define, metric=metric, mode=mode, sampler=sampler,
                            study_name=study.name, storage=storage)  # fmt: skip
    scheduler = (
        ASHAScheduler(
            time_attr=TIMESTEPS_TOTAL,  # the epoch (a resumed trial's too), not the report count
            metric="val_loss",
            mode="min",
            max_t=study.spec(study.sample_first()).epochs,
            grace_period=study.grace_epochs,
            reduction_factor=2,
        )  # fmt: skip
        if study.asha and single
        else FIFOScheduler()
    )
    options_dict = {**dataclasses.asdict(options), "cpus": cpus_per_trial}
    options_dict.pop("validate_each_epoch")
    run_id = new_run_id()
    trainable = tune.with_resources(
        tune.with_parameters(search_trial, data=data, study=study, store_uri=store.uri,
                             options=options_dict, run_id=run_id),
        {"cpu": cpus_per_trial, "gpu": gpus_per_trial},
    )  # fmt: skip
    journal = SaveJournal(store, local)
    callbacks: list = [StoppedRows(study, store), journal]
    if progress:
        line = ProgressLine(store.name, remaining, done, store, run_id)
        line.ids_of = lambda trial: [study.spec(trial.config).model_id]
        callbacks.append(line)
    tuner = tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            search_alg=ConcurrencyLimiter(searcher, max_concurrent=study.max_concurrent),
            scheduler=scheduler,
            num_samples=remaining,
            reuse_actors=False,  # a stopped model's process ends with it
        ),
        run_config=run_config(store, "search", callbacks, trackers),
    )
    tuner.fit()
    journal.save()
    return remaining


__all__ = ["run_search", "open_optuna_study", "search_trial"]
