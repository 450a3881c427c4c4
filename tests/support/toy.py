"""Tiny trained CNNs on scikit-learn's digits: fixtures for the measures' tests and benchmark.

Digits are 8×8 grey images (1797 of them, 10 classes), bundled with scikit-learn, so these
models train in well under a second on a CPU and still reach a nontrivial accuracy. The
network is the shape the measures must handle: Conv2d(bias) → BatchNorm2d → ReLU blocks,
pooling, a Linear head.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn


def digits(n: int | None = None, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(x [n, 1, 8, 8] standardized float32, y [n] int64): a seeded subset of digits."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32).reshape(-1, 1, 8, 8)
    y = torch.tensor(data.target, dtype=torch.int64)
    if n is not None:
        idx = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))[:n]
        x, y = x[idx], y[idx]
    return (x - x.mean()) / x.std(), y


def tiny_cnn(width: int = 8, seed: int = 0) -> nn.Sequential:
    """Conv-BN-ReLU, max-pool, Conv-BN-ReLU, global average pool, Linear (10 classes)."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, width, 3, padding=1),
        nn.BatchNorm2d(width),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(width, 2 * width, 3, padding=1),
        nn.BatchNorm2d(2 * width),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(2 * width, 10),
    )


def train_tiny(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    epochs: int = 5,
    lr: float = 1e-2,
    weight_decay: float = 0.0,
    batch_size: int = 64,
    seed: int = 0,
) -> tuple[nn.Module, nn.Module]:
    """(trained model, its initialization) after `epochs` of Adam; both in eval mode."""
    init = copy.deepcopy(model).eval()
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(x.shape[0], generator=gen)
        for s in range(0, x.shape[0], batch_size):
            idx = perm[s : s + batch_size]
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    return model.eval(), init


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Eval-mode accuracy (fraction)."""
    return float((model.eval()(x).argmax(-1) == y).float().mean())
