"""`train(spec, data) -> result`: one model under the paper protocol. No Ray in here.

Protocol (METHOD.md §2): minibatch SGD-family training for `spec.epochs` epochs with a
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
import platform
import time
from collections.abc import Callable
from datetime import datetime, timezone

import torch
import torch.nn.functional as F
from torch import nn

from qgen_ray import schema
from qgen_ray.data.base import ImageData
from qgen_ray.errors import UserError
from qgen_ray.provenance import provenance
from qgen_ray.spec import RunOptions, TrainSpec, row_header
from qgen_ray.store import TrialStore
from qgen_ray.train.build import build_model
from qgen_ray.train.evaluate import evaluate


class Diverged(Exception):
    """The training loss became non-finite."""


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def make_optimizer(spec: TrainSpec, model: nn.Module) -> torch.optim.Optimizer:
    """The spec's optimizer. Weight decay applies to network parameters, never to the
    quantizers' steps or codebooks (our choice, as in most LSQ implementations)."""
    from qgen_ray.quant import quantizer_parameters

    quant = {id(p) for p in quantizer_parameters(model)}
    groups = [
        {"params": [p for p in model.parameters() if id(p) not in quant]},
        {"params": [p for p in model.parameters() if id(p) in quant], "weight_decay": 0.0},
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


def _cpu_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


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
    from qgen_ray.quant import clamp_steps_, quant_regularizer, step_sizes

    start = time.time()
    device = resolve_device(options.device)
    torch.manual_seed(spec.seed)
    model = build_model(spec, data.num_classes, data.in_channels, data.image_size).to(device)
    optimizer = make_optimizer(spec, model)
    scheduler = make_scheduler(spec, optimizer)
    generator = torch.Generator().manual_seed(spec.seed)
    state = {"epoch": 0, "best_loss": math.inf, "best_epoch": 0, "best": None, "history": []}

    if store is not None and store.has(schema.LAST_CKPT):
        ckpt = store.load(schema.LAST_CKPT)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        generator.set_state(ckpt["generator"])
        state = {k: ckpt[k] for k in state}
    elif store is not None:
        store.save(schema.INIT_CKPT, _cpu_state(model))

    train_x, train_y = data.train_x.to(device), data.train_y.to(device)
    n, steps_per_epoch = len(train_x), math.ceil(len(train_x) / spec.batch_size)
    status, reason = schema.STATUS_OK, ""
    model.train()
    try:
        for epoch in range(state["epoch"] + 1, spec.epochs + 1):
            t0 = time.time()
            lr = optimizer.param_groups[0]["lr"]  # the rate this epoch trains at
            order = torch.randperm(n, generator=generator).to(device)
            loss_sum = torch.zeros((), device=device)  # summed on device: no per-step sync
            correct = torch.zeros((), device=device, dtype=torch.int64)
            for step in range(steps_per_epoch):
                idx = order[step * spec.batch_size : (step + 1) * spec.batch_size]
                xb = train_x[idx]
                if spec.augment:
                    xb = data.augment(xb, generator)
                xb = data.normalize(xb)
                logits = model(xb)
                progress = ((epoch - 1) * steps_per_epoch + step) / (spec.epochs * steps_per_epoch)
                loss = F.cross_entropy(logits, train_y[idx])
                optimizer.zero_grad(set_to_none=True)
                (loss + quant_regularizer(model, progress)).backward()
                optimizer.step()
                clamp_steps_(model)
                loss_sum += loss.detach() * len(idx)
                correct += (logits.argmax(1) == train_y[idx]).sum()
            scheduler.step()
            if not torch.isfinite(loss_sum):  # checked once per epoch (one device sync)
                raise Diverged(f"non-finite training loss in epoch {epoch}")
            epoch_loss = float(loss_sum) / n
            row = {
                "epoch": epoch,
                "train_loss": epoch_loss,
                "train_acc": int(correct) / n,
                "lr": lr,
                "seconds": time.time() - t0,
            }
            state["history"].append(row)
            if epoch_loss < state["best_loss"]:
                state.update(best_loss=epoch_loss, best_epoch=epoch, best=_cpu_state(model))
            state["epoch"] = epoch
            if store is not None and (
                epoch % options.checkpoint_every == 0 or epoch == spec.epochs
            ):
                store.save(
                    schema.LAST_CKPT,
                    {
                        **state,
                        "model": _cpu_state(model),
                        "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(),
                        "generator": generator.get_state(),
                    },
                )
            if report is not None:
                report({**row, "best_epoch": state["best_epoch"]})
    except Diverged as err:
        status, reason = schema.STATUS_DIVERGED, str(err)

    result = {
        **row_header(spec, status, reason),
        "best_epoch": state["best_epoch"],
        "epochs_run": state["epoch"],
        "num_train": n,
        "num_params": sum(p.numel() for p in model.parameters()),
        "num_classes": data.num_classes,
        "in_channels": data.in_channels,
        "image_size": data.image_size,
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "history": [{"model_id": spec.model_id, **h} for h in state["history"]],
        "steps": [],
        "spec": spec.to_dict(),
        **provenance(),
    }
    metrics = dict.fromkeys(
        ["train_loss", "train_acc", "test_loss", "test_acc", "gap_loss", "gap_acc"], math.nan
    )
    if state["best"] is not None:
        model.load_state_dict(state["best"])
        if spec.method == "qar":  # deploy the codebook: snap, and say what it cost
            result.update(_snap(model, data, device))
            state["best"] = _cpu_state(model)
        metrics.update(_measure(model, data, device))
        result["steps"] = [{"model_id": spec.model_id, **s} for s in step_sizes(model)]
        if store is not None:
            result["final_ckpt"] = store.save(schema.FINAL_CKPT, state["best"])
    if store is not None:
        result["init_ckpt"] = store.rel(schema.INIT_CKPT)
    result.update(metrics)
    result["seconds"] = time.time() - start
    result["finished_at"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    result["host"] = platform.node()
    return result


def _snap(model: nn.Module, data: ImageData, device: torch.device) -> dict:
    """QAR: snap every weight to its layer's codebook; test accuracy before / after."""
    from qgen_ray.quant import evaluate_snap

    x, y = data.normalize(data.test_x.to(device)), data.test_y.to(device)
    snap = evaluate_snap(model, x, y)
    return {
        "test_acc_before_snap": snap["acc_before"],
        "snap_acc_drop": snap["acc_drop"],
        "compression_ratio": snap["compression_ratio"],
    }


def _measure(model: nn.Module, data: ImageData, device: torch.device) -> dict:
    """Train/test loss and accuracy of the kept model, and both generalization gaps."""
    train_loss, train_acc = evaluate(model, data.train_x, data.train_y, data.normalize)
    test_loss, test_acc = evaluate(model, data.test_x, data.test_y, data.normalize)
    return {
        "train_loss": train_loss,
        "train_acc": train_acc,
        "test_loss": test_loss,
        "test_acc": test_acc,
        "gap_loss": test_loss - train_loss,
        "gap_acc": train_acc - test_acc,
    }


__all__ = ["Diverged", "make_optimizer", "make_scheduler", "resolve_device", "train"]
