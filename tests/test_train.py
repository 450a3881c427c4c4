"""The Ray-free training function (seeded, resumable, honest about divergence) and the
epoch protocol it shares with the fine-tuning loop (`train.epochs.EpochRecord`)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from qgen_ray import load_model, schema
from qgen_ray.data import load_image_data
from qgen_ray.errors import UserError
from qgen_ray.pipeline.collect import collect
from qgen_ray.spec import TrainSpec
from qgen_ray.store import StudyStore
from qgen_ray.train import evaluate, train
from qgen_ray.train.epochs import EpochRecord, cpu_state, device_label, kept_metrics
from tests.support.oracles import reference_training

METRICS = ["train_loss", "train_acc", "test_loss", "test_acc", "gap_loss", "gap_acc", "best_epoch"]


@pytest.fixture(scope="module")
def digits():
    torch.set_num_threads(1)
    data = load_image_data("digits")
    # a quarter of the digits keeps these tests fast; the code path is the full one
    data.train_x, data.train_y = data.train_x[:320], data.train_y[:320]
    return data


def _spec(**kw) -> TrainSpec:
    base = dict(
        dataset="digits",
        model="nin",
        width=1,
        depth=2,
        epochs=4,
        batch_size=64,
        milestones=(2,),
        lr=0.05,
        method="lsq",
        bits=4,
    )
    return TrainSpec(**{**base, **kw})


def test_same_spec_same_numbers_and_gaps_are_consistent(digits):
    a, b = train(_spec(), digits), train(_spec(), digits)
    assert [a[k] for k in METRICS] == [b[k] for k in METRICS]
    assert a["status"] == "ok" and a["epochs_run"] == 4
    assert math.isclose(a["gap_loss"], a["test_loss"] - a["train_loss"])
    assert math.isclose(a["gap_acc"], a["train_acc"] - a["test_acc"])
    best = min(a["history"], key=lambda h: h["train_loss"])
    assert a["best_epoch"] == best["epoch"]  # kept epoch = lowest training loss
    assert train(_spec(seed=1), digits)["train_loss"] != a["train_loss"]


def test_resumed_run_equals_uninterrupted_run(digits, tmp_path):
    """Killed at epoch 2, before the lr milestone at 3: the resumed run must restore the
    schedule (and optimizer, sampler) state, so every epoch's lr and loss match."""
    store = StudyStore(str(tmp_path / "s"))
    spec = _spec(optimizer="adam", lr=1e-3, milestones=(3,))
    straight = train(spec, digits)
    trial = store.trial(spec.model_id)
    train(TrainSpec.from_dict({**spec.to_dict(), "epochs": 2}), digits, trial)  # "killed" at 2
    ckpt = trial.load(schema.LAST_CKPT)
    assert ckpt["epoch"] == 2
    trained = []
    resumed = train(spec, digits, trial, report=lambda m: trained.append(m["epoch"]))
    assert trained == [3, 4]  # continued from last.pt, epochs 1-2 not trained again
    assert [h["epoch"] for h in resumed["history"]] == [1, 2, 3, 4]
    assert [h["lr"] for h in resumed["history"]] == [h["lr"] for h in straight["history"]]
    # the rate each epoch trained at: the milestone at 3 lowers it from epoch 4 on
    assert [h["lr"] for h in straight["history"]] == pytest.approx([1e-3, 1e-3, 1e-3, 1e-4])
    for got, want in zip(resumed["history"], straight["history"]):
        assert got["train_loss"] == pytest.approx(want["train_loss"], rel=1e-6), got["epoch"]
    for k in METRICS:
        assert resumed[k] == pytest.approx(straight[k], rel=1e-5, abs=1e-6), k


def test_final_checkpoint_holds_the_lowest_training_loss_epoch_not_the_last(digits, tmp_path):
    """The paper keeps the epoch of lowest training loss. Here the lr jumps x30 after
    epoch 3, so the loss climbs after it (1.81, then 2.21 and 2.35 at 1 or 2 threads):
    the kept epoch is 3 of 5, and final.pt must hold exactly the weights a run stopped
    after epoch 3 ends with."""
    store = StudyStore(str(tmp_path / "s"))
    spec = _spec(epochs=5, lr=0.1, milestones=(3,), gamma=30.0)
    trial = store.trial(spec.model_id)
    result = train(spec, digits, trial)
    losses = [h["train_loss"] for h in result["history"]]
    assert result["best_epoch"] == 1 + losses.index(min(losses)) == 3
    assert min(losses[3:]) > 1.1 * losses[2]  # the last epoch is clearly not the kept one
    stopped = TrainSpec.from_dict({**spec.to_dict(), "epochs": 3})
    stopped_trial = store.trial(stopped.model_id)
    train(stopped, digits, stopped_trial)
    epoch3 = stopped_trial.load(schema.LAST_CKPT)["model"]
    kept = trial.load(schema.FINAL_CKPT)
    assert kept.keys() == epoch3.keys()
    for name, tensor in kept.items():
        assert torch.equal(tensor, epoch3[name]), name


def test_non_finite_loss_marks_the_run_diverged(digits):
    result = train(_spec(method="fp32", bits=32, optimizer="sgd", lr=1e12), digits)
    assert result["status"] == "diverged" and "non-finite" in result["reason"]
    assert result["steps"] == [] and math.isnan(result["test_acc"]) and result["best_epoch"] == 0


def test_resolve_device():
    from qgen_ray.train.loop import resolve_device

    assert resolve_device("cpu") == torch.device("cpu")
    want = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto") == torch.device(want)


def test_store_round_trip_gives_the_trained_model(digits, tmp_path):
    store = StudyStore(str(tmp_path / "s"))
    spec = _spec(bits=2, epochs=2)
    trial = store.trial(spec.model_id)
    result = train(spec, digits, trial)
    trial.write_result(result)
    trials = collect(store)
    assert trials.loc[0, "model_id"] == spec.model_id and trials.loc[0, "status"] == "ok"
    model = load_model(store.uri, spec.model_id)
    loss, acc = evaluate(model, digits.test_x, digits.test_y, digits.normalize)
    assert loss == pytest.approx(result["test_loss"], rel=1e-5) and acc == result["test_acc"]
    init = load_model(store.uri, spec.model_id, which="init")
    assert not torch.equal(next(init.parameters()), next(model.parameters()))


REFERENCE_CASES = {
    # LSQ steps (no weight decay on them), SGD momentum + weight decay, a milestone, and
    # the crop / flip augmentation drawing from the run's generator
    "lsq-sgd-augmented": dict(
        optimizer="sgd", lr=0.05, weight_decay=5e-4, milestones=(2,), gamma=0.3, augment=True
    ),
    "fp32-adam-cosine": dict(
        method="fp32",
        bits=32,
        optimizer="adam",
        lr=3e-3,
        lr_schedule="cosine",
        batch_size=48,
        augment=False,
    ),
    "lsq2-rmsprop": dict(bits=2, optimizer="rmsprop", lr=1e-3, weight_decay=1e-3, epochs=3),
    "qar-adamw": dict(method="qar", bits=4, optimizer="adamw", lr=2e-3, weight_decay=0.05),
}


@pytest.mark.parametrize("case", REFERENCE_CASES)
def test_training_equals_a_plain_reference_loop(digits, tmp_path, case):
    """Every epoch's loss, accuracy and rate, the kept epoch and its weights, the initial
    weights and the kept model's numbers equal `tests.oracles.reference_training` (the same
    protocol written the obvious way). float32 sums in a different order: rel 1e-5."""
    import dataclasses

    data = dataclasses.replace(digits, crop_padding=2, flip=True)
    spec = _spec(**REFERENCE_CASES[case])
    trial = StudyStore(str(tmp_path / "s")).trial(spec.model_id)
    got, want = train(spec, data, trial), reference_training(spec, data)
    assert got["status"] == "ok" and got["epochs_run"] == spec.epochs
    assert got["num_train"] == len(data.train_x)
    assert [h["epoch"] for h in got["history"]] == list(range(1, spec.epochs + 1))
    for g, w in zip(got["history"], want["history"], strict=True):
        assert g["model_id"] == spec.model_id
        for key in ("train_loss", "train_acc", "lr"):
            assert g[key] == pytest.approx(w[key], rel=1e-5), (g["epoch"], key)
    assert got["best_epoch"] == want["best_epoch"]
    for name, tensor in trial.load(schema.INIT_CKPT).items():
        assert torch.equal(tensor, want["init"][name]), name
    final = trial.load(schema.FINAL_CKPT)
    assert final.keys() == want["best"].keys()
    if spec.method == "qar":  # the kept weights are deployed: snapped to the codebooks
        assert 0.0 <= got["snap_acc_drop"] + got["test_acc"] - got["test_acc_before_snap"] < 1e-9
        return
    for name, tensor in final.items():
        torch.testing.assert_close(tensor, want["best"][name], rtol=1e-4, atol=1e-6)
    for key in ("train_loss", "test_loss", "train_acc", "test_acc"):
        assert got[key] == pytest.approx(want[key], rel=1e-4, abs=1e-6), key
    assert got["num_params"] == want["num_params"]


def test_the_row_says_what_ran_where_and_when(digits, tmp_path):
    """Every column of the contract, checkpoints that exist, the learned steps per layer,
    wall time inside the call, UTC finish time, this host and the CPU."""
    import platform
    import time
    from datetime import datetime, timezone

    store = StudyStore(str(tmp_path / "s"))
    spec = _spec(epochs=2)
    trial = store.trial(spec.model_id)
    t0 = time.time()
    result = train(spec, digits, trial)
    wall = time.time() - t0
    assert set(schema.TRIALS_COLUMNS) <= set(result)
    assert result["init_ckpt"] == trial.rel(schema.INIT_CKPT) and trial.has(schema.INIT_CKPT)
    assert result["final_ckpt"] == trial.rel(schema.FINAL_CKPT) and trial.has(schema.FINAL_CKPT)
    assert 0 < result["seconds"] <= wall
    assert all(0 < h["seconds"] <= result["seconds"] for h in result["history"])
    finished = datetime.fromisoformat(result["finished_at"])
    assert finished.tzinfo == timezone.utc
    assert abs(finished.timestamp() - time.time()) < wall + 5
    assert result["host"] == platform.node() and result["device"] == "cpu"
    assert result["status"] == "ok" and result["reason"] == ""
    steps = result["steps"]
    assert steps and {s["model_id"] for s in steps} == {spec.model_id}
    assert [s["layer_index"] for s in steps] == list(range(len(steps)))
    without_store = train(spec, digits)
    assert "init_ckpt" not in without_store and "final_ckpt" not in without_store


def test_qar_row_reports_the_snap(digits):
    result = train(_spec(method="qar", bits=4, epochs=1), digits)
    assert result["snap_acc_drop"] == pytest.approx(
        result["test_acc_before_snap"] - result["test_acc"], abs=1e-12
    )
    assert 0.0 <= result["test_acc_before_snap"] <= 1.0 and result["compression_ratio"] > 1.0


def test_last_checkpoint_every_k_epochs_and_after_the_last(digits, tmp_path):
    """checkpoint_every=2 over 5 epochs: last.pt after epochs 2, 4 and 5; each epoch's
    report carries the kept epoch so far."""
    from qgen_ray.spec import RunOptions

    store = StudyStore(str(tmp_path / "s"))
    spec = _spec(epochs=5)
    trial = store.trial(spec.model_id)
    seen = []

    def report(metrics):
        last = trial.load(schema.LAST_CKPT)["epoch"] if trial.has(schema.LAST_CKPT) else None
        seen.append((metrics["epoch"], last, metrics["best_epoch"]))

    result = train(spec, digits, trial, RunOptions(checkpoint_every=2), report=report)
    assert [(e, last) for e, last, _ in seen] == [(1, None), (2, 2), (3, 2), (4, 4), (5, 5)]
    best = [min(result["history"][:e], key=lambda h: h["train_loss"])["epoch"] for e in range(1, 6)]
    assert [b for *_, b in seen] == best


def test_quantizer_parameters_get_no_weight_decay(digits):
    """Two groups: the network's parameters with the spec's weight decay, the LSQ steps
    with none (ours, as in most LSQ implementations)."""
    from qgen_ray.quant import quantizer_parameters
    from qgen_ray.train.build import build_model
    from qgen_ray.train.loop import make_optimizer

    spec = _spec(optimizer="sgd", weight_decay=5e-4)
    model = build_model(spec, 10, 1, 16)
    net, quant = make_optimizer(spec, model).param_groups
    steps = {id(p) for p in quantizer_parameters(model)}
    assert steps and {id(p) for p in quant["params"]} == steps
    assert quant["weight_decay"] == 0.0 and net["weight_decay"] == 5e-4
    assert not steps & {id(p) for p in net["params"]}


def test_the_regularizer_sees_the_fraction_of_training_done(digits, monkeypatch):
    """progress = (steps done) / (all steps), step by step: 320 images in batches of 64
    are 5 steps per epoch, so 2 epochs pass 0, 0.1, ..., 0.9 (VVTQ's ramp reads it)."""
    from qgen_ray.quant import QuantTerms

    seen = []
    real = QuantTerms.regularizer

    def recording(self, progress, weight=None):
        seen.append(progress)
        return real(self, progress, weight)

    monkeypatch.setattr(QuantTerms, "regularizer", recording)
    train(_spec(epochs=2), digits)
    assert seen == pytest.approx([i / 10 for i in range(10)])


@pytest.mark.parametrize("schedule", ["multistep", "cosine"])
def test_schedules(schedule, digits):
    from qgen_ray.train.build import build_model
    from qgen_ray.train.loop import make_optimizer, make_scheduler

    spec = _spec(optimizer="sgd", lr=0.1, epochs=4, milestones=(1, 3), gamma=0.5,
                 lr_schedule=schedule)  # fmt: skip
    optimizer = make_optimizer(spec, build_model(spec, 10, 1, 16))
    scheduler = make_scheduler(spec, optimizer)
    rates = []
    for _ in range(spec.epochs):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    if schedule == "multistep":
        assert rates == pytest.approx([0.1, 0.05, 0.05, 0.025])
    else:  # lr (1 + cos(pi e / E)) / 2 at epoch e = 0..E-1
        assert rates == pytest.approx([0.1 * (1 + math.cos(math.pi * e / 4)) / 2 for e in range(4)])


def test_every_optimizer_name_has_a_builder_and_no_other_falls_through():
    from dataclasses import replace

    import torch

    from qgen_ray.spec import OPTIMIZERS
    from qgen_ray.train import make_optimizer
    from qgen_ray.train.loop import OPTIMIZER_BUILDERS

    assert sorted(OPTIMIZER_BUILDERS) == sorted(OPTIMIZERS)
    model = torch.nn.Linear(2, 2)
    spec = TrainSpec(dataset="digits", model="nin")
    expected = {"sgd": "SGD", "adam": "Adam", "adamw": "AdamW", "rmsprop": "RMSprop"}
    for name, cls in expected.items():
        assert type(make_optimizer(replace(spec, optimizer=name), model)).__name__ == cls
    object.__setattr__(spec, "optimizer", "lion")  # past the spec's own check
    with pytest.raises(
        UserError, match="^unknown optimizer 'lion'; valid names: sgd, adam, adamw, rmsprop$"
    ):
        make_optimizer(spec, model)


# -- the epoch protocol on its own (train.epochs.EpochRecord) ----------------------------


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
