"""What every weight quantizer is: a module that maps a layer's latent weight to the weight
the layer computes with, holds its own learnable parameters (steps, codebooks) and knows
how many bits its weights cost to store.

A quantized layer (`qgen_ray.quant.layers`) owns one of these as `weight_quantizer`.
"""

from __future__ import annotations

import numbers

import torch
from torch import nn

from qgen_ray.errors import UserError

MIN_BITS = 2  # smallest bit width studied (the paper's int2)
MAX_BITS = 8  # largest bit width studied (the paper's int8)
FP32_BITS = 32  # "bits" value that means: no quantizer at all (the paper's FP32)
PARAM_BITS = 32  # storage cost of one step size or codebook entry (a float32)

# Smallest allowed LSQ step size. Ours: LSQ requires s > 0 but names no floor; 2^-26
# (~1.5e-8, exact in every float dtype) is far below any learned step we see (~1e-4 at
# 8 bits) and keeps 1/s finite in float32.
STEP_EPS = 2.0**-26


def as_int(value: object) -> int | None:
    """`value` as a Python int if it is an integer (numpy integers too, bools not), else None."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        return None
    return int(value)


def check_bits(bits: int) -> int:
    """Return `bits` as an int if it is a quantized bit width (2..8), else raise a UserError."""
    value = as_int(bits)
    if value is None or not MIN_BITS <= value <= MAX_BITS:
        raise UserError(
            f"bits={bits!r} is not a quantized bit width; use an integer in "
            f"{MIN_BITS}..{MAX_BITS} (or {FP32_BITS} with method 'fp32')"
        )
    return value


class WeightQuantizer(nn.Module):
    """Base class: `forward(w)` returns the weight the layer uses (differentiable),
    `dequantized(w)` the de-quantized weight w_hat the measures study (no gradient)."""

    def __init__(self, bits: int):
        super().__init__()
        self.bits = check_bits(bits)

    def initialize(self, w: torch.Tensor) -> None:
        """Set the learnable parameters from the layer's weight (called when wrapped)."""
        raise NotImplementedError

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def dequantized(self, w: torch.Tensor) -> torch.Tensor:
        """The de-quantized weight w_hat (what the layer computes with after training)."""
        return self.forward(w).detach()

    def lsq_parts(self, w: torch.Tensor) -> list[tuple[str, nn.Module, torch.Tensor]]:
        """(suffix, LSQ quantizer, slice of `w` it quantizes) for each learned step size;
        empty for quantizers without steps."""
        return []

    def clamp_(self) -> None:
        """Project the learnable parameters back into their valid set (after a step)."""

    def storage_bits(self, numel: int) -> int:
        """Bits needed to store a layer of `numel` weights quantized by this quantizer."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"bits={self.bits}"
