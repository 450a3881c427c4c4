"""The σ / α search: the largest radius whose perturbations cost 0.1 training accuracy.

One search routine serves the four perturbation families (`perturb.FAMILIES`) in two
modes, which differ only in the `SearchProtocol` knobs:

faithful (QGen Appendix B.2, Jiang et al. 2019 §C):
    bisection on r in the bracket [0, 2] (the reference implementation's bracket; see
    `upper` for how it grows), at most 15 steps; each step draws 10 fresh perturbations
    (sharpness: 10 fresh random starts, each with its own ascent mini-batches) and
    measures the mean training accuracy on the FULL training set; stop as soon as the
    mean drop is within 0.1 ± 0.01 (`converged`), else move the bracket end.

fast (ours):
    bisection on log r in [1e-6, 2]; the same K directions (and ascent mini-batches) at
    every radius (common random numbers: the drop becomes a smooth function of r); each
    step reads the training set in a fixed random order in chunks (128, 256, 512, ...
    images) and after every chunk forms the paired per-image drop
    d_i = clean_i − mean_k perturbed_ki, its mean D and standard error SE; it decides
    early: "too much" if D − z·SE > target, "too little" if D + z·SE < target,
    "converged" if |D − target| ≤ tol and z·SE ≤ tol; at the full set the point estimate
    decides. All K perturbations of a chunk go through the network as one vmap call
    (on CUDA; see `evaluate.use_vmap`).

In both modes `converged` means the final accuracy drop is within the tolerance, and the
returned radius is that of the last step (the converged one when converged).
"""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from qgen_ray.errors import UserError
from qgen_ray.measures.evaluate import (
    CleanPredictions,
    ForwardCounter,
    correct_predictions,
    use_vmap,
)
from qgen_ray.measures.params import ParamLayout
from qgen_ray.measures.perturb import Family, ascend

TOO_LOW, TOO_HIGH, IN_BAND = "too_low", "too_high", "in_band"


@dataclass(frozen=True)
class SearchProtocol:
    """Knobs of a σ / α search. `PROTOCOLS["faithful"]` is the paper's; `["fast"]` ours."""

    mode: str
    iterations: int = 15  # bisection steps at most (QGen App. B.2: 15)
    samples: int = 10  # perturbations (PAC-Bayes) / restarts (sharpness) per step (App. B.2)
    target: float = 0.1  # training-accuracy drop sought, fraction (Jiang et al. §C)
    tolerance: float = 0.01  # |drop − target| ≤ tolerance ends the search (Jiang et al. §C)
    log_space: bool = False  # bisect log r (geometric midpoint) instead of r
    lower: float = 0.0  # bracket lower end (radius units); > 0 when log_space
    upper: float = 2.0  # bracket upper end; while no step has overshot the target, a step
    #                     that falls short at r raises it to max(upper, 4 r) (so σ* > 2 is
    #                     found too). 2.0 is the reference implementation's bracket.
    fresh_noise: bool = True  # new directions every step (paper) / the same K (CRN)
    first_chunk: int | None = None  # images in the first look, doubling after; None: all
    z: float = 2.0  # confidence-interval half-width in standard errors (early decisions)
    ascent_steps: int = 20  # sharpness gradient-ascent steps (QGen App. B.2: 20)
    ascent_lr: float = 1e-4  # ascent SGD learning rate (QGen App. B.2: 1e-4)
    ascent_batch: int = 128  # images per ascent step (paper: the training batch, 128)
    eval_batch: int = 1024  # images per forward call (memory bound, no effect on results)
    batched: bool | None = False  # vmap the K perturbations (None: on CUDA only)


PROTOCOLS: dict[str, SearchProtocol] = {
    "faithful": SearchProtocol(mode="faithful"),
    "fast": SearchProtocol(
        mode="fast",
        samples=16,
        log_space=True,
        lower=1e-6,
        fresh_noise=False,
        first_chunk=128,
        ascent_batch=32,
        batched=None,
    ),
}


def protocol_for(mode: str, **overrides) -> SearchProtocol:
    """The protocol of a mode name, with knobs overridden (tests shrink the sizes)."""
    if mode not in PROTOCOLS:
        raise UserError(f"unknown search mode {mode!r}; valid modes: {', '.join(PROTOCOLS)}")
    return replace(PROTOCOLS[mode], **overrides)


@dataclass
class SearchResult:
    """Outcome of one search: the radius (σ, σ', α or α') and how it was reached."""

    radius: float
    drop: float  # the accuracy drop measured at `radius`
    converged: bool
    forward_images: int
    seconds: float
    steps: list[tuple[float, float]] = field(default_factory=list)  # (radius, drop) per step


def stream_seed(seed: int, stream: str) -> int:
    """A 63-bit seed for one named random stream, stable across runs and platforms."""
    digest = hashlib.sha256(f"{seed}:{stream}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


class FlatnessSearch:
    """Finds the radius of one perturbation family for one (folded) model."""

    def __init__(
        self,
        family: Family,
        protocol: SearchProtocol,
        model: nn.Module,
        layout: ParamLayout,
        w: torch.Tensor,
        x: torch.Tensor,
        y: torch.Tensor,
        clean: CleanPredictions,
        seed: int,
    ):
        self.family, self.protocol = family, protocol
        self.model, self.layout, self.w, self.x, self.y = model, layout, w, x, y
        self.clean, self.order = clean, clean.order
        self.counter = ForwardCounter()
        self.batched = use_vmap(protocol.batched, x.device)
        self.gen = torch.Generator(device=x.device)
        self.gen.manual_seed(stream_seed(seed, family.name))
        self._directions: torch.Tensor | None = None
        self._batches: list | None = None

    # -- perturbations ---------------------------------------------------------------
    def directions(self) -> torch.Tensor:
        """[K, ω] unit-scale directions: fresh per call, or drawn once (CRN)."""
        if self.protocol.fresh_noise or self._directions is None:
            self._directions = self.family.directions(
                self.protocol.samples, self.layout.numel, self.gen, self.x.device
            )
        return self._directions

    def ascent_batches(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Mini-batches for the ascent steps: consecutive slices of reshuffled passes
        over the training set (fresh per call, or drawn once when CRN)."""
        if self.protocol.fresh_noise or self._batches is None:
            p, n = self.protocol, self.x.shape[0]
            need = p.ascent_steps * p.ascent_batch
            perms = [
                torch.randperm(n, generator=self.gen, device=self.x.device)
                for _ in range(math.ceil(need / n))
            ]
            idx = torch.cat(perms)[:need].reshape(p.ascent_steps, p.ascent_batch)
            self._batches = [(self.x[i], self.y[i]) for i in idx]
        return self._batches

    def perturbed_weights(self, radius: float) -> torch.Tensor:
        """[K, ω] perturbed weight vectors at `radius` (after the ascent for sharpness)."""
        half_width = self.family.scale(radius, self.w)
        u = half_width * self.directions()
        if self.family.worst_case:
            p = self.protocol
            args = (self.model, self.layout, self.w)
            if p.fresh_noise:  # every restart draws its own ascent mini-batches
                u = torch.cat(
                    [
                        ascend(*args, u[j : j + 1], half_width, self.ascent_batches(),
                               p.ascent_lr, self.counter, self.batched)
                        for j in range(u.shape[0])
                    ]
                )
            else:
                u = ascend(*args, u, half_width, self.ascent_batches(), p.ascent_lr,
                           self.counter, self.batched)  # fmt: skip
        return self.w + u

    # -- one bisection step ----------------------------------------------------------
    def probe(self, radius: float) -> tuple[float, str]:
        """Accuracy drop at `radius` and the verdict: too low, too high, or in band."""
        p = self.protocol
        flat = self.perturbed_weights(radius)
        n_total = self.x.shape[0]
        seen, size, diffs = 0, p.first_chunk or n_total, []
        while True:
            upto = min(n_total, seen + size)
            correct = correct_predictions(
                self.model, self.layout, flat, self.x, self.y, self.counter,
                self.batched, p.eval_batch, index=self.order[seen:upto],
            )  # fmt: skip
            clean = self.clean.upto(upto, self.counter)[seen:upto]
            diffs.append(clean.float() - correct.float().mean(0))
            seen, size = upto, 2 * size
            d = torch.cat(diffs)
            drop = float(d.mean())
            se = max(float(d.std()) / math.sqrt(seen), 1.0 / seen) if seen > 1 else 1.0
            verdict = self._decide(drop, se, final=seen == n_total)
            if verdict is not None:
                return drop, verdict

    def _decide(self, drop: float, se: float, final: bool) -> str | None:
        p = self.protocol
        in_band = abs(drop - p.target) <= p.tolerance
        if final:
            return IN_BAND if in_band else (TOO_HIGH if drop > p.target else TOO_LOW)
        if in_band and p.z * se <= p.tolerance:
            return IN_BAND
        if drop - p.z * se > p.target:
            return TOO_HIGH
        if drop + p.z * se < p.target:
            return TOO_LOW
        return None

    # -- the search ------------------------------------------------------------------
    def run(self) -> SearchResult:
        p = self.protocol
        start = time.perf_counter()
        lo, hi, overshot = p.lower, p.upper, False
        steps: list[tuple[float, float]] = []
        radius, drop, verdict = hi, float("nan"), None
        for _ in range(p.iterations):
            radius = math.sqrt(lo * hi) if p.log_space else (lo + hi) / 2
            drop, verdict = self.probe(radius)
            steps.append((radius, drop))
            if verdict == IN_BAND:
                break
            if verdict == TOO_HIGH:
                hi, overshot = radius, True
            else:
                lo = radius
                if not overshot:
                    hi = max(hi, 4 * radius)
        return SearchResult(
            radius=radius,
            drop=drop,
            converged=verdict == IN_BAND,
            forward_images=self.counter.images,
            seconds=time.perf_counter() - start,
            steps=steps,
        )
