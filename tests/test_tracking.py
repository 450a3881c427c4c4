"""Experiment tracking through Ray Tune's own callbacks (`--callbacks mlflow,wandb`),
offline: MLflow's local SQLite store, W&B's offline mode. And the flag's mistakes, each
one line with exit status 2 before anything is written."""

from __future__ import annotations

import os
import subprocess
import sys

import pandas as pd
import pytest

from qgen_ray import schema
from qgen_ray.errors import UserError
from qgen_ray.ray import tracking
from tests.support.fixtures import REPO

DEMO = str(REPO / "studies" / "demo.py")


def test_unknown_or_unusable_trackers_are_one_line(tmp_path, monkeypatch):
    assert tracking.parse(None) == () and tracking.parse("mlflow") == ("mlflow",)
    with pytest.raises(UserError, match="unknown --callbacks 'comet'; valid: mlflow, wandb"):
        tracking.parse("mlflow,comet")
    for var in ("WANDB_MODE", "WANDB_API_KEY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc: never logged in
    with pytest.raises(UserError, match="WANDB_MODE=offline"):
        tracking.parse("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert tracking.parse("wandb, mlflow") == ("wandb", "mlflow")


def test_a_missing_tracker_package_names_its_extra(tmp_path):
    """Without the package the flag needs (hidden from the import system here), the study
    stops in one line naming the extra, and writes nothing."""
    code = (
        "import sys; sys.modules['mlflow'] = None\n"  # `import mlflow` now fails
        f"sys.argv = ['demo', '--smoke', '--storage', {str(tmp_path)!r}, '--callbacks', 'mlflow']\n"
        f"exec(open({DEMO!r}).read())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 2, out.stderr[-2000:]
    assert out.stderr.strip() == (
        "error: --callbacks mlflow needs the mlflow package: pip install -e '.[mlflow]'"
    )
    assert list(tmp_path.iterdir()) == []


def test_wandb_logs_at_the_epoch_not_the_report_count(tmp_path, monkeypatch):
    """Ray's W&B actor logs at `training_iteration` (the count of a trial's reports); ours
    puts the epoch there, so a pack's K reports an epoch, and a resumed model's, land at
    the epoch."""
    import inspect
    from queue import Queue

    from ray.air.integrations.wandb import _WandbLoggingActor

    assert "step=log.get(TRAINING_ITERATION)" in inspect.getsource(_WandbLoggingActor.run)
    monkeypatch.chdir(tmp_path)  # the actor changes into its log folder
    actor = tracking.epoch_step_wandb_actor()(str(tmp_path), Queue(), ["done"], [])
    result = {"training_iteration": 1, "timesteps_total": 7, "epoch": 7, "train_loss": 0.5}
    log, _ = actor._handle_result(result)
    assert log["training_iteration"] == 7 and log["train_loss"] == 0.5
    assert tracking.callbacks(("wandb",), "s")[0]._logger_actor_cls is type(actor)


@pytest.mark.slow
def test_mlflow_and_wandb_log_every_model_at_its_epochs(tmp_path):
    """The demo smoke (4 models x 2 epochs) with both trackers: one MLflow run and one W&B
    offline run per model, each curve at steps 1..2 (the epochs)."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MLFLOW_TRACKING_URI": uri,
           "WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path / "wb")}  # fmt: skip
    (tmp_path / "wb").mkdir()
    store = tmp_path / "results"
    out = subprocess.run(
        [sys.executable, DEMO, "--smoke", "--storage", str(store), "--stages", "train",
         "--quiet", "--callbacks", "mlflow,wandb"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    trials = pd.read_parquet(store / "demo-smoke" / schema.TRIALS)
    assert len(trials) == 4 and (trials["status"] == "ok").all()

    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("demo-smoke")
    runs = client.search_runs([experiment.experiment_id])
    assert sorted(r.info.run_name for r in runs) == sorted(trials["model_id"])
    for run in runs:
        assert run.info.status == "FINISHED"
        history = client.get_metric_history(run.info.run_id, "train_loss")
        assert sorted(m.step for m in history) == [1, 2]
        losses = trials.set_index("model_id").loc[run.info.run_name]
        assert all(0 < m.value < 10 for m in history) and losses["status"] == "ok"

    offline = sorted((tmp_path / "wb" / "wandb").glob("offline-run-*"))
    assert len(offline) == 4  # one W&B run per model, kept for `wandb sync`
    assert all(any(d.glob("*.wandb")) for d in offline)
