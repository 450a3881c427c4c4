"""`train(spec, data) -> result`: one model under the paper protocol. No Ray in here.

Protocol (docs/method.md §2): minibatch SGD-family training for `spec.epochs` epochs with a
multistep learning-rate schedule; the kept weights are those of the epoch with the
lowest training loss (no test data is used to choose); the kept model is then measured
in eval mode without augmentation on the full training and test sets.

"Training loss of an epoch" is the mean of that epoch's minibatch losses (train mode,
augmented batches), as seen during training: our choice, it costs no extra pass.

With a `TrialStore`, the weights at initialization (`init.pt`) and the kept weights
(`final.pt`) are saved, and every `checkpoint_every` epochs the whole training state
(`last.pt`) so a killed run continues where it stopped, giving the same numbers.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from qgen_ray import schema
from qgen_ray.data.base import ImageData
from qgen_ray.errors import UserError
from qgen_ray.quant import QuantTerms, step_sizes
from qgen_ray.spec import RunOptions, TrainSpec
from qgen_ray.store import TrialStore
from qgen_ray.train.build import build_model
from qgen_ray.train.epochs import EpochRecord, cpu_state, degenerate_reason, kept_metrics
from qgen_ray.train.evaluate import evaluate


class Diverged(Exception):
    """The training loss became non-finite."""


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


# Floating-point types a run may compute in (RunOptions.dtype). float64 is the
# reproducible mode: on a CPU its numbers do not move with the thread count (float32's do,
# by up to 0.076 in accuracy after 2 epochs on the digits NiNs) and packed training equals
# training alone to ~1e-12 (tests/test_pack.py).
DTYPES = {"float32": torch.float32, "float64": torch.float64}


def resolve_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise UserError(f"unknown dtype {name!r}; valid: {', '.join(DTYPES)}")
    return DTYPES[name]


def no_decay_ids(spec: TrainSpec, model: nn.Module) -> set[int]:
    """The parameters weight decay never touches: the quantizers' steps and codebooks (our
    choice, as in most LSQ implementations) and, for timm's models (the ViT recipe), what
    timm exempts itself: norms, biases and the model's `no_weight_decay()` names such as
    `pos_embed` and `cls_token` (`timm.optim.param_groups_weight_decay`)."""
    from qgen_ray.models import model_library
    from qgen_ray.quant import quantizer_parameters

    skip = {id(p) for p in quantizer_parameters(model)}
    library = model_library(spec.model)
    if library is not None and library[0] == "timm":
        from timm.optim import param_groups_weight_decay

        names = model.no_weight_decay() if hasattr(model, "no_weight_decay") else ()
        groups = param_groups_weight_decay(model, 1.0, no_weight_decay_list=names)
        skip |= {id(p) for g in groups if g["weight_decay"] == 0.0 for p in g["params"]}
    return skip


def make_optimizer(spec: TrainSpec, model: nn.Module) -> torch.optim.Optimizer:
    """The spec's optimizer; weight decay on every parameter but `no_decay_ids`."""
    skip = no_decay_ids(spec, model)
    groups = [
        {"params": [p for p in model.parameters() if id(p) not in skip]},
        {"params": [p for p in model.parameters() if id(p) in skip], "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    if spec.optimizer not in OPTIMIZER_BUILDERS:
        raise UserError(
            f"unknown optimizer {spec.optimizer!r}; valid names: {', '.join(OPTIMIZER_BUILDERS)}"
        )
    return OPTIMIZER_BUILDERS[spec.optimizer](groups, spec)


# One builder per name of `qgen_ray.spec.OPTIMIZERS` (a test holds the two lists equal).
OPTIMIZER_BUILDERS = {
    "sgd": lambda groups, spec: torch.optim.SGD(
        groups, lr=spec.lr, momentum=spec.momentum, weight_decay=spec.weight_decay
    ),
    "adam": lambda groups, spec: torch.optim.Adam(
        groups, lr=spec.lr, weight_decay=spec.weight_decay
    ),
    # decoupled weight decay (the DeiT / VVTQ recipe)
    "adamw": lambda groups, spec: torch.optim.AdamW(
        groups, lr=spec.lr, weight_decay=spec.weight_decay
    ),
    "rmsprop": lambda groups, spec: torch.optim.RMSprop(
        groups, lr=spec.lr, weight_decay=spec.weight_decay
    ),
}


def make_scheduler(
    spec: TrainSpec, optimizer: torch.optim.Optimizer
) -> torch.optim.lr_scheduler.LRScheduler:
    """The spec's learning-rate schedule, stepped once per epoch: "multistep" multiplies
    the rate by `gamma` at each of `milestones`; "cosine" anneals it from `lr` to 0 over
    `epochs` (per epoch, no warm-up: our reading of VVTQ's "AdamW, cosine")."""
    if spec.lr_schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=spec.epochs)
    return torch.optim.lr_scheduler.MultiStepLR(
        optimizer, milestones=list(spec.milestones), gamma=spec.gamma
    )


@dataclass
class Run:
    """One model's training state: model, optimizer, schedule, batch-order generator,
    epoch record and quantization terms."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    generator: torch.Generator
    record: EpochRecord
    terms: QuantTerms


def start_run(
    spec: TrainSpec,
    data: ImageData,
    store: TrialStore | None,
    device: torch.device,
    dtype: torch.dtype,
) -> Run:
    """The model seeded by `spec.seed` with its optimizer, schedule and batch generator;
    resumed from the store's `last.pt` when there is one (else `init.pt` is written).
    `train` and every member of `train_pack` start here."""
    torch.manual_seed(spec.seed)
    model = build_model(spec, data.num_classes, data.in_channels, data.image_size)
    model = model.to(device=device, dtype=dtype)
    optimizer = make_optimizer(spec, model)
    scheduler = make_scheduler(spec, optimizer)
    generator = torch.Generator().manual_seed(spec.seed)
    record, extra = EpochRecord.start(store, model, optimizer, scheduler)
    if "generator" in extra:
        generator.set_state(extra["generator"])
    return Run(model, optimizer, scheduler, generator, record, QuantTerms(model))


def train(
    spec: TrainSpec,
    data: ImageData,
    store: TrialStore | None = None,
    options: RunOptions = RunOptions(),
    report: Callable[[dict], None] | None = None,
) -> dict:
    """Train one model; return its result row (schema.TRIALS_COLUMNS plus history/steps).

    `report(metrics)` is called once per epoch (the Ray adapter passes `tune.report`).
    """
    start = time.time()
    device, dtype = resolve_device(options.device), resolve_dtype(options.dtype)
    run = start_run(spec, data, store, device, dtype)
    model, optimizer, scheduler = run.model, run.optimizer, run.scheduler
    generator, record, terms = run.generator, run.record, run.terms

    train_x, train_y = data.train_x.to(device), data.train_y.to(device)
    n, steps_per_epoch = len(train_x), math.ceil(len(train_x) / spec.batch_size)
    status, reason = schema.STATUS_OK, ""
    model.train()
    try:
        for epoch in range(record.epoch + 1, spec.epochs + 1):
            t0 = time.time()
            lr = optimizer.param_groups[0]["lr"]  # the rate this epoch trains at
            order = torch.randperm(n, generator=generator).to(device)
            loss_sum = torch.zeros((), device=device, dtype=dtype)  # on device: no per-step sync
            correct = torch.zeros((), device=device, dtype=torch.int64)
            for step in range(steps_per_epoch):
                idx = order[step * spec.batch_size : (step + 1) * spec.batch_size]
                xb = train_x[idx]
                if spec.augment:
                    xb = data.augment(xb, generator)
                xb = data.normalize(xb).to(dtype)
                logits = model(xb)
                progress = ((epoch - 1) * steps_per_epoch + step) / (spec.epochs * steps_per_epoch)
                loss = F.cross_entropy(logits, train_y[idx])
                optimizer.zero_grad(set_to_none=True)
                (loss + terms.regularizer(progress)).backward()
                optimizer.step()
                terms.clamp_steps_()
                loss_sum += loss.detach() * len(idx)
                correct += (logits.argmax(1) == train_y[idx]).sum()
            scheduler.step()
            if not torch.isfinite(loss_sum):  # checked once per epoch (one device sync)
                raise Diverged(f"non-finite training loss in epoch {epoch}")
            row = {
                "epoch": epoch,
                "train_loss": float(loss_sum) / n,
                "train_acc": int(correct) / n,
                "lr": lr,
                "seconds": time.time() - t0,
            }
            record.observe(row, model)
            if store is not None and record.checkpoint_due(options.checkpoint_every, spec.epochs):
                record.save_last(
                    store, model, optimizer, scheduler, generator=generator.get_state()
                )
            if report is not None:
                held = {}
                if options.validate_each_epoch:  # the held-out split (a search's validation)
                    held = dict(zip(("val_loss", "val_acc"), evaluate(
                        model, data.test_x, data.test_y, data.normalize)))  # fmt: skip
                report({**row, **held, "best_epoch": record.best_epoch})
    except Diverged as err:
        status, reason = schema.STATUS_DIVERGED, str(err)

    return finish_row(spec, record, model, data, store, status, reason, device, start)


def finish_row(
    spec: TrainSpec,
    record: EpochRecord,
    model: nn.Module,
    data: ImageData,
    store: TrialStore | None,
    status: str,
    reason: str,
    device: torch.device,
    start: float,
) -> dict:
    """The result row of a model whose epochs are done: load the kept weights (QAR: snap
    them), measure them on both splits, save `final.pt`, and fill the row."""
    kept_columns = {}
    if record.load_kept(model):
        if spec.method == "qar":  # deploy the codebook: snap, and say what it cost
            kept_columns.update(_snap(model, data, device))
            record.best = cpu_state(model)
        kept_columns.update(_kept_model_metrics(model, data))
        why = degenerate_reason(kept_columns["train_loss"], kept_columns["train_acc"],
                                data.num_classes, len(data.train_x))  # fmt: skip
        if status == schema.STATUS_OK and why:
            status, reason = schema.STATUS_DEGENERATE, why
        kept_columns["steps"] = [{"model_id": spec.model_id, **s} for s in step_sizes(model)]
        if store is not None:
            kept_columns["final_ckpt"] = store.save(schema.FINAL_CKPT, record.best)
    result = {
        **record.row(spec, status, reason, model, device),
        "num_train": len(data.train_x),
        "num_classes": data.num_classes,
        "in_channels": data.in_channels,
        "image_size": data.image_size,
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        **kept_columns,
    }
    if store is not None:
        result["init_ckpt"] = store.rel(schema.INIT_CKPT)
    result["seconds"] = time.time() - start
    return result


def _snap(model: nn.Module, data: ImageData, device: torch.device) -> dict:
    """QAR: snap every weight to its layer's codebook; test accuracy before / after."""
    from qgen_ray.quant import evaluate_snap

    dtype = next(model.parameters()).dtype
    x, y = data.normalize(data.test_x.to(device)).to(dtype), data.test_y.to(device)
    snap = evaluate_snap(model, x, y)
    return {
        "test_acc_before_snap": snap["acc_before"],
        "snap_acc_drop": snap["acc_drop"],
        "compression_ratio": snap["compression_ratio"],
    }


def _kept_model_metrics(model: nn.Module, data: ImageData) -> dict:
    """Train/test loss and accuracy of the kept model, and both generalization gaps."""
    return kept_metrics(
        evaluate(model, data.train_x, data.train_y, data.normalize),
        evaluate(model, data.test_x, data.test_y, data.normalize),
    )


__all__ = [
    "DTYPES",
    "Diverged",
    "Run",
    "finish_row",
    "start_run",
    "make_optimizer",
    "make_scheduler",
    "resolve_device",
    "resolve_dtype",
    "train",
]
