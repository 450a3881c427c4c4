"""The closed-form bounds of the PAC-Bayes and sharpness measures (docs/method.md §3).

Pure functions of the weights and the searched radius. Notation: `w` trained weights,
`w0` weights at initialization, `ref` = w − w0 ("init" variants) or w ("orig" variants),
`m` training-set size, `ω` number of weights (see `params.py` for which tensors count),
`σ` / `α` the searched Gaussian std / box half-width. Logs are natural logs. Values are the
raw bounds; the reference implementation additionally reports sqrt(bound / m), a monotone
transform for a fixed m that leaves every ranking unchanged.

Equation numbers are those of Jiang et al. 2019 "Fantastic generalization measures"
(arXiv:1912.02178) as used by its reference implementation
(nitarshan/robust-generalization-measures); QGen Appendix A restates the same formulas.
"""

from __future__ import annotations

import math

import torch

MAG_EPS = 1e-3
"""ε of the magnitude-aware measures: noise floor so that zero weights are perturbed too
(unitless, same unit as the weights). Source: Jiang et al. 2019 §C; docs/method.md §3."""


def pacbayes_bound(ref_sq_norm: float, sigma: float, m: int) -> float:
    """PAC-Bayes bound, Jiang et al. eq. (48) pacbayes.init / eq. (49) pacbayes.orig:

    ||ref||² / (4σ²) + log(m / σ) + 10.
    """
    return ref_sq_norm / (4 * sigma**2) + math.log(m / sigma) + 10


def sharpness_bound(ref_sq_norm: float, alpha: float, m: int, omega: int) -> float:
    """Worst-case sharpness bound, Jiang et al. §C "sharpness-init" / "sharpness-orig":

    ||ref||² · log(2ω) / (4α²) + log(m / α) + 10.
    """
    return ref_sq_norm * math.log(2 * omega) / (4 * alpha**2) + math.log(m / alpha) + 10


def magnitude_aware_bound(
    w: torch.Tensor, w0: torch.Tensor, ref: torch.Tensor, sigma: float, m: int
) -> float:
    """Magnitude-aware bound, Jiang et al. eq. (56) pacbayes.mag.init / eq. (57)
    pacbayes.mag.orig; with the box radius α' in place of σ' it is also
    sharpness.mag.init / sharpness.mag.orig (QGen Appendix A):

    (1/4) Σ_i log( (ε² + (σ'² + 1) ||ref||² / ω) / (ε² + σ'² (w_i − w0_i)²) )
        + log(m / σ') + 10,      ε = MAG_EPS.

    The denominator uses w − w0 in both variants, as in Jiang et al.
    """
    w64, w064, ref64 = w.double(), w0.double(), ref.double()
    omega = w64.numel()
    eps2 = MAG_EPS**2
    numerator = eps2 + (sigma**2 + 1) * ref64.pow(2).sum() / omega
    denominator = eps2 + sigma**2 * (w64 - w064).pow(2)
    return float(0.25 * torch.log(numerator / denominator).sum()) + math.log(m / sigma) + 10


def paper_scale(bound: float, m: int) -> float:
    """A bound as the paper prints it: QGen follows the reference implementation of
    Dziugaite et al. 2020, which reports a (non-log) bound as sqrt(bound / m), m the
    training-set size (docs/method.md §3)."""
    return math.sqrt(bound / m) if bound >= 0 and m > 0 else math.nan


def flatness(radius: float) -> float:
    """Raw flatness 1/σ² (pacbayes.flatness, eq. 53; pacbayes.mag.flatness, eq. 61) or
    1/α² (the sharpness counterparts)."""
    return 1.0 / radius**2


def weight_norm(w: torch.Tensor) -> float:
    """L2 norm of all weights, ||w||₂ (QGen Table 2)."""
    return float(w.double().norm())
