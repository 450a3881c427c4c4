"""ImageNet fine-tuning with DDP: sharding, the per-rank loop (checkpoint, resume, ViT
recipe), the study script's bad-input lines, and the study script through real Ray Train
on 2 CPU workers: one run killed after its first epoch, then re-run to the end (Ray
Train starts in ~20-60 s here, so both Ray tests read that one store).

Fixtures are real ImageFolders of JPEGs written with PIL; "pretrained" weights are state
dicts of freshly built torchvision / timm models (nothing is downloaded).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.distributed as dist

from qgen_ray import schema
from qgen_ray.imagenet.imagefolder import (
    check_imagefolder,
    eval_transform,
    image_folder,
    make_loader,
    train_transform,
)
from qgen_ray.spec import TrainSpec
from qgen_ray.store import LOCK, StudyStore
from qgen_ray.train.finetune import FinetuneOptions, finetune
from tests.support.fixtures import REPO, load_script, save_weights, write_imagefolder

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_DEDUP_LOGS": "0"}
SCRIPT = REPO / "studies" / "imagenet_finetune.py"


SMOKE_SPEC = dict(
    dataset="imagenet",
    model="resnet18",
    method="lsq",
    bits=4,
    epochs=2,
    batch_size=4,
    milestones=(1,),
    lr=0.01,
    weight_decay=1e-4,
    image_size=32,
)


# -- data: shards and transforms --------------------------------------------------------------
def test_train_shards_are_disjoint_halves_and_eval_shards_cover_every_image(tmp_path):
    root = write_imagefolder(tmp_path / "data", classes=3, train=5, val=3, size=24)
    assert check_imagefolder(root) == ["n00000000", "n00000001", "n00000002"]
    train = image_folder(root, "train", 16, augment=True)
    val = image_folder(root, "val", 16, augment=False)
    common = dict(num_workers=0, seed=0)
    for epoch in (1, 2):
        seen = []
        for rank in (0, 1):
            loader = make_loader(train, 2, rank=rank, world_size=2, train=True, **common)
            loader.sampler.set_epoch(epoch)
            seen.append([int(i) for _, _, idx in loader for i in idx])
        assert len(seen[0]) == len(seen[1]) == 7  # 15 images: 7 each, one left out per epoch
        assert not set(seen[0]) & set(seen[1])
        assert len(set(seen[0]) | set(seen[1])) == 14
    shards = [
        [
            int(i)
            for _, _, idx in make_loader(val, 4, rank=r, world_size=2, train=False, **common)
            for i in idx
        ]
        for r in (0, 1)
    ]
    assert sorted(shards[0] + shards[1]) == list(range(9))  # odd count: no padding, no loss
    x, y, _ = train[0]
    assert x.shape == (3, 16, 16) and val[0][0].shape == (3, 16, 16) and y == 0


def test_labels_count_the_class_folders_the_checks_count(tmp_path):
    """A hidden folder (`.ipynb_checkpoints`, with or without images) is no class: the
    labels of training and measures agree with `check_imagefolder` and ImageNet-C's."""
    from qgen_ray.imagenet.imagenet_c import clean_class_index

    root = write_imagefolder(tmp_path / "data", classes=2, train=2, val=1, size=16)
    write_imagefolder(tmp_path / "hidden", classes=1, train=1, val=1, size=16)
    for split in ("train", "val"):
        (tmp_path / "hidden" / split / "n00000000").rename(root / split / ".ipynb_checkpoints")
    (root / "train" / ".cache").mkdir()  # no images: torchvision's own rule would raise
    classes = check_imagefolder(root)
    dataset = image_folder(root, "train", 16, augment=False)
    assert dataset.classes == classes == ["n00000000", "n00000001"]
    assert dataset.class_to_idx == clean_class_index(root)
    assert sorted(dataset.targets) == [0, 0, 1, 1]


def test_transforms_follow_the_imagenet_recipe():
    names = [type(t).__name__ for t in train_transform(224).transforms]
    assert names == ["RandomResizedCrop", "RandomHorizontalFlip", "ToTensor", "Normalize"]
    resize, crop = eval_transform(224).transforms[:2]
    assert resize.size == 256 and crop.size == (224, 224)


def test_image_size_and_schedule_enter_the_id_only_when_set():
    base = TrainSpec(dataset="cifar10", model="resnet18_cifar")
    same = TrainSpec(dataset="cifar10", model="resnet18_cifar", lr_schedule="multistep")
    assert same.model_id == base.model_id  # ids of studies run before these fields: kept
    ids = {
        base.model_id,
        TrainSpec(**SMOKE_SPEC).model_id,
        TrainSpec(**{**SMOKE_SPEC, "image_size": 224}).model_id,
        TrainSpec(**{**SMOKE_SPEC, "lr_schedule": "cosine"}).model_id,
    }
    assert len(ids) == 4


def test_resources_split_and_pack_train_runs():
    from qgen_ray.errors import UserError
    from qgen_ray.ray.ddp import DDPResources

    cpu = DDPResources(workers=2, cpus_per_worker=1)
    assert cpu.per_worker() == {"CPU": 1} and cpu.concurrent_runs({"CPU": 2}) == 1
    gpu = DDPResources(workers=2, cpus_per_worker=8, gpus_per_worker=1)
    assert gpu.per_worker() == {"CPU": 8, "GPU": 1}
    assert gpu.concurrent_runs({"CPU": 64, "GPU": 8}) == 4  # 8 GPUs hold four 2-GPU runs
    assert DDPResources(1, 4, 0.5).concurrent_runs({"CPU": 16, "GPU": 1}) == 2  # packed
    with pytest.raises(UserError, match="NCCL"):
        DDPResources(workers=2, cpus_per_worker=1, gpus_per_worker=0.5)


def test_only_a_lost_worker_runs_a_model_again():
    """Train's `WorkerGroupError` as Ray builds it: a rank whose code raised holds that
    exception (not run again: the same code raises again); a rank whose process died holds
    Train's health-check error around the actor error (run again, from last.pt)."""
    from ray.exceptions import ActorDiedError
    from ray.train import WorkerGroupError
    from ray.train.v2._internal.exceptions import WorkerHealthCheckFailedError

    from qgen_ray.ray.ddp import worker_lost

    died = WorkerHealthCheckFailedError("rank 1 died", ActorDiedError())
    gloo = RuntimeError("Connection closed by peer")  # what the surviving rank sees
    assert worker_lost(WorkerGroupError("lost", {0: gloo, 1: died}))
    assert worker_lost(WorkerGroupError("lost", {1: ActorDiedError()}))
    bug = ValueError("Expected more than 1 value per channel when training")
    assert not worker_lost(WorkerGroupError("raised", {0: bug, 1: bug}))
    assert not worker_lost(ValueError("no worker failures"))


# -- the per-rank loop without Ray ------------------------------------------------------------
@pytest.fixture
def process_group(tmp_path):
    """A real one-rank gloo group, so `finetune` wraps the model in DDP as on a cluster."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


class Crash(Exception):
    pass


def crash_after(epoch: int):
    def report(metrics: dict) -> None:
        if metrics["epoch"] == epoch:
            raise Crash(f"killed after epoch {epoch}")

    return report


def test_finetune_keeps_the_lowest_training_loss_epoch_not_the_last(tmp_path, process_group):
    """The lr jumps x30 after epoch 1, so the loss climbs (0.98, then 1.16 and 6.5): the
    kept epoch is 1 of 3, and final.pt holds exactly the weights of a run stopped there."""
    root = write_imagefolder(tmp_path / "data")
    opts = dict(data_root=str(root), weights=str(save_weights(tmp_path / "r18.pt")))
    spec = TrainSpec(**{**SMOKE_SPEC, "epochs": 3, "milestones": (2,), "gamma": 30.0})
    store = StudyStore(str(tmp_path / "s"))
    result = finetune(spec, FinetuneOptions(store=store.uri, **opts), torch.device("cpu"))
    losses = [h["train_loss"] for h in result["history"]]
    assert result["best_epoch"] == 1 + losses.index(min(losses)) == 1
    assert min(losses[1:]) > 1.1 * losses[0]
    stopped = TrainSpec(**{**SMOKE_SPEC, "epochs": 1, "milestones": (2,), "gamma": 30.0})
    finetune(stopped, FinetuneOptions(store=store.uri, **opts), torch.device("cpu"))
    epoch1 = store.trial(stopped.model_id).load(schema.LAST_CKPT)["model"]
    kept = store.trial(spec.model_id).load(schema.FINAL_CKPT)
    assert kept.keys() == epoch1.keys()
    assert all(torch.equal(kept[k], epoch1[k]) for k in kept)


def test_finetune_checkpoints_each_epoch_and_a_resumed_run_matches_an_uninterrupted_one(
    tmp_path, process_group
):
    root = write_imagefolder(tmp_path / "data")
    weights = save_weights(tmp_path / "r18.pt")
    spec = TrainSpec(**SMOKE_SPEC)
    opts = dict(data_root=str(root), weights=str(weights))

    whole = finetune(spec, FinetuneOptions(store=str(tmp_path / "a"), **opts), torch.device("cpu"))
    interrupted = FinetuneOptions(store=str(tmp_path / "b"), **opts)
    with pytest.raises(Crash):
        finetune(spec, interrupted, torch.device("cpu"), report=crash_after(1))
    trial = StudyStore(str(tmp_path / "b")).trial(spec.model_id)
    assert trial.load(schema.LAST_CKPT)["epoch"] == 1 and not trial.has_result()
    init_bytes = trial.study.read_bytes(trial.rel(schema.INIT_CKPT))
    resumed = finetune(spec, interrupted, torch.device("cpu"))

    assert resumed["resumed_from"] == 1 and whole["resumed_from"] == 0
    assert [h["epoch"] for h in resumed["history"]] == [1, 2]
    assert trial.study.read_bytes(trial.rel(schema.INIT_CKPT)) == init_bytes  # not redone
    for key in ("train_loss", "test_loss", "best_epoch"):
        assert resumed[key] == pytest.approx(whole[key], rel=1e-5), key
    a = StudyStore(str(tmp_path / "a")).trial(spec.model_id).load(schema.FINAL_CKPT)
    b = trial.load(schema.FINAL_CKPT)
    assert all(torch.allclose(a[k].float(), b[k].float(), atol=1e-6) for k in a)
    # the row: every trials.parquet column, pretrained start recorded, LSQ steps learned
    assert set(schema.TRIALS_COLUMNS) <= set(resumed) and resumed["status"] == "ok"
    assert resumed["init_weights"] == "file:r18.pt" and resumed["num_classes"] == 3
    assert resumed["steps"] and {s["bits"] for s in resumed["steps"]} == {4, 8}
    assert trial.read_result()["model_id"] == spec.model_id


def test_vit_follows_the_vvtq_recipe_under_ddp(tmp_path, process_group):
    root = write_imagefolder(tmp_path / "data", classes=2, train=2, val=1)
    weights = save_weights(tmp_path / "deit.pt", "deit_tiny")
    spec = TrainSpec(
        **{
            **SMOKE_SPEC,
            "model": "deit_tiny",
            "method": "vvtq",
            "epochs": 2,
            "optimizer": "adamw",
            "lr": 5e-4,
            "lr_schedule": "cosine",
            "weight_decay": 0.05,
        }
    )
    row = finetune(
        spec,
        FinetuneOptions(store=str(tmp_path / "s"), data_root=str(root), weights=str(weights)),
        torch.device("cpu"),
    )
    assert row["status"] == "ok" and row["optimizer"] == "adamw"
    assert [h["lr"] for h in row["history"]] == pytest.approx([5e-4, 2.5e-4])  # cosine, T=2
    layers = {s["layer"] for s in row["steps"]}
    assert {"blocks.0.attn.qkv.q", "blocks.0.attn.qkv.k", "blocks.0.attn.qkv.v"} <= layers
    bits = {s["layer"]: s["bits"] for s in row["steps"]}
    assert bits["patch_embed.proj"] == bits["head"] == 8 and bits["blocks.0.mlp.fc1"] == 4


# -- bad input: one line, exit status 2, before Ray starts ------------------------------------
def _bad(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exc:
        load_script("imagenet_finetune").main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("error: "), err
    return err


def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys):
    good = write_imagefolder(tmp_path / "good", classes=2, train=1, val=1, size=16)
    weights = save_weights(tmp_path / "r18.pt")
    base = ["--smoke", "--models", "resnet18", "--storage", str(tmp_path / "store")]
    ok = [*base, "--weights", f"resnet18={weights}"]

    empty = tmp_path / "empty"
    for split in ("train", "val"):
        (empty / split / "n0").mkdir(parents=True)
    assert "without images" in _bad([*ok, "--data-root", str(empty)], capsys)

    mismatched = write_imagefolder(tmp_path / "mismatched", classes=2, train=1, val=1, size=16)
    (mismatched / "val" / "n00000001").rename(mismatched / "val" / "n00000009")
    err = _bad([*ok, "--data-root", str(mismatched)], capsys)
    assert "class folders differ" in err and "n00000009" in err

    other = save_weights(tmp_path / "mnv2.pt", "mobilenet_v2")
    err = _bad([*base, "--data-root", str(good), "--weights", f"resnet18={other}"], capsys)
    assert "does not fit resnet18" in err

    assert "--weights resnet18=PATH" in _bad([*base, "--data-root", str(good)], capsys)
    assert "train/ and val/" in _bad([*ok, "--data-root", str(tmp_path / "none")], capsys)
    assert "divide" in _bad([*ok, "--data-root", str(good), "--workers", "3"], capsys)
    assert not (tmp_path / "store").exists()  # nothing written

    # a second run beside a live one (here: a lease just renewed on another machine)
    study = tmp_path / "store" / "imagenet_finetune-smoke"
    study.mkdir(parents=True)
    now = datetime.now(timezone.utc).isoformat()
    lease = {"token": "t", "pid": 1, "host": "elsewhere", "command": "c", "since": now}
    (study / LOCK).write_text(json.dumps({**lease, "renewed": now}))
    assert "another run is writing" in _bad([*ok, "--data-root", str(good)], capsys)
    assert sorted(p.name for p in study.iterdir()) == [LOCK]  # nothing written


# -- the study script through real Ray Train (2 CPU workers, gloo) ---------------------------
def _script(args: list[str]) -> list[str]:
    return [
        sys.executable,
        str(SCRIPT),
        "--smoke",
        "--models",
        "resnet18",
        "--workers",
        "2",
        "--log-samples",
        *args,
    ]


def _samples(trial: Path) -> dict[tuple[int, int], dict]:
    """(epoch, rank) -> the record of the images that rank trained on in that epoch."""
    out = {}
    for path in (trial / "samples").glob("*.json"):
        record = json.loads(path.read_text())
        out[record["epoch"], record["rank"]] = record
    return out


def _descendants(pid: int) -> list[int]:
    """Every process below `pid` now, by walking /proc's parent links."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        out += kids
        todo += kids
    return out


@pytest.fixture(scope="module")
def killed_then_rerun(tmp_path_factory) -> dict:
    """Run the smoke study (resnet18 LSQ-4, 2 epochs, 2 workers, 24 training images), kill
    its whole process group once epoch 1 is checkpointed, re-run it to the end."""
    tmp = tmp_path_factory.mktemp("ddp")
    root = write_imagefolder(tmp / "data", classes=3, train=8, val=2)
    weights = save_weights(tmp / "r18.pt")
    args = [
        "--data-root",
        str(root),
        "--weights",
        f"resnet18={weights}",
        "--storage",
        str(tmp / "store"),
        "--quiet",
    ]
    study = tmp / "store" / "imagenet_finetune-smoke"
    proc = subprocess.Popen(
        _script(args),
        cwd=REPO,
        env=ENV,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 400
    try:
        while not (
            list(study.glob("trials/*/last.pt"))  # epoch 1 checkpointed and logged
            and len(list(study.glob("trials/*/samples/epoch0001-*"))) == 2
        ):
            assert proc.poll() is None, "the study ended before it could be killed"
            assert time.time() < deadline, "no checkpoint within the deadline"
            time.sleep(0.05)
    finally:
        # the whole process tree, Ray's daemons and Train workers included: a worker that
        # outlived its driver's group once went on to checkpoint epoch 2 after this kill
        tree = _descendants(proc.pid)
        os.killpg(proc.pid, signal.SIGKILL)
        for pid in tree:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        proc.wait()
        while any(Path(f"/proc/{pid}").exists() for pid in tree) and time.time() < deadline:
            time.sleep(0.05)  # SIGKILLed; gone once the kernel has reaped them
    trial = next(study.glob("trials/*"))
    killed = {
        "last_epoch": torch.load(trial / "last.pt", weights_only=True)["epoch"],
        "had_result": (trial / "result.json").exists(),
        "samples": _samples(trial),
        "init": (trial / "init.pt").read_bytes(),
    }
    out = subprocess.run(
        _script(args), cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return {"study": study, "trial": trial, "killed": killed, "stdout": out.stdout}


@pytest.mark.slow
def test_two_cpu_workers_train_disjoint_halves_and_land_in_trials_parquet(killed_then_rerun):
    study, trial = killed_then_rerun["study"], killed_then_rerun["trial"]
    trials = pd.read_parquet(study / schema.TRIALS)
    assert len(trials) == 1 and set(schema.TRIALS_COLUMNS) <= set(trials.columns)
    row = trials.iloc[0]
    assert row["status"] == "ok" and row["workers"] == 2 and row["epochs_run"] == 2
    assert row["num_train"] == 24 and row["device"] == "cpu"
    assert np.isfinite([row["train_loss"], row["test_loss"], row["gap_loss"]]).all()
    for name in (schema.INIT_CKPT, schema.LAST_CKPT, schema.FINAL_CKPT, schema.RESULT_JSON):
        assert (trial / name).is_file(), name
    samples = _samples(trial)
    for epoch in (1, 2):  # each rank trained on its own half of the 24 images
        a, b = (set(samples[epoch, rank]["indices"]) for rank in (0, 1))
        assert len(a) == len(b) == 12 and not a & b and a | b == set(range(24))
        assert samples[epoch, 0]["pid"] != samples[epoch, 1]["pid"]  # two processes
    assert samples[1, 0]["indices"] != samples[2, 0]["indices"]  # reshuffled per epoch
    history = pd.read_parquet(study / schema.HISTORY)
    assert history["epoch"].tolist() == [1, 2] and (history["train_loss"] > 0).all()
    assert len(pd.read_parquet(study / schema.STEPS)) > 0
    assert list((study / "tune").rglob("events.out.tfevents*"))  # Tune got the epochs
    # the script's default stages go on to measure (images read from the ImageFolder; the
    # smoke run's measures: one search and the norm)
    measures = pd.read_parquet(study / schema.MEASURES)
    assert set(measures["model_id"]) == {trial.name}
    assert sorted(measures["measure"]) == ["pacbayes_init", "weight_norm"]
    assert measures["value"].notna().all() and (study / "report" / "report.md").is_file()


@pytest.mark.slow
def test_a_killed_run_resumes_from_its_last_epoch(killed_then_rerun):
    trial, killed = killed_then_rerun["trial"], killed_then_rerun["killed"]
    assert killed["last_epoch"] == 1 and not killed["had_result"]
    assert "0 already done, 1 to fine-tune" in killed_then_rerun["stdout"]
    result = json.loads((trial / "result.json").read_text())
    assert result["status"] == "ok" and result["resumed_from"] == 1
    assert [h["epoch"] for h in result["history"]] == [1, 2]
    after, before = _samples(trial), killed["samples"]
    for rank in (0, 1):  # epoch 1 was not trained again; epoch 2 by the new processes
        assert after[1, rank] == before[1, rank]
        assert after[2, rank]["pid"] not in {before[1, r]["pid"] for r in (0, 1)}
    assert (trial / "init.pt").read_bytes() == killed["init"]  # not re-initialized
    trials = pd.read_parquet(killed_then_rerun["study"] / schema.TRIALS)
    assert trials["resumed_from"].tolist() == [1]
