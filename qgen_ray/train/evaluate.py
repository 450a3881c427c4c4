"""Evaluation in eval mode without augmentation: mean cross-entropy and accuracy."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

EVAL_BATCH = 1000  # images per forward pass in evaluation (memory only, not science)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    normalize: Callable[[torch.Tensor], torch.Tensor],
    batch_size: int = EVAL_BATCH,
) -> tuple[float, float]:
    """(mean loss, accuracy in [0, 1]) of `model` on uint8 images `x`, eval mode.

    `x` may live on any device; batches move to the model's device.
    """
    was_training = model.training
    model.eval()
    first = next(model.parameters())
    device, dtype = first.device, first.dtype
    total_loss, correct = 0.0, 0
    for i in range(0, len(x), batch_size):
        xb = normalize(x[i : i + batch_size].to(device)).to(dtype)
        yb = y[i : i + batch_size].to(device)
        logits = model(xb)
        total_loss += float(F.cross_entropy(logits, yb, reduction="sum"))
        correct += int((logits.argmax(1) == yb).sum())
    model.train(was_training)
    return total_loss / len(x), correct / len(x)
