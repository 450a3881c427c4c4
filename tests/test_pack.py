"""Packed (horizontally fused) training: every member equals the same spec trained alone,
lives its own life (diverges alone, resumes from its own checkpoint), and leaves plain
single-model checkpoints and rows behind."""

from __future__ import annotations

import math

import pytest
import torch

from qgen_ray import load_model, schema
from qgen_ray.data import load_image_data
from qgen_ray.errors import UserError
from qgen_ray.pipeline.study_cli import pack_size
from qgen_ray.spec import RunOptions, TrainSpec
from qgen_ray.store import StudyStore
from qgen_ray.train import train
from qgen_ray.train.pack import (
    AUTO_PACK,
    check_pack_models,
    check_packable,
    check_sequential,
    form_packs,
    pack_id,
    train_pack,
)
from tests.support.compare import assert_same_checkpoints, assert_trained_alike

F64 = RunOptions(dtype="float64")


@pytest.fixture(scope="module")
def digits():
    data = load_image_data("digits")
    data.train_x, data.train_y = data.train_x[:320], data.train_y[:320]
    data.test_x, data.test_y = data.test_x[:200], data.test_y[:200]
    return data


def _spec(**kw) -> TrainSpec:
    base = dict(dataset="digits", model="nin", width=1, depth=2, epochs=2, batch_size=64,
                milestones=(1,), gamma=0.5)  # fmt: skip
    return TrainSpec(**{**base, **kw})


# FP32 / int8 / int4 / int2, three learning rates, two weight decays, SGD, Adam, RMSprop
MIXED = [
    _spec(method="fp32", bits=32, optimizer="sgd", lr=0.05, weight_decay=5e-4, seed=0),
    _spec(method="lsq", bits=8, optimizer="adam", lr=1e-3, weight_decay=0.0, seed=1),
    _spec(method="lsq", bits=4, optimizer="rmsprop", lr=5e-4, weight_decay=5e-4, seed=2),
    _spec(method="lsq", bits=2, optimizer="sgd", lr=0.1, weight_decay=0.0, seed=3),
]


def test_every_member_equals_its_spec_trained_alone_in_float64(digits, tmp_path):
    store = StudyStore(str(tmp_path / "packed"))
    alone_store = StudyStore(str(tmp_path / "alone"))
    rows = train_pack(MIXED, digits, [store.trial(s.model_id) for s in MIXED], F64)
    for spec, row in zip(MIXED, rows, strict=True):
        alone_trial = alone_store.trial(spec.model_id)
        alone = train(spec, digits, alone_trial, F64)
        assert_trained_alike(row, alone, rel=1e-9)
        assert_same_checkpoints(store.trial(spec.model_id), alone_trial, rtol=1e-9)
        assert row["pack_id"] == pack_id(MIXED) and row["pack_size"] == 4


@pytest.mark.statistical
def test_float32_packing_moves_numbers_no_more_than_a_second_thread_does(digits, stat_seed):
    """In float32 the grouped convolution sums in another order. Its effect is measured
    against what the thread count does to a model trained alone (1 vs 2 threads), over
    every epoch's training loss / accuracy and the kept model's test loss / accuracy.
    Measured on 3 seed sets: loss spreads 2.9e-4 / 2.0e-3 / 5.1e-4 for threads and
    packing alike (ratio ≤ 1.003); accuracy spreads one or two images for both, packing
    never more than threads. Asserted: loss ≤ 2x the thread spread (floor 1e-5), accuracy
    ≤ the thread spread + one test image."""
    import dataclasses

    specs = [dataclasses.replace(s, seed=s.seed + stat_seed) for s in MIXED]
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = [train(s, digits) for s in specs]
        packed = train_pack(specs, digits)
        torch.set_num_threads(2)
        two = [train(s, digits) for s in specs]
    finally:
        torch.set_num_threads(threads)

    def spread(a: list[dict], b: list[dict], kind: str) -> float:
        diffs = [abs(x[f"test_{kind}"] - y[f"test_{kind}"]) for x, y in zip(a, b, strict=True)]
        for x, y in zip(a, b, strict=True):
            diffs += [abs(p[f"train_{kind}"] - q[f"train_{kind}"])
                      for p, q in zip(x["history"], y["history"], strict=True)]  # fmt: skip
        return max(diffs)

    loss_threads, loss_packed = spread(one, two, "loss"), spread(one, packed, "loss")
    acc_threads, acc_packed = spread(one, two, "acc"), spread(one, packed, "acc")
    print(f"float32 loss: threads {loss_threads:.2e}, packing {loss_packed:.2e}; "
          f"accuracy: threads {acc_threads:.2e}, packing {acc_packed:.2e}")  # fmt: skip
    assert loss_packed <= 2 * max(loss_threads, 1e-5)
    assert acc_packed <= acc_threads + 1 / len(digits.test_x) + 1e-12


def test_a_diverging_member_stops_alone(digits):
    wild = _spec(method="fp32", bits=32, optimizer="sgd", lr=1e300, seed=7)  # overflows float64
    rows = train_pack([MIXED[1], wild, MIXED[3]], digits, options=F64)
    assert rows[1]["status"] == "diverged" and "non-finite" in rows[1]["reason"]
    assert math.isnan(rows[1]["test_acc"])
    calm = train_pack([MIXED[1], MIXED[3]], digits, options=F64)
    for got, want in zip([rows[0], rows[2]], calm, strict=True):
        assert_trained_alike(got, want, rel=1e-12)


def test_a_killed_pack_resumes_every_member_from_its_own_last_epoch(digits, tmp_path):
    """Members "killed" after epochs 1 and 2 of 3 (their last.pt written by a shorter
    run): the re-run trains each only from where it stopped, member 2 waiting for member
    1 to catch up, and ends with the uninterrupted pack's numbers."""
    full = [_spec(epochs=3, seed=s, method="lsq", bits=4, optimizer="adam", lr=1e-3)
            for s in (0, 1)]  # fmt: skip
    straight = train_pack(full, digits, options=F64)
    store = StudyStore(str(tmp_path / "s"))
    trials = [store.trial(s.model_id) for s in full]
    for spec, trial, done in zip(full, trials, (1, 2), strict=True):
        short = TrainSpec.from_dict({**spec.to_dict(), "epochs": done})
        train_pack([short], digits, [trial], F64)
        assert trial.load(schema.LAST_CKPT)["epoch"] == done
    trained = []
    resumed = train_pack(full, digits, trials, F64,
                         report=lambda m: trained.append((m["model_id"], m["epoch"])))  # fmt: skip
    a, b = (s.model_id for s in full)
    assert trained == [(a, 2), (a, 3), (b, 3)]
    for got, want in zip(resumed, straight, strict=True):
        assert_trained_alike(got, want, rel=1e-9)


def test_a_packed_member_is_a_plain_model(digits, tmp_path):
    store = StudyStore(str(tmp_path / "s"))
    specs = MIXED[:2]
    rows = train_pack(specs, digits, [store.trial(s.model_id) for s in specs])
    for spec, row in zip(specs, rows, strict=True):
        store.trial(spec.model_id).write_result(row)
        model = load_model(store.uri, spec.model_id)
        from qgen_ray.train import evaluate

        loss, acc = evaluate(model, digits.test_x, digits.test_y, digits.normalize)
        assert loss == pytest.approx(row["test_loss"], rel=1e-5) and acc == row["test_acc"]


def test_what_cannot_be_packed_is_one_clear_error(digits):
    with pytest.raises(UserError, match="differ in width"):
        check_packable([_spec(width=1), _spec(width=2)])
    with pytest.raises(UserError, match="each model once"):
        check_packable([_spec(), _spec()])
    with pytest.raises(UserError, match="at least one model"):
        check_packable([])
    resnet = TrainSpec(dataset="digits", model="resnet18_cifar", epochs=1, batch_size=64)
    with pytest.raises(UserError, match="cannot pack layers of type Linear"):
        train_pack([resnet], digits)

    class Residual(torch.nn.Module):  # fusable layers, but not applied as a chain
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(1, 1, 3, padding=1)
            self.pool = torch.nn.AdaptiveAvgPool2d(1)
            self.flat = torch.nn.Flatten()

        def forward(self, x):
            return self.flat(self.pool(x + self.conv(x)))

    with pytest.raises(UserError, match="Residual is not a chain of its layers"):
        check_sequential(Residual(), digits)
    with pytest.raises(UserError, match="unknown dtype 'float16'"):
        train_pack([_spec()], digits, options=RunOptions(dtype="float16"))


def test_packs_form_per_shape_in_near_equal_sizes_and_in_order():
    """Models of one shape share packs (never two widths in one), each shape cut into
    ceil(n / K) packs whose sizes differ by at most one, in the order given."""
    narrow = [_spec(seed=s) for s in range(5)]
    wide = [_spec(width=2, seed=s) for s in range(2)]
    items = [(spec, {"i": i}) for i, spec in enumerate([*narrow[:3], *wide, *narrow[3:]])]
    packs = form_packs(items, 4, spec_of=lambda item: item[0])
    assert [[spec for spec, _ in p] for p in packs] == [narrow[:3], narrow[3:], wide]
    assert [[extra["i"] for _, extra in p] for p in packs] == [[0, 1, 2], [5, 6], [3, 4]]
    assert [len(p) for p in form_packs(narrow * 1, 1)] == [1] * 5
    assert [len(p) for p in form_packs([_spec(seed=s) for s in range(13)], 12)] == [7, 6]
    assert form_packs([], 4) == []
    with pytest.raises(UserError, match="at least 1 model"):
        form_packs(narrow, 0)


def test_packs_are_checked_before_training(digits):
    """A model that is not a chain of its layers is refused once its pack has two members
    (a pack of one trains on the plain path), and the caller's random state is untouched."""
    resnet = [TrainSpec(dataset="digits", model="resnet18_cifar", epochs=1, seed=s)
              for s in (0, 1)]  # fmt: skip
    check_pack_models([[resnet[0]], [resnet[1]]], digits)
    state = torch.get_rng_state()
    check_pack_models([MIXED[:2]], digits)
    assert torch.equal(torch.get_rng_state(), state)
    with pytest.raises(UserError, match="cannot pack layers of type Linear"):
        check_pack_models([resnet], digits)
    with pytest.raises(UserError, match="differ in width"):
        check_pack_models([[_spec(width=1), _spec(width=2)]], digits)


@pytest.mark.parametrize(
    "value, device, gpus, want",
    [("auto", "auto", 0.0, 1), ("auto", "auto", 0.25, AUTO_PACK["cuda"]),
     ("auto", "cpu", 0.25, 1), ("3", "auto", 0.0, 3), ("1", "cuda", 1.0, 1)],
)  # fmt: skip
def test_pack_size_auto_is_per_device(value, device, gpus, want):
    assert AUTO_PACK["cpu"] == 1 and AUTO_PACK["cuda"] > 1
    assert pack_size(value, device, gpus) == want


@pytest.mark.parametrize("value", ["0", "-2", "two", "1.5"])
def test_a_bad_pack_size_is_one_line(value):
    with pytest.raises(UserError, match="--pack must be a whole number >= 1 or auto"):
        pack_size(value, "auto", 0.0)


def test_channels_last_and_compile_equal_the_eager_fused_path_in_float64(digits):
    """The GPU fast paths that do not change the arithmetic, checked where they run
    (CPU): channels-last tensors, and `torch.compile` (inductor) of the fused forward,
    each equal to the plain fused path, hence to `train` alone, to 1e-9 in float64."""
    plain = train_pack(MIXED, digits, options=F64)
    for fast in (dict(channels_last=True), dict(compile=True)):
        rows = train_pack(MIXED, digits, options=RunOptions(dtype="float64", **fast))
        for got, want in zip(rows, plain, strict=True):
            assert_trained_alike(got, want, rel=1e-9)


def test_bf16_autocast_trains_within_a_stated_margin_of_float32(digits):
    """bfloat16 autocast (8 bits of mantissa) really computes in bf16 (the numbers move)
    and stays close: each member's first-epoch training loss within 1% of float32's
    (measured: at most 0.18%, seed 0, 1 or 2 threads), its test accuracy within 5 points
    (measured: at most 1), and its row says it ran under autocast."""
    fp32 = train_pack(MIXED, digits)
    bf16 = train_pack(MIXED, digits, options=RunOptions(amp="bf16"))
    moved = 0.0
    for got, want in zip(bf16, fp32, strict=True):
        assert got["amp"] == "bf16" and want["amp"] == "off"
        a, b = got["history"][0]["train_loss"], want["history"][0]["train_loss"]
        assert abs(a - b) <= 0.01 * b, (got["model_id"], a, b)
        assert abs(got["test_acc"] - want["test_acc"]) <= 0.05
        moved = max(moved, abs(a - b))
    assert moved > 1e-5  # autocast was on: float32 runs agree to ~1e-6


def test_a_fast_path_that_cannot_be_had_is_one_line(digits):
    with pytest.raises(UserError, match="unknown --amp 'fp8'"):
        train_pack([_spec()], digits, options=RunOptions(amp="fp8"))
    with pytest.raises(UserError, match="not the reproducible float64 mode"):
        train_pack([_spec()], digits, options=RunOptions(amp="bf16", dtype="float64"))
