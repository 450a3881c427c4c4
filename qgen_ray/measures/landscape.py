"""2-D loss landscape around the trained weights (Li et al. 2018; docs/method.md §5).

    L(a, b) = loss(w + a·d1 + b·d2),   (a, b) on a steps × steps grid over [-span, span]²

with d1, d2 random Gaussian directions, filter-normalized: for every weight tensor of two
or more dims, each output filter (slice along dim 0: a conv filter, a linear row) of the
direction is rescaled to the norm of the same filter of the weights. Directions of
one-dimensional parameters (biases, BatchNorm γ and β) are zero, as in Li et al.'s
`ignore="biasbn"`; BatchNorm running statistics are buffers and stay as they are. The
model is evaluated in eval mode, BatchNorm NOT folded (the surface of the model as is).
"""

from __future__ import annotations

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

FILTER_EPS = 1e-10  # guards the division by an all-zero random filter (never in practice)


def filter_normalized_direction(
    params: dict[str, torch.Tensor], generator: torch.Generator
) -> dict[str, torch.Tensor]:
    """A random direction shaped like `params`, filter-normalized, zero on 1-D tensors."""
    direction = {}
    for name, p in params.items():
        if p.dim() <= 1:
            direction[name] = torch.zeros_like(p)
            continue
        d = torch.randn(p.shape, generator=generator, device=p.device, dtype=p.dtype)
        d_norm = d.flatten(1).norm(dim=1)
        p_norm = p.flatten(1).norm(dim=1)
        scale = p_norm / (d_norm + FILTER_EPS)
        direction[name] = d * scale.reshape(-1, *([1] * (p.dim() - 1)))
    return direction


@torch.no_grad()
def loss_landscape(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    steps: int = 51,
    span: float = 1.0,
    seed: int = 0,
    *,
    batch_size: int = 1024,
) -> pd.DataFrame:
    """Loss and accuracy on a steps × steps grid; columns x, y, loss, accuracy.

    `x`, `y` are the images and labels to evaluate on (on the model's device);
    `span` is the half-width of the grid in units of the filter-normalized directions;
    `batch_size` images per forward call (memory only). Deterministic given `seed`.
    """
    params = {n: p.detach() for n, p in model.named_parameters()}
    device = next(iter(params.values())).device
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    d1 = filter_normalized_direction(params, gen)
    d2 = filter_normalized_direction(params, gen)
    coords = torch.linspace(-span, span, steps).tolist()
    was_training = model.training
    model.eval()
    rows = []
    try:
        for a in coords:
            for b in coords:
                moved = {n: p + a * d1[n] + b * d2[n] for n, p in params.items()}
                loss_sum, correct = 0.0, 0
                for s in range(0, x.shape[0], batch_size):
                    logits = functional_call(model, moved, (x[s : s + batch_size],))
                    target = y[s : s + batch_size]
                    loss_sum += float(F.cross_entropy(logits, target, reduction="sum"))
                    correct += int((logits.argmax(-1) == target).sum())
                rows.append((a, b, loss_sum / x.shape[0], correct / x.shape[0]))
    finally:
        model.train(was_training)
    return pd.DataFrame(rows, columns=["x", "y", "loss", "accuracy"])
