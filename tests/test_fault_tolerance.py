"""Fault tolerance on a real Ray head (`ray start --head`, one per module, ~20 s):

- a trial process killed mid-training is retried by Tune and resumes from its last.pt;
- a trial whose code raises in k of N models leaves N-k ok rows and k failed rows with
  their reasons, ends as ERROR in Tune's results with its error, and a re-run retries only
  those k;
- a measure actor killed mid-search is restarted and no result is lost;
- a measure job killed mid-way keeps every row it flushed; a re-run finishes the rest.

One study serves all three: NiN on digits (1,347 training images) with batch 673, so the
last batch of every epoch holds one image. At depth 2 the last block still sees 4x4 maps
and trains; at depth 4 the maps are 1x1, so BatchNorm gets one value per channel and
PyTorch raises in the first epoch: a real failure of some models of a grid, not a mock.
(A killed driver resuming is tests/test_study_e2e.py.)
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pandas as pd
import pytest

from qgen_ray import schema
from tests.support.cluster import LocalHead, pid_alive
from tests.support.fixtures import REPO

pytestmark = pytest.mark.slow

EPOCHS = 24  # long enough to kill a trial mid-training (~0.3 s an epoch here)
STUDY_SCRIPT = f"""
from qgen_ray.pipeline.study import Study
from qgen_ray.pipeline.study_cli import main

main(Study(name="faults", dataset="digits", model="nin",
           grid={{"width": [1], "depth": [2, 4]}},
           precisions=(("fp32", 32), ("lsq", 4)),
           protocol={{"epochs": {EPOCHS}, "batch_size": 673, "milestones": (100,),
                      "augment": False}}))
"""
BN_ERROR = "ValueError: Expected more than 1 value per channel when training"
MEASURES = ["pacbayes_init", "pacbayes_orig"]  # one sigma search: seconds per model


def _wait_for(condition, what: str, proc: subprocess.Popen, timeout: float = 300):
    deadline = time.time() + timeout
    while not condition():
        assert proc.poll() is None, f"the run ended before {what}"
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def _kill(pids: list[int]) -> None:
    for pid in pids:
        os.kill(pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def head():
    with LocalHead(num_cpus=2) as h:
        yield h


class Run:
    """A study script or `qgen` command run against the head."""

    def __init__(self, head: LocalHead, args: list[str]):
        self.proc = subprocess.Popen(
            [*args, "--address", head.address], cwd=REPO, env=head.env, text=True,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )  # fmt: skip

    def finish(self, timeout: float = 400, code: int = 0) -> str:
        """The output; the run must exit with `code` (1: some models or items failed)."""
        out, _ = self.proc.communicate(timeout=timeout)
        assert self.proc.returncode == code, out[-4000:]
        return out


@pytest.fixture(scope="module")
def faults(head, tmp_path_factory):
    """The study run once, its two trainable trials' processes killed mid-training."""
    root = tmp_path_factory.mktemp("faults")
    script = root / "faults_study.py"
    script.write_text(textwrap.dedent(STUDY_SCRIPT))
    study = root / "store" / "faults"
    args = [sys.executable, str(script), "--storage", str(root / "store")]
    run = Run(head, args)

    def training() -> list[Path]:
        return [p.parent for p in study.glob("trials/*/last.pt")
                if not (p.parent / schema.RESULT_JSON).exists()]  # fmt: skip

    _wait_for(lambda: len(training()) == 2 and head.pids("ray::ImplicitFunc"),
              "two trials to be training", run.proc)  # fmt: skip
    init_mtimes = {d.name: (d / schema.INIT_CKPT).stat().st_mtime_ns for d in training()}
    killed = head.pids("ray::ImplicitFunc")
    _kill(killed)
    out = run.finish(code=1)  # the two raising models failed
    (tune_run,) = (study / schema.TUNE_DIR).glob("train-*")
    return {"study": study, "args": args, "out": out, "killed": killed, "init": init_mtimes,
            "tune_run": tune_run}  # fmt: skip


def test_killed_trial_process_is_retried_and_resumes(faults):
    study = faults["study"]
    assert faults["killed"] and not any(pid_alive(p) for p in faults["killed"])
    # Tune saw both deaths and retried both trials, and only those (a raising model's
    # retries are not counted: they raise its recorded error again)
    assert re.findall(r"retried (\d+)\)", faults["out"])[-1] == "2"
    trials = pd.read_parquet(study / schema.TRIALS).set_index("model_id")
    history = pd.read_parquet(study / schema.HISTORY)
    for model_id, init_mtime in faults["init"].items():
        assert trials.loc[model_id, "status"] == "ok" and trials.loc[model_id, "depth"] == 2
        epochs = history[history["model_id"] == model_id]["epoch"].tolist()
        assert epochs == list(range(1, EPOCHS + 1))  # every epoch once: resumed, not redone
        # init.pt is written only by a fresh start: the retry resumed from last.pt
        assert (study / "trials" / model_id / schema.INIT_CKPT).stat().st_mtime_ns == init_mtime


def test_raising_models_leave_failed_rows_and_only_they_are_retried(faults, head):
    study = faults["study"]
    trials = pd.read_parquet(study / schema.TRIALS)
    assert len(trials) == 4 and trials["model_id"].is_unique
    failed = trials[trials["status"] == "failed"]
    assert sorted(failed["depth"]) == [4, 4] and (trials["status"] != "failed").sum() == 2
    assert all(BN_ERROR in reason for reason in failed["reason"])
    assert "failed 2" in faults["out"] and "'failed': 2" in faults["out"]
    assert f"2 failed (retried on re-run): {BN_ERROR}" in faults["out"]  # the reason, once
    assert "error: train: 2 failed (e.g. " in faults["out"]  # and the exit status says so

    results = {m: study / "trials" / m / schema.RESULT_JSON for m in trials["model_id"]}
    before = {m: (p.read_bytes(), p.stat().st_mtime_ns) for m, p in results.items()}
    out = Run(head, faults["args"]).finish(code=1)
    assert "2 already done, 2 to train" in out
    for model_id in trials["model_id"]:
        was, mtime = before[model_id]
        if model_id in set(failed["model_id"]):
            assert results[model_id].stat().st_mtime_ns != mtime  # retried
            assert json.loads(results[model_id].read_text())["status"] == "failed"
        else:
            assert results[model_id].read_bytes() == was  # untouched
    again = pd.read_parquet(study / schema.TRIALS)
    assert again["status"].value_counts().to_dict() == {"ok": 2, "failed": 2}


def test_raising_models_end_as_error_in_tunes_results(faults):
    """Tune's own view agrees with the store: the raising trials are ERROR with their
    error (Tune's retries raised it again without training), the others TERMINATED."""
    from ray.tune import ExperimentAnalysis, ResultGrid

    trials = pd.read_parquet(faults["study"] / schema.TRIALS)
    failed = set(trials.loc[trials["status"] == "failed", "model_id"])
    grid = ResultGrid(ExperimentAnalysis(str(faults["tune_run"])))
    errors = {Path(r.path).name: r.error for r in grid}  # trial folder = model id
    assert set(errors) == set(trials["model_id"])
    assert {m for m, e in errors.items() if e is not None} == failed
    assert all(BN_ERROR.split(": ", 1)[1] in str(errors[m]) for m in failed)
    assert all("ModelFailed" in str(errors[m]) for m in failed)  # the retries: not retrained
    assert trials["run_id"].str.fullmatch("[0-9a-f]{12}").all()  # the Tune run of each row


def test_killed_measure_actor_is_replaced_and_no_result_is_lost(faults, head):
    study = faults["study"]
    qgen = str(Path(sys.executable).with_name("qgen"))
    run = Run(head, [qgen, "measure", str(study), "--measures", *MEASURES])
    _wait_for(lambda: head.pids("ray::FanOutWorker.run"), "a measure to run", run.proc)
    killed = head.pids("ray::FanOutWorker.run")  # an actor mid-search
    _kill(killed)
    out = run.finish()
    assert not any(pid_alive(p) for p in killed)
    assert "failed and will be retried" not in out
    measures = pd.read_parquet(study / schema.MEASURES)
    ok = pd.read_parquet(study / schema.TRIALS).query("status == 'ok'")["model_id"]
    pairs = set(zip(measures["model_id"], measures["measure"]))
    assert pairs == {(m, name) for m in ok for name in MEASURES}
    assert measures["value"].notna().all()


def test_killed_measure_job_keeps_its_rows_and_a_rerun_finishes(faults, head, tmp_path):
    """One actor (2 CPUs) measures the two models in turn, so there is a moment when the
    first model's rows are flushed and the second is being measured: kill the driver then."""
    study = tmp_path / "faults"
    shutil.copytree(faults["study"], study, ignore=shutil.ignore_patterns(schema.MEASURES))
    qgen = str(Path(sys.executable).with_name("qgen"))
    names = ["pacbayes_init", "pacbayes_mag_init", "sharpness_init", "sharpness_mag_init"]
    args = [qgen, "measure", str(study), "--cpus-per-task", "2", "--measures", *names]
    table = study / schema.MEASURES
    run = Run(head, args)
    _wait_for(table.exists, "the first rows to be flushed", run.proc)
    before = pd.read_parquet(table)
    assert before["model_id"].nunique() == 1  # the second model is not done
    run.proc.kill()
    run.proc.wait()
    after_kill = pd.read_parquet(table)
    pd.testing.assert_frame_equal(after_kill, before)  # nothing lost or damaged
    out = Run(head, args).finish()
    assert "2 models, 1 already measured, 1 to measure" in out
    final = pd.read_parquet(table)
    assert final["model_id"].nunique() == 2 and len(final) == 2 * len(names)
    kept = final.merge(before, on=list(before.columns))
    assert len(kept) == len(before)  # the first model's rows, unchanged
