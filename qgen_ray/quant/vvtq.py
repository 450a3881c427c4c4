"""VVTQ-style weight quantization for vision transformers (Huang et al. 2023, "Variation-aware
Vision Transformer Quantization"), weights only, as docs/method.md §1 describes:

- LSQ on every Linear; timm's fused `qkv` gets one step per third of its output rows
  (q, k, v), named `<layer>.q`, `<layer>.k`, `<layer>.v`;
- patch embedding and classifier head at 8 bits: that is the default `QuantPolicy`
  (first and last quantizable layer at 8 bits), so nothing here overrides it;
- step init by the MSE fixed point s <- <w,q>/<q,q>, q = clamp(round(w/s));
- the bin regularizer R (VVTQ's "oscillation-aware bin regularization"), weighted by
  lambda(t): 0 for the first 25% of training, then a cosine ramp to 0.01.

Multi-crop distillation is not part of this module (the training loop owns the loss).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from qgen_ray.quant.base import PARAM_BITS, STEP_EPS, WeightQuantizer
from qgen_ray.quant.lsq import LSQWeightQuantizer, quantize_codes

# MSE step search (VVTQ's `quantize_by_mse`): start at the no-clipping step max|w|/Qp and
# iterate until the step changes by less than MSE_INIT_RTOL (relative; VVTQ's eps). Each
# iteration cannot raise the MSE (it is Lloyd's algorithm on s). VVTQ loops without a cap;
# ours stops after MSE_INIT_ITERS: measured on 2e5 Gaussian weights it settles in ~25
# iterations at 2 bits and ~100 at 4 bits, while at 8 bits it drifts for ~2000 iterations
# with little gain (the capped result is then between the start and the fixed point).
MSE_INIT_ITERS = 200
MSE_INIT_RTOL = 1e-5

# Bin-regularizer weight schedule (VVTQ / docs/method.md §1): 0 until this fraction of
# training is done, then a cosine ramp up to VVTQ_LAMBDA_MAX at the end.
VVTQ_WARMUP = 0.25
VVTQ_LAMBDA_MAX = 0.01

QKV_PARTS = ("q", "k", "v")  # timm's fused qkv: output rows [q | k | v]


def mse_step(w: torch.Tensor, Qn: int, Qp: int) -> torch.Tensor:
    """MSE step search (VVTQ init): from s = max|w|/Qp, iterate s <- <w,q>/<q,q> with
    q = clamp(round(w/s), -Qn, Qp) until the step settles (or MSE_INIT_ITERS)."""
    w = w.detach().flatten()
    s = (w.abs().max() / Qp).clamp_min(STEP_EPS)
    for _ in range(MSE_INIT_ITERS):
        q = quantize_codes(w, s, Qn, Qp)
        qq = torch.dot(q, q)
        if qq <= 0:  # every weight rounds to 0: nothing to fit
            break
        s_new = torch.dot(w, q) / qq
        done = bool(torch.abs(s_new - s) <= MSE_INIT_RTOL * s)
        s = s_new
        if done:
            break
    return s


def mse_init_(quantizer: WeightQuantizer, w: torch.Tensor) -> None:
    """Set every step of an LSQ (or fused-qkv) quantizer by `mse_step` on its slice of w."""
    for _, part, w_part in quantizer.lsq_parts(w):
        part.set_step(mse_step(w_part, part.Qn, part.Qp), like=w)


def is_fused_qkv(name: str, layer: nn.Module) -> bool:
    """True for timm's fused attention projection: a Linear named `...qkv` with 3*d outputs
    (DeiT's `Attention.qkv`, Swin's `WindowAttention.qkv`)."""
    return (
        isinstance(layer, nn.Linear)
        and name.rsplit(".", 1)[-1] == "qkv"
        and layer.out_features % len(QKV_PARTS) == 0
    )


class QKVWeightQuantizer(WeightQuantizer):
    """LSQ on a fused qkv weight with separate steps for q, k and v (VVTQ): each third of
    the output rows is its own LSQ layer (own step, own gradient scale over its N/3)."""

    def __init__(self, bits: int):
        super().__init__(bits)
        for part in QKV_PARTS:
            self.add_module(part, LSQWeightQuantizer(bits))

    def parts(self) -> list[LSQWeightQuantizer]:
        return [getattr(self, part) for part in QKV_PARTS]

    def lsq_parts(self, w: torch.Tensor) -> list[tuple[str, nn.Module, torch.Tensor]]:
        return list(zip(QKV_PARTS, self.parts(), w.chunk(len(QKV_PARTS), dim=0)))

    def initialize(self, w: torch.Tensor) -> None:
        for _, part, w_part in self.lsq_parts(w):
            part.initialize(w_part)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return torch.cat([part(w_part) for _, part, w_part in self.lsq_parts(w)], dim=0)

    def clamp_(self) -> None:
        for part in self.parts():
            part.clamp_()

    def storage_bits(self, numel: int) -> int:
        return numel * self.bits + len(QKV_PARTS) * PARAM_BITS


def bin_regularizer(w: torch.Tensor, step: torch.Tensor, Qn: int, Qp: int) -> torch.Tensor:
    """VVTQ's bin regularizer for one LSQ layer (docs/method.md §1):

        R = mean( (sg(w_hat) - clip(w))^2 ) + sum over bins of Var(clip(w) in that bin)

    clip(w) = clamp(w, -Qn*s, Qp*s); a bin is the set of weights with the same grid code;
    Var is the unbiased variance, 0 for bins with fewer than two weights (as in VVTQ's
    code). Ours: the step is treated as a constant here (the task loss alone learns it).
    The variance is computed per bin from the offsets d = clip(w) - w_hat, so it is exactly
    0 when every weight sits on the grid. Zero at the grid, positive off it."""
    s = step.detach()
    codes = quantize_codes(w.detach(), s, Qn, Qp).flatten()
    d = torch.clamp(w.flatten(), -Qn * s, Qp * s) - codes * s
    bins = (codes + Qn).long()
    num_bins = Qn + Qp + 1
    count = torch.zeros(num_bins, dtype=d.dtype, device=d.device).index_add_(
        0, bins, torch.ones_like(d)
    )
    sum_d = torch.zeros(num_bins, dtype=d.dtype, device=d.device).index_add(0, bins, d)
    sum_d2 = torch.zeros(num_bins, dtype=d.dtype, device=d.device).index_add(0, bins, d * d)
    several = count > 1
    n = count[several]
    variance = ((sum_d2[several] - sum_d[several] ** 2 / n) / (n - 1)).clamp_min(0)
    return (d * d).mean() + variance.sum()


def quantizer_bin_regularizer(quantizer: WeightQuantizer, w: torch.Tensor) -> torch.Tensor:
    """`bin_regularizer` summed over a quantizer's steps (q, k, v count as three layers)."""
    terms = [bin_regularizer(w_p, p.step, p.Qn, p.Qp) for _, p, w_p in quantizer.lsq_parts(w)]
    return torch.stack(terms).sum()


def vvtq_lambda(progress: float) -> float:
    """VVTQ regularizer weight at `progress` (fraction of training done, in [0, 1]):
    0 before VVTQ_WARMUP, then VVTQ_LAMBDA_MAX * (1 - cos(pi * t)) / 2 with t the fraction
    of the remaining training done."""
    if not 0.0 <= progress <= 1.0:
        raise ValueError(f"progress must be in [0, 1], got {progress}")
    if progress < VVTQ_WARMUP:
        return 0.0
    t = (progress - VVTQ_WARMUP) / (1.0 - VVTQ_WARMUP)
    return VVTQ_LAMBDA_MAX * 0.5 * (1.0 - math.cos(math.pi * t))
