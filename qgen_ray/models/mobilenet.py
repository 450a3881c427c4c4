"""MobileNet-V1 (Howard et al. 2017) for CIFAR, as in QGen's CIFAR-100 corruption study.

Table 1 of the paper with the stem's stride 2 set to 1 for 32x32 inputs (the common CIFAR
form): conv3x3 32 -> 13 depthwise-separable blocks (depthwise 3x3 -> BN -> ReLU ->
pointwise 1x1 -> BN -> ReLU) -> global average pool -> Linear. Convs have no bias
(BatchNorm follows each).
"""

from __future__ import annotations

from torch import Tensor, nn

from qgen_ray.errors import UserError
from qgen_ray.models._layers import classifier_head, conv_bn_relu
from qgen_ray.models.registry import register_model

STEM_CHANNELS = 32
# (output channels, depthwise stride) of each separable block, Howard et al. Table 1.
BLOCKS = (
    (64, 1),
    (128, 2),
    (128, 1),
    (256, 2),
    (256, 1),
    (512, 2),
    *[(512, 1)] * 5,
    (1024, 2),
    (1024, 1),
)
MIN_CHANNELS = 8  # floor on a layer's width when width_mult shrinks it


def separable_block(in_channels: int, out_channels: int, stride: int) -> nn.Sequential:
    """Depthwise 3x3 (stride) -> BN -> ReLU -> pointwise 1x1 -> BN -> ReLU."""
    return nn.Sequential(
        conv_bn_relu(in_channels, in_channels, 3, stride, groups=in_channels, bias=False),
        conv_bn_relu(in_channels, out_channels, 1, bias=False),
    )


class MobileNetV1(nn.Module):
    """`features` (stem + separable blocks) then `classifier` (pool -> flatten -> Linear)."""

    def __init__(self, num_classes: int, in_channels: int, width_mult: float):
        super().__init__()

        def scaled(channels: int) -> int:
            return max(MIN_CHANNELS, int(channels * width_mult))

        layers = [conv_bn_relu(in_channels, scaled(STEM_CHANNELS), 3, bias=False)]
        channels = scaled(STEM_CHANNELS)
        for out, stride in BLOCKS:
            layers.append(separable_block(channels, scaled(out), stride))
            channels = scaled(out)
        self.features = nn.Sequential(*layers)
        self.classifier = classifier_head(channels, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))


@register_model("mobilenet_v1", head="classifier")
def mobilenet_v1(
    num_classes: int, in_channels: int, image_size: int, *, width_mult: float = 1.0
) -> MobileNetV1:
    """CIFAR MobileNet-V1; `width_mult`: the paper's width multiplier alpha (scales every
    layer's channels, floor 8)."""
    if width_mult <= 0:
        raise UserError(f"mobilenet_v1 needs width_mult > 0, got {width_mult}")
    return MobileNetV1(num_classes, in_channels, width_mult)
