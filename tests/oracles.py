"""Independent answers the tests hold the package to, written from its primitives.

Not fixtures: plain functions that recompute a quantity the slow, obvious way.
"""

from __future__ import annotations

import torch

from qgen_ray.measures import folded_weights
from qgen_ray.measures.evaluate import ForwardCounter, correct_predictions
from qgen_ray.measures.perturb import FAMILIES, ascend

PAPER_ASCENT = dict(steps=20, batch=128, lr=1e-4)  # QGen App. B.2


def fresh_drops(model, x, y, family_name: str, radius: float, k: int, seed: int) -> torch.Tensor:
    """[k] training-accuracy drops of `k` fresh perturbations at `radius`, each on the
    whole of (x, y): what one step of the faithful protocol measures, one value per
    perturbation (sharpness: the paper's ascent from each random start, with mini-batches
    drawn per restart). Their mean is the drop at `radius`; sd / sqrt(k) its standard error."""
    folded, layout, w = folded_weights(model)
    family = FAMILIES[family_name]
    gen = torch.Generator().manual_seed(seed)
    scale = family.scale(radius, w)
    u = scale * family.directions(k, layout.numel, gen, w.device)
    if family.worst_case:
        steps, batch, lr = PAPER_ASCENT["steps"], PAPER_ASCENT["batch"], PAPER_ASCENT["lr"]
        starts = []
        for j in range(k):
            idx = torch.randint(0, x.shape[0], (steps, batch), generator=gen)
            batches = [(x[i], y[i]) for i in idx]
            starts.append(ascend(folded, layout, w, u[j : j + 1], scale, batches, lr,
                                 ForwardCounter()))  # fmt: skip
        u = torch.cat(starts)
    count = ForwardCounter()
    clean = correct_predictions(folded, layout, w[None], x, y, count)[0].float()
    perturbed = correct_predictions(folded, layout, w + u, x, y, count).float()
    return (clean[None] - perturbed).mean(1)
