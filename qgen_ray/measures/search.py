"""The σ / α search: the largest radius whose perturbations cost 0.1 training accuracy.

One search routine serves the four perturbation families (`perturb.FAMILIES`) in two
modes, which differ only in the `SearchProtocol` knobs:

faithful (QGen Appendix B.2, Jiang et al. 2019 §C):
    bisection on r in the bracket [0, 2] (the reference implementation's bracket; see
    `upper` for how it grows), at most 15 steps; each step draws 10 fresh perturbations
    (sharpness: 10 fresh random starts, each with its own ascent mini-batches) and
    measures the mean training accuracy on the FULL training set; stop as soon as the
    mean drop is within 0.1 ± 0.01 (`converged`), else move the bracket end.

fast (ours; agrees with faithful, see benchmarks/measures_fast_vs_faithful.py):
    - common random numbers: 32 directions (sharpness: 32 random starts and one set of
      ascent mini-batches) drawn once and rescaled at every radius, so the drop is a
      smooth function of r (antithetic pairs are available but off: on one digits model
      the drops of u and −u correlated at +0.7, which halves the effective sample);
    - bisection on log r in [1e-6, 2], stepping to the log-log secant through the
      bracket ends' measured drops when both are known (`next_radius`);
    - each probe reads the training set in a fixed order in doubling chunks (32, 64, ...
      images, at most 256) and stops as soon as a confidence bound decides the bisection
      step, see `probe`; the order is stratified by the clean model's margin (every
      prefix of 2^j images has one image from each of 2^j margin slices of a random pool
      of 4096, see `sampling`), which halves the image-sampling error of a probe;
    - the ascent uses mini-batches of 8 (faithful: 128; measured: α unchanged to 0.3%),
      and the K perturbations go through the network as one vmap call where that is
      faster (`evaluate.use_vmap`).
    How closely each mode lands on a precise reference search, and what each costs, is
    measured by benchmarks/measures_fast_vs_faithful.py (figures: README, "Measured
    figures"). The faithful mode can land off the crossing: its first-in-band rule
    accepts a step whose 10-perturbation mean happened to fall in the ±0.01 band, on its
    coarse bisection grid (0.125, 0.1875, ...). The fast cost does not grow with m (the
    margin pool is ≤ 4096 images once per model), so its image saving grows with the
    training set.

In both modes `converged` means the final accuracy drop is within the tolerance. The
faithful mode returns the radius of the last step (the converged one when converged); the
fast mode, once converged, the radius where its (common-random-number, hence smooth) drop
curve crosses the target, interpolated between the probes either side (`crossing_radius`):
the in-band probe alone can sit anywhere in the ±tolerance band, ±5% in σ on these models.
"""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from qgen_ray.errors import UserError
from qgen_ray.measures.forward import (
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
    samples: int = 10  # Gaussian perturbations per step (PAC-Bayes; QGen App. B.2: 10)
    restarts: int = 10  # random starts per step (sharpness; QGen App. B.2: 10)
    target: float = 0.1  # training-accuracy drop sought, fraction (Jiang et al. §C)
    tolerance: float = 0.01  # |drop − target| ≤ tolerance ends the search (Jiang et al. §C)
    log_space: bool = False  # bisect log r (geometric midpoint) instead of r
    interpolate: bool = False  # log space only: next r from a log-log secant through the
    #                            bracket ends' measured drops (safeguarded, see next_radius)
    refine: bool = False  # report the radius at the target drop itself, interpolated
    #                       (log-log) between the probes closest below and above it, instead
    #                       of the in-band probe's radius; needs common random numbers (the
    #                       probes then lie on one smooth drop curve). See `crossing_radius`
    lower: float = 0.0  # bracket lower end (radius units); > 0 when log_space
    upper: float = 2.0  # bracket upper end; while no step has overshot the target, a step
    #                     that falls short at r raises it to max(upper, 4 r) (so σ* > 2 is
    #                     found too). 2.0 is the reference implementation's bracket.
    fresh_noise: bool = True  # new directions every step (paper) / the same K (CRN)
    antithetic: bool = False  # directions in pairs (u, −u): same law; lowers the variance
    #                           only when the two drops anti-correlate (model-dependent)
    first_chunk: int | None = None  # images of the first look, doubling after; None: all
    z: float = 2.0  # confidence-interval half-width in standard errors (early decisions)
    sd_floor: float = 0.3  # least per-image spread the intervals assume, sqrt(0.1 · 0.9):
    #                        the per-image drops are skewed (a few fragile images carry
    #                        them), so a small sample that misses those images shows a
    #                        falsely small spread and would decide "too little" too early
    stratify: bool = False  # read the images stratified by clean margin (max_images
    #                         slices of a random pool, see `sampling`) instead of at random
    pool_max: int = 4096  # images of that pool at most (evaluated once per model)
    max_images: int | None = None  # images read per radius at most (None: all). With K
    #                                directions, ~ the n where the image error matches the
    #                                directions' for random reading (sd ≈ 0.19 per image vs
    #                                0.06 per direction on digits CNNs): n ≈ K · (0.19 /
    #                                0.06)² ≈ 320 for K = 32; the fast mode reads 256, and
    #                                its margin-stratified order halves the image error
    ascent_steps: int = 20  # sharpness gradient-ascent steps (QGen App. B.2: 20)
    ascent_lr: float = 1e-4  # ascent SGD learning rate (QGen App. B.2: 1e-4)
    ascent_batch: int = 128  # images per ascent step (paper: the training batch, 128)
    eval_batch: int = 1024  # images per forward call (memory bound, no effect on results)
    batched: bool | None = False  # vmap the K perturbations (None: auto, see use_vmap)


PROTOCOLS: dict[str, SearchProtocol] = {
    "faithful": SearchProtocol(mode="faithful"),
    "fast": SearchProtocol(
        mode="fast",
        samples=32,
        restarts=32,
        log_space=True,
        interpolate=True,
        refine=True,
        lower=1e-6,
        fresh_noise=False,
        first_chunk=32,
        max_images=256,
        stratify=True,
        ascent_batch=8,
        batched=None,
    ),
}


def protocol_for(mode: str, **overrides) -> SearchProtocol:
    """The protocol of a mode name, with knobs overridden (tests shrink the sizes)."""
    if mode not in PROTOCOLS:
        raise UserError(f"unknown search mode {mode!r}; valid modes: {', '.join(PROTOCOLS)}")
    protocol = replace(PROTOCOLS[mode], **overrides)
    if protocol.log_space and protocol.lower <= 0:
        raise UserError("a log-space search needs a lower bracket end > 0; set lower=1e-6")
    if min(protocol.samples, protocol.restarts, protocol.iterations) < 1:
        raise UserError("samples, restarts and iterations must be at least 1")
    return protocol


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


def crossing_radius(steps: list[tuple[float, float]], target: float) -> float:
    """The radius where the drop curve crosses `target`, from the (radius, drop) probes:
    the log-log secant between the largest probe below the target and the smallest one at
    or above it (drop ≈ c·r^k between them). The last probe's radius when either side is
    missing or the two are out of order (a drop of 0 has no logarithm: it counts as
    missing)."""
    last = steps[-1][0]
    below = [(r, d) for r, d in steps if 0 < d < target]
    above = [(r, d) for r, d in steps if d >= target]
    if not below or not above:
        return last
    (r0, d0), (r1, d1) = max(below), min(above)
    if not r0 < r1:
        return last
    t = (math.log(target) - math.log(d0)) / (math.log(d1) - math.log(d0))
    return math.exp(math.log(r0) + t * (math.log(r1) - math.log(r0)))


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
        self.k = protocol.restarts if family.worst_case else protocol.samples
        self.counter = ForwardCounter()
        self.batched = use_vmap(protocol.batched, x.device)
        self.batched_ascent = use_vmap(protocol.batched, x.device, ascent=True)
        self.gen = torch.Generator(device=x.device)
        self.gen.manual_seed(stream_seed(seed, family.name))
        self._directions: torch.Tensor | None = None
        self._batches: list | None = None

    # -- perturbations ---------------------------------------------------------------
    def directions(self) -> torch.Tensor:
        """[K, ω] unit-scale directions: fresh per call, or drawn once (CRN); with
        `antithetic` the second half is the negated first half."""
        if self.protocol.fresh_noise or self._directions is None:
            k, omega, dev = self.k, self.layout.numel, self.x.device
            if self.protocol.antithetic:
                half = self.family.directions((k + 1) // 2, omega, self.gen, dev)
                self._directions = torch.cat([half, -half])[:k]
            else:
                self._directions = self.family.directions(k, omega, self.gen, dev)
        return self._directions

    def ascent_batches(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Mini-batches for the ascent steps: consecutive slices of reshuffled passes
        over the training set (fresh per call, or drawn once when CRN)."""
        if self.protocol.fresh_noise or self._batches is None:
            p, n = self.protocol, self.x.shape[0]
            need = p.ascent_steps * p.ascent_batch
            perms = [torch.empty(0, dtype=torch.long, device=self.x.device)] + [
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
                )  # fmt: skip
            else:
                u = ascend(*args, u, half_width, self.ascent_batches(), p.ascent_lr,
                           self.counter, self.batched_ascent)  # fmt: skip
        return self.w + u

    # -- one bisection step ----------------------------------------------------------
    def probe(self, radius: float) -> tuple[float, str]:
        """Accuracy drop at `radius` and the verdict: too low, too high, or in band.

        Reads the images in `order`: `first_chunk` of them, then twice as many at every
        further look, up to `max_images` (all of them at once when `first_chunk` is
        None). After each look it forms the paired per-image drops
        d_i = clean_i − mean_k perturbed_ki, their mean D and standard error
        SE = max(sd(d), sd_floor) / sqrt(n) · sqrt(1 − n/m) (finite population), and
        stops early when D ± z·SE excludes the target (or lies inside the band); at the
        cap the point estimate decides. The cap is fixed, not data-driven, so when the
        reading stops does not bias D.
        """
        p = self.protocol
        flat = self.perturbed_weights(radius)
        n_total = self.x.shape[0]
        cap = min(n_total, p.max_images or n_total)
        seen, upto, diffs = 0, min(cap, p.first_chunk or cap), []
        while True:
            correct = correct_predictions(
                self.model, self.layout, flat, self.x, self.y, self.counter,
                self.batched, p.eval_batch, index=self.order[seen:upto],
            ).float()  # fmt: skip
            clean = self.clean.upto(upto, self.counter)[seen:upto].float()
            diffs.append(clean - correct.mean(0))
            seen, upto = upto, min(cap, 2 * upto)
            d = torch.cat(diffs)
            drop = float(d.mean())
            if seen == cap:
                return drop, self._decide(drop, 0.0)
            spread = max(float(d.std()) if seen > 1 else 1.0, p.sd_floor)
            se = spread / math.sqrt(seen) * math.sqrt(1 - seen / n_total)
            verdict = self._decide(drop, se)
            if verdict is not None:
                return drop, verdict

    def _decide(self, drop: float, se: float) -> str | None:
        """Verdict from the estimate and its standard error (0: decide by the point
        estimate), or None to read more images."""
        p = self.protocol
        in_band = abs(drop - p.target) <= p.tolerance
        if se == 0.0:
            return IN_BAND if in_band else (TOO_HIGH if drop > p.target else TOO_LOW)
        if in_band and p.z * se <= p.tolerance:
            return IN_BAND
        if drop - p.z * se > p.target:
            return TOO_HIGH
        if drop + p.z * se < p.target:
            return TOO_LOW
        return None

    # -- the search ------------------------------------------------------------------
    def next_radius(self, lo: float, hi: float, lo_drop: float | None,
                    hi_drop: float | None, same_end_moves: int) -> float:  # fmt: skip
        """Midpoint of the bracket (arithmetic, or geometric in log space); with
        `interpolate`, the log-log secant through the bracket ends' measured drops
        (drop ≈ c·r^k), kept inside the middle 80% of the log bracket, and the geometric
        midpoint whenever an end is unmeasured, the drops are not increasing, or the
        same end moved twice in a row (Illinois-style guard against one-sided creep)."""
        p = self.protocol
        if not p.log_space:
            return (lo + hi) / 2
        mid = math.sqrt(lo * hi)
        if (
            not p.interpolate
            or lo_drop is None
            or hi_drop is None
            or not 0 < lo_drop < hi_drop
            or same_end_moves >= 2
        ):
            return mid
        t = (math.log(p.target) - math.log(lo_drop)) / (math.log(hi_drop) - math.log(lo_drop))
        t = min(max(t, 0.1), 0.9)
        return math.exp(math.log(lo) + t * (math.log(hi) - math.log(lo)))

    def run(self) -> SearchResult:
        p = self.protocol
        start = time.perf_counter()
        lo, hi, overshot = p.lower, p.upper, False
        lo_drop: float | None = None
        hi_drop: float | None = None
        last_end, same_end_moves = "", 0
        steps: list[tuple[float, float]] = []
        radius, drop, verdict = hi, float("nan"), None
        for _ in range(p.iterations):
            radius = self.next_radius(lo, hi, lo_drop, hi_drop, same_end_moves)
            drop, verdict = self.probe(radius)
            steps.append((radius, drop))
            if verdict == IN_BAND:
                break
            end = "hi" if verdict == TOO_HIGH else "lo"
            same_end_moves = same_end_moves + 1 if end == last_end else 1
            last_end = end
            if verdict == TOO_HIGH:
                hi, hi_drop, overshot = radius, drop, True
            else:
                lo, lo_drop = radius, drop
                if not overshot and 4 * radius > hi:
                    hi, hi_drop = 4 * radius, None
        if verdict == IN_BAND and p.refine:
            radius, drop = crossing_radius(steps, p.target), p.target
        return SearchResult(
            radius=radius,
            drop=drop,
            converged=verdict == IN_BAND,
            forward_images=self.counter.images,
            seconds=time.perf_counter() - start,
            steps=steps,
        )
