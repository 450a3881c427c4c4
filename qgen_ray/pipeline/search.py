"""A search study: the bit width tuned with the other hyperparameters (QGen §3: the
quantization level is a regularizer and "should also be carefully tuned").

A study script declares a `SearchStudy`: a search space over `TrainSpec` fields, a budget
(number of models), and the objective, measured on a validation split carved from the
training set (`ImageData.with_validation`; its fraction is part of every model's id). The
test set is never read while choosing: search trials get a data object without it, and the
finished models are evaluated on the test set only after the search (`evaluate_on_test`).

Space entries (`choice`, `log_uniform`) are sampled by Optuna; every parameter is present
in every trial (Optuna's importances need that), so two conditional ones are encoded:

    lr             `lr_position` in [0, 1], the log-position inside the chosen optimizer's
                   own range: lr = low * (high / low) ** position (the grid's lr_rank idea)
    weight decay   log-uniform over [low / 10, high]; the lowest decade maps to 0, so
                   "no weight decay" is as likely as each decade of the range
    precision      "fp32" or "lsq<b>" (LSQ at b bits, 2 <= b <= 8)

No Ray in here: `qgen_ray.ray.tune_search` runs it with Ray Tune's OptunaSearch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from qgen_ray.errors import UserError
from qgen_ray.spec import OPTIMIZERS, TrainSpec

OBJECTIVES = ("val_loss", "weight_bits")  # the second one is optional: a Pareto front
SEARCHABLE = ("precision", "optimizer", "lr", "weight_decay", "width", "depth")
PRECISION_CHOICES = ("fp32", *(f"lsq{b}" for b in range(2, 9)))


@dataclass(frozen=True)
class Choice:
    """A categorical choice among `values` (Optuna's suggest_categorical)."""

    values: tuple

    def __str__(self) -> str:
        return "{" + ", ".join(str(v) for v in self.values) + "}"


@dataclass(frozen=True)
class LogUniform:
    """Log-uniform on [low, high]; `with_zero`: 0 is drawn as often as one decade."""

    low: float
    high: float
    with_zero: bool = False

    def __str__(self) -> str:
        return f"log-uniform [{self.low:g}, {self.high:g}]" + (" or 0" if self.with_zero else "")


def choice(values) -> Choice:
    return Choice(tuple(values))


def log_uniform(low: float, high: float, with_zero: bool = False) -> LogUniform:
    return LogUniform(float(low), float(high), with_zero)


def _check_range(name: str, dist: LogUniform) -> None:
    if not (dist.low > 0 and dist.high >= dist.low and math.isfinite(dist.high)):
        raise UserError(
            f"search space {name!r}: log_uniform needs 0 < low <= high, got "
            f"({dist.low}, {dist.high}); use with_zero=True to include 0"
        )


def _check_choice(name: str, dist) -> tuple:
    if not isinstance(dist, Choice):
        raise UserError(f"search space {name!r} must be choice([...]), got {dist!r}")
    if not dist.values:
        raise UserError(f"search space {name!r} is an empty choice: list at least one value")
    return dist.values


def precision_of(value: str) -> tuple[str, int]:
    """ "fp32" -> ("fp32", 32); "lsq4" -> ("lsq", 4)."""
    return ("fp32", 32) if value == "fp32" else ("lsq", int(value.removeprefix("lsq")))


@dataclass(frozen=True)
class SearchStudy:
    """What a search trains: the space, the budget and the objective(s)."""

    name: str
    dataset: str
    model: str
    space: dict  # SEARCHABLE field -> Choice / LogUniform; "lr": {optimizer: LogUniform}
    budget: int  # models to train in all (a re-run continues up to it)
    protocol: dict = field(default_factory=dict)  # fixed TrainSpec fields (epochs, ...)
    objectives: tuple[str, ...] = ("val_loss",)  # + "weight_bits" for a Pareto front
    val_fraction: float = 0.2  # validation split carved (stratified) from the training set
    asha: bool = True  # early stopping on val_loss (single objective only)
    grace_epochs: int = 1  # ASHA: epochs every model trains before it can be stopped
    seed: int = 0  # the sampler's seed (and the models' seed unless the protocol sets one)
    max_concurrent: int = 4  # models training at once (bounded further by the cluster)
    smoke_budget: int | None = None
    smoke_protocol: dict | None = None
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0
    stages: tuple[str, ...] = ("train", "report")
    stage_options: dict = field(default_factory=dict)
    description: str = ""

    def smoke(self) -> SearchStudy:
        return replace(
            self,
            budget=self.smoke_budget or min(self.budget, 4),
            protocol={**self.protocol, **(self.smoke_protocol or {})},
        )

    # -- checks ------------------------------------------------------------------------
    def check(self) -> None:
        """A bad space, budget or objective: one clear line before anything is written."""
        unknown = sorted(set(self.space) - set(SEARCHABLE))
        if unknown:
            raise UserError(
                f"search space has unknown field {unknown[0]!r}; valid: {', '.join(SEARCHABLE)}"
            )
        for key in ("precision", "optimizer"):
            if key not in self.space:
                raise UserError(f"search space needs {key!r} (a choice)")
        for value in _check_choice("precision", self.space["precision"]):
            if value not in PRECISION_CHOICES:
                raise UserError(
                    f"search space 'precision' has {value!r}: bits must be 2..8 (lsq2 .. "
                    f"lsq8) or FP32 (fp32); valid: {', '.join(PRECISION_CHOICES)}"
                )
        optimizers = _check_choice("optimizer", self.space["optimizer"])
        for name in optimizers:
            if name not in OPTIMIZERS:
                raise UserError(f"search space 'optimizer' has unknown {name!r}; "
                                f"valid: {', '.join(OPTIMIZERS)}")  # fmt: skip
        lr = self.space.get("lr")
        if not isinstance(lr, dict) or set(lr) != set(optimizers):
            raise UserError("search space 'lr' must map every optimizer of the choice to "
                            "log_uniform(low, high)")  # fmt: skip
        for name, dist in lr.items():
            if not isinstance(dist, LogUniform):
                raise UserError(f"search space 'lr' of {name!r} must be log_uniform(low, high)")
            _check_range(f"lr[{name}]", dist)
        wd = self.space.get("weight_decay", log_uniform(1e-5, 1e-3, with_zero=True))
        if not isinstance(wd, LogUniform):
            raise UserError("search space 'weight_decay' must be log_uniform(low, high)")
        _check_range("weight_decay", wd)
        for key in ("width", "depth"):
            if key in self.space:
                for value in _check_choice(key, self.space[key]):
                    if not isinstance(value, int) or value < 1:
                        raise UserError(f"search space {key!r} has {value!r}: whole numbers >= 1")
        if self.budget < 1:
            raise UserError(f"search budget must be >= 1 models, got {self.budget}")
        if (
            not self.objectives
            or self.objectives[0] != "val_loss"
            or not set(self.objectives) <= set(OBJECTIVES)
        ):
            raise UserError(f"objectives must be ('val_loss',) or {OBJECTIVES}")
        if not 0 < self.val_fraction < 1:
            raise UserError(f"val_fraction must be in (0, 1), got {self.val_fraction}")
        self.spec({**self.sample_first(), "seed": self.seed})  # names, model options
        from qgen_ray.pipeline.study import _check_stages

        _check_stages(self.stages, self.stage_options)

    def sample_first(self) -> dict:
        """The space's first point (every choice's first value, ranges' low ends)."""
        return {
            "precision": self.space["precision"].values[0],
            "optimizer": self.space["optimizer"].values[0],
            "lr_position": 0.0,
            "weight_decay": self._wd().low / 10 if self._wd().with_zero else self._wd().low,
            **{k: self.space[k].values[0] for k in ("width", "depth") if k in self.space},
        }

    def _wd(self) -> LogUniform:
        return self.space.get("weight_decay", log_uniform(1e-5, 1e-3, with_zero=True))

    # -- sampling (define-by-run) ------------------------------------------------------
    def define(self, trial) -> None:
        """Optuna's define-by-run: suggest every parameter (all present in every trial)."""
        trial.suggest_categorical("precision", list(self.space["precision"].values))
        trial.suggest_categorical("optimizer", list(self.space["optimizer"].values))
        trial.suggest_float("lr_position", 0.0, 1.0)
        wd = self._wd()
        trial.suggest_float("weight_decay", wd.low / 10 if wd.with_zero else wd.low, wd.high,
                            log=True)  # fmt: skip
        for key in ("width", "depth"):
            if key in self.space:
                trial.suggest_categorical(key, list(self.space[key].values))

    def spec(self, params: dict) -> TrainSpec:
        """The model a sampled point names (the same point always names the same model)."""
        method, bits = precision_of(params["precision"])
        lr = self.space["lr"][params["optimizer"]]
        wd = self._wd()
        weight_decay = float(params["weight_decay"])
        if wd.with_zero and weight_decay < wd.low:
            weight_decay = 0.0
        fields_ = {
            "dataset": self.dataset,
            "model": self.model,
            "seed": self.seed,
            **self.protocol,
            "optimizer": params["optimizer"],
            "lr": float(lr.low * (lr.high / lr.low) ** float(params["lr_position"])),
            "weight_decay": weight_decay,
            "method": method,
            "bits": bits,
            "val_fraction": self.val_fraction,
            **{k: int(params[k]) for k in ("width", "depth") if k in params},
        }
        spec = TrainSpec.from_dict(fields_)
        from qgen_ray.pipeline.study import _check_names

        _check_names([spec])
        return spec

    @property
    def axes(self) -> list[str]:
        """The hyperparameter columns a search varies: lr, weight decay and bits always
        (every point samples them), the others when the space names them."""
        always = ("lr", "weight_decay")
        order = ("optimizer", "lr", "weight_decay", "width", "depth")
        return [k for k in order if k in always or k in self.space] + ["bits"]

    def describe(self) -> dict:
        """The study.json record (`search` marks a search study for status and report)."""
        return {
            "study": self.name,
            "dataset": self.dataset,
            "model": self.model,
            "axes": self.axes,
            "search": {
                "space": {
                    k: ({o: str(d) for o, d in v.items()} if isinstance(v, dict) else str(v))
                    for k, v in self.space.items()
                },
                "objectives": list(self.objectives),
                "val_fraction": self.val_fraction,
                "asha": self.asha and len(self.objectives) == 1,
                "seed": self.seed,
            },
            "protocol": self.protocol,
            "num_models": self.budget,
            "description": self.description,
        }


def weight_bits(model) -> int:
    """The model's weight memory, the second objective: bits of all Conv2d/Linear weights
    as stored (`quant.model.weight_storage_bits`: b bits per quantized weight plus its
    steps, 32 per weight of a layer left in FP32, e.g. none under first_last_8bit)."""
    from qgen_ray.quant.model import weight_storage_bits

    return weight_storage_bits(model)[0]


def evaluate_on_test(store, data) -> int:
    """After the search: evaluate each ok search model (kept weights) on the test set,
    which no search trial could read, and fill test_loss / test_acc / gap_loss / gap_acc
    (gaps against its training numbers, on the training set less the validation split).
    Returns how many models were evaluated; models that have them are skipped."""
    from qgen_ray import schema
    from qgen_ray.loaders import load_model
    from qgen_ray.train.evaluate import evaluate

    count = 0
    for result in store.results():
        if result.get("status") != schema.STATUS_OK or "val_loss" not in result:
            continue
        if not math.isnan(float(result.get("test_loss", math.nan))):
            continue
        model = load_model(store.uri, result["model_id"])
        loss, acc = evaluate(model, data.test_x, data.test_y, data.normalize)
        store.trial(result["model_id"]).write_result({
            **result, "test_loss": loss, "test_acc": acc,
            "gap_loss": loss - result["train_loss"], "gap_acc": result["train_acc"] - acc,
        })  # fmt: skip
        count += 1
    return count


__all__ = [
    "Choice",
    "LogUniform",
    "OBJECTIVES",
    "SearchStudy",
    "choice",
    "log_uniform",
    "precision_of",
    "evaluate_on_test",
    "weight_bits",
]
