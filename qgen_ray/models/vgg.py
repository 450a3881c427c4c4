"""CIFAR VGG-16 and VGG-19 with BatchNorm (Simonyan & Zisserman 2015; the CIFAR form of
QGen's CIFAR-100 corruption study and of the QAR benchmarks).

The conv stacks are torchvision's configurations "D" and "E" (3x3 conv -> BN -> ReLU,
2x2 max pools); a global average pool and a single Linear replace the three FC layers,
as in the usual CIFAR adaptation, so any input size works. Pools use ceil_mode so a 1x1
map stays 1x1 (identical to the plain pool on 32x32 inputs).
"""

from __future__ import annotations

from torch import Tensor, nn

from qgen_ray.models._layers import classifier_head, conv_bn_relu
from qgen_ray.models.registry import register_model

POOL = "M"
VGG_CONFIGS: dict[str, list[int | str]] = {
    "vgg16": [64, 64, POOL, 128, 128, POOL, *[256] * 3, POOL, *[512] * 3, POOL, *[512] * 3, POOL],
    "vgg19": [64, 64, POOL, 128, 128, POOL, *[256] * 4, POOL, *[512] * 4, POOL, *[512] * 4, POOL],
}


class CifarVGG(nn.Module):
    """`features` (conv stack) then `classifier` (pool -> flatten -> Linear)."""

    def __init__(self, config: list[int | str], num_classes: int, in_channels: int):
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_channels
        for item in config:
            if item == POOL:
                layers.append(nn.MaxPool2d(2, 2, ceil_mode=True))
            else:
                layers.extend(conv_bn_relu(channels, int(item), 3))
                channels = int(item)
        self.features = nn.Sequential(*layers)
        self.classifier = classifier_head(channels, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))


@register_model("vgg16_cifar", head="classifier")
def vgg16_cifar(num_classes: int, in_channels: int, image_size: int) -> CifarVGG:
    """CIFAR VGG-16 with BN (13 convs, one Linear)."""
    return CifarVGG(VGG_CONFIGS["vgg16"], num_classes, in_channels)


@register_model("vgg19_cifar", head="classifier")
def vgg19_cifar(num_classes: int, in_channels: int, image_size: int) -> CifarVGG:
    """CIFAR VGG-19 with BN (16 convs, one Linear)."""
    return CifarVGG(VGG_CONFIGS["vgg19"], num_classes, in_channels)
