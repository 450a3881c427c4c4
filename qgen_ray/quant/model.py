"""Whole-model quantization: `quantize_model` and the helpers the trainer, the store and the
measures call on a quantized model (step sizes, effective weights, the loss term, the
quantizer parameters, materialization into plain layers, the compression ratio).

A quantized model carries `model.qgen_quant = {"bits", "method", "policy", "layers"}`
(policy as `QuantPolicy.to_dict()`, layers = module name -> bits of each quantized layer).
Build, load pretrained weights if any, `quantize_model` (quantizers are initialized from
the weights here), then wrap in DDP. A fresh model passed through `quantize_model` with the
same arguments accepts the state dict of a trained one and computes the same outputs.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from qgen_ray.errors import UserError
from qgen_ray.quant.base import FP32_BITS, PARAM_BITS, WeightQuantizer, as_int, check_bits
from qgen_ray.quant.layers import (
    FLOAT_LAYER_TYPES,
    QuantizedLayer,
    quantized_layers,
    replace_modules,
    to_float_layer,
    wrap_layer,
)
from qgen_ray.quant.methods import METHODS
from qgen_ray.quant.policy import QuantPolicy

QUANT_ATTR = "qgen_quant"  # the attribute holding a quantized model's record


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside DataParallel / DistributedDataParallel / torch.compile wrappers."""
    while True:
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def float_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, layer) for each nn.Conv2d / nn.Linear in registration order. A subclass of
    either (whose forward we could not reproduce faithfully) is a UserError."""
    layers = []
    for name, module in model.named_modules():
        if type(module) in FLOAT_LAYER_TYPES:
            layers.append((name, module))
        elif isinstance(module, FLOAT_LAYER_TYPES) and not isinstance(module, QuantizedLayer):
            raise UserError(
                f"layer {name!r} is a {type(module).__name__}, a subclass of Conv2d/Linear "
                "that quantize_model cannot wrap; use plain nn.Conv2d / nn.Linear layers"
            )
    return layers


def _check_request(model: nn.Module, bits: int, method: str) -> int:
    """Validate a quantize_model call; return `bits` as a Python int."""
    METHODS.get(method)  # unknown method: UserError listing the valid ones
    if unwrap(model) is not model:
        raise UserError("quantize_model got a wrapped model; quantize before DDP/compile")
    if hasattr(model, QUANT_ATTR):
        raise UserError(
            f"model was already passed through quantize_model ({getattr(model, QUANT_ATTR)}); "
            "build a fresh model"
        )
    if method == "fp32" and as_int(bits) != FP32_BITS:
        raise UserError(f"method 'fp32' needs bits={FP32_BITS}, got bits={bits!r}")
    if isinstance(model, FLOAT_LAYER_TYPES):
        raise UserError("quantize_model needs a container module; wrap the layer in Sequential")
    return FP32_BITS if as_int(bits) == FP32_BITS else check_bits(bits)


def quantize_model(
    model: nn.Module, bits: int, method: str = "lsq", policy: QuantPolicy | None = None
) -> nn.Module:
    """Quantize every nn.Conv2d / nn.Linear weight of `model` in place and return it.

    bits: 2..8, or 32 for FP32 (bits=32 with any method, or method "fp32", leaves the
    layers untouched; method "fp32" with other bits is an error). method: a METHODS name.
    policy: per-layer precision (default `QuantPolicy()`: first and last layer at 8 bits).
    """
    bits = _check_request(model, bits, method)
    policy = policy or QuantPolicy()
    if bits == FP32_BITS:
        record = {"bits": FP32_BITS, "method": "fp32", "policy": None, "layers": {}}
        setattr(model, QUANT_ATTR, record)
        return model
    make_quantizer = METHODS.get(method).make_quantizer
    layers = float_layers(model)
    layer_bits = policy.resolve([name for name, _ in layers], bits)
    replacements, quantized = {}, {}
    for name, layer in layers:
        if layer_bits[name] == FP32_BITS:
            continue
        quantizer = make_quantizer(name, layer, layer_bits[name])
        replacements[id(layer)] = wrap_layer(layer, quantizer)
        quantized[name] = layer_bits[name]
    replace_modules(model, replacements)
    record = {"bits": bits, "method": method, "policy": policy.to_dict(), "layers": quantized}
    setattr(model, QUANT_ATTR, record)
    return model


def quant_record(model: nn.Module) -> dict[str, Any]:
    """The model's `qgen_quant` record (FP32 if it never went through quantize_model)."""
    return getattr(unwrap(model), QUANT_ATTR, {"bits": FP32_BITS, "method": "fp32"})


def _quantizers(model: nn.Module) -> list[WeightQuantizer]:
    return [m for m in unwrap(model).modules() if isinstance(m, WeightQuantizer)]


def step_sizes(model: nn.Module) -> list[dict[str, Any]]:
    """The learned step of every LSQ step (the paper's Figure 1 data): dicts with keys
    layer (module name; fused qkv: `<name>.q/.k/.v`), layer_index (0-based position among
    the quantized layers), bits, step. Empty for FP32 and QAR models."""
    rows = []
    for index, (name, layer) in enumerate(quantized_layers(unwrap(model))):
        for suffix, part, _ in layer.weight_quantizer.lsq_parts(layer.weight):
            rows.append(
                {
                    "layer": f"{name}.{suffix}" if suffix else name,
                    "layer_index": index,
                    "bits": part.bits,
                    "step": float(part.step.detach()),
                }
            )
    return rows


def effective_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """Module name -> de-quantized weight w_hat (detached) of each quantized layer."""
    return {name: layer.dequantized_weight() for name, layer in quantized_layers(unwrap(model))}


def materialize(model: nn.Module) -> nn.Module:
    """A deep copy in which every quantized layer is a plain nn.Conv2d / nn.Linear holding
    its de-quantized weight (QAR: snapped to the codebook), so a perturbation of w_hat is
    not rounded away. An FP32 model comes back as a plain deep copy."""
    clone = copy.deepcopy(unwrap(model))
    layers = quantized_layers(clone)
    replace_modules(clone, {id(layer): to_float_layer(layer) for _, layer in layers})
    if hasattr(clone, QUANT_ATTR):
        setattr(clone, QUANT_ATTR, {**getattr(clone, QUANT_ATTR), "materialized": True})
    return clone


class QuantTerms:
    """A model's quantization work per training step, gathered once: the layers whose
    quantizers add a loss term, the method's weight schedule and every quantizer to clamp.
    `train` builds one per model instead of walking the modules at every step."""

    def __init__(self, model: nn.Module):
        inner = unwrap(model)
        self.method = METHODS.get(quant_record(inner)["method"])
        self.layers = [m for _, m in quantized_layers(inner)]
        self.quantizers = _quantizers(inner)
        first = next(inner.parameters(), None)
        self.device = first.device if first is not None else None

    def regularizer(self, progress: float, weight: float | None = None) -> torch.Tensor:
        """The method's loss term at `progress` (fraction of training done, in [0, 1]):
        vvtq: vvtq_lambda(progress) * sum of bin regularizers; qar: QAR_LAMBDA * sum of
        clustering penalties; lsq / fp32: a zero tensor. `weight` overrides the lambda."""
        if not 0.0 <= progress <= 1.0:
            raise ValueError(f"progress must be in [0, 1], got {progress}")
        lam = self.method.penalty_weight(progress) if weight is None else weight
        zero = torch.zeros((), device=self.device)
        if self.method.penalty is None or lam == 0.0 or not self.layers:
            return zero
        terms = [self.method.penalty(m.weight_quantizer, m.weight) for m in self.layers]
        return lam * torch.stack(terms).sum()

    def clamp_steps_(self) -> None:
        """Keep every LSQ step >= STEP_EPS; call after each optimizer step."""
        for quantizer in self.quantizers:
            quantizer.clamp_()


def quant_regularizer(
    model: nn.Module, progress: float, weight: float | None = None
) -> torch.Tensor:
    """`QuantTerms(model).regularizer(progress, weight)`, for one-off calls."""
    return QuantTerms(model).regularizer(progress, weight)


def quantizer_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The quantizers' learnable parameters (LSQ steps, QAR codebooks). Ours, following most
    LSQ implementations: the optimizer puts them in a group without weight decay."""
    return [p for q in _quantizers(model) for p in q.parameters(recurse=False)]


def clamp_steps_(model: nn.Module) -> None:
    """`QuantTerms(model).clamp_steps_()`, for one-off calls."""
    QuantTerms(model).clamp_steps_()


def weight_storage_bits(model: nn.Module) -> tuple[int, int]:
    """(stored, full) bits of all Conv2d/Linear weights: b bits per quantized weight plus
    32 bits per step (LSQ) or per codebook entry (QAR), layers left in FP32 at 32 bits;
    `full` counts every weight at 32. Biases and normalization parameters are not counted."""
    inner = unwrap(model)
    full = stored = 0
    for _, layer in float_layers(inner) + quantized_layers(inner):
        numel = layer.weight.numel()
        full += PARAM_BITS * numel
        quantizer = getattr(layer, "weight_quantizer", None)
        stored += PARAM_BITS * numel if quantizer is None else quantizer.storage_bits(numel)
    return stored, full


def compression_ratio(model: nn.Module) -> float:
    """32-bit storage of the weights over their quantized storage (`weight_storage_bits`);
    1.0 for FP32."""
    stored, full = weight_storage_bits(model)
    return full / stored if stored else 1.0
