"""The Ray adapter of ImageNet fine-tuning: Ray Train inside Ray Tune (the Ray 2.60 pattern).

One Tune function trial per model (a grid over models x precisions); each trial builds and
fits a `TorchTrainer` whose workers run `qgen_ray.train.finetune.finetune` under
DistributedDataParallel (NCCL on GPUs, gloo on CPUs), and forwards rank 0's per-epoch
metrics to Tune with `TuneReportCallback` (progress line, TensorBoard files). Several
Train runs share the cluster: Tune starts as many as its free CPUs / GPUs hold.

Resume lives in the study store, not in Ray: a Train run resumes from the model's
`last.pt`. Every attempt gets a fresh Train run name, because re-running a Train run
under the same `RunConfig(name)` silently resumes Ray's own state instead. A run whose
worker was lost (its process or node died) is run again, up to `MAX_FAILURES` times, each
resuming from `last.pt`; preempted nodes are Train's own retries (`max_preemption_failures`).
A run whose code raised is not retrained (Train would retry it as any worker error): it
is recorded as `failed` (a re-run of the study retries it) and its trial ends as ERROR in
Tune's results.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone

import ray
import ray.train
import torch
from ray import tune
from ray.exceptions import RayActorError
from ray.train.torch import TorchConfig, TorchTrainer
from ray.train.v2._internal.exceptions import RayTrainError  # Train's own worker errors
from ray.tune.integration.ray_train import TuneReportCallback

from qgen_ray import schema
from qgen_ray.errors import UserError
from qgen_ray.ray.tune_study import (
    MAX_FAILURES,
    ProgressLine,
    epoch_step,
    failed_result,
    run_config,
    tune_storage,
)
from qgen_ray.spec import TrainSpec
from qgen_ray.store import StudyStore
from qgen_ray.train.finetune import FinetuneOptions, finetune

# The Tune trial only builds the TorchTrainer and waits for it (the Train controller takes
# 0 CPUs too), so it holds no CPU: a bundle needs some resource, hence a little memory.
DRIVER_RESOURCES = {"cpu": 0, "memory": 256 * 2**20}
TRAIN_RUNS_DIR = "ddp"  # <study>/tune/ddp/<model_id>-<time>/: Ray Train's own run folders


@dataclass(frozen=True)
class DDPResources:
    """One Train run: `workers` DDP ranks, each holding these CPUs and GPUs."""

    workers: int
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0

    def __post_init__(self) -> None:
        if self.workers < 1 or self.cpus_per_worker <= 0 or self.gpus_per_worker < 0:
            raise UserError("--workers must be >= 1, CPUs per worker > 0 and GPUs >= 0")
        if self.workers > 1 and 0 < self.gpus_per_worker < 1:
            raise UserError(
                f"{self.workers} DDP workers with {self.gpus_per_worker:g} GPU each could share "
                "a GPU, which NCCL refuses; give each worker a whole GPU (or use --workers 1 "
                "to pack runs)"
            )

    @property
    def use_gpu(self) -> bool:
        return self.gpus_per_worker > 0

    def per_worker(self) -> dict[str, float]:
        out = {"CPU": self.cpus_per_worker}
        if self.use_gpu:
            out["GPU"] = self.gpus_per_worker
        return out

    def concurrent_runs(self, cluster: dict[str, float]) -> int:
        """How many Train runs the cluster's CPUs and GPUs hold at once (at least 1)."""
        fits = [cluster.get("CPU", 0.0) / (self.workers * self.cpus_per_worker)]
        if self.use_gpu:
            fits.append(cluster.get("GPU", 0.0) / (self.workers * self.gpus_per_worker))
        return max(1, int(min(fits)))


def worker_loop(config: dict) -> None:
    """Ray Train worker: the process group is up; run this rank of the fine-tuning."""
    import ray.train.torch

    spec = TrainSpec.from_dict(config["spec"])
    options = FinetuneOptions(**config["options"])
    use_gpu = config["resources"]["gpus_per_worker"] > 0
    device = ray.train.torch.get_device() if use_gpu else torch.device("cpu")
    finetune(spec, options, device, report=lambda m: ray.train.report(epoch_step(m)))


def worker_lost(err: BaseException) -> bool:
    """Whether a Train run failed because a worker's process or node died (run it again),
    not because the code raised (do not). Ray Train's `WorkerGroupError` holds each failed
    rank's exception: the code's own exception for an error, Train's health-check error (or
    the actor error) for a lost worker. The other ranks then fail with collective errors of
    their own, so one lost worker decides."""
    failures = getattr(err, "worker_failures", None) or {}
    return any(isinstance(e, (RayActorError, RayTrainError)) for e in failures.values())


def finetune_trial(config: dict) -> None:
    """Tune function trial: fit one TorchTrainer for one model, again when a worker was
    lost (`worker_lost`, at most `MAX_FAILURES` times); record a failure."""
    config = config["trial"]
    for attempt in range(MAX_FAILURES + 1):
        try:
            return _fit(config)
        except Exception as err:  # noqa: BLE001 - recorded in the table, retried on re-run
            if attempt < MAX_FAILURES and worker_lost(err):
                continue  # a fresh Train run resumes from last.pt
            trial = StudyStore(config["options"]["store"]).trial(config["model_id"])
            if trial.has_result() and trial.read_result()["status"] != schema.STATUS_FAILED:
                return  # rank 0 finished and wrote the row; the error came after it
            result = failed_result(TrainSpec.from_dict(config["spec"]), err)
            result.update(config["options"]["extra"])
            trial.write_result(result)
            raise  # ERROR in Tune's results, with the error


def _fit(config: dict) -> None:
    """One Train run of one model (a fresh run name each attempt)."""
    spec = TrainSpec.from_dict(config["spec"])
    resources = DDPResources(**config["resources"])
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    trainer = TorchTrainer(
        worker_loop,
        train_loop_config=config,
        torch_config=TorchConfig(backend="nccl" if resources.use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(
            num_workers=resources.workers,
            use_gpu=resources.use_gpu,
            resources_per_worker=resources.per_worker(),
        ),
        run_config=ray.train.RunConfig(
            name=f"{spec.model_id}-{stamp}-{time.time_ns() % 10**6:06d}",
            storage_path=config["train_storage"],
            # no retry of a worker error inside Train (code errors are worker errors too):
            # finetune_trial runs again when a worker was lost
            failure_config=ray.train.FailureConfig(max_failures=0),
            callbacks=[TuneReportCallback()],
        ),
    )
    trainer.fit()


def run_finetune(
    store: StudyStore,
    pending: list[tuple[TrainSpec, dict]],
    options: FinetuneOptions,
    resources: DDPResources,
    weights: dict[str, str] | None = None,
    already_done: int = 0,
    progress: bool = True,
    trackers: tuple[str, ...] = (),
) -> None:
    """Fine-tune every pending model as one Tune trial holding one Train run; results
    land in the store (`<study>/trials/<model_id>/result.json`). `weights` maps a model
    name to its starting state dict (overrides `options.weights`); `trackers`:
    `ray.tracking` names."""
    if not pending:
        return
    configs = [
        {
            "spec": spec.to_dict(),
            "options": {
                **asdict(options),
                "weights": (weights or {}).get(spec.model, options.weights),
                "extra": {**options.extra, **extra},
            },
            "resources": asdict(resources),
            "train_storage": f"{tune_storage(store)}/{TRAIN_RUNS_DIR}",
            "model_id": spec.model_id,
        }
        for spec, extra in pending
    ]
    callbacks = [ProgressLine(store.name, len(configs), already_done)] if progress else []
    tuner = tune.Tuner(
        tune.with_resources(finetune_trial, DRIVER_RESOURCES),
        param_space={"trial": tune.grid_search(configs)},
        tune_config=tune.TuneConfig(
            max_concurrent_trials=resources.concurrent_runs(ray.cluster_resources()),
            trial_name_creator=lambda t: t.config["trial"]["model_id"],
            trial_dirname_creator=lambda t: t.config["trial"]["model_id"],
        ),
        # Train retries dead workers itself (and the trial records a failure): no Tune retry
        run_config=run_config(store, "finetune", callbacks, trackers, max_failures=0),
    )
    tuner.fit()


__all__ = ["DDPResources", "finetune_trial", "run_finetune", "worker_loop"]
