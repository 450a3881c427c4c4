"""Network-in-Network of Dziugaite et al. 2020, the model of QGen's population study
(docs/method.md §2, QGen Section 4.2 and Appendix B.3).

A block is conv3x3 stride 2 -> BN -> ReLU -> (conv1x1 -> BN -> ReLU) x 2; `depth` blocks
of `base_width * width` channels; the head is conv1x1 to the classes -> BN -> ReLU ->
global average pool. Every conv keeps its bias so BatchNorm can be folded into it.
"""

from __future__ import annotations

from torch import Tensor, nn

from qgen_ray.errors import UserError
from qgen_ray.models._layers import conv_bn_relu
from qgen_ray.models.registry import register_model


def nin_block(in_channels: int, channels: int) -> nn.Sequential:
    """One NiN block: a strided 3x3 conv then two 1x1 convs, each followed by BN and ReLU."""
    return nn.Sequential(
        conv_bn_relu(in_channels, channels, 3, stride=2),
        conv_bn_relu(channels, channels, 1),
        conv_bn_relu(channels, channels, 1),
    )


class NiN(nn.Module):
    """`features` (the blocks) then `head` (conv1x1 -> BN -> ReLU -> pool -> flatten)."""

    def __init__(self, num_classes: int, in_channels: int, depth: int, channels: int):
        super().__init__()
        blocks = [nin_block(in_channels if i == 0 else channels, channels) for i in range(depth)]
        self.features = nn.Sequential(*blocks)
        self.head = nn.Sequential(
            conv_bn_relu(channels, num_classes, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten()
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


@register_model("nin", head="head")
def nin(
    num_classes: int,
    in_channels: int,
    image_size: int,
    *,
    depth: int = 2,
    width: int = 1,
    base_width: int = 25,
) -> NiN:
    """NiN with `depth` blocks (study grid: 2-4 on CIFAR-10, 3-5 on CIFAR-100) and
    `base_width * width` channels (width multiplier, study grid 8/10/12; base 25 as in
    Dziugaite et al.). Any input size works: stride 2 on a 1x1 map stays 1x1."""
    if depth < 1 or width < 1 or base_width < 1:
        raise UserError(
            f"nin needs depth, width and base_width of at least 1, got {depth}, {width}, "
            f"{base_width}"
        )
    return NiN(num_classes, in_channels, depth, base_width * width)
