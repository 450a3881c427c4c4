"""A study: a declared grid of models, expanded into frozen `TrainSpec`s.

A study script (studies/<name>.py) builds one `Study` and hands it to
`qgen_ray.pipeline.study_cli.main`. The grid maps hyperparameter names (TrainSpec fields) to
lists of values; `lr` may instead map each optimizer to its own list (the paper's NiN
grid: SGD {0.1, 0.05, 0.01}, Adam / RMSProp {1e-3, 5e-4, 1e-4}), in which case the
position of the value in its list is recorded as `lr_rank`, the granulated-Kendall axis
that lets optimizers be compared at "the same" learning rate.
"""

from __future__ import annotations

import inspect
import itertools
from dataclasses import dataclass, field, replace

from qgen_ray.errors import UserError
from qgen_ray.spec import TrainSpec

# Precisions as (method, bits). FP32 is no quantizer at all.
PAPER_PRECISIONS = (("fp32", 32), ("lsq", 8), ("lsq", 4), ("lsq", 2))

# What a study can run, in order: training, then the follow-up stages (qgen_ray.pipeline.followups).
STAGES = ("train", "measure", "corrupt", "landscape", "report")
# Parameters of a follow-up stage function that are not study options: the store it works
# on, where it runs, and where a report goes (all come from the command line).
STAGE_RUN_PARAMETERS = ("store", "place", "out")

# The paper's NiN learning rates per optimizer (docs/method.md §2, QGen Appendix B.3).
NIN_LR_GRID = {"sgd": [0.1, 0.05, 0.01], "adam": [1e-3, 5e-4, 1e-4], "rmsprop": [1e-3, 5e-4, 1e-4]}


def _check_names(specs) -> None:
    """Unknown dataset, model, method or model option: one clear line before any work."""
    from qgen_ray.data import DATASETS
    from qgen_ray.models import model_options
    from qgen_ray.quant import METHODS

    seen = set()
    for spec in specs:
        key = (spec.dataset, spec.model, spec.method, tuple(sorted(spec.model_arguments)))
        if key in seen:
            continue
        seen.add(key)
        DATASETS.get(spec.dataset)
        METHODS.get(spec.method)
        valid = model_options(spec.model)
        unknown = sorted(set(spec.model_arguments) - set(valid))
        if unknown:
            raise UserError(
                f"model {spec.model!r} has no option {unknown[0]!r}; valid: "
                f"{', '.join(sorted(valid)) or 'none'} (set width/depth only for nin)"
            )


def stage_option_names(stage: str) -> list[str]:
    """The options a study may set for `stage`: its stage function's keyword parameters
    (read from the signature, as the model registry reads a builder's)."""
    from qgen_ray.pipeline.followups import STAGE_FUNCTIONS

    if stage not in STAGE_FUNCTIONS:
        return []
    params = inspect.signature(STAGE_FUNCTIONS[stage]).parameters
    return [name for name in params if name not in STAGE_RUN_PARAMETERS]


def _check_stages(stages, stage_options: dict) -> None:
    """Unknown stage, stage option or option key: one clear line before any work."""
    for stage in stages:
        if stage not in STAGES:
            raise UserError(f"unknown stage {stage!r} in stages; valid: {', '.join(STAGES)}")
    if not isinstance(stage_options, dict):
        raise UserError("stage_options must map a stage name to a dict of its options")
    for stage, options in stage_options.items():
        valid = stage_option_names(stage)
        if not valid:
            with_options = [s for s in STAGES if stage_option_names(s)]
            raise UserError(
                f"stage_options names {stage!r}, which is not a stage with options; "
                f"valid: {', '.join(with_options)}"
            )
        if not isinstance(options, dict):
            raise UserError(f"stage_options[{stage!r}] must be a dict of options")
        unknown = sorted(set(options) - set(valid))
        if unknown:
            raise UserError(
                f"stage {stage!r} has no option {unknown[0]!r}; valid: {', '.join(valid)}"
            )


@dataclass(frozen=True)
class Study:
    """What a study trains: dataset, model family, grid, precisions, protocol, resources."""

    name: str
    dataset: str
    model: str
    grid: dict  # TrainSpec field -> list of values ("lr" may be {optimizer: [values]})
    precisions: tuple[tuple[str, int], ...] = PAPER_PRECISIONS
    protocol: dict = field(default_factory=dict)  # fixed TrainSpec fields: epochs, batch_size...
    smoke_grid: dict | None = None  # --smoke: replaces `grid` (a corner of it)
    smoke_protocol: dict | None = None  # --smoke: overrides `protocol` (e.g. epochs=2)
    smoke_precisions: tuple[tuple[str, int], ...] | None = None
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0  # fractional: 0.25 packs four trials per GPU
    stages: tuple[str, ...] = ("train",)  # after training: "measure", "corrupt", "report"
    stage_options: dict = field(default_factory=dict)  # per stage: {"measure": {...}}
    description: str = ""
    smoke_stage_options: dict | None = None  # --smoke: per stage, over `stage_options`

    def smoke(self) -> Study:
        """The same study shrunk to about a minute with Ray's start, for CI (`--smoke`)."""
        smoke = self.smoke_stage_options or {}
        return replace(
            self,
            grid=self.smoke_grid if self.smoke_grid is not None else self.grid,
            protocol={**self.protocol, **(self.smoke_protocol or {})},
            precisions=self.smoke_precisions or self.precisions,
            stage_options={
                stage: {**self.stage_options.get(stage, {}), **smoke.get(stage, {})}
                for stage in dict.fromkeys([*self.stage_options, *smoke])
            },
        )

    @property
    def axes(self) -> list[str]:
        """The hyperparameter columns that vary (granulated-Kendall axes)."""
        out = []
        for key, values in self.grid.items():
            if key == "lr" and isinstance(values, dict):
                if max(len(v) for v in values.values()) > 1:
                    out.append("lr_rank")
                if "optimizer" not in self.grid and len(values) > 1:
                    out.append("optimizer")
            elif len(values) > 1:
                out.append(key)
        if len({bits for _, bits in self.precisions}) > 1:
            out.append("bits")
        return out

    def specs(self) -> list[TrainSpec]:
        """Every model of the grid, in a fixed order, validated."""
        return [spec for spec, _ in self.plan()]

    def plan(self) -> list[tuple[TrainSpec, dict]]:
        """(spec, extra columns) for every model; extra holds `lr_rank` when used. Checks
        the whole declaration (grid, names, stages and their options) first."""
        _check_stages(self.stages, self.stage_options)
        grid = dict(self.grid)
        lr_table = grid.pop("lr") if isinstance(grid.get("lr"), dict) else None
        if lr_table is not None and "optimizer" not in grid:
            grid["optimizer"] = list(lr_table)
        for key, values in grid.items():
            if not isinstance(values, list | tuple) or not values:
                raise UserError(f"grid entry {key!r} must be a non-empty list of values")
        out = []
        keys = list(grid)
        for combo in itertools.product(*(grid[k] for k in keys)):
            point = dict(zip(keys, combo))
            lr_choices = [(None, None)]
            if lr_table is not None:
                if point["optimizer"] not in lr_table:
                    raise UserError(
                        f"grid 'lr' has no values for optimizer {point['optimizer']!r}; "
                        f"add it to the lr table (has: {', '.join(lr_table)})"
                    )
                lr_choices = list(enumerate(lr_table[point["optimizer"]]))
            for rank, lr in lr_choices:
                for method, bits in self.precisions:
                    fields_ = {
                        "dataset": self.dataset,
                        "model": self.model,
                        **self.protocol,
                        **point,
                        "method": method,
                        "bits": bits,
                    }
                    extra = {}
                    if lr is not None:
                        fields_["lr"] = lr
                        extra["lr_rank"] = rank
                    out.append((TrainSpec.from_dict(fields_), extra))
        _check_names(spec for spec, _ in out)
        ids = [s.model_id for s, _ in out]
        if len(set(ids)) != len(ids):
            raise UserError(
                f"study {self.name!r} lists the same model twice; remove repeated values"
            )
        return out

    def describe(self) -> dict:
        """The study.json record: enough for analysis to know its axes."""
        first = self.specs()[0]
        return {
            "study": self.name,
            "dataset": self.dataset,
            "model": self.model,
            "axes": self.axes,
            "grid": self.grid,
            "precisions": [list(p) for p in self.precisions],
            "protocol": {k: v for k, v in first.to_dict().items() if k not in self.grid},
            "num_models": len(self.specs()),
            "description": self.description,
        }


def nin_population(dataset: str, depths: list[int]) -> Study:
    """The paper's NiN population on a CIFAR dataset (docs/method.md §2, QGen Appendix B.3):
    optimizer x lr (3 each) x weight decay x width x depth = 243 models per precision,
    at FP32 / int8 / int4 / int2; batch 128, 300 epochs, lr x0.1 at epochs 100 and 200."""
    return Study(
        name=f"nin_{dataset}",
        description=f"NiN on {dataset}: 972 models (243 per precision), 300 epochs each.",
        dataset=dataset,
        model="nin",
        grid={
            "lr": NIN_LR_GRID,
            "weight_decay": [0.0, 1e-4, 2e-4],
            "width": [8, 10, 12],
            "depth": list(depths),
        },
        protocol={"epochs": 300, "batch_size": 128, "milestones": (100, 200)},
        smoke_grid={"lr": {"sgd": [0.1]}, "weight_decay": [0.0], "width": [1], "depth": [2]},
        smoke_protocol={"epochs": 1, "milestones": (1,)},
        cpus_per_trial=2.0,
        gpus_per_trial=0.25,
        stages=("train", "measure", "report"),
    )


# --smoke of the ImageNet studies: 2 epochs of 32-px crops, a global batch of 4.
IMAGENET_SMOKE_PROTOCOL = {"epochs": 2, "milestones": (1,), "batch_size": 4, "image_size": 32}


def imagenet_cnns(name: str, **overrides) -> Study:
    """The paper's ImageNet CNNs (docs/method.md §7, QGen Appendix B.1): ResNet-18, ResNet-50
    and MobileNetV2 fine-tuned from torchvision's pretrained weights at FP32 / LSQ 8/4/2
    with SGD lr 0.01, momentum 0.9, weight decay 1e-4, 120 epochs, lr x0.1 at 30/60/90,
    a global batch of 256 (torchvision's recipe) and 224-px crops. `overrides` replace
    Study fields (description, stages, smoke_precisions, ...); the model ids depend only
    on the grid, precisions and protocol, so every study built here shares them."""
    study = Study(
        name=name,
        dataset="imagenet",
        model="resnet18",
        grid={"model": ["resnet18", "resnet50", "mobilenet_v2"]},
        precisions=PAPER_PRECISIONS,
        protocol={
            "optimizer": "sgd",
            "lr": 0.01,
            "momentum": 0.9,
            "weight_decay": 1e-4,
            "epochs": 120,
            "milestones": (30, 60, 90),
            "batch_size": 256,
            "image_size": 224,
        },
        smoke_grid={"model": ["resnet18"]},
        smoke_protocol=IMAGENET_SMOKE_PROTOCOL,
        smoke_precisions=(("lsq", 4),),
    )
    return replace(study, **overrides)
