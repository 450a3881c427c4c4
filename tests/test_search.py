"""Search studies: the space checked before anything is written, the validation split,
the test set never read while choosing (through the data object), ASHA's stopped models,
and a search killed mid-way that resumes its Optuna study."""

from __future__ import annotations

import json
import math
import sys
import textwrap
import time
from dataclasses import replace

import pandas as pd
import pytest
import torch

from qgen_ray import schema
from qgen_ray.data import load_image_data
from qgen_ray.pipeline import study_cli
from qgen_ray.pipeline.search import SearchStudy, choice, evaluate_on_test, log_uniform
from qgen_ray.store import StudyStore
from tests.support.cluster import LocalHead
from tests.support.fixtures import REPO

SPACE = {
    "precision": choice(["fp32", "lsq4", "lsq2"]),
    "optimizer": choice(["sgd", "adam"]),
    "lr": {"sgd": log_uniform(0.01, 0.2), "adam": log_uniform(3e-4, 5e-3)},
    "weight_decay": log_uniform(1e-5, 1e-3, with_zero=True),
    "width": choice([1]),
    "depth": choice([2]),
}
STUDY = SearchStudy(
    name="search_test", dataset="digits", model="nin", space=SPACE, budget=6,
    protocol={"epochs": 4, "batch_size": 128, "milestones": (3,), "augment": False},
    grace_epochs=1, max_concurrent=2,
)  # fmt: skip


@pytest.mark.parametrize(
    "space, says",
    [
        ({**SPACE, "momentum": choice([0.9])}, "unknown field 'momentum'"),
        ({**SPACE, "precision": choice(["fp32", "lsq9"])}, "bits must be 2..8"),
        ({**SPACE, "precision": choice(["lsq1"])}, "bits must be 2..8"),
        ({**SPACE, "width": choice([])}, "'width' is an empty choice"),
        ({**SPACE, "weight_decay": log_uniform(-1e-4, 1e-3)}, "needs 0 < low <= high"),
        ({**SPACE, "lr": {"sgd": log_uniform(0.1, 0.01), "adam": log_uniform(1e-4, 1e-3)}},
         "needs 0 < low <= high"),
    ],
)  # fmt: skip
def test_a_bad_space_is_one_line_and_exit_2_before_anything_is_written(
    space, says, tmp_path, capsys
):
    with pytest.raises(SystemExit) as exit_info:
        study_cli.main(replace(STUDY, space=space), ["--storage", str(tmp_path / "store")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and says in err, err
    assert not (tmp_path / "store").exists()


def test_the_validation_split_is_stratified_seeded_and_holds_no_test_image():
    data = load_image_data("digits")
    val = data.with_validation(0.2, seed=3)
    assert len(val.train_y) + len(val.test_y) == len(data.train_y)
    for label in range(10):  # stratified: 20% of each class
        n = int((data.train_y == label).sum())
        assert int((val.test_y == label).sum()) == round(0.2 * n)
    # the held-out images are training images; none of the test set is in the object
    train_rows = {tuple(x.flatten().tolist()) for x in data.train_x}
    assert all(tuple(x.flatten().tolist()) in train_rows for x in val.test_x)
    again, other = data.with_validation(0.2, seed=3), data.with_validation(0.2, seed=4)
    assert torch.equal(again.test_x, val.test_x) and not torch.equal(other.test_x, val.test_x)


def test_a_point_names_one_model_and_the_split_is_part_of_its_identity():
    point = {"precision": "lsq4", "optimizer": "sgd", "lr_position": 1.0,
             "weight_decay": 5e-6, "width": 1, "depth": 2}  # fmt: skip
    spec = STUDY.spec(point)
    assert (spec.method, spec.bits) == ("lsq", 4) and spec.lr == pytest.approx(0.2)
    assert spec.weight_decay == 0.0  # below the range: the "no weight decay" decade
    assert STUDY.spec({**point, "weight_decay": 2e-4}).weight_decay == pytest.approx(2e-4)
    assert STUDY.spec(point).model_id == spec.model_id
    assert replace(STUDY, val_fraction=0.1).spec(point).model_id != spec.model_id
    assert replace(spec, val_fraction=None).model_id != spec.model_id


@pytest.mark.slow
def test_the_search_never_reads_the_test_split_and_stops_weak_models(tmp_path):
    """The search gets digits whose test labels are out of range: any evaluation on the
    test split would raise (a failed model). Every model ends ok or stopped, with finite
    validation numbers; the test numbers appear only after the search."""
    import ray

    from qgen_ray.ray.tune_search import run_search
    from qgen_ray.spec import RunOptions

    data = load_image_data("digits")
    poisoned = replace(data, test_y=torch.full_like(data.test_y, 10**6))
    store = StudyStore(str(tmp_path / "search_test"))
    study = replace(STUDY, budget=8, protocol={**STUDY.protocol, "epochs": 6})
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    try:
        run_search(store, study, poisoned, RunOptions(device="cpu"), 1.0, 0.0, progress=False)
    finally:
        ray.shutdown()
    results = store.results()
    statuses = [r["status"] for r in results]
    assert len(results) == 8 and set(statuses) <= {schema.STATUS_OK, schema.STATUS_STOPPED}
    assert schema.STATUS_STOPPED in statuses  # ASHA stopped some at a rung
    stopped = [r for r in results if r["status"] == schema.STATUS_STOPPED]
    assert all(r["epochs_run"] < 6 and "ASHA" in r["reason"] for r in stopped)
    assert all(math.isfinite(r["val_loss"]) for r in results)
    ok = [r for r in results if r["status"] == schema.STATUS_OK]
    assert ok and all(math.isnan(r["test_loss"]) for r in ok)
    assert evaluate_on_test(store, data) == len(ok)  # after the search: the real test set
    after = {r["model_id"]: r for r in store.results()}
    for r in ok:
        assert math.isfinite(after[r["model_id"]]["test_loss"])
        assert after[r["model_id"]]["gap_loss"] == pytest.approx(
            after[r["model_id"]]["test_loss"] - r["train_loss"]
        )


TEST_COLUMNS = ("test_loss", "test_acc", "gap_loss", "gap_acc")  # filled after the search


def _trained(folder) -> tuple:
    """What training wrote for a model: its result less the test columns, its weights."""
    result = json.loads((folder / schema.RESULT_JSON).read_text())
    final = folder / schema.FINAL_CKPT
    weights = final.read_bytes() if final.exists() else b""  # a stopped model has none
    kept = {k: v for k, v in result.items() if k not in TEST_COLUMNS}
    return json.dumps(kept, sort_keys=True), weights  # NaN compares equal as text


SCRIPT = """
from tests.test_search import STUDY
from dataclasses import replace
from qgen_ray.pipeline.study_cli import main

main(replace(STUDY, budget={budget}, protocol={{**STUDY.protocol, "epochs": 8}}))
"""


@pytest.mark.slow
def test_a_search_killed_mid_way_resumes_its_optuna_study(tmp_path):
    import subprocess

    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    script = tmp_path / "search_script.py"
    script.write_text(textwrap.dedent(SCRIPT.format(budget=8)))
    study_dir = tmp_path / "store" / "search_test"
    with LocalHead(num_cpus=2) as head:
        args = [sys.executable, str(script), "--storage", str(tmp_path / "store"),
                "--address", head.address, "--quiet"]  # fmt: skip
        env = {**head.env, "PYTHONPATH": str(REPO)}
        proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)  # fmt: skip
        deadline = time.time() + 300
        while len(list(study_dir.glob("trials/*/result.json"))) < 3:
            assert proc.poll() is None, proc.stdout.read()[-3000:]
            assert time.time() < deadline, "no 3 finished models in time"
            time.sleep(0.2)
        proc.kill()  # SIGKILL: no handler runs
        proc.wait()
        first = {p.parent.name: _trained(p.parent) for p in study_dir.glob("trials/*/result.json")}
        journal = study_dir / schema.OPTUNA_JOURNAL
        assert journal.exists()  # written after every finished model
        local = tmp_path / "before.journal"
        local.write_bytes(journal.read_bytes())
        storage = JournalStorage(JournalFileBackend(str(local)))
        before = optuna.load_study(study_name="search_test", storage=storage)
        out = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True,
                             timeout=600)  # fmt: skip
        assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    assert "models in the Optuna study" in out.stdout
    after = optuna.load_study(study_name="search_test",
                              storage=JournalStorage(JournalFileBackend(str(journal))))  # fmt: skip
    assert len(after.trials) > len(before.trials)  # the same study, continued
    complete = [t for t in after.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(complete) >= 8
    trials = pd.read_parquet(study_dir / schema.TRIALS)
    assert trials["model_id"].is_unique
    for model_id, trained in first.items():  # finished models untouched (not retrained)
        assert _trained(study_dir / "trials" / model_id) == trained
    assert set(trials["status"]) <= {schema.STATUS_OK, schema.STATUS_STOPPED}
    record = json.loads((study_dir / schema.STUDY_JSON).read_text())
    assert record["num_models"] == 8 and "search" in record


@pytest.mark.slow
def test_the_two_objective_cluster_search_smoke_reports_a_pareto_front(cifar10_root, tmp_path):
    """search_nin_cifar10 --smoke (val_loss and weight_bits, so no ASHA) on a CIFAR-10
    folder in torchvision's layout, through Tune, then its report and `qgen status`."""
    import ray

    from qgen_ray import cli
    from tests.support.fixtures import load_script

    script = load_script("search_nin_cifar10")
    argv = ["--smoke", "--storage", str(tmp_path), "--data-root", str(cifar10_root),
            "--quiet", "--gpus-per-trial", "0"]  # fmt: skip
    try:
        study_cli.main(script.STUDY, argv)
    finally:
        ray.shutdown()
    study_dir = tmp_path / "search_nin_cifar10-smoke"
    trials = pd.read_parquet(study_dir / schema.TRIALS)
    # one epoch on 90 images: a model may end no better than chance (degenerate)
    assert len(trials) == 2 and set(trials["status"]) <= {"ok", schema.STATUS_DEGENERATE}
    ok = trials[trials["status"] == schema.STATUS_OK]
    assert ok["test_loss"].notna().all()  # measured after the search (when any is ok)
    assert trials["weight_bits"].gt(0).all() and trials["val_loss"].notna().all()
    assert (trials["val_fraction"] == 0.1).all()
    report = (study_dir / schema.REPORT_DIR / "report.md").read_text()
    assert "## Search" in report and "objectives val_loss, weight_bits" in report
    assert (study_dir / schema.REPORT_DIR / "search.png").exists()
    assert "2/2 (search budget) models done" in cli.status(StudyStore(str(study_dir)))


def test_a_search_refuses_packing_in_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        study_cli.main(STUDY, ["--storage", str(tmp_path / "s"), "--pack", "4"])
    assert exit_info.value.code == 2
    assert "drop --pack" in capsys.readouterr().err and not (tmp_path / "s").exists()
