"""Weight quantization for quantization-aware training: LSQ (Esser et al. 2020), VVTQ-style
ViT quantization (Huang et al. 2023) and QAR (Malchiodi et al. 2026), behind
one entry point, `quantize_model(model, bits, method, policy)`.

Typical training use:

    model = quantize_model(build(...), bits=4, method="lsq")      # before DDP
    groups = [{"params": others, "weight_decay": wd},
              {"params": quantizer_parameters(model), "weight_decay": 0.0}]
    terms = QuantTerms(model)                                       # once per model
    loss = ce + terms.regularizer(progress=epoch_fraction)         # every step
    loss.backward(); optimizer.step(); terms.clamp_steps_()

Measures call `materialize(model)` (plain layers holding w_hat) and `step_sizes(model)`.
"""

from qgen_ray.quant.base import FP32_BITS, MAX_BITS, MIN_BITS, STEP_EPS, WeightQuantizer
from qgen_ray.quant.layers import QConv2d, QLinear, QuantizedLayer, quantized_layers
from qgen_ray.quant.lsq import LSQWeightQuantizer
from qgen_ray.quant.methods import METHODS, QuantMethod
from qgen_ray.quant.model import (
    QuantTerms,
    clamp_steps_,
    compression_ratio,
    effective_weights,
    materialize,
    quant_record,
    quant_regularizer,
    quantize_model,
    quantizer_parameters,
    step_sizes,
    unwrap,
)
from qgen_ray.quant.policy import QuantPolicy
from qgen_ray.quant.qar import QAR_LAMBDA, CodebookQuantizer
from qgen_ray.quant.snap import evaluate_snap, snap_to_codebook_
from qgen_ray.quant.vvtq import QKVWeightQuantizer, vvtq_lambda

__all__ = [
    "FP32_BITS",
    "MAX_BITS",
    "METHODS",
    "MIN_BITS",
    "QAR_LAMBDA",
    "STEP_EPS",
    "CodebookQuantizer",
    "LSQWeightQuantizer",
    "QConv2d",
    "QKVWeightQuantizer",
    "QLinear",
    "QuantMethod",
    "QuantPolicy",
    "QuantTerms",
    "QuantizedLayer",
    "WeightQuantizer",
    "clamp_steps_",
    "compression_ratio",
    "effective_weights",
    "evaluate_snap",
    "materialize",
    "quant_record",
    "quant_regularizer",
    "quantize_model",
    "quantized_layers",
    "quantizer_parameters",
    "snap_to_codebook_",
    "step_sizes",
    "unwrap",
    "vvtq_lambda",
]
