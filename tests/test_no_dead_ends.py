"""No dead ends: every damaged file, bad value and unreachable resource of the "no dead
ends" issue gives one line and a way on, and loses no finished result.

A module fixture trains four one-epoch digits NiNs into a study folder (no Ray); each test
copies it and damages the copy its own way.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
import torch

from qgen_ray import cli, schema
from qgen_ray.data import load_image_data
from qgen_ray.errors import DamagedFile, UserError
from qgen_ray.pipeline.collect import collect, finished_ids, progress_counts
from qgen_ray.pipeline.followups import measure_todo, ok_trials
from qgen_ray.spec import TrainSpec
from qgen_ray.store import LOCK, StudyStore
from qgen_ray.train import train
from qgen_ray.train.epochs import degenerate_reason
from tests.support.fixtures import REPO

PRECISIONS = (("fp32", 32), ("lsq", 8), ("lsq", 4), ("lsq", 2))
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_DEDUP_LOGS": "0"}


def _spec(method: str, bits: int) -> TrainSpec:
    return TrainSpec(dataset="digits", model="nin", width=1, depth=2, epochs=1,
                     batch_size=64, bits=bits, method=method, augment=False)  # fmt: skip


@pytest.fixture(scope="module")
def digits():
    return load_image_data("digits")


@pytest.fixture(scope="module")
def finished(tmp_path_factory, digits):
    """Four finished models, their tables and study.json."""
    store = StudyStore(str(tmp_path_factory.mktemp("finished") / "mini"))
    for method, bits in PRECISIONS:
        spec = _spec(method, bits)
        trial = store.trial(spec.model_id)
        trial.write_result(train(spec, digits, trial))
    collect(store)
    store.write_json(schema.STUDY_JSON, {"study": "mini", "num_models": 4})
    return store


@pytest.fixture
def study(finished, tmp_path) -> StudyStore:
    """A copy of the finished study for one test to damage."""
    shutil.copytree(finished.root, tmp_path / "mini")
    return StudyStore(str(tmp_path / "mini"))


def _ids(store: StudyStore) -> list[str]:
    return sorted(store.read_table(schema.TRIALS)["model_id"])


def _one_line(capsys, code, fn, *args) -> str:
    with pytest.raises(SystemExit) as exc:
        fn(*args)
    err = capsys.readouterr().err.strip()
    assert exc.value.code == code and "\n" not in err and "Traceback" not in err, err
    return err


# 1. collect never drops rows it cannot rebuild --------------------------------------------


def test_synced_tables_without_trial_folders_keep_their_rows_and_count_as_done(study, capsys):
    """The laptop workflow: tables synced, trials/ left in the bucket (here: 3 of 4)."""
    ids = _ids(study)
    before = study.read_table(schema.TRIALS)
    history = study.read_table(schema.HISTORY)
    for model_id in ids[1:]:
        shutil.rmtree(study.path(study.trial(model_id).prefix))
    trials = collect(study)
    pd.testing.assert_frame_equal(trials[before.columns], before)  # 4 rows, as they were
    assert len(study.read_table(schema.HISTORY)) == len(history)
    assert "kept 3 rows of models whose trial folders are not" in capsys.readouterr().out
    assert finished_ids(study) == set(ids)  # the study script retrains nothing
    assert progress_counts(study)["ok"] == 4
    assert "4/4 models done" in cli.status(study)
    err = _one_line(capsys, 2, cli.main, ["measure", study.root])
    assert "have a row but no trial folder" in err and "copy the trials/ folders back" in err


# 2. dead ends whose message was untrue -------------------------------------------------------


def test_a_missing_final_checkpoint_is_requeued_and_rebuilt_by_the_rerun(study, digits, capsys):
    model_id = _ids(study)[0]
    trial = study.trial(model_id)
    want = trial.read_result()
    os.remove(study.path(trial.rel(schema.FINAL_CKPT)))
    assert model_id not in finished_ids(study)
    assert "re-queued, the re-run rebuilds it" in capsys.readouterr().out
    err = _one_line(capsys, 2, cli.main, ["measure", study.root])
    assert "lack init.pt or final.pt" in err and "re-run the study script" in err
    row = train(TrainSpec.from_dict(want["spec"]), digits, trial)  # what the re-run does
    assert row["train_loss"] == want["train_loss"] and trial.has(schema.FINAL_CKPT)
    trial.write_result(row)
    assert model_id in finished_ids(study)


def test_a_missing_init_checkpoint_is_rebuilt_from_the_seed(study, digits):
    model_id = _ids(study)[1]
    trial = study.trial(model_id)
    init = trial.load(schema.INIT_CKPT)
    os.remove(study.path(trial.rel(schema.INIT_CKPT)))
    with pytest.raises(UserError, match="lack init.pt or final.pt"):
        ok_trials(study)
    train(TrainSpec.from_dict(trial.read_result()["spec"]), digits, trial)  # resumes
    for name, tensor in trial.load(schema.INIT_CKPT).items():
        assert torch.equal(tensor, init[name]), name


def test_a_truncated_last_checkpoint_is_set_aside_and_training_restarts(study, digits, capsys):
    model_id = _ids(study)[2]
    trial = study.trial(model_id)
    want = trial.read_result()
    last = study.path(trial.rel(schema.LAST_CKPT))
    with open(last, "r+b") as f:
        f.truncate(os.path.getsize(last) // 2)
    row = train(TrainSpec.from_dict(want["spec"]), digits, trial)
    err = capsys.readouterr().err
    assert "damaged file" in err and "kept as last.pt.damaged" in err and "epoch 0" in err
    assert os.path.exists(last + ".damaged")
    assert row["train_loss"] == want["train_loss"]  # trained again from the seed: same numbers


def test_a_truncated_corrupted_set_is_set_aside_and_generated_again(tmp_path, capsys):
    from qgen_ray.data.corruptions import corrupted_set

    images = np.random.default_rng(0).integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)
    labels = np.arange(8)
    first, _ = corrupted_set(tmp_path, images, labels, "fixture", "contrast", 3, seed=0)
    [cached] = list(tmp_path.rglob("*.npy"))
    cached.write_bytes(cached.read_bytes()[:100])
    again, _ = corrupted_set(tmp_path, images, labels, "fixture", "contrast", 3, seed=0)
    np.testing.assert_array_equal(again, first)
    assert "kept as" in capsys.readouterr().err and list(tmp_path.rglob("*.damaged"))


# 3. skip keys include the settings that change the result -----------------------------------


def test_measure_rows_count_only_in_the_mode_asked_for():
    done = pd.DataFrame({"model_id": ["a", "a", "b"], "measure": ["pb", "wn", "pb"],
                         "mode": ["fast", "exact", "faithful"]})  # fmt: skip
    assert measure_todo(done, ["a", "b"], ["pb", "wn"], "fast") == ["b"]
    assert measure_todo(done, ["a", "b"], ["pb", "wn"], "faithful") == ["a", "b"]
    assert measure_todo(done, ["a", "b"], ["wn"], "faithful") == ["b"]


def test_the_report_draws_landscapes_of_one_grid_and_says_which_were_left_out(study):
    from qgen_ray.analysis.study_tables import load_study

    ids = _ids(study)
    rows = [{"model_id": m, "x": x, "y": y, "loss": 1.0, "accuracy": 0.5}
            for m, steps in zip(ids, (3, 3, 5))
            for x in np.linspace(-1, 1, steps) for y in np.linspace(-1, 1, steps)]  # fmt: skip
    study.write_table(schema.LANDSCAPES, pd.DataFrame(rows))
    tables = load_study(study.root)
    assert set(tables.landscapes["model_id"]) == set(ids[:2])
    assert any("2 grid sizes" in note and ids[2] in note for note in tables.notes)


# 5. damaged tables and records ---------------------------------------------------------------


def test_damaged_tables_and_records_are_set_aside_and_rebuilt(study, capsys):
    ids = _ids(study)
    for rel in (schema.TRIALS, schema.STUDY_JSON, study.trial(ids[0]).rel(schema.RESULT_JSON)):
        with open(study.path(rel), "r+b") as f:
            f.truncate(10)
    status = cli.status(study)  # no traceback: the study.json is set aside
    assert "?" in status and "ok 3" in status  # the damaged result is re-queued
    from qgen_ray.loaders import load_trials

    assert sorted(load_trials(study.root)["model_id"]) == ids[1:]  # rebuilt from the folders
    err = capsys.readouterr().err
    assert err.count("damaged file") == 3 and "re-queued" in err
    for rel in (schema.TRIALS, schema.STUDY_JSON):
        assert os.path.exists(study.path(rel + ".damaged"))
    assert ids[0] not in finished_ids(study)
    with pytest.raises(DamagedFile):
        study.read_json(study.trial(ids[0]).rel(schema.RESULT_JSON) + ".damaged")


def test_a_folder_that_cannot_be_written_is_one_line(tmp_path):
    """A folder below a plain file cannot be written, even by root."""
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(UserError, match="cannot write to storage .*make it writable"):
        StudyStore(str(blocker / "mini")).check_writable()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_study_folder_is_one_line_for_report_and_collect(study, capsys):
    os.chmod(study.root, 0o555)
    try:
        for command in ("collect", "report"):
            err = _one_line(capsys, 2, cli.main, [command, study.root])
            assert "cannot write to storage" in err
    finally:
        os.chmod(study.root, 0o755)


def test_report_on_a_study_where_every_model_failed_says_so(study, capsys):
    """Real history and steps tables, every row failed: a report that says so, no traceback."""
    trials = study.read_table(schema.TRIALS)
    trials["status"] = schema.STATUS_FAILED
    study.write_table(schema.TRIALS, trials)
    cli.main(["report", study.root])
    out = capsys.readouterr()
    assert "Traceback" not in out.err
    text = open(os.path.join(study.root, schema.REPORT_DIR, "report.md")).read()
    assert "no model has status ok yet" in text


# 6 and 7. bad values and unreachable resources, before any work -------------------------------


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["landscape", "{s}", "--steps", "0"], "--steps >= 3"),
        (["landscape", "{s}", "--per-precision", "0"], "--per-precision >= 1"),
        (["measure", "{s}", "--cpus-per-task", "0"], "--cpus-per-task must be > 0"),
        (["measure", "{s}", "--gpus-per-task", "-1"], "--gpus-per-task >= 0"),
        (["measure", "{s}", "--device", "cuda"], "--device cuda needs --gpus-per-task > 0"),
        (["measure", "{s}", "--address", "127.0.0.1:1"], "no Ray cluster answers at"),
    ],
)
def test_bad_values_are_one_line_before_any_work(study, capsys, argv, fragment):
    before = sorted(os.listdir(study.root))
    t0 = time.time()
    err = _one_line(capsys, 2, cli.main, [a.replace("{s}", study.root) for a in argv])
    assert fragment in err and time.time() - t0 < 30
    assert sorted(os.listdir(study.root)) == before  # nothing written


@pytest.mark.slow
def test_requests_no_node_can_hold_are_one_line_not_a_hang(study, capsys):
    """A local Ray of 2 CPUs and no GPU: a GPU per task, or 100 GPUs per trial, would wait
    forever; both are refused in one line."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    try:
        err = _one_line(capsys, 2, cli.main, ["measure", study.root, "--gpus-per-task", "1"])
        assert "no node of this Ray cluster can hold that" in err and "0 GPUs" in err
        from qgen_ray.ray.session import check_request

        with pytest.raises(UserError, match="ask for 1 CPUs and 100 GPUs"):
            check_request(1, 100, "--cpus-per-trial / --gpus-per-trial")
        check_request(2, 0, "fits")
    finally:
        ray.shutdown()


# 8. a full disk -------------------------------------------------------------------------------

FULL_DISK = """
import resource, signal, sys
from qgen_ray.errors import exit_on_user_error
from qgen_ray.store import StudyStore
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 16, 1 << 16))
store = StudyStore(sys.argv[1])
exit_on_user_error(lambda: store.write_bytes("trials/m/final.pt", b"x" * (1 << 20)))()
"""


def test_a_full_disk_is_one_line_and_leaves_no_temporary_file(tmp_path):
    out = subprocess.run([sys.executable, "-c", FULL_DISK, str(tmp_path / "s")], cwd=REPO,
                         env=ENV, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stderr
    assert "no space left on the device" in out.stderr and "finished results are kept" in out.stderr
    assert os.listdir(tmp_path / "s" / "trials" / "m") == []  # the .tmp-* file is removed


# 9. two runs, and models no better than chance -------------------------------------------------


def test_a_second_run_beside_the_first_is_one_line_and_a_dead_ones_lock_is_taken_over(study):
    with study.claimed("studies/mini.py"):
        with study.claimed("nested stage"):  # the same process: passes
            pass
        lock = json.loads(open(study.path(LOCK)).read())
        assert lock["pid"] == os.getpid() and lock["command"] == "studies/mini.py"
        other = subprocess.run(
            [sys.executable, "-m", "qgen_ray", "collect", study.root], cwd=REPO, env=ENV,
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert other.returncode == 2 and "another run is writing" in other.stderr
        assert f"pid {os.getpid()}" in other.stderr and other.stderr.count("\n") == 1
    assert not os.path.exists(study.path(LOCK))
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    with open(study.path(LOCK), "w") as f:
        json.dump({"pid": dead.pid, "host": os.uname().nodename, "command": "x"}, f)
    with study.claimed("after a crash"):  # a killed run's lock does not block the re-run
        assert json.loads(open(study.path(LOCK)).read())["command"] == "after a crash"


def test_a_model_no_better_than_a_constant_guess_is_degenerate():
    assert degenerate_reason(6e5, 0.1, 10, 1000).startswith("kept model at chance")
    assert degenerate_reason(2.5, 0.11, 10, 1000)  # within 3 standard errors of 0.1
    assert not degenerate_reason(2.5, 0.2, 10, 1000)  # clearly learning
    assert not degenerate_reason(2.2, 0.1, 10, 1000)  # below a uniform guess's loss


# 4. Ctrl-C stops the study ---------------------------------------------------------------------


SWALLOWS_CTRL_C = """
import sys, time
from qgen_ray import errors
errors.INTERRUPT_GRACE_S = float(sys.argv[1])

@errors.exit_on_user_error
def main():
    print("running", flush=True)
    while True:  # a library that catches KeyboardInterrupt and goes on
        try:
            time.sleep(0.05)
        except KeyboardInterrupt:
            pass

main()
"""


@pytest.mark.parametrize("grace, signals", [(1.0, 1), (60.0, 2)])
def test_ctrl_c_ends_a_run_that_swallowed_it(tmp_path, grace, signals):
    """Ctrl-C ends the run INTERRUPT_GRACE_S later even where a library swallowed the
    KeyboardInterrupt, and at once at a second Ctrl-C: status 130, the line said once."""
    script = tmp_path / "swallows.py"
    script.write_text(SWALLOWS_CTRL_C)
    proc = subprocess.Popen(
        [sys.executable, str(script), str(grace)], cwd=REPO, env=ENV, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    assert proc.stdout.readline() == "running\n"
    start = time.time()
    for _ in range(signals):
        proc.send_signal(signal.SIGINT)
        time.sleep(0.5)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 130 and time.time() - start < 15, out
    assert out.count("interrupted: what finished is kept") == 1 and "Traceback" not in out


@pytest.mark.slow
def test_ctrl_c_stops_the_study_at_once_keeping_what_finished(tmp_path):
    demo = str(REPO / "studies" / "demo.py")
    proc = subprocess.Popen(
        [sys.executable, demo, "--storage", str(tmp_path)], cwd=REPO, text=True,
        env={**ENV, "PYTHONFAULTHANDLER": "1"},  # SIGABRT dumps every thread's stack
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    trials = tmp_path / "demo" / "trials"
    deadline = time.time() + 300
    while not list(trials.glob("*/last.pt")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    try:
        out, _ = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:  # seen once in CI: say where the driver hung
        proc.send_signal(signal.SIGABRT)
        out, _ = proc.communicate(timeout=60)
        stacks = out[out.find("Fatal Python error") :][:8000]
        pytest.fail(f"still running 120 s after Ctrl-C; its output and stacks:\n{stacks}")
    assert proc.returncode == 130, out[-3000:]
    assert "interrupted: what finished is kept" in out and "Traceback" not in out
    assert not (tmp_path / "demo" / schema.MEASURES).exists()  # the next stages did not run
    assert list(trials.glob("*/init.pt"))  # what was written stays
