"""After QAR training (Malchiodi et al. 2026): snap every weight to its layer's nearest
representative and report accuracy before and after the snap together with the
compression ratio."""

from __future__ import annotations

import torch
from torch import nn

from qgen_ray.errors import UserError
from qgen_ray.quant.layers import quantized_layers
from qgen_ray.quant.model import compression_ratio, quant_record, unwrap
from qgen_ray.quant.qar import CodebookQuantizer

EVAL_BATCH_SIZE = 1024  # images per forward pass in `evaluate_snap` (memory only)


def snap_to_codebook_(model: nn.Module) -> None:
    """Overwrite every QAR layer's weight with its nearest codebook representative, in
    place; afterwards each layer holds at most 2^b distinct values."""
    layers = [
        layer
        for _, layer in quantized_layers(unwrap(model))
        if isinstance(layer.weight_quantizer, CodebookQuantizer)
    ]
    if not layers:
        raise UserError(
            f"snap_to_codebook_ needs a model quantized with method 'qar'; this one is "
            f"{quant_record(model)['method']!r}"
        )
    with torch.no_grad():
        for layer in layers:
            layer.weight.copy_(layer.dequantized_weight())


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Top-1 accuracy of `model` (as it is: call .eval() first) on (x, y), in [0, 1]."""
    correct = 0
    for start in range(0, len(x), EVAL_BATCH_SIZE):
        logits = model(x[start : start + EVAL_BATCH_SIZE])
        correct += int((logits.argmax(dim=1) == y[start : start + EVAL_BATCH_SIZE]).sum())
    return correct / max(len(x), 1)


def evaluate_snap(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """Snap a QAR model in place and measure it in eval mode on (x, y): acc_before,
    acc_after, acc_drop = acc_before - acc_after, compression_ratio."""
    was_training = model.training
    model.eval()
    before = accuracy(model, x, y)
    snap_to_codebook_(model)
    after = accuracy(model, x, y)
    model.train(was_training)
    return {
        "acc_before": before,
        "acc_after": after,
        "acc_drop": before - after,
        "compression_ratio": compression_ratio(model),
    }
