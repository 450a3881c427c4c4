"""The registry of weight-quantization methods: how each builds a layer's quantizer and
which loss term (with which weight schedule) it adds to training.

    fp32  no quantizer at all (the paper's FP32 baseline)
    lsq   LSQ per layer (Esser et al. 2020), LSQ step init, no loss term
    vvtq  LSQ with MSE step init and the bin regularizer under VVTQ's lambda schedule;
          a timm fused `qkv` gets separate q/k/v steps. On a model without a fused qkv
          (a CNN) it is exactly that minus the q/k/v split: per-layer LSQ with MSE init
          and the bin regularizer (our fallback; VVTQ itself is defined for ViTs)
    qar   the regularizer of Malchiodi et al. 2026: learnable per-layer codebook of 2^b
          representatives, clustering penalty with weight QAR_LAMBDA, snap after training
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from qgen_ray.quant.base import WeightQuantizer
from qgen_ray.quant.lsq import LSQWeightQuantizer
from qgen_ray.quant.qar import QAR_LAMBDA, CodebookQuantizer, cluster_penalty
from qgen_ray.quant.vvtq import (
    QKVWeightQuantizer,
    is_fused_qkv,
    mse_init_,
    quantizer_bin_regularizer,
    vvtq_lambda,
)
from qgen_ray.registry import Registry


@dataclass(frozen=True)
class QuantMethod:
    """One quantization method.

    make_quantizer(name, layer, bits): an initialized quantizer for that layer (None: fp32).
    penalty(quantizer, weight): the method's per-layer loss term (None: no term).
    penalty_weight(progress): its weight at a fraction `progress` of training done.
    """

    name: str
    make_quantizer: Callable[[str, nn.Module, int], WeightQuantizer] | None = None
    penalty: Callable[[WeightQuantizer, torch.Tensor], torch.Tensor] | None = None
    penalty_weight: Callable[[float], float] = lambda progress: 0.0


def _lsq_quantizer(name: str, layer: nn.Module, bits: int) -> WeightQuantizer:
    quantizer = LSQWeightQuantizer(bits)
    quantizer.initialize(layer.weight)
    return quantizer


def _vvtq_quantizer(name: str, layer: nn.Module, bits: int) -> WeightQuantizer:
    quantizer = QKVWeightQuantizer(bits) if is_fused_qkv(name, layer) else LSQWeightQuantizer(bits)
    mse_init_(quantizer, layer.weight)
    return quantizer


def _qar_quantizer(name: str, layer: nn.Module, bits: int) -> WeightQuantizer:
    quantizer = CodebookQuantizer(bits)
    quantizer.initialize(layer.weight)
    return quantizer


def _qar_penalty(quantizer: WeightQuantizer, w: torch.Tensor) -> torch.Tensor:
    return cluster_penalty(w, quantizer.codebook)


METHODS: Registry[QuantMethod] = Registry("quantization method")
METHODS.add("fp32", QuantMethod("fp32"))
METHODS.add("lsq", QuantMethod("lsq", make_quantizer=_lsq_quantizer))
METHODS.add(
    "vvtq",
    QuantMethod(
        "vvtq",
        make_quantizer=_vvtq_quantizer,
        penalty=quantizer_bin_regularizer,
        penalty_weight=vvtq_lambda,
    ),
)
METHODS.add(
    "qar",
    QuantMethod(
        "qar",
        make_quantizer=_qar_quantizer,
        penalty=_qar_penalty,
        penalty_weight=lambda progress: QAR_LAMBDA,
    ),
)
