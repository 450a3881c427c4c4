"""The model registry: `create_model(name, ...)` builds any model of the zoo by name.

Every builder takes `(num_classes, in_channels, image_size)` positionally and its own
options as keyword-only arguments with defaults; those options are the only extra
keyword arguments `create_model` accepts for that name, so a typo is one clear line.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from qgen_ray.errors import UserError
from qgen_ray.models.weights import (
    WEIGHTS_FIX,
    check_loaded_keys,
    head_classes,
    load_weights_file,
    read_weights_file,
    strip_prefixes,
)
from qgen_ray.registry import Registry

Builder = Callable[..., nn.Module]


@dataclass(frozen=True)
class ModelEntry:
    """One model of the zoo.

    build: `build(num_classes, in_channels, image_size, *, <options>)`; when `pretrained`
        is true it also takes `pretrained: bool` and loads published weights itself.
    head: module name of the classifier (e.g. "fc"); a weights file whose head has another
        number of classes loads everything except this module.
    origin: where a fitting weights file comes from, quoted in the mismatch error.
    pretrained: whether published (hub) weights exist for `pretrained=True`.
    library: ("torchvision" | "timm", architecture name) for a library's model: its
        published recipe (transforms) is the library's own (`imagenet.recipe`).
    """

    build: Builder
    head: str
    origin: str
    pretrained: bool = False
    library: tuple[str, str] | None = None

    def options(self) -> dict[str, object]:
        """The model's own keyword options and their defaults (`pretrained` excluded)."""
        params = inspect.signature(self.build).parameters.values()
        return {
            p.name: p.default
            for p in params
            if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name not in BUILD_ARGUMENTS
        }


# keyword arguments of a builder that say where its weights come from, not model options
BUILD_ARGUMENTS = ("pretrained", "state_dict")


MODELS: Registry[ModelEntry] = Registry("model")


def register_model(
    name: str,
    *,
    head: str,
    origin: str | None = None,
    pretrained: bool = False,
    library: tuple[str, str] | None = None,
) -> Callable[[Builder], Builder]:
    """Decorator: register `build` under `name` (see `ModelEntry` for the fields)."""

    def deco(build: Builder) -> Builder:
        entry = ModelEntry(build, head, origin or f"qgen_ray's {name}", pretrained, library)
        MODELS.add(name, entry)
        return build

    return deco


def model_library(name: str) -> tuple[str, str] | None:
    """("torchvision" | "timm", architecture) of a library's model; None for our own models
    and unknown names."""
    return MODELS.get(name).library if name in MODELS else None


def model_options(name: str) -> dict[str, object]:
    """The keyword options `create_model(name, ...)` accepts, with their defaults."""
    return MODELS.get(name).options()


def create_model(
    name: str,
    num_classes: int,
    in_channels: int = 3,
    image_size: int = 32,
    *,
    weights: str | Path | None = None,
    pretrained: bool = False,
    **kwargs: object,
) -> nn.Module:
    """Build the model registered as `name`.

    num_classes: outputs of the classifier. in_channels: input image channels (the stem
    conv is built or replaced for it). image_size: input side in pixels (used by the ViTs;
    the CNNs accept any size). weights: path of a local state dict (`torch.save` of
    `model.state_dict()`) to load; a head for another number of classes is skipped.
    pretrained: load published weights from the torchvision/timm hub (needs internet or a
    filled cache; never used unless asked). kwargs: the model's own options, see
    `model_options(name)`.
    """
    entry = MODELS.get(name)
    options = entry.options()
    unknown = sorted(set(kwargs) - set(options))
    if unknown:
        valid = ", ".join(sorted(options)) or "none"
        raise UserError(
            f"model {name!r} has no option {', '.join(unknown)}; valid options: {valid}"
        )
    for label, value in (("num_classes", num_classes), ("in_channels", in_channels)):
        if value < 1:
            raise UserError(f"{label} must be at least 1, got {value}")
    if image_size < 1:
        raise UserError(f"image_size must be at least 1 pixel, got {image_size}")
    if pretrained and weights is not None:
        raise UserError("pass either weights=<file> or pretrained=True, not both")
    if pretrained and not entry.pretrained:
        raise UserError(
            f"model {name!r} has no published weights; drop pretrained=True or {WEIGHTS_FIX}"
        )
    if pretrained:
        kwargs["pretrained"] = True
    library = model_library(name)
    if weights is not None and library is not None and library[0] == "timm":
        # through timm's own loading: position embeddings (and Swin's tables) resampled to
        # image_size, the stem adapted; the head kept when it has num_classes, else dropped
        state = strip_prefixes(read_weights_file(weights))
        keys, classes = list(state), head_classes(state, entry.head)
        try:
            model = entry.build(num_classes, in_channels, image_size, state_dict=state, **kwargs)
        except RuntimeError as err:
            if "loading state_dict" not in str(err):
                raise
            detail = str(err).splitlines()[1].strip().rstrip(".") if "\n" in str(err) else ""
            raise UserError(
                f"weights file {weights} does not fit {name} ({detail}); it must be a state "
                f"dict of {entry.origin}"
            ) from None
        source = f"weights file {weights}"
        check_loaded_keys(model, keys, other_head=classes != num_classes, name=name,
                          head=entry.head, source=source, origin=entry.origin)  # fmt: skip
        return model
    model = entry.build(num_classes, in_channels, image_size, **kwargs)
    if weights is not None:
        load_weights_file(model, weights, name=name, head=entry.head, origin=entry.origin)
    return model


def count_params(model: nn.Module) -> int:
    """Number of parameters of `model` (trainable or not; buffers such as BN statistics
    are not parameters)."""
    return sum(p.numel() for p in model.parameters())
