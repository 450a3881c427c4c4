"""Learned Step size Quantization of weights (Esser et al. 2020, "LSQ"), one step per layer.

For b bits the signed grid is Qn = 2^(b-1), Qp = 2^(b-1) - 1 (b=2: levels {-2,-1,0,1}):

    w_hat = round( clamp(w / s, -Qn, Qp) ) * s          LSQ Eq. 1-2
    s0    = 2 * mean(|w|) / sqrt(Qp)                     LSQ Sec. 2.1 (step initialization)
    g     = 1 / sqrt(N * Qp)                             LSQ Sec. 2.2 (step gradient scale)

Gradients (LSQ Eq. 3 with the straight-through estimator for round), with v = w / s:
    dw_hat/dw = 1 if -Qn < v < Qp else 0
    dw_hat/ds = round(v) - v if -Qn < v < Qp;  -Qn if v <= -Qn;  Qp if v >= Qp   (times g)
The unrounded v decides clipping. Forward values equal
`torch.fake_quantize_per_tensor_affine(w, s, 0, -Qn, Qp)` bit for bit: like its kernel we
compute v as w * (1/s) and round half to even.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from qgen_ray.quant.base import PARAM_BITS, STEP_EPS, WeightQuantizer


def grid_limits(bits: int) -> tuple[int, int]:
    """(Qn, Qp) of the signed b-bit grid: the levels are -Qn..Qp (LSQ Sec. 2)."""
    return 2 ** (bits - 1), 2 ** (bits - 1) - 1


def lsq_init_step(w: torch.Tensor, Qp: int) -> torch.Tensor:
    """LSQ's step initialization s0 = 2 * mean(|w|) / sqrt(Qp), floored at STEP_EPS."""
    return (2.0 * w.detach().abs().mean() / math.sqrt(Qp)).clamp_min(STEP_EPS)


def quantize_codes(w: torch.Tensor, step: torch.Tensor, Qn: int, Qp: int) -> torch.Tensor:
    """Integer grid codes round(clamp(w / s, -Qn, Qp)) as floats (LSQ Eq. 1), with v
    computed as w * (1/s) and rounded half to even, as PyTorch's fake-quantize kernel does."""
    return torch.round(w * (1.0 / step)).clamp_(-Qn, Qp)


class _LSQFakeQuantize(torch.autograd.Function):
    """w_hat = codes * s with LSQ's gradients (Eq. 3); saves only w and s for backward."""

    @staticmethod
    def forward(ctx, w, step, grad_scale: float, Qn: int, Qp: int):
        ctx.save_for_backward(w, step)
        ctx.constants = (grad_scale, Qn, Qp)
        return quantize_codes(w, step, Qn, Qp) * step

    @staticmethod
    def backward(ctx, grad_out):
        w, step = ctx.saved_tensors
        grad_scale, Qn, Qp = ctx.constants
        v = w * (1.0 / step)
        below = v <= -Qn
        above = v >= Qp
        inside = ~(below | above)
        grad_w = grad_out * inside if ctx.needs_input_grad[0] else None
        grad_step = None
        if ctx.needs_input_grad[1]:
            dstep = torch.where(inside, torch.round(v) - v, torch.where(below, -Qn, Qp))
            grad_step = ((grad_out * dstep).sum() * grad_scale).reshape(step.shape)
        return grad_w, grad_step, None, None, None


class LSQWeightQuantizer(WeightQuantizer):
    """LSQ weight quantizer with one learnable step `step` (an nn.Parameter of shape (1,)).

    `initialize(w)` sets the step from a weight tensor; `q(w)` returns the fake-quantized
    weight. Keep the step positive with `clamp_()` after each optimizer step."""

    def __init__(self, bits: int):
        super().__init__(bits)
        self.Qn, self.Qp = grid_limits(self.bits)
        self.step = nn.Parameter(torch.ones(1))

    @torch.no_grad()
    def set_step(self, value: torch.Tensor | float, like: torch.Tensor | None = None) -> None:
        """Set the step (moving the quantizer to `like`'s device first, if given)."""
        if like is not None and self.step.device != like.device:
            self.to(like.device)
        self.step.fill_(max(float(value), STEP_EPS))

    def initialize(self, w: torch.Tensor) -> None:
        """LSQ init: s0 = 2 * mean(|w|) / sqrt(Qp)."""
        self.set_step(lsq_init_step(w, self.Qp), like=w)

    def grad_scale(self, w: torch.Tensor) -> float:
        """LSQ's step gradient scale g = 1 / sqrt(N * Qp), N = number of weights."""
        return 1.0 / math.sqrt(w.numel() * self.Qp)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return _LSQFakeQuantize.apply(w, self.step, self.grad_scale(w), self.Qn, self.Qp)

    def lsq_parts(self, w: torch.Tensor) -> list[tuple[str, nn.Module, torch.Tensor]]:
        return [("", self, w)]

    @torch.no_grad()
    def clamp_(self) -> None:
        self.step.clamp_(min=STEP_EPS)

    def storage_bits(self, numel: int) -> int:
        return numel * self.bits + PARAM_BITS

    def extra_repr(self) -> str:
        return f"bits={self.bits}, Qn={self.Qn}, Qp={self.Qp}"
