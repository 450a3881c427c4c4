"""The Ray Tune adapter: one trial per model or per pack, fractional resources,
store-based resume.

A trial trains one model with `qgen_ray.train.train`, or a pack of models of one shape
as one fused network with `qgen_ray.train.pack.train_pack` (`--pack K`), and writes each
model's own result.json. Idempotency lives in the store, not in Tune: the
driver plans the grid, drops every model that already has a result (ok or diverged),
and gives Tune only the rest; a model that had started continues from its `last.pt`.
A trial whose code raises is recorded as `failed` with its reason (a re-run retries
it) and ends as ERROR in Tune with that error: Tune's retries of it (`MAX_FAILURES`, there
for processes that die) raise the recorded error again at once, without training. A trial
whose process dies is retried by Tune and resumes from its `last.pt`. Every epoch is
reported with `timesteps_total = epoch`, the step Tune's TensorBoard, MLflow and W&B
callbacks plot at, so a resumed model's curves continue where they stopped.
"""

from __future__ import annotations

import dataclasses
import os
import time
import traceback
import uuid
from datetime import datetime, timezone

from ray import tune
from ray.tune.result import TIMESTEPS_TOTAL

from qgen_ray import schema
from qgen_ray.data.base import ImageData
from qgen_ray.provenance import provenance
from qgen_ray.ray.session import check_request
from qgen_ray.spec import RunOptions, TrainSpec, row_header
from qgen_ray.store import StudyStore
from qgen_ray.train import train
from qgen_ray.train.pack import pack_id, train_pack

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


class ModelFailed(RuntimeError):
    """Tune's retry of a trial whose code raised in this run: the recorded reason."""


def epoch_step(metrics: dict) -> dict:
    """An epoch's metrics with the epoch as the step trackers plot at (`timesteps_total`:
    a resumed model's first report is its next epoch, not step 1)."""
    return {**metrics, TIMESTEPS_TOTAL: metrics["epoch"]}


def report_epoch(metrics: dict) -> None:
    """One epoch to Tune, at its epoch step (`epoch_step`)."""
    tune.report(epoch_step(metrics))


def _report_member(metrics: dict) -> None:
    """A pack member's epoch to Tune, its numbers tagged with its model id (one
    TensorBoard curve per member inside the pack's trial)."""
    tag = metrics["model_id"]
    report_epoch({"epoch": metrics["epoch"], "model_id": tag,
                  **{f"{tag}/{k}": v for k, v in metrics.items() if k != "model_id"}})  # fmt: skip


def failed_in_this_run(results: list[dict | None], run_id: str) -> str | None:
    """The reason, when every model of a trial already failed in this Tune run (so this
    start is Tune's retry of a code error, not of a dead process)."""
    if results and all(
        r and r.get("status") == schema.STATUS_FAILED and r.get("run_id") == run_id for r in results
    ):
        return results[0].get("reason", "")
    return None


def run_trial(config: dict, data: ImageData) -> None:
    """Tune function trainable: train one model, or a pack of them as one fused network,
    and write each model's result into the store."""
    import torch

    config = config["trial"]
    torch.set_num_threads(max(1, int(config["cpus"])))
    specs = [TrainSpec.from_dict(d) for d in config["specs"]]
    study = StudyStore(config["store"])
    trials = [study.trial(spec.model_id) for spec in specs]
    options = RunOptions(**config["options"])
    reason = failed_in_this_run([trial.result() for trial in trials], config["run_id"])
    if reason is not None:
        raise ModelFailed(reason)
    failure = None
    try:
        if len(specs) == 1 and not options.fast_paths:  # the plain reference path
            results = [train(specs[0], data, trials[0], options, report=report_epoch)]
        else:
            results = train_pack(specs, data, trials, options, report=_report_member)
    except Exception as err:  # noqa: BLE001 - recorded in the table, retried on re-run
        results, failure = [failed_result(spec, err) for spec in specs], err
    placed = placement(config["run_id"])
    for result, trial, extra in zip(results, trials, config["extras"], strict=True):
        trial.write_result({**result, **extra, **placed})
    if failure is not None:
        raise failure  # ERROR in Tune's results, with the error


def placement(run_id: str) -> dict:
    """Where Ray ran this trial (`schema.PLACEMENT_COLUMNS`): its node, its share of a
    GPU and the Tune run it belongs to."""
    import ray

    context = ray.get_runtime_context()
    share = context.get_assigned_resources().get("GPU", 0.0)
    return {"node_id": context.get_node_id(), "gpu_share": float(share), "run_id": run_id}


class ProgressLine(tune.Callback):
    """One console line: done / failed / retried / running / ETA (the store has details).

    Every count is of models, not trials (a pack's trial holds several). A trial whose
    code raised is recorded `failed` in the store and ends as ERROR once Tune's retries
    (which only raise the recorded error again) are spent: `failed`, never `retried`. A
    trial whose process died is retried by Tune (`retried`) and its models count as
    failed only when Tune gives up. With `store`, each completion is classified from its
    models' result.json. `done` counts models that need no more training (ok or diverged).
    """

    def __init__(self, study: str, total: int, already: int, store: StudyStore | None = None,
                 run_id: str = ""):  # fmt: skip
        self.study, self.total, self.already, self.store = study, total, already, store
        self.run_id = run_id
        self.done = self.failed = self.retried = 0
        self.start = time.time()
        self.last_print = 0.0
        self.ids_of = _model_ids  # the models of a Tune trial (a search sets its own)

    def _print(self, trials, force: bool = False, ended=None) -> None:
        now = time.time()
        if not force and now - self.last_print < PROGRESS_EVERY_S:
            return
        self.last_print = now
        running = sum(
            len(self.ids_of(t)) for t in trials if t.status == "RUNNING" and t is not ended
        )
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

    def _status(self, model_id: str) -> str:
        if self.store is None:
            return schema.STATUS_OK
        result = self.store.trial(model_id).result()  # a damaged one is set aside
        return result.get("status", schema.STATUS_FAILED) if result else schema.STATUS_FAILED

    def on_step_end(self, iteration, trials, **info):
        self._print(trials)

    def on_trial_complete(self, iteration, trials, trial, **info):
        for model_id in self.ids_of(trial):
            if self._status(model_id) == schema.STATUS_FAILED:
                self.failed += 1
            else:
                self.done += 1
        self._print(trials, force=True, ended=trial)

    def on_trial_recover(self, iteration, trials, trial, **info):
        ids = self.ids_of(trial)
        if self.store is not None and failed_in_this_run(
            [self.store.trial(m).result() for m in ids], self.run_id
        ):
            return  # its code raised: Tune's retries only confirm the error
        self.retried += len(ids)  # its process died
        self._print(trials, force=True)

    def on_trial_error(self, iteration, trials, trial, **info):
        self.failed += len(self.ids_of(trial))
        self._print(trials, force=True, ended=trial)


def _model_ids(trial) -> list[str]:
    """The models a trial trains (one, or a pack's members)."""
    config = trial.config["trial"]
    return config.get("model_ids") or [config["model_id"]]


def tune_storage(store: StudyStore) -> str:
    return store.path(schema.TUNE_DIR) if store.is_local else f"{store.uri}/{schema.TUNE_DIR}"


def new_run_id() -> str:
    """The id of one Tune run of a study (recorded in each row it writes: `run_id`)."""
    return uuid.uuid4().hex[:12]


def run_config(
    store: StudyStore, kind: str, callbacks: list, trackers=(), max_failures: int = MAX_FAILURES
) -> tune.RunConfig:
    """A study's Tune run: its files in the study folder (`tune/<kind>-<time>`), trials
    whose process died retried `max_failures` times, the progress and tracking
    callbacks; Ctrl-C stops at once (Tune's own handler would end the run quietly and let
    the next stages start on a partial population): finished models are stored."""
    from qgen_ray.ray.tracking import callbacks as tracker_callbacks

    os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
    return tune.RunConfig(
        name=f"{kind}-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}",
        storage_path=tune_storage(store),
        failure_config=tune.FailureConfig(max_failures=max_failures),
        verbose=0,
        callbacks=[*callbacks, *tracker_callbacks(tuple(trackers), store.name)],
    )


def run_training(
    store: StudyStore,
    packs: list[list[tuple[TrainSpec, dict]]],
    data: ImageData,
    options: RunOptions,
    cpus_per_trial: float,
    gpus_per_trial: float,
    already_done: int = 0,
    progress: bool = True,
    trackers: tuple[str, ...] = (),
) -> None:
    """Train every pending model, one Tune trial per pack of (spec, extra) pairs with the
    per-trial resources (`train.pack.form_packs` forms them; a pack of one is one plain
    model); results land in the store. `trackers`: `ray.tracking` names."""
    if not packs:
        return
    check_request(cpus_per_trial, gpus_per_trial, "--cpus-per-trial / --gpus-per-trial")
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, data=data), {"cpu": cpus_per_trial, "gpu": gpus_per_trial}
    )
    run_id = new_run_id()
    configs = [
        {
            "specs": [spec.to_dict() for spec, _ in members],
            "extras": [extra for _, extra in members],
            "store": store.uri,
            "options": dataclasses.asdict(options),  # every RunOptions field reaches train
            "cpus": cpus_per_trial,
            "model_id": members[0][0].model_id
            if len(members) == 1
            else f"pack-{pack_id([s for s, _ in members])}",
            "model_ids": [spec.model_id for spec, _ in members],
            "run_id": run_id,
        }
        for members in packs
    ]
    total = sum(len(members) for members in packs)
    callbacks = [ProgressLine(store.name, total, already_done, store, run_id)] if progress else []
    tuner = tune.Tuner(
        trainable,
        param_space={"trial": tune.grid_search(configs)},
        tune_config=tune.TuneConfig(
            reuse_actors=True,
            trial_name_creator=lambda t: t.config["trial"]["model_id"],
            trial_dirname_creator=lambda t: t.config["trial"]["model_id"],
        ),
        run_config=run_config(store, "train", callbacks, trackers),
    )
    tuner.fit()


__all__ = ["run_training"]
