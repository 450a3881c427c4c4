"""One fine-tuning run on one worker: plain PyTorch and torch.distributed, no Ray in here.

`finetune(spec, options, device)` runs on every rank of a process group (or alone, when
none is initialized): it builds the model from pretrained weights, quantizes it
(`spec.method`: LSQ for CNNs, VVTQ for ViTs), wraps it in DistributedDataParallel, and
trains `spec.epochs` epochs on this rank's shard of the ImageFolder; the Ray Train
adapter (`qgen_ray.ray.ddp`) only supplies the process group, the device and `report`.

Protocol (docs/method.md §7) as in the population studies: `spec.batch_size` is the global
batch (each of w ranks takes batch_size / w); the training loss of an epoch is the mean
of its minibatch losses over all ranks; the kept weights are those of the epoch with the
lowest training loss; the kept model is measured in eval mode without augmentation on
the full train and val splits (every image once, sharded over the ranks).

Rank 0 writes, through the study store: `init.pt` (the weights at step 0: pretrained and
quantized), `last.pt` every `checkpoint_every` epochs (the whole state: a killed run
resumes from it on every rank), `final.pt` (the kept weights) and `result.json` (the row
of `trials.parquet`, with history and learned steps). On a GPU the forward pass runs under
bf16 autocast with channels-last tensors (`fast_path`); on a CPU both are off.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from qgen_ray import schema
from qgen_ray.errors import UserError
from qgen_ray.imagenet.imagefolder import (
    check_imagefolder,
    image_folder,
    loader_workers,
    make_loader,
)
from qgen_ray.quant import QuantTerms
from qgen_ray.spec import TrainSpec
from qgen_ray.store import StudyStore, TrialStore
from qgen_ray.train.build import build_model
from qgen_ray.train.epochs import EpochRecord, kept_metrics
from qgen_ray.train.loop import Diverged, make_optimizer, make_scheduler

SAMPLES_DIR = "samples"  # trials/<model_id>/samples/epochNNNN-rankR.json (log_samples)
EVAL_BATCH_FACTOR = 2  # evaluation batch = this x the per-rank training batch (memory only)


@dataclass(frozen=True)
class FinetuneOptions:
    """How one fine-tuning run is executed: never part of the model id.

    store: URI of the study store. data_root: folder with train/ and val/ ImageFolders.
    weights: local state dict to start from; pretrained_from_hub: start from the
    torchvision / timm published weights instead. cpus_per_worker: CPUs each rank holds
    (sizes its DataLoader processes and torch threads). checkpoint_every: epochs between
    `last.pt` writes. log_samples: write the image indices each rank trained on, per
    epoch (a check that the shards are disjoint). extra: more columns for the row.
    """

    store: str
    data_root: str
    weights: str | None = None
    pretrained_from_hub: bool = False
    cpus_per_worker: float = 1.0
    checkpoint_every: int = 1
    log_samples: bool = False
    extra: dict = field(default_factory=dict)


def world() -> tuple[int, int]:
    """(rank, world size) of the process group; (0, 1) when there is none."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_reduce(values: list[float], device: torch.device, op=None) -> list[float]:
    """Sum (or `op`) of each value over all ranks; the values themselves without a group."""
    if world()[1] == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
    return t.tolist()


def fast_path(device: torch.device) -> bool:
    """bf16 autocast and channels-last memory format: on CUDA only."""
    return device.type == "cuda"


def _autocast(device: torch.device):
    if fast_path(device):
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    x = x.to(device, non_blocking=True)
    return x.contiguous(memory_format=torch.channels_last) if fast_path(device) else x


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """Augmentation seed of one rank's epoch: a resumed run draws the same crops."""
    return (seed * 1_000_003 + epoch) * 1_009 + rank


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) of the two softmax distributions, mean over the batch: the
    online distillation term (temperature 1, weight 1, added to the cross-entropy)."""
    return F.kl_div(F.log_softmax(student_logits.float(), 1),
                    F.log_softmax(teacher_logits.float(), 1), log_target=True,
                    reduction="batchmean")  # fmt: skip


def train_epoch(
    model: nn.Module,
    loader,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    epoch: int,
    epochs: int,
    keep_indices: bool = False,
    terms=None,
    teacher: nn.Module | None = None,
) -> dict:
    """One pass over this rank's shard. Returns the epoch's loss, accuracy and image count
    summed over all ranks (mean loss = loss_sum / images: the cross-entropy, without the
    regularizer or distillation terms), the seconds it took, and (with `keep_indices`)
    the dataset indices this rank trained on. `terms`: the model's `QuantTerms` (built
    here when not given). `teacher`: a frozen model whose softmax the student is also
    pulled toward (`distillation_loss`)."""
    terms = terms or QuantTerms(model)
    model.train()
    t0 = time.time()
    steps = len(loader)
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)  # on device: no sync
    correct = torch.zeros((), device=device, dtype=torch.int64)
    count, seen = 0, []
    for step, (x, y, index) in enumerate(loader):
        x, y = _to_device(x, device), y.to(device, non_blocking=True)
        progress = min(1.0, ((epoch - 1) * steps + step) / (epochs * steps))
        with _autocast(device):
            logits = model(x)
            loss = F.cross_entropy(logits, y)
            extra = terms.regularizer(progress)
            if teacher is not None:
                with torch.no_grad():
                    teacher_logits = teacher(x)
                extra = extra + distillation_loss(logits, teacher_logits)
        optimizer.zero_grad(set_to_none=True)
        (loss + extra).backward()
        optimizer.step()
        terms.clamp_steps_()
        loss_sum += loss.detach().double() * len(y)
        correct += (logits.argmax(1) == y).sum()
        count += len(y)
        if keep_indices:
            seen.extend(index.tolist())
    total_loss, total_correct, total = all_reduce(
        [float(loss_sum), float(correct), float(count)], device
    )
    return {
        "loss_sum": total_loss,
        "correct": total_correct,
        "images": int(total),
        "seconds": time.time() - t0,
        "indices": seen,
    }


@torch.no_grad()
def evaluate_loader(model: nn.Module, loader, device: torch.device) -> tuple[float, float]:
    """(mean loss, accuracy) over every rank's shard, eval mode. Pass the unwrapped model:
    ranks may hold different numbers of batches, and DDP's forward would wait for peers.
    Batches are (images, labels) or (images, labels, indices)."""
    was_training = model.training
    model.eval()
    loss_sum, correct, count = 0.0, 0, 0
    for x, y, *_ in loader:
        x, y = _to_device(x, device), y.to(device, non_blocking=True)
        with _autocast(device):
            logits = model(x)
        loss_sum += float(F.cross_entropy(logits.float(), y, reduction="sum"))
        correct += int((logits.argmax(1) == y).sum())
        count += len(y)
    model.train(was_training)
    loss_sum, correct, count = all_reduce([loss_sum, correct, count], device)
    return loss_sum / count, correct / count


def _wrap(model: nn.Module, device: torch.device) -> nn.Module:
    """DistributedDataParallel when a process group exists (parameters are broadcast from
    rank 0 here), the model itself otherwise."""
    if not (dist.is_available() and dist.is_initialized()):
        return model
    return DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None
    )


def init_weights_label(options: FinetuneOptions) -> str:
    """Where the starting weights came from, for the row (provenance, not hashed)."""
    if options.weights:
        return f"file:{os.path.basename(options.weights)}"
    return "hub" if options.pretrained_from_hub else "none"


@dataclass
class _Run:
    """The training state of one rank: model, optimizer, schedule, the epoch record and
    the model's quantization terms."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    record: EpochRecord
    terms: QuantTerms
    teacher: nn.Module | None = None


def _start(
    spec: TrainSpec, options: FinetuneOptions, trial: TrialStore, num_classes: int, device
) -> _Run:
    """The model from pretrained weights, quantized; or the state of `last.pt` when the
    run was interrupted (then the weights file is not read again)."""
    resume = trial.has(schema.LAST_CKPT)
    torch.manual_seed(spec.seed)
    model = build_model(
        spec,
        num_classes,
        3,
        spec.image_size,
        weights=None if resume else options.weights,
        pretrained=options.pretrained_from_hub and not resume,
    ).to(device)
    if fast_path(device):
        model = model.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(spec, model)
    scheduler = make_scheduler(spec, optimizer)
    record, _ = EpochRecord.start(
        trial, model, optimizer, scheduler, write_init=world()[0] == 0, map_location=device
    )
    return _Run(
        model,
        optimizer,
        scheduler,
        record,
        QuantTerms(model),
        _teacher(spec, options, num_classes, device),
    )


PUBLISHED_CLASSES = 1000  # the head of the libraries' published ImageNet weights


def check_teacher(model: str, weights: str | None, num_classes: int) -> None:
    """Distillation's teacher is the FP32 model of the starting weights as they are, head
    included: they must classify the study's `num_classes` classes (a head dropped for
    another class count would be a random teacher). `weights`: the local file, or None for
    the published weights."""
    from qgen_ray.models import MODELS
    from qgen_ray.models.weights import head_classes, read_weights_file, strip_prefixes

    classes = PUBLISHED_CLASSES
    if weights is not None:
        classes = head_classes(strip_prefixes(read_weights_file(weights)), MODELS.get(model).head)
    if classes != num_classes:
        raise UserError(
            f"--distill needs a teacher of these {num_classes} classes, but the starting "
            f"weights of {model} have a {classes}-class head; pass --weights {model}=PATH of "
            "an FP32 model fine-tuned on these classes, or drop --distill"
        )


def _teacher(
    spec: TrainSpec, options: FinetuneOptions, num_classes: int, device
) -> nn.Module | None:
    """The frozen FP32 model of the student's starting weights (`spec.distill`), eval mode,
    every weight from them (`check_teacher`); rebuilt from those weights on resume."""
    if not spec.distill:
        return None
    from dataclasses import replace

    check_teacher(spec.model, options.weights, num_classes)
    fp32 = replace(spec, method="fp32", bits=32, distill=False)
    teacher = build_model(fp32, num_classes, 3, spec.image_size, weights=options.weights,
                          pretrained=options.pretrained_from_hub).to(device)  # fmt: skip
    teacher.eval().requires_grad_(False)
    return teacher


def _log_samples(trial: TrialStore, epoch: int, indices: list[int]) -> None:
    rank, world_size = world()
    record = {"epoch": epoch, "rank": rank, "world_size": world_size, "pid": os.getpid()}
    rel = f"{trial.prefix}/{SAMPLES_DIR}/epoch{epoch:04d}-rank{rank}.json"
    trial.study.write_json(rel, {**record, "indices": indices})


def finetune(
    spec: TrainSpec,
    options: FinetuneOptions,
    device: torch.device,
    report: Callable[[dict], None] | None = None,
) -> dict | None:
    """Fine-tune one model on this rank; rank 0 writes and returns the result row.

    `report(metrics)` is called on every rank once per epoch with the same (all-reduced)
    metrics. Resumes from the store's `last.pt` when there is one.
    """
    start = time.time()
    rank, world_size = world()
    if spec.batch_size % world_size or spec.image_size is None:
        raise UserError(
            f"{spec.model}: needs image_size (got {spec.image_size}) and a global batch "
            f"({spec.batch_size}) divisible by the {world_size} workers"
        )
    torch.set_num_threads(max(1, int(options.cpus_per_worker)))
    trial = StudyStore(options.store).trial(spec.model_id)
    classes = check_imagefolder(options.data_root)
    run = _start(spec, options, trial, len(classes), device)
    ddp_model = _wrap(run.model, device)

    loader_args = {
        "rank": rank,
        "world_size": world_size,
        "num_workers": loader_workers(options.cpus_per_worker),
        "pin_memory": device.type == "cuda",
    }
    per_rank = spec.batch_size // world_size
    train_set = image_folder(
        options.data_root, "train", spec.image_size, spec.augment, model=spec.model
    )
    if len(train_set) < world_size:
        raise UserError(
            f"{options.data_root}/train has {len(train_set)} images, fewer than the "
            f"{world_size} workers; use fewer --workers"
        )
    loader = make_loader(train_set, per_rank, train=True, seed=spec.seed, **loader_args)

    record, status, reason = run.record, schema.STATUS_OK, ""
    try:
        for epoch in range(record.epoch + 1, spec.epochs + 1):
            seed = epoch_seed(spec.seed, epoch, rank)
            torch.manual_seed(seed)  # transforms in this process (no loader workers)
            loader.generator.manual_seed(seed)  # seeds of loader worker processes
            loader.sampler.set_epoch(epoch)
            lr = run.optimizer.param_groups[0]["lr"]
            keep = options.log_samples
            stats = train_epoch(
                ddp_model, loader, run.optimizer, device, epoch, spec.epochs, keep, run.terms,
                run.teacher,
            )  # fmt: skip
            run.scheduler.step()
            if not math.isfinite(stats["loss_sum"]):
                raise Diverged(f"non-finite training loss in epoch {epoch}")
            row = {
                "epoch": epoch,
                "train_loss": stats["loss_sum"] / stats["images"],
                "train_acc": stats["correct"] / stats["images"],
                "lr": lr,
                "seconds": stats["seconds"],
                "images_per_s": stats["images"] / stats["seconds"],
            }
            record.observe(row, run.model)
            if options.log_samples:
                _log_samples(trial, epoch, stats["indices"])
            if rank == 0 and record.checkpoint_due(options.checkpoint_every, spec.epochs):
                record.save_last(trial, run.model, run.optimizer, run.scheduler)
            if report is not None:
                report({**row, "best_epoch": record.best_epoch})
    except Diverged as err:
        status, reason = schema.STATUS_DIVERGED, str(err)

    metrics = {}
    if record.load_kept(run.model):
        metrics = _kept_model_metrics(
            run.model,
            spec,
            options.data_root,
            per_rank * EVAL_BATCH_FACTOR,
            loader_args,
            device,
        )
    if rank != 0:
        return None
    from qgen_ray.quant import step_sizes

    history = record.history
    result = {
        **record.row(spec, status, reason, run.model, device),
        **metrics,
        "in_channels": 3,
        "image_size": spec.image_size,
        "images_per_s": _mean([h["images_per_s"] for h in history[1:] or history]),
        "init_weights": init_weights_label(options),
        "resumed_from": record.resumed_from,
        "num_train": len(train_set),
        "num_classes": len(classes),
        "workers": world_size,
        **options.extra,
    }
    if record.best is not None:
        result["steps"] = [{"model_id": spec.model_id, **s} for s in step_sizes(run.model)]
        result["final_ckpt"] = trial.save(schema.FINAL_CKPT, record.best)
    result["init_ckpt"] = trial.rel(schema.INIT_CKPT)
    result["seconds"] = time.time() - start
    trial.write_result(result)
    return result


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def _kept_model_metrics(
    model: nn.Module, spec: TrainSpec, root: str, batch: int, loader_args: dict, device
) -> dict:
    """Train/val loss and accuracy of the kept model (its eval transform), and both gaps."""
    splits = []
    for split in ("train", "val"):
        data = image_folder(root, split, spec.image_size, augment=False, model=spec.model)
        loader = make_loader(data, batch, train=False, seed=0, **loader_args)
        splits.append(evaluate_loader(model, loader, device))
    return kept_metrics(*splits)


__all__ = [
    "FinetuneOptions",
    "all_reduce",
    "epoch_seed",
    "evaluate_loader",
    "fast_path",
    "finetune",
    "train_epoch",
    "world",
]
