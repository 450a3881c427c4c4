"""The σ / α search: it hits the target drop, and the fast mode agrees with the faithful one.

Precision notes (measured on these digits CNNs, see benchmarks/measures_fast_vs_faithful.py):
the training accuracy of one perturbed model varies by ~0.06 from one perturbation to the
next, so a single faithful search (10 perturbations per step) carries ~0.02 of Monte-Carlo
noise in its drop, i.e. ~10% in σ. Tests that compare against the target or between modes
therefore either raise the sample counts (same algorithm, larger sizes) or average the
searches over seeds; each test says which.
"""

from __future__ import annotations

import math

import pytest
import torch
from scipy.stats import kendalltau

from qgen_ray.measures import compute_measures, fold_batchnorm
from qgen_ray.measures.evaluate import CleanPredictions, ForwardCounter, correct_predictions
from qgen_ray.measures.params import ParamLayout
from qgen_ray.measures.perturb import FAMILIES, ascend
from qgen_ray.measures.search import FlatnessSearch, protocol_for
from qgen_ray.measures.toy import digits, tiny_cnn, train_tiny

TARGET = 0.1

# (width, epochs, weight decay): five digits CNNs whose σ are 15-30% apart
AGREEMENT_MODELS = [(8, 3, 0.0), (8, 10, 1e-3), (8, 20, 0.0), (16, 10, 0.0), (4, 3, 0.0)]


@pytest.fixture(scope="module")
def data():
    return digits(600, seed=0)


@pytest.fixture(scope="module")
def models(data):
    x, y = data
    return [
        train_tiny(tiny_cnn(width, seed=0), x, y, epochs=epochs, weight_decay=wd)
        for width, epochs, wd in AGREEMENT_MODELS
    ]


def _fresh_drop(model, x, y, family_name: str, radius: float, k: int, seed: int) -> float:
    """Mean training-accuracy drop of `k` fresh perturbations at `radius`, written from
    the primitives (plain loop; sharpness: the paper's 20 ascent steps, lr 1e-4)."""
    folded = fold_batchnorm(model)
    layout = ParamLayout.of(folded)
    w = layout.flatten(folded)
    family = FAMILIES[family_name]
    gen = torch.Generator().manual_seed(seed)
    scale = family.scale(radius, w)
    u = scale * family.directions(k, layout.numel, gen, w.device)
    if family.worst_case:
        idx = torch.randint(0, x.shape[0], (20, 128), generator=gen)
        batches = [(x[i], y[i]) for i in idx]  # vmapped: equal to the loop (test_perturb)
        u = ascend(folded, layout, w, u, scale, batches, 1e-4, ForwardCounter(), batched=True)
    count = ForwardCounter()
    clean = correct_predictions(folded, layout, w[None], x, y, count)[0].float()
    perturbed = correct_predictions(folded, layout, w + u, x, y, count).float()
    return float((clean[None] - perturbed).mean())


@pytest.mark.parametrize("name", ["pacbayes_mag_init", "sharpness_init"])
def test_fresh_noise_at_returned_radius_drops_accuracy_by_target(models, data, name):
    """The fast search with 96 perturbations (64 restarts) and a ±0.005 band (its default
    sizes leave ~0.015 of noise, the paper's ~0.02); re-evaluated with 120 fresh ones."""
    x, y = data
    model, init = models[2]
    overrides = dict(samples=96, restarts=64, tolerance=0.005)
    (row,) = compute_measures(model, init, x, y, names=[name], protocol_overrides=overrides)
    assert row["converged"]
    drop = _fresh_drop(model, x, y, name.rsplit("_", 1)[0], row["sigma"], 120, seed=99)
    assert abs(drop - TARGET) <= 0.02


def _geomean_sigmas(models, data, name, mode, seeds, overrides=None) -> list[float]:
    x, y = data
    out = []
    for model, init in models:
        sigmas = [
            compute_measures(model, init, x, y, names=[name], mode=mode, seed=s,
                             protocol_overrides=overrides)[0]["sigma"]
            for s in range(seeds)
        ]  # fmt: skip
        out.append(math.exp(sum(map(math.log, sigmas)) / seeds))
    return out


@pytest.mark.parametrize("name", ["pacbayes_init", "pacbayes_mag_init"])
def test_fast_agrees_with_faithful_gaussian(models, data, name):
    """Default protocols, unchanged; each mode averaged (geometric mean) over 3 seeds."""
    fast = _geomean_sigmas(models, data, name, "fast", 3)
    faithful = _geomean_sigmas(models, data, name, "faithful", 3)
    for a, b in zip(fast, faithful):
        assert abs(a / b - 1) <= 0.10, (fast, faithful)
    assert kendalltau(fast, faithful).statistic >= 0.8


def test_fast_agrees_with_faithful_sharpness(models, data):
    """Sharpness on two of the models (α about 0.09 and 0.12; the others are either too
    close in α to order reliably or, like model 0, so noisy that one random start in the
    box moves the accuracy by 0.13 sd). The sharpness curve is shallow (the paper's
    ±0.01 band alone spans ±8% in α), so both modes run with 48 restarts and, to keep the
    sequential faithful ascent affordable, 1 ascent step instead of 20 (the algorithm is
    unchanged; the benchmark runs the full protocol); 3 seeds each."""
    subset = [models[1], models[3]]
    sizes = dict(restarts=48, ascent_steps=1)
    fast = _geomean_sigmas(subset, data, "sharpness_init", "fast", 3, sizes)
    faithful = _geomean_sigmas(subset, data, "sharpness_init", "faithful", 3, sizes)
    for a, b in zip(fast, faithful):
        assert abs(a / b - 1) <= 0.10, (fast, faithful)
    assert (fast[0] < fast[1]) == (faithful[0] < faithful[1])


def test_common_random_numbers_and_antithetic_directions(models, data):
    x, y = data
    folded = fold_batchnorm(models[0][0])
    layout = ParamLayout.of(folded)
    w = layout.flatten(folded)
    clean = CleanPredictions(folded, layout, w, x, y, torch.arange(x.shape[0]))
    fast = protocol_for("fast", samples=6, antithetic=True)
    search = FlatnessSearch(FAMILIES["pacbayes"], fast, folded, layout, w, x, y, clean, 0)
    d = search.directions()
    assert torch.equal(d[3:], -d[:3]) and search.directions() is d  # drawn once (CRN)
    paper = FlatnessSearch(
        FAMILIES["pacbayes"], protocol_for("faithful"), folded, layout, w, x, y, clean, 0
    )
    assert not torch.equal(paper.directions(), paper.directions())  # fresh every step
