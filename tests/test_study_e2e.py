"""Study scripts end to end through a real local Ray: smoke run, kill and resume, bad input.

These start Ray (~15-30 s each on 2 cores), so they are marked slow; `make test` runs them.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pandas as pd
import pytest

from qgen_ray import schema
from qgen_ray.pipeline.study import Study
from qgen_ray.pipeline.study_cli import main
from tests.support.fixtures import REPO, load_script

pytestmark = pytest.mark.slow
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_DEDUP_LOGS": "0"}


def _run(args: list[str], cwd=REPO, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args],
        cwd=cwd,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=600,
        **kw,
    )


def test_demo_smoke_trains_every_precision(tmp_path):
    """With a relative --storage (as `make demo` passes): Tune trials run in their own
    working folders, so the store must reach them as an absolute path."""
    demo = str(REPO / "studies" / "demo.py")
    out = _run([demo, "--smoke", "--storage", "results", "--stages", "train"], cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    tmp_path = tmp_path / "results"
    trials = pd.read_parquet(tmp_path / "demo-smoke" / schema.TRIALS)
    assert sorted(trials["bits"]) == [2, 4, 8, 32]
    assert (trials["status"] == "ok").all() and trials["model_id"].is_unique
    assert "trials:" in out.stdout and "done 4/4" in out.stdout  # the progress line
    history = pd.read_parquet(tmp_path / "demo-smoke" / schema.HISTORY)
    assert len(history) == 4 * 2  # two epochs per model
    tb = list((tmp_path / "demo-smoke" / "tune").rglob("events.out.tfevents*"))
    assert len(tb) >= 4  # TensorBoard files for every trial


def test_dtype_flag_reaches_every_trial(tmp_path):
    """--dtype float64 (the reproducible mode) travels through Tune into each trial and
    the row says what the model was computed in."""
    demo = str(REPO / "studies" / "demo.py")
    store = tmp_path / "results"
    out = _run([demo, "--smoke", "--storage", str(store), "--stages", "train", "--quiet",
                "--dtype", "float64"])  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    trials = pd.read_parquet(store / "demo-smoke" / schema.TRIALS)
    assert len(trials) == 4 and (trials["dtype"] == "float64").all()
    assert (trials["status"] == "ok").all()
    assert "pack_id" not in trials  # --pack auto on CPU: one plain model per trial


def test_a_packed_study_through_tune_equals_each_model_trained_alone(tmp_path):
    """--pack 2 in the reproducible mode: two packs of two, one Tune trial each, every
    model's row and checkpoints those of its spec trained alone. Then two models are
    lost (one's result.json, the other's result and checkpoints but init.pt; a row without
    any trial folder counts as done, see test_no_dead_ends): the re-run with --pack 4
    trains only those two, as one pack (one resumes from its final last.pt, one starts afresh),
    leaves the others' results alone, and the numbers are again those of training alone."""
    from qgen_ray.data import load_image_data
    from qgen_ray.spec import RunOptions, TrainSpec
    from qgen_ray.store import StudyStore
    from qgen_ray.train import train
    from tests.support.compare import assert_same_checkpoints, assert_trained_alike

    demo = str(REPO / "studies" / "demo.py")
    args = [demo, "--smoke", "--storage", str(tmp_path), "--stages", "train", "--dtype", "float64"]
    out = _run([*args, "--pack", "2"])
    assert out.returncode == 0, out.stderr[-3000:]
    assert "4 models in 2 packs (--pack 2)" in out.stdout and "done 4/4" in out.stdout
    trials = pd.read_parquet(tmp_path / "demo-smoke" / schema.TRIALS)
    assert (trials["status"] == "ok").all() and (trials["pack_size"] == 2).all()
    assert trials["pack_id"].nunique() == 2 and trials["model_id"].is_unique
    store, alone = StudyStore(str(tmp_path / "demo-smoke")), StudyStore(str(tmp_path / "alone"))
    data, f64 = load_image_data("digits"), RunOptions(dtype="float64")
    want = {}
    for model_id in trials["model_id"]:
        spec = TrainSpec.from_dict(store.trial(model_id).read_result()["spec"])
        want[model_id] = train(spec, data, alone.trial(model_id), f64)
        assert_trained_alike(store.trial(model_id).read_result(), want[model_id], rel=1e-9)
        assert_same_checkpoints(store.trial(model_id), alone.trial(model_id), rtol=1e-9)

    lost, kept = list(trials["model_id"][:2]), list(trials["model_id"][2:])
    os.remove(store.path(store.trial(lost[0]).rel(schema.RESULT_JSON)))
    for name in (schema.RESULT_JSON, schema.LAST_CKPT, schema.FINAL_CKPT):
        os.remove(store.path(store.trial(lost[1]).rel(name)))

    def stamps():
        return {m: os.stat(store.path(store.trial(m).rel(schema.RESULT_JSON))).st_mtime_ns
                for m in kept}  # fmt: skip

    before = stamps()
    out = _run([*args, "--pack", "4"])
    assert out.returncode == 0, out.stderr[-3000:]
    assert "2 already done, 2 to train" in out.stdout and "2 models in 1 packs" in out.stdout
    assert stamps() == before
    for model_id in lost:
        row = store.trial(model_id).read_result()
        assert row["pack_size"] == 2
        assert_trained_alike(row, want[model_id], rel=1e-9)


RESUME_SCRIPT = """
from qgen_ray.pipeline.study import Study
from qgen_ray.pipeline.study_cli import main
main(Study(name="resume", dataset="digits", model="nin",
           grid={{"width": [1, 2], "depth": [2]}},
           precisions=(("fp32", 32), ("lsq", 4)),
           protocol={{"epochs": {epochs}, "batch_size": 128, "milestones": (100,),
                      "augment": False}}))
"""


def _alive(name: str) -> bool:
    """Whether a process whose command line holds `name` runs (Ray names its workers)."""
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        with contextlib.suppress(OSError):
            if name.encode() in cmdline.read_bytes():
                return True
    return False


def test_killed_study_resumes_without_retraining(tmp_path):
    script = tmp_path / "resume_study.py"
    script.write_text(textwrap.dedent(RESUME_SCRIPT.format(epochs=40)))
    study = tmp_path / "store" / "resume"
    cmd = [sys.executable, str(script), "--storage", str(tmp_path / "store"), "--quiet"]
    proc = subprocess.Popen(
        cmd,
        cwd=REPO,
        env=ENV,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 300
    try:
        while time.time() < deadline:  # kill once one model is done and another is mid-way
            done = list(study.glob("trials/*/result.json"))
            # mid-way: last.pt at an epoch far from the end, so it cannot finish between
            # this look and the kill (a model at epoch 39 could, and would then not resume)
            if done and any(1 <= e <= 30 for e in _unfinished_epochs(study).values()):
                break
            assert proc.poll() is None, "the study ended before it could be killed"
            time.sleep(0.2)
        else:
            pytest.fail("no model finished within the deadline")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    # Ray's worker processes live in their own sessions: one may finish its epoch before
    # it notices its raylet is gone. Read the store once they are gone (at most 60 s) and
    # nothing has changed for 2 s.
    gone_by = time.time() + 60
    while _alive("ray::ImplicitFunc") and time.time() < gone_by:
        time.sleep(0.5)
    resumable, seen = None, {}
    while resumable != seen:
        seen = resumable
        time.sleep(2)
        resumable = _unfinished_epochs(study)  # model id -> the epoch its last.pt holds
    before = {p.parent.name: p.read_text() for p in study.glob("trials/*/result.json")}
    assert 1 <= len(before) < 4
    assert resumable and max(resumable.values()) >= 1
    first_runs = set((study / schema.TUNE_DIR).glob("train-*"))
    out = _run([str(script), "--storage", str(tmp_path / "store"), "--quiet"])
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"{len(before)} already done" in out.stdout
    trials = pd.read_parquet(study / schema.TRIALS)
    assert len(trials) == 4 and trials["model_id"].is_unique and (trials["status"] == "ok").all()
    for mid, text in before.items():  # finished models were not retrained
        assert (study / "trials" / mid / "result.json").read_text() == text
    history = pd.read_parquet(study / schema.HISTORY)
    assert (history.groupby("model_id")["epoch"].apply(list) == [list(range(1, 41))] * 4).all()
    # TensorBoard: a model resumed from last.pt at epoch k continues its curves at step k+1
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (rerun,) = set((study / schema.TUNE_DIR).glob("train-*")) - first_runs
    for mid in set(trials["model_id"]) - set(before):
        (events,) = (rerun / mid).glob("events.out.tfevents*")
        tb = EventAccumulator(str(events))
        tb.Reload()
        expected = list(range(resumable.get(mid, 0) + 1, 41))
        if not expected:  # an orphaned worker wrote its last epoch: nothing left to train
            assert "ray/tune/train_loss" not in tb.Tags()["scalars"], mid
            continue
        steps = [e.step for e in tb.Scalars("ray/tune/train_loss")]
        assert steps == expected, mid


def _unfinished_epochs(study) -> dict[str, int]:
    """Models with a `last.pt` and no result: the epoch each checkpoint holds."""
    import torch

    epochs = {}
    for ckpt in study.glob("trials/*/last.pt"):
        if (ckpt.parent / "result.json").exists():
            continue
        try:
            epochs[ckpt.parent.name] = torch.load(ckpt, weights_only=True)["epoch"]
        except (OSError, RuntimeError, EOFError):  # replaced while read: look again
            continue
    return epochs


def _bad(argv, study: Study, capsys) -> str:
    with pytest.raises(SystemExit) as exc:
        main(study, argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("error: ")  # one line, no traceback
    return err


def test_bad_input_is_one_line_exit_2_and_leaves_the_store_alone(tmp_path, capsys):
    store = tmp_path / "store"
    (store / "x").mkdir(parents=True)
    (store / "x" / schema.TRIALS).write_bytes(b"precious")
    ok = dict(name="x", dataset="digits", model="nin", grid={"width": [1]})
    argv = ["--storage", str(store)]
    assert "widht" in _bad(argv, Study(**{**ok, "grid": {"widht": [1]}}), capsys)
    assert "valid names" in _bad(argv, Study(**{**ok, "model": "nin9"}), capsys)
    assert "valid names" in _bad(argv, Study(**{**ok, "dataset": "mnist"}), capsys)
    cifar = Study(**{**ok, "dataset": "cifar10"})
    assert "--data-root" in _bad([*argv, "--data-root", str(tmp_path / "none")], cifar, capsys)
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert "cannot write" in _bad(["--storage", str(blocker / "sub")], Study(**ok), capsys)
    assert (store / "x" / schema.TRIALS).read_bytes() == b"precious"


@pytest.mark.parametrize(
    "declaration, fragment",
    [
        (dict(stages=("train", "measures")), "unknown stage 'measures'"),
        (dict(stage_options={"landscape": {"stepz": 11}}), "no option 'stepz'"),
        (dict(grid={"width": [1], "optimizer": ["lion"]}), "unknown optimizer 'lion'"),
    ],
)
def test_bad_study_declaration_is_one_line_before_any_file(tmp_path, capsys, declaration, fragment):
    """Checked in plan(), before the store is created: the storage folder stays absent."""
    store = tmp_path / "store"
    study = Study(
        **{"name": "x", "dataset": "digits", "model": "nin", "grid": {"width": [1]}, **declaration}
    )
    assert fragment in _bad(["--storage", str(store), "--quiet"], study, capsys)
    assert not store.exists()


@pytest.mark.parametrize("flag", [["--cpus-per-trial", "0"], ["--pack", "0"]])
def test_study_script_bad_flag_value_exits_2(flag, tmp_path):
    out = _run(["studies/demo.py", "--smoke", *flag, "--storage", str(tmp_path / "q")])
    assert out.returncode == 2 and out.stderr.strip().count("\n") == 0, out.stderr
    assert flag[0] in out.stderr and not (tmp_path / "q").exists()


def test_cifar_study_smoke_reads_the_published_layout(cifar10_root, tmp_path):
    """nin_cifar10 --smoke through Tune on a CIFAR folder in torchvision's pickle format."""
    import ray

    nin_cifar10 = load_script("nin_cifar10")
    argv = [
        "--smoke",
        "--storage",
        str(tmp_path),
        "--data-root",
        str(cifar10_root),
        "--quiet",
        "--stages",
        "train",
        "--gpus-per-trial",
        "0",
    ]
    try:
        main(nin_cifar10.STUDY, argv)
    finally:
        ray.shutdown()
    trials = pd.read_parquet(tmp_path / "nin_cifar10-smoke" / schema.TRIALS)
    assert len(trials) == 4 and (trials["status"] == "ok").all()
    assert set(trials["dataset"]) == {"cifar10"} and (trials["num_train"] == 100).all()


def test_the_data_root_is_the_studys_own_after_its_first_run(cifar10_root, tmp_path):
    """The README's head-node re-run and follow-up job pass no --data-root: the first run
    recorded it in study.json, where they find it."""
    import json

    import ray

    from qgen_ray import cli

    nin_cifar10 = load_script("nin_cifar10")
    argv = ["--smoke", "--storage", str(tmp_path), "--quiet", "--gpus-per-trial", "0"]
    study = tmp_path / "nin_cifar10-smoke"
    try:
        main(nin_cifar10.STUDY, [*argv, "--data-root", str(cifar10_root), "--stages", "train"])
        record = json.loads((study / schema.STUDY_JSON).read_text())
        assert record["data_root"] == str(cifar10_root.resolve())
        main(nin_cifar10.STUDY, [*argv, "--stages", "train"])  # the recorded root is used
        cli.main(["measure", str(study), "--measures", "weight_norm"])  # loads it from there
    finally:
        ray.shutdown()
    measures = pd.read_parquet(study / schema.MEASURES)
    assert len(measures) == 4 and set(measures["measure"]) == {"weight_norm"}
    assert json.loads((study / schema.STUDY_JSON).read_text())["data_root"] == record["data_root"]


def test_planned_models_without_a_result_are_named(tmp_path, capsys):
    """A trial that ended without writing its result (e.g. it wrote elsewhere) is said."""
    from qgen_ray.pipeline.study_cli import collect_trials
    from qgen_ray.store import StudyStore

    collect_trials(StudyStore(str(tmp_path / "s")), "s", ["0123abcd"])
    out = capsys.readouterr().out
    assert "trials: {}" in out and "1 models ended without a result (e.g. 0123abcd)" in out
