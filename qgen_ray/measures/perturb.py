"""The four perturbation families of docs/method.md §3 and the sharpness gradient ascent.

A perturbation is u = scale(radius, w) ⊙ direction, with a per-coordinate scale:

    family          direction        scale (std or box half-width)       radius
    pacbayes        N(0, 1)          σ                                   σ
    pacbayes_mag    N(0, 1)          sqrt(σ'² w² + ε²)                   σ'
    sharpness       U(-1, 1)         α                                   α
    sharpness_mag   U(-1, 1)         α' (|w| + ε)                        α'

so `u ~ N(0, σ² I)`, `u_i ~ N(0, σ'² w_i² + ε²)`, `|u_i| ≤ α`, `|u_i| ≤ α'(|w_i| + ε)`
(ε = `formulas.MAG_EPS`). Keeping the direction apart from the scale is what lets the fast
search reuse the same directions at every radius (common random numbers).

Sharpness (worst case) then runs `ascent_steps` steps of gradient ASCENT on the training
loss from that random start (SGD without momentum: u ← u + lr · ∇L(w + u)), eval mode,
projecting u back into the box after every step. `ascend` does it for K restarts, one at
a time (plain loop) or all at once (vmap of torch.func.grad); a test checks they agree.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from qgen_ray.measures.formulas import MAG_EPS
from qgen_ray.measures.forward import ForwardCounter
from qgen_ray.measures.params import ParamLayout


@dataclass(frozen=True)
class Family:
    """One way of perturbing the weights; `name` is the measure name without _init/_orig."""

    name: str
    worst_case: bool  # box + gradient ascent (sharpness) instead of Gaussian (PAC-Bayes)
    magnitude_aware: bool  # scale with |w| (Keskar et al.) instead of a uniform scale

    def scale(self, radius: float, w: torch.Tensor) -> torch.Tensor:
        """Per-coordinate std (Gaussian) or box half-width (worst case), shape of `w`."""
        if not self.magnitude_aware:
            return torch.full_like(w, radius)
        if self.worst_case:
            return radius * (w.abs() + MAG_EPS)
        return torch.sqrt(radius**2 * w.pow(2) + MAG_EPS**2)

    def directions(
        self, k: int, omega: int, generator: torch.Generator, device: torch.device
    ) -> torch.Tensor:
        """K unit-scale directions [K, ω]: standard normal, or uniform on [-1, 1]."""
        if self.worst_case:
            u = torch.rand(k, omega, generator=generator, device=device)
            return u.mul_(2).sub_(1)
        return torch.randn(k, omega, generator=generator, device=device)


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family("pacbayes", worst_case=False, magnitude_aware=False),
        Family("pacbayes_mag", worst_case=False, magnitude_aware=True),
        Family("sharpness", worst_case=True, magnitude_aware=False),
        Family("sharpness_mag", worst_case=True, magnitude_aware=True),
    )
}


def ascend(
    model: nn.Module,
    layout: ParamLayout,
    w: torch.Tensor,
    u: torch.Tensor,
    half_width: torch.Tensor,
    batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
    lr: float,
    counter: ForwardCounter,
    batched: bool = False,
) -> torch.Tensor:
    """Projected gradient ascent on the training loss for K restarts; returns the final u.

    `u` [K, ω] is the starting perturbation (inside the box), `half_width` [ω] the box,
    `batches` one (images, labels) mini-batch per step, shared by the K restarts. Each
    step: u ← clamp(u + lr · ∇_w CE(f(w + u; x), y), -half_width, half_width).
    """
    u = u.clone()
    k = u.shape[0]

    def loss_of(theta: torch.Tensor, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(functional_call(model, layout.unflatten(theta), (xb,)), yb)

    batched_grad = vmap(grad(loss_of), in_dims=(0, None, None))
    for xb, yb in batches:
        if batched:
            g = batched_grad(w + u, xb, yb)
        else:
            g = torch.empty_like(u)
            for j in range(k):
                theta = (w + u[j]).requires_grad_(True)
                (g[j],) = torch.autograd.grad(loss_of(theta, xb, yb), theta)
        u = torch.maximum(torch.minimum(u + lr * g, half_width), -half_width)
        counter.add(2 * k * xb.shape[0])
    return u.detach()
