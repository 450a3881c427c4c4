"""The Ray Tune adapter: one trial per model, fractional resources, store-based resume.

The trial body is a thin
wrapper around `qgen_ray.train.train`; idempotency lives in the store, not in Tune: the
driver plans the grid, drops every model that already has a result (ok or diverged),
and gives Tune only the rest; a model that had started continues from its `last.pt`.
A trial whose code raises is recorded as `failed` with its reason (a re-run retries
it); a trial whose process dies is retried by Tune (`MAX_FAILURES`) and resumes.
"""

from __future__ import annotations

import dataclasses
import time
import traceback
from datetime import datetime, timezone

from ray import tune

from qgen_ray import schema
from qgen_ray.data.base import ImageData
from qgen_ray.provenance import provenance
from qgen_ray.spec import RunOptions, TrainSpec, row_header
from qgen_ray.store import StudyStore
from qgen_ray.train import train

MAX_FAILURES = 3  # Tune retries of a trial whose worker process died (not code errors)
PROGRESS_EVERY_S = 15.0  # seconds between progress lines while nothing completes


def failed_result(spec: TrainSpec, err: BaseException) -> dict:
    """The row of a model whose training raised: status failed, the reason kept."""
    last = traceback.extract_tb(err.__traceback__)[-1:] if err.__traceback__ else []
    where = f" at {last[0].filename.rsplit('/', 1)[-1]}:{last[0].lineno}" if last else ""
    return {
        **row_header(spec, schema.STATUS_FAILED, f"{err.__class__.__name__}: {err}{where}"[:500]),
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "spec": spec.to_dict(),
        **provenance(),
    }


def run_trial(config: dict, data: ImageData) -> None:
    """Tune function trainable: train one model and write its result into the store."""
    import torch

    config = config["trial"]
    torch.set_num_threads(max(1, int(config["cpus"])))
    spec = TrainSpec.from_dict(config["spec"])
    trial = StudyStore(config["store"]).trial(spec.model_id)
    try:
        result = train(spec, data, trial, RunOptions(**config["options"]), report=tune.report)
    except Exception as err:  # noqa: BLE001 - recorded in the table, retried on re-run
        result = failed_result(spec, err)
    result.update(config["extra"])
    trial.write_result(result)


class ProgressLine(tune.Callback):
    """One console line: done / failed / retried / running / ETA (the store has details).

    A trial whose code raised ends normally in Tune and is recorded `failed` in the store,
    so with `store` each completion is classified from its result.json. A trial whose
    process died is retried by Tune (`retried`) and counts as failed only when Tune gives
    up. `done` counts models that need no more training (ok or diverged).
    """

    def __init__(self, study: str, total: int, already: int, store: StudyStore | None = None):
        self.study, self.total, self.already, self.store = study, total, already, store
        self.done = self.failed = self.retried = 0
        self.start = time.time()
        self.last_print = 0.0

    def _print(self, trials, force: bool = False, ended=None) -> None:
        now = time.time()
        if not force and now - self.last_print < PROGRESS_EVERY_S:
            return
        self.last_print = now
        running = sum(t.status == "RUNNING" and t is not ended for t in trials)
        finished = self.done + self.failed
        left = self.total - finished
        eta = (now - self.start) / finished * left if finished else float("nan")
        eta_txt = "?" if eta != eta else f"{int(eta // 60)}m{int(eta % 60):02d}s"
        print(
            f"[{self.study}] done {self.already + self.done}/{self.already + self.total} "
            f"(this run {finished}/{self.total}, failed {self.failed}, retried {self.retried}) "
            f"running {running}  elapsed {int(now - self.start)}s  ETA {eta_txt}",
            flush=True,
        )

    def _status(self, trial) -> str:
        if self.store is None:
            return schema.STATUS_OK
        try:
            return self.store.trial(trial.config["trial"]["model_id"]).read_result()["status"]
        except (OSError, KeyError, ValueError):
            return schema.STATUS_FAILED  # ended without a readable result

    def on_step_end(self, iteration, trials, **info):
        self._print(trials)

    def on_trial_complete(self, iteration, trials, trial, **info):
        if self._status(trial) == schema.STATUS_FAILED:
            self.failed += 1
        else:
            self.done += 1
        self._print(trials, force=True, ended=trial)

    def on_trial_recover(self, iteration, trials, trial, **info):
        self.retried += 1
        self._print(trials, force=True)

    def on_trial_error(self, iteration, trials, trial, **info):
        self.failed += 1
        self._print(trials, force=True, ended=trial)


def tune_storage(store: StudyStore) -> str:
    return store.path(schema.TUNE_DIR) if store.is_local else f"{store.uri}/{schema.TUNE_DIR}"


def run_training(
    store: StudyStore,
    pending: list[tuple[TrainSpec, dict]],
    data: ImageData,
    options: RunOptions,
    cpus_per_trial: float,
    gpus_per_trial: float,
    already_done: int = 0,
    progress: bool = True,
) -> None:
    """Train every pending model as one Tune trial; results land in the store."""
    if not pending:
        return
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, data=data), {"cpu": cpus_per_trial, "gpu": gpus_per_trial}
    )
    configs = [
        {
            "spec": spec.to_dict(),
            "extra": extra,
            "store": store.uri,
            "options": dataclasses.asdict(options),  # every RunOptions field reaches train
            "cpus": cpus_per_trial,
            "model_id": spec.model_id,
        }
        for spec, extra in pending
    ]
    callbacks = [ProgressLine(store.name, len(configs), already_done, store)] if progress else []
    tuner = tune.Tuner(
        trainable,
        param_space={"trial": tune.grid_search(configs)},
        tune_config=tune.TuneConfig(
            reuse_actors=True,
            trial_name_creator=lambda t: t.config["trial"]["model_id"],
            trial_dirname_creator=lambda t: t.config["trial"]["model_id"],
        ),
        run_config=tune.RunConfig(
            name=f"train-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}",
            storage_path=tune_storage(store),
            failure_config=tune.FailureConfig(max_failures=MAX_FAILURES),
            verbose=0,
            callbacks=callbacks,
        ),
    )
    tuner.fit()


def finished_ids(store: StudyStore) -> set[str]:
    """Models that need no more training: ok or diverged (failed ones are retried)."""
    return {
        r["model_id"]
        for r in store.results()
        if r["status"] in (schema.STATUS_OK, schema.STATUS_DIVERGED)
    }


__all__ = ["finished_ids", "run_training"]
