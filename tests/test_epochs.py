"""The epoch protocol (`train.epochs.EpochRecord`) on its own: which epoch is kept, what
`last.pt` holds and restores, what the shared part of the row says."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from qgen_ray import schema
from qgen_ray.spec import TrainSpec
from qgen_ray.store import StudyStore
from qgen_ray.train.epochs import EpochRecord, cpu_state, device_label, kept_metrics


def _parts(seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=[2], gamma=0.1)
    return model, optimizer, scheduler


def test_the_kept_epoch_is_the_first_lowest_training_loss():
    model, *_ = _parts()
    record = EpochRecord()
    for epoch, loss in enumerate([0.9, 0.5, 0.7, 0.5, 0.6], 1):
        with torch.no_grad():
            model.weight.fill_(epoch)  # the weights of epoch e are all e
        record.observe({"epoch": epoch, "train_loss": loss}, model)
    assert (record.best_epoch, record.best_loss, record.epoch) == (2, 0.5, 5)  # tie: earlier
    assert torch.equal(record.best["weight"], torch.full((2, 3), 2.0))  # a copy, not a view
    assert [h["epoch"] for h in record.history] == [1, 2, 3, 4, 5]
    fresh, _, _ = _parts(1)
    assert record.load_kept(fresh) and torch.equal(fresh.weight, torch.full((2, 3), 2.0))
    assert not EpochRecord().load_kept(fresh)


def test_cpu_state_is_a_copy():
    model, *_ = _parts()
    state = cpu_state(model)
    with torch.no_grad():
        model.weight.add_(1.0)
    assert not torch.equal(state["weight"], model.weight) and state["weight"].device.type == "cpu"


@pytest.mark.parametrize(
    "every, epochs, due",
    [(1, 3, [1, 2, 3]), (2, 5, [2, 4, 5]), (3, 3, [3]), (4, 2, [2])],
)
def test_checkpoint_due(every, epochs, due):
    record = EpochRecord()
    got = []
    for epoch in range(1, epochs + 1):
        record.epoch = epoch
        if record.checkpoint_due(every, epochs):
            got.append(epoch)
    assert got == due


def test_last_pt_round_trip_restores_the_whole_state(tmp_path):
    trial = StudyStore(str(tmp_path / "s")).trial("m")
    model, optimizer, scheduler = _parts()
    record, extra = EpochRecord.start(trial, model, optimizer, scheduler)
    assert extra == {} and record == EpochRecord() and trial.has(schema.INIT_CKPT)
    init = trial.load(schema.INIT_CKPT)
    assert torch.equal(init["weight"], model.weight)
    for epoch in (1, 2):
        model(torch.ones(4, 3)).sum().backward()
        optimizer.step()
        scheduler.step()
        record.observe({"epoch": epoch, "train_loss": 1.0 / epoch}, model)
    record.save_last(trial, model, optimizer, scheduler, generator=torch.tensor([7]))

    model2, optimizer2, scheduler2 = _parts(seed=5)
    resumed, extra = EpochRecord.start(trial, model2, optimizer2, scheduler2)
    assert torch.equal(extra["generator"], torch.tensor([7])) and set(extra) == {"generator"}
    assert (resumed.epoch, resumed.best_epoch, resumed.resumed_from) == (2, 2, 2)
    assert resumed.history == record.history and resumed.best_loss == 0.5
    assert torch.equal(model2.weight, model.weight)
    assert optimizer2.state_dict()["state"][0]["momentum_buffer"].equal(
        optimizer.state_dict()["state"][0]["momentum_buffer"]
    )
    assert scheduler2.state_dict() == scheduler.state_dict()
    assert torch.equal(trial.load(schema.INIT_CKPT)["weight"], init["weight"])  # not rewritten


def test_no_init_checkpoint_when_told_not_to(tmp_path):
    trial = StudyStore(str(tmp_path / "s")).trial("m")
    record, _ = EpochRecord.start(trial, *_parts(), write_init=False)
    assert record.epoch == 0 and not trial.has(schema.INIT_CKPT)
    assert EpochRecord.start(None, *_parts())[0] == EpochRecord()


def test_the_shared_row():
    spec = TrainSpec(dataset="digits", model="nin", width=1, depth=2, epochs=3)
    model, *_ = _parts()
    record = EpochRecord()
    record.observe({"epoch": 1, "train_loss": 0.4}, model)
    row = record.row(spec, "ok", "", model, torch.device("cpu"))
    assert (row["model_id"], row["status"], row["best_epoch"], row["epochs_run"]) == (
        spec.model_id, "ok", 1, 1)  # fmt: skip
    assert all(math.isnan(row[k]) for k in ("train_loss", "test_acc", "gap_loss", "gap_acc"))
    assert row["num_params"] == 8 and row["device"] == "cpu" and row["steps"] == []
    assert row["history"] == [{"model_id": spec.model_id, "epoch": 1, "train_loss": 0.4}]
    assert row["spec"] == spec.to_dict() and "torch_version" in row and row["host"]
    assert device_label(torch.device("cpu")) == "cpu"


def test_kept_metrics_gaps():
    m = kept_metrics((0.5, 0.9), (0.75, 0.8))
    assert m == {
        "train_loss": 0.5, "train_acc": 0.9, "test_loss": 0.75, "test_acc": 0.8,
        "gap_loss": 0.25, "gap_acc": pytest.approx(0.1),
    }  # fmt: skip
