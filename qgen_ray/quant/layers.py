"""Quantized layers: nn.Conv2d / nn.Linear subclasses that compute with the weight their
`weight_quantizer` returns, plus the conversions from and back to plain layers.

`QConv2d` is still an nn.Conv2d (same parameters, same state-dict keys plus
`weight_quantizer.*`), so code that looks for convs (BN folding, filter-normalized
directions) keeps working on a quantized model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qgen_ray.quant.base import WeightQuantizer

FLOAT_LAYER_TYPES = (nn.Conv2d, nn.Linear)  # the layers `quantize_model` wraps


class QuantizedLayer:
    """Mixin for a layer whose weight goes through `self.weight_quantizer` in forward."""

    weight: nn.Parameter
    weight_quantizer: WeightQuantizer

    def quantized_weight(self) -> torch.Tensor:
        """The weight the layer computes with (differentiable in weight and quantizer)."""
        return self.weight_quantizer(self.weight)

    def dequantized_weight(self) -> torch.Tensor:
        """The de-quantized weight w_hat, detached (QAR: snapped to the codebook)."""
        return self.weight_quantizer.dequantized(self.weight)


class QConv2d(QuantizedLayer, nn.Conv2d):
    """nn.Conv2d computing with `weight_quantizer(weight)`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.quantized_weight(), self.bias)


class QLinear(QuantizedLayer, nn.Linear):
    """nn.Linear computing with `weight_quantizer(weight)`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.quantized_weight(), self.bias)


def _rebuild(layer: nn.Module, cls: type, weight: nn.Parameter) -> nn.Module:
    """A `cls` layer with `layer`'s hyperparameters, the given weight and `layer`'s bias
    (built on the meta device, so nothing is allocated or initialized twice)."""
    if isinstance(layer, nn.Conv2d):
        new = cls(
            layer.in_channels,
            layer.out_channels,
            layer.kernel_size,
            stride=layer.stride,
            padding=layer.padding,
            dilation=layer.dilation,
            groups=layer.groups,
            bias=layer.bias is not None,
            padding_mode=layer.padding_mode,
            device="meta",
        )
    else:
        new = cls(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
    new.weight = weight
    new.bias = layer.bias
    new.train(layer.training)
    return new


def wrap_layer(layer: nn.Module, quantizer: WeightQuantizer) -> QuantizedLayer:
    """A quantized layer sharing `layer`'s weight and bias Parameters, using `quantizer`."""
    cls = QConv2d if isinstance(layer, nn.Conv2d) else QLinear
    new = _rebuild(layer, cls, layer.weight)
    new.weight_quantizer = quantizer.to(layer.weight.device)
    return new


def to_float_layer(layer: QuantizedLayer) -> nn.Module:
    """A plain nn.Conv2d / nn.Linear whose weight is `layer`'s de-quantized weight."""
    cls = nn.Conv2d if isinstance(layer, nn.Conv2d) else nn.Linear
    weight = nn.Parameter(layer.dequantized_weight().clone(), requires_grad=True)
    return _rebuild(layer, cls, weight)


def quantized_layers(model: nn.Module) -> list[tuple[str, QuantizedLayer]]:
    """(module name, layer) for every quantized layer, in registration order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, QuantizedLayer)]


def replace_modules(model: nn.Module, replacements: dict[int, nn.Module]) -> None:
    """Swap modules in place: every occurrence of a module whose id() is a key (shared
    modules included) is replaced by the value."""
    for name, module in list(model.named_modules(remove_duplicate=False)):
        if id(module) in replacements and name:
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, replacements[id(module)])
