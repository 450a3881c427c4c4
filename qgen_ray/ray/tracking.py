"""Experiment tracking: `--callbacks mlflow` / `--callbacks wandb` attach Ray Tune's own
`MLflowLoggerCallback` / `WandbLoggerCallback` to a study's Tune run.

Both are optional extras (`pip install -e '.[mlflow]'`, `'.[wandb]'`), checked before
anything is written. Every model's curves are logged with its epoch as the step (the
trials report `timesteps_total = epoch`, which Tune's TensorBoard and MLflow callbacks
take as the step; Ray's W&B logger logs at `training_iteration`, the count of reports, so
ours logs at the epoch: `EpochStepWandbActor`), so a resumed model continues its curve.

- MLflow: one experiment per study, one run per Tune trial, at MLflow's tracking URI
  (`MLFLOW_TRACKING_URI`; MLflow's own default is `mlflow.db` in the driver's working
  directory).
- W&B: one project per study, one run per trial, grouped by Tune run. Online needs an
  API key (`WANDB_API_KEY` or `wandb login`); `WANDB_MODE=offline` writes the runs under
  `WANDB_DIR` (default: the driver's working directory) for a later `wandb sync`.
"""

from __future__ import annotations

import functools
import importlib
import netrc
import os

from qgen_ray.errors import UserError

TRACKERS = ("mlflow", "wandb")  # each is its module and its extra


def parse(value: str | None) -> tuple[str, ...]:
    """`--callbacks mlflow,wandb` as names, checked: known, installed, and (W&B) able to
    log in; one line naming the fix otherwise."""
    names = tuple(n.strip() for n in (value or "").split(",") if n.strip())
    for name in names:
        if name not in TRACKERS:
            raise UserError(f"unknown --callbacks {name!r}; valid: {', '.join(TRACKERS)}")
        try:
            importlib.import_module(name)
        except ImportError:
            raise UserError(
                f"--callbacks {name} needs the {name} package: pip install -e '.[{name}]'"
            ) from None
    if "wandb" in names and not _wandb_can_log():
        raise UserError(
            "--callbacks wandb needs a W&B login: set WANDB_API_KEY, run `wandb login`, or "
            "set WANDB_MODE=offline (runs kept locally for `wandb sync`)"
        )
    return names


def _wandb_can_log() -> bool:
    if os.environ.get("WANDB_MODE") in ("offline", "disabled") or os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (OSError, netrc.NetrcParseError):
        return False


def callbacks(names: tuple[str, ...], study: str) -> list:
    """Ray Tune's own logger callbacks for the named trackers."""
    out = []
    if "mlflow" in names:
        from ray.air.integrations.mlflow import MLflowLoggerCallback

        out.append(MLflowLoggerCallback(experiment_name=study, tags={"study": study}))
    if "wandb" in names:
        mode = os.environ.get("WANDB_MODE")
        out.append(
            _epoch_step_wandb()(
                project=study,
                dir=os.environ.get("WANDB_DIR", os.getcwd()),  # the logging actor's cwd is Ray's
                **({"mode": mode} if mode else {}),
            )
        )
    return out


@functools.cache
def epoch_step_wandb_actor():
    """Ray's W&B logging actor, logging each result at its epoch (`timesteps_total`)
    rather than at `training_iteration`: a pack reports K times an epoch, and a model
    resumed by a re-run or a retried trial starts its reports at 1 again."""
    from ray.air.integrations.wandb import _WandbLoggingActor
    from ray.tune.result import TIMESTEPS_TOTAL, TRAINING_ITERATION

    class EpochStepWandbActor(_WandbLoggingActor):
        def _handle_result(self, result: dict) -> tuple[dict, dict]:
            log, config_update = super()._handle_result(result)
            if TIMESTEPS_TOTAL in log:  # the step W&B logs at (Ray reads it from here)
                log[TRAINING_ITERATION] = log[TIMESTEPS_TOTAL]
            return log, config_update

    return EpochStepWandbActor


@functools.cache
def _epoch_step_wandb():
    from ray.air.integrations.wandb import WandbLoggerCallback

    class EpochStepWandb(WandbLoggerCallback):
        _logger_actor_cls = epoch_step_wandb_actor()

    return EpochStepWandb


__all__ = ["TRACKERS", "callbacks", "epoch_step_wandb_actor", "parse"]
