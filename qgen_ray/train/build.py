"""Build the (quantized) model a `TrainSpec` describes, ready for training or loading."""

from __future__ import annotations

from torch import nn

from qgen_ray.spec import TrainSpec


def build_model(
    spec: TrainSpec,
    num_classes: int,
    in_channels: int,
    image_size: int,
    *,
    weights: str | None = None,
    pretrained: bool = False,
) -> nn.Module:
    """Model from the zoo, then its quantizers (initialized from its weights).

    weights / pretrained: start from a local state dict or the hub's published weights
    (see `create_model`; fine-tuning), loaded before the quantizers are initialized.
    Loading a checkpoint into the result with `load_state_dict` restores the trained
    weights and steps exactly (the quantizers' init is then overwritten).
    """
    from qgen_ray.models import create_model
    from qgen_ray.quant import QuantPolicy, quantize_model

    model = create_model(
        spec.model,
        num_classes=num_classes,
        in_channels=in_channels,
        image_size=image_size,
        weights=weights,
        pretrained=pretrained,
        **spec.model_arguments,
    )
    if spec.method != "fp32":
        quantize_model(model, spec.bits, spec.method, QuantPolicy.from_name(spec.quant_policy))
    return model
