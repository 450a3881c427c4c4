"""`TrainSpec`: the scientific settings of one model, frozen and hashed into its id.

The id is a stable hash of the fields that change what model comes out (dataset, model,
hyperparameters, precision, protocol, seed) and never of run options (paths, devices,
packing, Ray resources), so the same model always has the same id and a re-run of a
study knows what is already done. Run options live in `RunOptions`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, fields

from qgen_ray.errors import UserError

OPTIMIZERS = ("sgd", "adam", "rmsprop", "adamw")
LR_SCHEDULES = ("multistep", "cosine")  # see qgen_ray.train.loop.make_scheduler

# Fields added after the first studies were run: hashed into `model_id` only when set away
# from this default, so every id computed before they existed stays valid.
LATE_FIELD_DEFAULTS = {
    "lr_schedule": "multistep",
    "image_size": None,
    "val_fraction": None,
    "distill": False,
}


@dataclass(frozen=True)
class TrainSpec:
    """One model under one training protocol (docs/method.md §2). Every field is science."""

    dataset: str  # data registry name ("digits", "cifar10", "cifar100", "imagenet")
    model: str  # model registry name ("nin", "resnet18_cifar", ...)
    optimizer: str = "sgd"  # "sgd" (momentum 0.9) | "adam" | "rmsprop" | "adamw" (ViTs)
    lr: float = 0.1  # initial learning rate
    weight_decay: float = 0.0  # L2 coefficient on weights (never on quantizer steps)
    width: int | None = None  # NiN width multiplier: 25 * width channels per block
    depth: int | None = None  # NiN depth multiplier: number of stride-2 blocks
    bits: int = 32  # 32 = FP32; 2..8 = quantized weights
    method: str = "fp32"  # "fp32" | "lsq" | "vvtq" | "qar"
    epochs: int = 300  # paper: 300 for NiN, 200 for CIFAR ResNets
    batch_size: int = 128  # paper: 128
    milestones: tuple[int, ...] = (100, 200)  # epochs at which lr is multiplied by gamma
    gamma: float = 0.1  # multistep lr factor (paper: x0.1)
    momentum: float = 0.9  # SGD momentum (paper: 0.9); unused by Adam / RMSProp
    augment: bool = True  # the dataset's training augmentation (CIFAR: crop + flip)
    seed: int = 0  # weights init, batch order and augmentation
    model_kwargs: tuple[tuple[str, object], ...] = ()  # extra model arguments, sorted pairs
    quant_policy: str = "first_last_8bit"  # qgen_ray.quant.QuantPolicy name
    lr_schedule: str = "multistep"  # "multistep" (milestones, gamma) | "cosine" (to 0 at epochs)
    image_size: int | None = None  # input side in pixels for on-disk datasets (ImageFolder
    # crops); None = the dataset's own size (digits, CIFAR)
    val_fraction: float | None = None  # search studies: this share of the training set,
    # stratified and seeded by `seed`, is held out as the validation split (never trained on)
    distill: bool = False  # fine-tuning: online knowledge distillation from the frozen FP32
    # model of the same starting weights (VVTQ's cheap substitute for multi-crop soft labels)

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise UserError(
                f"unknown optimizer {self.optimizer!r}; valid names: {', '.join(OPTIMIZERS)}"
            )
        if self.method == "fp32" and self.bits != 32:
            raise UserError(f"method 'fp32' needs bits=32, got {self.bits}; use method 'lsq'")
        if self.method != "fp32" and not 2 <= self.bits <= 8:
            raise UserError(
                f"bits={self.bits} is outside 2..8 for method {self.method!r}; "
                "use 2..8, or bits=32 with method 'fp32'"
            )
        if self.lr_schedule not in LR_SCHEDULES:
            raise UserError(
                f"unknown lr_schedule {self.lr_schedule!r}; valid: {', '.join(LR_SCHEDULES)}"
            )
        if self.image_size is not None and self.image_size < 1:
            raise UserError(f"image_size must be a positive pixel count, got {self.image_size}")
        if self.distill and self.method == "fp32":
            raise UserError("distill=True teaches a quantized model; an FP32 model has no teacher")
        if self.val_fraction is not None and not 0 < self.val_fraction < 1:
            raise UserError(f"val_fraction must be in (0, 1), got {self.val_fraction}")
        if self.epochs < 1 or self.batch_size < 1:
            raise UserError("epochs and batch_size must be positive integers")

    @property
    def model_id(self) -> str:
        """Stable 16-hex-digit hash of every field (all fields are scientific); a field of
        `LATE_FIELD_DEFAULTS` counts only when it differs from its default."""
        d = {
            k: v
            for k, v in self.to_dict().items()
            if k not in LATE_FIELD_DEFAULTS or v != LATE_FIELD_DEFAULTS[k]
        }
        blob = json.dumps(d, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    @property
    def model_arguments(self) -> dict:
        """Keyword arguments for `qgen_ray.models.create_model` beyond the class count."""
        kwargs = dict(self.model_kwargs)
        if self.width is not None:
            kwargs["width"] = self.width
        if self.depth is not None:
            kwargs["depth"] = self.depth
        return kwargs

    def to_dict(self) -> dict:
        d = asdict(self)
        d["milestones"] = list(self.milestones)
        d["model_kwargs"] = [list(kv) for kv in self.model_kwargs]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> TrainSpec:
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise UserError(
                f"unknown hyperparameter(s) {', '.join(unknown)}; valid: {', '.join(sorted(names))}"
            )
        d = dict(d)
        if "milestones" in d:
            d["milestones"] = tuple(int(m) for m in d["milestones"])
        if "model_kwargs" in d:
            kw = d["model_kwargs"]
            items = kw.items() if isinstance(kw, dict) else kw
            d["model_kwargs"] = tuple(sorted((str(k), v) for k, v in items))
        return cls(**d)


@dataclass(frozen=True)
class RunOptions:
    """How a spec is run: never part of the model id."""

    device: str = "auto"  # "auto" = cuda when available, else cpu
    checkpoint_every: int = 1  # epochs between resumable checkpoints (last.pt)
    dtype: str = "float32"  # "float32" | "float64" (reproducible: thread-count independent)
    # The GPU fast paths, in the fused trainer only (`train.pack`; `train` stays the plain
    # reference they are tested against): bfloat16 autocast of the forward ("bf16"),
    # channels-last tensors, and `torch.compile` of the fused forward.
    amp: str = "off"  # "off" | "bf16"
    channels_last: bool = False
    compile: bool = False
    # Search trials: evaluate the held-out split after every epoch and report it as
    # val_loss / val_acc (eval mode, no gradient: the training itself is unchanged).
    validate_each_epoch: bool = False

    @property
    def fast_paths(self) -> bool:
        """Whether a fast path is asked for (then even one model trains fused)."""
        return self.amp != "off" or self.channels_last or self.compile


def row_header(spec: TrainSpec, status: str, reason: str = "") -> dict:
    """The first columns of a trials.parquet row: id, hyperparameters, protocol, status."""
    from qgen_ray import schema

    return {
        "model_id": spec.model_id,
        **{k: getattr(spec, k) for k in schema.HPARAM_COLUMNS},
        "epochs": spec.epochs,
        "batch_size": spec.batch_size,
        "status": status,
        "reason": reason,
    }
