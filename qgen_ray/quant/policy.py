"""Which layers keep a higher precision: the quantization policy recorded with the model.

Quantizable layers are the model's nn.Conv2d and nn.Linear modules in registration order
(`model.named_modules()`); "first" and "last" refer to that order (for our models: the stem
conv / patch embedding and the classifier head). A layer's bit width is, by priority:

1. `layer_bits[name]` when the policy names it (2..8, or 32 = leave that layer in FP32);
2. `first_last_bits` for the first and last quantizable layer, unless it is None;
3. the model's `bits` otherwise.

`QuantPolicy()` is the LSQ convention (Esser et al. 2020, Sec. 3): first and last layer at
8 bits. `QuantPolicy.none()` quantizes every layer at the model's `bits`. Specs name them
"first_last_8bit" and "none" (`QuantPolicy.from_name`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from qgen_ray.errors import UserError
from qgen_ray.quant.base import FP32_BITS, MAX_BITS, MIN_BITS, as_int

LSQ_FIRST_LAST_BITS = 8  # LSQ keeps the first and last layer at 8 bits


def _check_layer_bits(bits: Any, what: str) -> int:
    value = as_int(bits)
    if value is None or not (MIN_BITS <= value <= MAX_BITS or value == FP32_BITS):
        raise UserError(
            f"{what} must be an integer in {MIN_BITS}..{MAX_BITS} or {FP32_BITS} (FP32)"
        )
    return value


@dataclass(frozen=True)
class QuantPolicy:
    """The per-layer precision policy (see the module docstring).

    first_last_bits: bits of the first and last quantizable layer; None = no exception.
    layer_bits: module name -> bits, for named layers; pass a dict, stored as sorted pairs.
    """

    first_last_bits: int | None = LSQ_FIRST_LAST_BITS
    layer_bits: tuple[tuple[str, int], ...] = field(default=())

    def __post_init__(self) -> None:
        if self.first_last_bits is not None:
            bits = _check_layer_bits(self.first_last_bits, "QuantPolicy.first_last_bits")
            object.__setattr__(self, "first_last_bits", bits)
        pairs = {
            str(name): _check_layer_bits(bits, f"QuantPolicy.layer_bits[{name!r}]")
            for name, bits in dict(self.layer_bits).items()
        }
        object.__setattr__(self, "layer_bits", tuple(sorted(pairs.items())))

    @classmethod
    def none(cls) -> QuantPolicy:
        """Every quantizable layer at the model's bits."""
        return cls(first_last_bits=None)

    @classmethod
    def from_name(cls, name: str) -> QuantPolicy:
        """The preset called `name`: "first_last_8bit" (LSQ, the default) or "none"."""
        presets = {"first_last_8bit": cls(), "none": cls.none()}
        if name not in presets:
            raise UserError(f"unknown quant policy {name!r}; valid names: {', '.join(presets)}")
        return presets[name]

    def to_dict(self) -> dict[str, Any]:
        """JSON-serializable form; `QuantPolicy.from_dict` inverts it."""
        return {"first_last_bits": self.first_last_bits, "layer_bits": dict(self.layer_bits)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> QuantPolicy:
        unknown = set(data) - {"first_last_bits", "layer_bits"}
        if unknown:
            raise UserError(
                f"unknown QuantPolicy key(s) {sorted(unknown)}; valid keys: "
                "first_last_bits, layer_bits"
            )
        return cls(
            first_last_bits=data.get("first_last_bits", LSQ_FIRST_LAST_BITS),
            layer_bits=dict(data.get("layer_bits", {})),
        )

    def resolve(self, layer_names: list[str], bits: int) -> dict[str, int]:
        """Bits for each quantizable layer name (32 = not quantized), in the given order."""
        unknown = [name for name, _ in self.layer_bits if name not in layer_names]
        if unknown:
            raise UserError(
                f"QuantPolicy names layer(s) {unknown} that the model does not have; "
                f"quantizable layers: {', '.join(layer_names)}"
            )
        resolved = {name: bits for name in layer_names}
        if self.first_last_bits is not None and layer_names:
            resolved[layer_names[0]] = self.first_last_bits
            resolved[layer_names[-1]] = self.first_last_bits
        resolved.update(dict(self.layer_bits))
        return resolved
