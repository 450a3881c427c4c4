"""The paper's epoch protocol, written once for every training loop (docs/method.md §2.3).

An `EpochRecord` follows one model through its epochs: it records each finished epoch's
row, keeps the weights of the epoch with the lowest training loss (a tie keeps the
earlier epoch; no test data is used to choose), knows when `last.pt` is due, writes it
with the whole training state and restores it, and builds the part of the result row
that every loop shares. The population loop (`train.loop`), the ImageNet fine-tuning loop
(`train.finetune`) and any later loop use it, so the rule that decides which weights a
study reports lives here only.
"""

from __future__ import annotations

import math
import platform
from dataclasses import dataclass, field
from datetime import datetime, timezone

import torch
from torch import nn

from qgen_ray import schema
from qgen_ray.errors import DamagedFile
from qgen_ray.provenance import provenance
from qgen_ray.spec import TrainSpec, row_header
from qgen_ray.store import TrialStore

# The kept model's numbers in the result row (NaN when no epoch finished).
KEPT_METRICS = ("train_loss", "train_acc", "test_loss", "test_acc", "gap_loss", "gap_acc")


def cpu_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of the model's state dict on the CPU (never a view of the live weights)."""
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def kept_metrics(train: tuple[float, float], test: tuple[float, float]) -> dict:
    """The kept model's (loss, accuracy) on the training and test sets, and both gaps:
    gap_loss = test − train loss, gap_acc = train − test accuracy."""
    (train_loss, train_acc), (test_loss, test_acc) = train, test
    return {
        "train_loss": train_loss,
        "train_acc": train_acc,
        "test_loss": test_loss,
        "test_acc": test_acc,
        "gap_loss": test_loss - train_loss,
        "gap_acc": train_acc - test_acc,
    }


def degenerate_reason(train_loss: float, train_acc: float, num_classes: int, n: int) -> str:
    """Why a finished model is no better than a constant guess, or "": its training loss
    is above ln(classes) (a uniform prediction's) and its training accuracy within 3
    binomial standard errors of chance (1 / classes over n images)."""
    chance = 1.0 / num_classes
    bar = chance + 3 * math.sqrt(chance * (1 - chance) / max(n, 1))
    if train_loss > math.log(num_classes) and train_acc <= bar:
        return (
            f"kept model at chance: training loss {train_loss:.4g} > ln({num_classes}) = "
            f"{math.log(num_classes):.3f} and training accuracy {train_acc:.3f} <= {bar:.3f}"
        )
    return ""


def device_label(device: torch.device) -> str:
    """What the row says ran the model: "cpu", or the GPU's name."""
    return str(device) if device.type != "cuda" else torch.cuda.get_device_name(device)


def _readable_last(trial: TrialStore | None, map_location) -> dict | None:
    """The trial's `last.pt`, or None when there is none or it is damaged (then set aside:
    training starts again from the initial weights, which the seed rebuilds)."""
    if trial is None or not trial.has(schema.LAST_CKPT):
        return None
    try:
        return trial.load(schema.LAST_CKPT, map_location=map_location)
    except DamagedFile as err:
        trial.study.set_aside(err, "training starts again from epoch 0")
        return None


@dataclass
class EpochRecord:
    """Epochs done, the kept (lowest training loss) epoch with its weights, the history.

    `epoch`, `best_loss`, `best_epoch`, `best` and `history` are what `last.pt` keeps
    beside the state dicts; `resumed_from` is the epoch of the `last.pt` this process
    started from (0: a fresh run)."""

    epoch: int = 0
    best_loss: float = math.inf
    best_epoch: int = 0
    best: dict[str, torch.Tensor] | None = None
    history: list[dict] = field(default_factory=list)
    resumed_from: int = 0

    SAVED = ("epoch", "best_loss", "best_epoch", "best", "history")

    # -- start: fresh (init.pt) or resumed (last.pt) ---------------------------------
    @classmethod
    def start(
        cls,
        trial: TrialStore | None,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        *,
        write_init: bool = True,
        map_location=None,
    ) -> tuple[EpochRecord, dict]:
        """Resume from the trial's `last.pt` when there is one (model, optimizer and
        schedule restored); otherwise a fresh record, saving the initial weights as
        `init.pt` when `write_init`. Returns the record and the checkpoint's extra state
        (what `checkpoint(**extra)` saved; empty for a fresh run)."""
        ckpt = _readable_last(trial, map_location)
        if ckpt is not None:
            if write_init and not trial.has(schema.INIT_CKPT):  # the model is still at init
                trial.save(schema.INIT_CKPT, cpu_state(model))
            model.load_state_dict(ckpt.pop("model"))
            optimizer.load_state_dict(ckpt.pop("optimizer"))
            scheduler.load_state_dict(ckpt.pop("scheduler"))
            record = cls(**{k: ckpt.pop(k) for k in cls.SAVED})
            record.resumed_from = record.epoch
            return record, ckpt
        if trial is not None and write_init:
            trial.save(schema.INIT_CKPT, cpu_state(model))
        return cls(), {}

    # -- each epoch ------------------------------------------------------------------
    def observe(self, row: dict, model: nn.Module) -> None:
        """Record a finished epoch (`row` has at least "epoch" and "train_loss"); keep a
        copy of the weights when its training loss is the lowest so far."""
        self.history.append(row)
        if row["train_loss"] < self.best_loss:
            self.best_loss, self.best_epoch = row["train_loss"], row["epoch"]
            self.best = cpu_state(model)
        self.epoch = row["epoch"]

    def checkpoint_due(self, every: int, epochs: int) -> bool:
        """`last.pt` is written every `every` epochs and after the last one."""
        return self.epoch % every == 0 or self.epoch == epochs

    def save_last(
        self,
        trial: TrialStore,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        **extra,
    ) -> None:
        """Write `last.pt`: this record, the three state dicts and `extra` (e.g. the
        batch-order generator's state), enough for a killed run to continue exactly."""
        trial.save(
            schema.LAST_CKPT,
            {
                **{k: getattr(self, k) for k in self.SAVED},
                "model": cpu_state(model),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                **extra,
            },
        )

    # -- the end ---------------------------------------------------------------------
    def load_kept(self, model: nn.Module) -> bool:
        """Load the kept epoch's weights into `model`; False when no epoch finished."""
        if self.best is None:
            return False
        model.load_state_dict(self.best)
        return True

    def row(self, spec: TrainSpec, status: str, reason: str, model: nn.Module, device) -> dict:
        """The result row's shared part (schema.TRIALS_COLUMNS less what the loop adds):
        the spec's columns, status, kept and run epochs, parameter count, device, the
        history rows, the spec itself and provenance. The kept model's metrics start as
        NaN; the loop fills them."""
        from qgen_ray.quant import unwrap

        return {
            **row_header(spec, status, reason),
            **dict.fromkeys(KEPT_METRICS, math.nan),
            "best_epoch": self.best_epoch,
            "epochs_run": self.epoch,
            "num_params": sum(p.numel() for p in unwrap(model).parameters()),
            "device": device_label(device),
            "history": [{"model_id": spec.model_id, **h} for h in self.history],
            "steps": [],
            "spec": spec.to_dict(),
            **provenance(),
            "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "host": platform.node(),
        }


__all__ = ["KEPT_METRICS", "EpochRecord", "cpu_state", "device_label", "kept_metrics"]
