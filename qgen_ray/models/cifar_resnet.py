"""CIFAR ResNets (He et al. 2016) as in QGen's ResNet study (docs/method.md §2): base width 16.

Stem conv3x3 stride 1 -> BN -> ReLU, no max pool, four stages of widths
`base_width * (1, 2, 4, 8)` with strides (1, 2, 2, 2), global average pool, linear.
ResNet-18 uses torchvision's BasicBlock (2, 2, 2, 2); ResNet-50 its Bottleneck
(expansion 4, blocks 3, 4, 6, 3). Module names follow torchvision (conv1, bn1,
layer1..layer4, fc) so layer policies (first/last layer at 8 bits) read the same.
"""

from __future__ import annotations

from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock, Bottleneck

from qgen_ray.models.registry import register_model

Block = type[BasicBlock] | type[Bottleneck]
STAGE_STRIDES = (1, 2, 2, 2)


class CifarResNet(nn.Module):
    """A ResNet for small images: 3x3 stride-1 stem, no max pool, four stages."""

    def __init__(
        self,
        block: Block,
        blocks_per_stage: tuple[int, int, int, int],
        num_classes: int,
        in_channels: int,
        base_width: int,
    ):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, base_width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(base_width)
        self.relu = nn.ReLU(inplace=True)
        inplanes = base_width
        for i, (n, stride) in enumerate(zip(blocks_per_stage, STAGE_STRIDES, strict=True)):
            planes = base_width * 2**i
            layers = []
            for j in range(n):
                downsample = None
                out = planes * block.expansion
                if j == 0 and (stride != 1 or inplanes != out):
                    downsample = nn.Sequential(
                        nn.Conv2d(inplanes, out, 1, stride=stride, bias=False),
                        nn.BatchNorm2d(out),
                    )
                layers.append(block(inplanes, planes, stride if j == 0 else 1, downsample))
                inplanes = out
            setattr(self, f"layer{i + 1}", nn.Sequential(*layers))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(inplanes, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.avgpool(x).flatten(1))


@register_model("resnet18_cifar", head="fc")
def resnet18_cifar(
    num_classes: int, in_channels: int, image_size: int, *, base_width: int = 16
) -> CifarResNet:
    """CIFAR ResNet-18; `base_width`: channels of the stem and first stage (QGen: 16)."""
    return CifarResNet(BasicBlock, (2, 2, 2, 2), num_classes, in_channels, base_width)


@register_model("resnet50_cifar", head="fc")
def resnet50_cifar(
    num_classes: int, in_channels: int, image_size: int, *, base_width: int = 16
) -> CifarResNet:
    """CIFAR ResNet-50; `base_width`: channels of the stem and first stage (QGen: 16)."""
    return CifarResNet(Bottleneck, (3, 4, 6, 3), num_classes, in_channels, base_width)
