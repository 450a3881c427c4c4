"""Build the (quantized) model a `TrainSpec` describes, ready for training or loading."""

from __future__ import annotations

from torch import nn

from qgen_ray.errors import UserError
from qgen_ray.spec import TrainSpec

# TrainSpec.quant_policy names -> policies: LSQ's convention (first and last layer at
# 8 bits) or every layer at the spec's bits.
POLICY_NAMES = ("first_last_8bit", "none")


def quant_policy(name: str):
    from qgen_ray.quant import QuantPolicy

    if name not in POLICY_NAMES:
        raise UserError(f"unknown quant_policy {name!r}; valid: {', '.join(POLICY_NAMES)}")
    return QuantPolicy() if name == "first_last_8bit" else QuantPolicy.none()


def build_model(spec: TrainSpec, num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    """Model from the zoo, then its quantizers (initialized from the fresh weights).

    Loading a checkpoint into the result with `load_state_dict` restores the trained
    weights and steps exactly (the quantizers' init is then overwritten).
    """
    from qgen_ray.models import create_model
    from qgen_ray.quant import quantize_model

    model = create_model(
        spec.model,
        num_classes=num_classes,
        in_channels=in_channels,
        image_size=image_size,
        **spec.model_arguments,
    )
    if spec.method != "fp32":
        quantize_model(model, spec.bits, spec.method, quant_policy(spec.quant_policy))
    return model
