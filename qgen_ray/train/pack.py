"""`train_pack(specs, data) -> rows`: K models of one shape trained as one network.

Horizontal fusion (Wang et al., "Horizontally Fused Training Array", MLSys 2021): the K
members of a pack share an architecture and a protocol; every layer of the pack is one
operator over all members. A convolution becomes one grouped convolution over the
members' concatenated channels (K × its groups), BatchNorm one normalization over K·C
channels, ReLU and pooling act on the packed tensor as they are; the network's output
holds the K members' logits side by side. Each member still reads its own images: the
packed input is the members' own batches concatenated along the channel axis.

Each member is a complete model of its own, built by `build_model` from its seed exactly
as `train(spec)` builds it, with its own optimizer and schedule (`make_optimizer`,
`make_scheduler`: the same code, so the same hyperparameters and state), its own batch
order and augmentation generator, its own quantizers (an FP32 member is never quantized;
LSQ members keep their own steps and grid limits) and its own epoch record
(`train.epochs.EpochRecord`): the kept epoch, `last.pt`, `init.pt` / `final.pt` and the
result row are those of a single model, so everything downstream reads a packed study as
an unpacked one. The fused forward is built from the members at every epoch: the weights
are the members' own parameters, concatenated per forward, so gradients and optimizer
steps land on each member's tensors. The loss is the sum of the members' mean losses, so
each member's gradient is the one it gets alone.

Members live their own lives: one whose epoch loss is not finite stops alone (diverged);
a member resumes from its own `last.pt`; a member already at a later epoch than the
others (a pack killed between two members' checkpoints) waits until they catch up.

The GPU fast paths live here, never in `train`, which stays the plain reference they are
tested against (tests/test_pack.py): `RunOptions.channels_last` (channels-last tensors)
and `RunOptions.compile` (`torch.compile` of the fused forward, recompiled only when the
set of training members changes) leave the arithmetic as it is (float64: equal to 1e-9);
`RunOptions.amp="bf16"` runs the forward under bfloat16 autocast, losses and optimizer
steps in float32 (first-epoch loss within 1% of float32's; the row records `amp`).

Exactness: in float64 (`RunOptions(dtype="float64")`) every member equals `train(spec)`
to ~1e-12; in float32 the grouped convolution sums in another order, within the spread
of running one model on 1 vs 2 threads (tests/test_pack.py measures both).
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from qgen_ray import schema
from qgen_ray.data.base import ImageData
from qgen_ray.errors import UserError
from qgen_ray.spec import RunOptions, TrainSpec
from qgen_ray.store import TrialStore
from qgen_ray.train.loop import Run, finish_row, resolve_device, resolve_dtype, start_run

# What members of one pack must share (they may differ in everything else of the spec:
# optimizer, lr, weight decay, momentum, precision, seed).
SHARED = (
    "dataset", "model", "width", "depth", "epochs", "batch_size", "lr_schedule",
    "milestones", "gamma", "augment", "image_size", "model_kwargs", "quant_policy",
)  # fmt: skip


def pack_id(specs: Sequence[TrainSpec]) -> str:
    """A short id naming the set of models trained together (never part of a model id)."""
    joined = ",".join(sorted(s.model_id for s in specs))
    return hashlib.sha256(joined.encode()).hexdigest()[:16]


def check_packable(specs: Sequence[TrainSpec]) -> None:
    """One line naming the first field two members disagree on, or a repeated model."""
    if not specs:
        raise UserError("a pack needs at least one model")
    first = specs[0]
    for spec in specs[1:]:
        for name in SHARED:
            if getattr(spec, name, None) != getattr(first, name, None):
                raise UserError(
                    f"models {first.model_id} and {spec.model_id} differ in {name} "
                    f"({getattr(first, name, None)!r} vs {getattr(spec, name, None)!r}); "
                    f"a pack shares {', '.join(SHARED)}"
                )
    ids = [s.model_id for s in specs]
    if len(set(ids)) != len(ids):
        raise UserError("a pack holds each model once; got a repeated model id")


def _leaves(model: nn.Module) -> list[nn.Module]:
    """The model's layers in registration order: its leaf modules, a quantized layer
    counting as one (its quantizer is part of it)."""
    from qgen_ray.quant import QuantizedLayer

    if isinstance(model, QuantizedLayer) or not list(model.children()):
        return [model]
    return [leaf for child in model.children() for leaf in _leaves(child)]


def _is_conv(m: nn.Module) -> bool:
    return isinstance(m, nn.Conv2d)


FUSABLE = (nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.AdaptiveAvgPool2d, nn.Flatten, nn.Identity)


class FusedNetwork:
    """The members' networks as one: a forward over their leaf modules in order, each
    layer one operator over all members. Only for models that are their leaves applied
    in order (checked once per member shape by `check_sequential`)."""

    def __init__(self, members: Sequence[nn.Module], channels_last: bool = False):
        self.members = list(members)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.layers = list(zip(*[_leaves(m) for m in self.members], strict=True))
        for column in self.layers:
            if not all(isinstance(m, FUSABLE) for m in column):
                names = ", ".join(sorted({type(m).__name__ for m in column}))
                raise UserError(f"cannot pack layers of type {names}; train unpacked (--pack 1)")
            # a quantized conv and a plain one fuse (each gives its own weight)
            kinds = {nn.Conv2d if _is_conv(m) else type(m) for m in column}
            if len(kinds) > 1:
                raise UserError("members of a pack must have the same layers")

    def forward(self, xs: Sequence[torch.Tensor], training: bool) -> list[torch.Tensor]:
        """The K members' outputs for their K input batches (same shape each)."""
        k = len(self.members)
        x = torch.cat(list(xs), dim=1).contiguous(memory_format=self.memory_format)
        for column in self.layers:
            first = column[0]
            if _is_conv(first):
                weight = torch.cat([_conv_weight(m) for m in column])
                weight = weight.contiguous(memory_format=self.memory_format)
                bias = torch.cat([m.bias for m in column]) if first.bias is not None else None
                x = F.conv2d(x, weight, bias, first.stride, first.padding, first.dilation,
                             first.groups * k)  # fmt: skip
            elif isinstance(first, nn.BatchNorm2d):
                x = _batch_norm(column, x, training)
            else:
                x = first(x)
        return list(x.chunk(k, dim=1))


def _conv_weight(layer: nn.Conv2d) -> torch.Tensor:
    """The weight a member's conv computes with: fake-quantized for a quantized layer."""
    quantized = getattr(layer, "quantized_weight", None)
    return quantized() if quantized is not None else layer.weight


def _batch_norm(column: Sequence[nn.BatchNorm2d], x: torch.Tensor, training: bool):
    """One batch norm over the members' K·C channels; the running statistics are
    updated in the members' own buffers (per channel, as each would alone)."""
    first = column[0]
    running_mean = torch.cat([m.running_mean for m in column])
    running_var = torch.cat([m.running_var for m in column])
    out = F.batch_norm(
        x,
        running_mean,
        running_var,
        torch.cat([m.weight for m in column]),
        torch.cat([m.bias for m in column]),
        training,
        first.momentum,
        first.eps,
    )
    if training:
        c = first.num_features
        with torch.no_grad():
            for i, m in enumerate(column):
                m.running_mean.copy_(running_mean[i * c : (i + 1) * c])
                m.running_var.copy_(running_var[i * c : (i + 1) * c])
                m.num_batches_tracked += 1
    return out


def check_sequential(model: nn.Module, data: ImageData) -> None:
    """Refuse a model whose forward is not its leaf modules applied in order (the fused
    network would compute something else): compared once on two training images."""
    was = model.training
    model.eval()
    with torch.no_grad():
        x = data.normalize(data.train_x[:2]).to(next(model.parameters()))
        want = model(x)
        got = FusedNetwork([model]).forward([x], training=False)[0]
    model.train(was)
    if got.shape != want.shape or not torch.allclose(got, want, rtol=1e-4, atol=1e-5):
        raise UserError(
            f"{type(model).__name__} is not a chain of its layers; train it unpacked (--pack 1)"
        )


# The pack size `--pack auto` picks per device. CPU: 1, measured (benchmarks/
# population_throughput.py, 2 cores): a grouped convolution over K members is no faster
# than K plain ones there, so packing buys nothing and the plain path stays. CUDA: small
# convolutions at batch 128 leave a GPU mostly idle; 12 members per pack is the middle of
# the benchmark's K = 4/12/36 (to be confirmed with benchmarks/gpu_check.sh).
AUTO_PACK = {"cpu": 1, "cuda": 12}


def shared_key(spec: TrainSpec) -> tuple:
    """What decides whether two models may share a pack: their `SHARED` fields."""
    return tuple(repr(getattr(spec, name, None)) for name in SHARED)


def form_packs(items: Sequence, size: int, spec_of: Callable = lambda item: item) -> list[list]:
    """Split items (specs, or anything `spec_of` maps to one) into packs of at most `size`
    models that share an architecture and protocol: each group of `shared_key` is cut into
    ceil(n / size) packs of near-equal size, in the order given (deterministic, so a
    re-run over the same pending models forms the same packs)."""
    if size < 1:
        raise UserError(f"a pack holds at least 1 model, got {size}; use --pack 1 to not pack")
    groups: dict[tuple, list] = {}
    for item in items:
        groups.setdefault(shared_key(spec_of(item)), []).append(item)
    packs = []
    for group in groups.values():
        count = math.ceil(len(group) / size)
        bounds = [-(-i * len(group) // count) for i in range(count + 1)]  # ceil: larger first
        packs += [group[a:b] for a, b in zip(bounds, bounds[1:])]
    return packs


def check_pack_models(packs: Sequence[Sequence[TrainSpec]], data: ImageData) -> None:
    """Before any training: each pack's members may share it, and the model of every
    pack of two or more is a chain of its layers (built once per shape, on the CPU,
    without touching the caller's random state)."""
    from qgen_ray.train.build import build_model

    checked = set()
    for pack in packs:
        check_packable(pack)
        key = shared_key(pack[0])
        if len(pack) < 2 or key in checked:
            continue
        checked.add(key)
        with torch.random.fork_rng(devices=[]):
            model = build_model(pack[0], data.num_classes, data.in_channels, data.image_size)
        check_sequential(model, data)


AMP = {"off": None, "bf16": torch.bfloat16}  # RunOptions.amp -> the autocast type


def check_fast_paths(options: RunOptions, dtype: torch.dtype) -> None:
    """One line for a fast path that cannot be had as asked."""
    if options.amp not in AMP:
        raise UserError(f"unknown --amp {options.amp!r}; valid: {', '.join(AMP)}")
    if options.amp != "off" and dtype != torch.float32:
        raise UserError("--amp bf16 computes the forward in bfloat16; use it with float32, "
                        "not the reproducible float64 mode")  # fmt: skip


class _Forward:
    """The fused forward of the members still training, under the run's fast paths:
    rebuilt (and, with `compile`, recompiled) only when that set of members changes."""

    def __init__(self, options: RunOptions, device: torch.device):
        self.options, self.device = options, device
        self.key: tuple = ()
        self.fn: Callable | None = None

    def __call__(self, active: Sequence[_Member], xs: list[torch.Tensor]) -> list[torch.Tensor]:
        key = tuple(id(m) for m in active)
        if key != self.key:
            fused = FusedNetwork([m.run.model for m in active], self.options.channels_last)
            self.key = key
            self.fn = torch.compile(fused.forward) if self.options.compile else fused.forward
        amp = AMP[self.options.amp]
        with torch.autocast(self.device.type, dtype=amp or torch.float32, enabled=amp is not None):
            return self.fn(xs, training=True)


@dataclass
class _Member:
    """A member's spec, store and training state (`train.loop.Run`), and how it ended."""

    spec: TrainSpec
    store: TrialStore | None
    run: Run
    status: str = schema.STATUS_OK
    reason: str = ""


def train_pack(
    specs: Sequence[TrainSpec],
    data: ImageData,
    stores: Sequence[TrialStore | None] | None = None,
    options: RunOptions = RunOptions(),
    report: Callable[[dict], None] | None = None,
) -> list[dict]:
    """Train the specs as one fused network; return one result row per spec (the row
    `train(spec)` returns, plus `pack_id` and `pack_size`), in the order given.

    `stores[i]` is member i's trial store (checkpoints, resume). `report(metrics)` is
    called once per member and epoch, with the member's `model_id`."""
    check_packable(specs)
    stores = list(stores) if stores is not None else [None] * len(specs)
    if len(stores) != len(specs):
        raise UserError(f"{len(specs)} models but {len(stores)} stores")
    start = time.time()
    device, dtype = resolve_device(options.device), resolve_dtype(options.dtype)
    check_fast_paths(options, dtype)
    members = [
        _Member(spec, store, start_run(spec, data, store, device, dtype))
        for spec, store in zip(specs, stores, strict=True)
    ]
    check_sequential(members[0].run.model, data)
    first = specs[0]
    train_x, train_y = data.train_x.to(device), data.train_y.to(device)
    n, steps = len(train_x), math.ceil(len(train_x) / first.batch_size)
    forward = _Forward(options, device)
    for m in members:
        m.run.model.train()
    for epoch in range(1, first.epochs + 1):
        active = [m for m in members if m.status == schema.STATUS_OK and m.run.record.epoch < epoch]
        if not active:
            continue
        t0 = time.time()
        rates = [m.run.optimizer.param_groups[0]["lr"] for m in active]
        orders = [torch.randperm(n, generator=m.run.generator).to(device) for m in active]
        sums = [torch.zeros((), device=device, dtype=dtype) for _ in active]
        correct = [torch.zeros((), device=device, dtype=torch.int64) for _ in active]
        for step in range(steps):
            batch = slice(step * first.batch_size, (step + 1) * first.batch_size)
            xs, ys = [], []
            for m, order in zip(active, orders, strict=True):
                idx = order[batch]
                xb = train_x[idx]
                if m.spec.augment:
                    xb = data.augment(xb, m.run.generator)
                xs.append(data.normalize(xb).to(dtype))
                ys.append(train_y[idx])
            logits = [out.to(dtype) for out in forward(active, xs)]  # bf16 autocast: back
            progress = ((epoch - 1) * steps + step) / (first.epochs * steps)
            total = 0
            for i, m in enumerate(active):
                loss = F.cross_entropy(logits[i], ys[i])
                total = total + loss + m.run.terms.regularizer(progress)
                sums[i] += loss.detach() * len(ys[i])
                correct[i] += (logits[i].argmax(1) == ys[i]).sum()
            for m in active:
                m.run.optimizer.zero_grad(set_to_none=True)
            total.backward()
            for m in active:
                m.run.optimizer.step()
                m.run.terms.clamp_steps_()
        seconds = time.time() - t0
        for i, m in enumerate(active):
            m.run.scheduler.step()
            if not torch.isfinite(sums[i]):
                m.status = schema.STATUS_DIVERGED
                m.reason = f"non-finite training loss in epoch {epoch}"
                continue
            row = {
                "epoch": epoch,
                "train_loss": float(sums[i]) / n,
                "train_acc": int(correct[i]) / n,
                "lr": rates[i],
                "seconds": seconds,
            }
            m.run.record.observe(row, m.run.model)
            if m.store is not None and m.run.record.checkpoint_due(
                options.checkpoint_every, first.epochs
            ):
                m.run.record.save_last(m.store, m.run.model, m.run.optimizer, m.run.scheduler,
                                   generator=m.run.generator.get_state())  # fmt: skip
            if report is not None:
                report({**row, "model_id": m.spec.model_id, "best_epoch": m.run.record.best_epoch})
    pid, rows = pack_id(specs), []
    for m in members:
        row = finish_row(
            m.spec, m.run.record, m.run.model, data, m.store, m.status, m.reason, device, start
        )
        rows.append({**row, "pack_id": pid, "pack_size": len(specs), "amp": options.amp})
    return rows


__all__ = [
    "AMP", "AUTO_PACK", "FusedNetwork", "check_fast_paths", "check_pack_models",
    "check_packable", "form_packs", "pack_id", "train_pack",
]  # fmt: skip
