"""ImageNet CNNs from torchvision: ResNet-18, ResNet-50, MobileNetV2 (QGen Appendix B.1,
C.1: ImageNet fine-tuning and ImageNet-C).

Built with `weights=None`, so nothing is downloaded unless `pretrained=True` asks for
torchvision's DEFAULT weights (cached under `torch.hub.get_dir()`; with
`HF_HUB_OFFLINE=1` only the cache is used). For `in_channels != 3` the stem conv is
replaced by one of the same shape otherwise.
"""

from __future__ import annotations

import os
from functools import partial
from pathlib import Path

import torch
import torchvision
from torch import nn

from qgen_ray.errors import UserError
from qgen_ray.models.registry import register_model
from qgen_ray.models.weights import WEIGHTS_FIX, load_fitting

# registry name -> module name of the classifier in torchvision's model
TORCHVISION_HEADS = {"resnet18": "fc", "resnet50": "fc", "mobilenet_v2": "classifier.1"}


def replace_first_conv(model: nn.Module, in_channels: int) -> nn.Module:
    """Swap the model's first Conv2d for a freshly initialized one taking `in_channels`."""
    name, conv = next((n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d))
    new = nn.Conv2d(
        in_channels,
        conv.out_channels,
        conv.kernel_size,
        stride=conv.stride,
        padding=conv.padding,
        dilation=conv.dilation,
        groups=conv.groups,
        bias=conv.bias is not None,
    )
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent), attr, new)
    return model


def hub_state_dict(arch: str) -> tuple[dict[str, torch.Tensor], str]:
    """torchvision's DEFAULT ImageNet weights for `arch` and their name; UserError offline."""
    weights = torchvision.models.get_model_weights(arch).DEFAULT
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
    fix = f"put {Path(weights.url).name} in {cached.parent} or {WEIGHTS_FIX}"
    if not cached.is_file() and os.environ.get("HF_HUB_OFFLINE") == "1":
        raise UserError(f"{weights} is not cached and HF_HUB_OFFLINE=1 forbids downloads; {fix}")
    try:
        return weights.get_state_dict(progress=False), str(weights)
    except OSError as err:
        raise UserError(f"cannot download {weights} ({err}); {fix}") from None


def torchvision_model(
    arch: str, num_classes: int, in_channels: int, image_size: int, *, pretrained: bool = False
) -> nn.Module:
    """torchvision's `arch` for `num_classes` and `in_channels`; ImageNet weights if asked
    (every layer but the classifier when num_classes != 1000)."""
    if pretrained and in_channels != 3:
        raise UserError(
            f"pretrained {arch} weights take 3 input channels, got in_channels={in_channels}; "
            "use in_channels=3 or pretrained=False"
        )
    model = torchvision.models.get_model(arch, weights=None, num_classes=num_classes)
    if in_channels != 3:
        replace_first_conv(model, in_channels)
    if pretrained:
        state, source = hub_state_dict(arch)
        head = TORCHVISION_HEADS[arch]
        origin = f"torchvision's {arch}"
        load_fitting(model, state, name=arch, head=head, source=source, origin=origin)
    return model


for _arch, _head in TORCHVISION_HEADS.items():
    register_model(
        _arch,
        head=_head,
        origin=f"torchvision's {_arch}",
        pretrained=True,
        library=("torchvision", _arch),
    )(  # fmt: skip
        partial(torchvision_model, _arch)
    )
