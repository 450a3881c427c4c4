"""Fast and faithful σ / α searches measure the same radius on the demo study's models.

The models: three of the demo's NiNs (8-bit Adam lr 1e-3, 8-bit SGD lr 0.1, 2-bit Adam lr
2e-3), trained here exactly as `make demo` trains them (the same specs and seeds, without
Ray) and read back the way `qgen measure` reads them (store → de-quantized plain model,
full training set, m = 1,347).

Both modes seek the radius where perturbing the weights costs 0.1 of training accuracy;
they differ in how they estimate that drop. So the fast mode is held to the faithful
protocol's own measurement: at the radius the fast search returns, fresh perturbations
evaluated on the whole training set (what one faithful step measures) must drop the
accuracy by 0.1. That decides on margins measured here rather than on the faithful
search's σ, whose first-in-band rule on a coarse bisection grid leaves it up to 16% off the
crossing by itself (README, "fast vs faithful"). The faithful search is still run, on the
PAC-Bayes families, and must order the models as the fast one does wherever the two models
are further apart than the faithful search's own noise.

Noise figures (measured 2026-12-02 on 5 demo models, 6 fast seeds, 1 thread): one fast
search's σ varies by 3-7% from seed to seed; 32 fresh perturbations at it drop the
accuracy by 0.077-0.136 (60 evaluations, sd 0.014 around 0.10, i.e. the fast search's own
error plus the 32 draws' sampling error of ~0.009). One faithful PAC-Bayes search's σ
varies by 3-6% from seed to seed (4 seeds on the same 5 models, ~3 s a search), the fast
one's by 3-6% too (~0.8 s).
"""

from __future__ import annotations

import math
import statistics

import pytest
import torch

from qgen_ray.data import load_image_data
from qgen_ray.measures import compute_measures
from qgen_ray.pipeline.collect import collect
from qgen_ray.pipeline.jobs import measure_inputs
from qgen_ray.store import StudyStore
from qgen_ray.train import train
from tests.support.fixtures import load_script
from tests.support.oracles import fresh_drops

pytestmark = [pytest.mark.slow, pytest.mark.statistical]
TARGET = 0.1  # the paper's drop (Jiang et al. §C), written here, not read from a protocol
# (bits, optimizer, lr) of the chosen demo models: their σ are 10-90% apart
MODELS = [(8, "adam", 1e-3), (8, "sgd", 0.1), (2, "adam", 2e-3)]
FAST_SEEDS = 2  # fast searches per model (each gets its own fresh perturbations)
FRESH = 24  # fresh perturbations per fast search
# sd of one evaluation of FRESH fresh perturbations at one fast search's radius, measured
# (above: 0.014 with 32 of them; 24 add ~0.001). A floor for the sd the test measures
# from its own 6 evaluations, which is itself uncertain with so few.
SINGLE_SD = 0.016
# sd of log σ of one search, seed to seed (measured above: 0.03-0.06 for both modes)
FAITHFUL_LOG_SD = FAST_LOG_SD = 0.06


@pytest.fixture(scope="module")
def demo_models(tmp_path_factory):
    """[(model, init, x, y)] of the chosen demo models, from a real study store."""
    study = load_script("demo").STUDY
    specs = [next(s for s in study.specs() if (s.bits, s.optimizer, s.lr) == key) for key in MODELS]
    store = StudyStore(str(tmp_path_factory.mktemp("store") / study.name))
    data = load_image_data(study.dataset)
    for spec in specs:
        trial = store.trial(spec.model_id)
        trial.write_result(train(spec, data, trial))
    collect(store)
    return [measure_inputs(store, data, s.model_id, torch.device("cpu")) for s in specs]


def _sigma(inputs, family: str, mode: str, seed: int) -> float:
    model, init, x, y = inputs
    (row,) = compute_measures(model, init, x, y, names=[f"{family}_init"], mode=mode, seed=seed)
    return row["sigma"]


@pytest.mark.parametrize("family", ["pacbayes", "pacbayes_mag", "sharpness", "sharpness_mag"])
def test_fast_radius_drops_the_faithful_measurement_by_the_target(demo_models, family, stat_seed):
    """At each fast σ, FRESH fresh perturbations on the full training set: their mean drop
    over the 3 models x 2 seeds is the target within 5 standard errors of a mean of 6 (sd:
    the larger of the spread measured here and SINGLE_SD, so ±0.033 at least), and each
    single evaluation within 6 SINGLE_SD (±0.096). A fast search aiming at a drop of 0.2
    lands at ~0.2 and fails both."""
    drops = []
    for m, inputs in enumerate(demo_models):
        model, _, x, y = inputs
        for s in range(FAST_SEEDS):
            seed = 1000 * stat_seed + 10 * m + s
            sigma = _sigma(inputs, family, "fast", seed)
            drops.append(float(fresh_drops(model, x, y, family, sigma, FRESH, seed + 5).mean()))
    mean, sd = statistics.mean(drops), max(statistics.stdev(drops), SINGLE_SD)
    assert abs(mean - TARGET) <= 5 * sd / math.sqrt(len(drops)), (drops, sd)
    assert all(abs(d - TARGET) <= 6 * SINGLE_SD for d in drops), drops


def test_fast_orders_models_as_faithful_where_they_are_apart(demo_models, stat_seed):
    """PAC-Bayes magnitude-aware σ', per model the mean log σ' of 3 fast and 3 faithful
    searches. Each model's two means agree within the two modes' documented offsets from
    the precise reference (6% faithful, 3% fast; README) plus 4 standard errors; and over
    every pair of models whose faithful means are further apart than those offsets plus 4
    standard errors of a difference, both modes order the pair the same way. The demo
    models' σ' span 1.9x, so one pair (8-bit Adam vs SGD lr 0.1, 1.9x) is always that far
    apart, and another (2-bit Adam vs SGD, 1.6x) usually. Plain PAC-Bayes σ spans only
    1.5x over all 16 demo models, too close for a decisive order: it is checked by the
    calibration test above."""
    family, runs = "pacbayes_mag", 3
    seeds = [1000 * stat_seed + 100 + s for s in range(runs)]
    fast, faithful = [], []
    for inputs in demo_models:
        for mode, out in (("fast", fast), ("faithful", faithful)):
            out.append(sum(math.log(_sigma(inputs, family, mode, s)) for s in seeds) / runs)
    se = math.sqrt((FAITHFUL_LOG_SD**2 + FAST_LOG_SD**2) / runs)
    offsets = math.log(1.06) + math.log(1.03)
    for a, b in zip(fast, faithful):
        assert abs(a - b) <= offsets + 4 * se, (fast, faithful)
    apart = 2 * math.log(1.06) + 4 * math.sqrt(2) * se
    pairs = [
        (i, j)
        for i in range(len(fast))
        for j in range(i + 1, len(fast))
        if abs(faithful[i] - faithful[j]) > apart
    ]
    assert pairs, f"no two models apart beyond the faithful noise ({apart:.3f}): {faithful}"
    for i, j in pairs:
        assert (fast[i] < fast[j]) == (faithful[i] < faithful[j]), (fast, faithful)
