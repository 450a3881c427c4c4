"""Sharpness, PAC-Bayes and norm measures of trained models, and their loss landscapes.

Public API (no Ray inside; the fan-out jobs call these per model):

    compute_measures(model, init_model, x, y, names=None, mode="fast", seed=0,
                     device="cpu") -> list[dict]       rows of schema.MEASURES_COLUMNS
    MEASURES                                           registry of the measure names
    fold_batchnorm(model) -> nn.Module                 BN folded into conv/linear
    folded_weights(model) -> (folded, layout, w)       what the searches perturb
    loss_landscape(model, x, y, steps=51, span=1.0, seed=0) -> pandas.DataFrame

Modules: params (which tensors are the weights), bn_fold, formulas (the bounds),
perturb (perturbation families, gradient ascent), evaluate (batched evaluation, image
accounting), search (σ / α bisection, faithful and fast), api, landscape; toy (tiny
digits CNNs for tests and the benchmark).
"""

from qgen_ray.measures.api import MEASURES, Measure, compute_measures, folded_weights
from qgen_ray.measures.bn_fold import fold_batchnorm
from qgen_ray.measures.landscape import loss_landscape
from qgen_ray.measures.search import PROTOCOLS, SearchProtocol

__all__ = [
    "MEASURES",
    "PROTOCOLS",
    "Measure",
    "SearchProtocol",
    "compute_measures",
    "fold_batchnorm",
    "folded_weights",
    "loss_landscape",
]
