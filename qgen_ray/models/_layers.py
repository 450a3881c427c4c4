"""Building blocks shared by the zoo's CNNs."""

from __future__ import annotations

from torch import nn


def conv_bn_relu(
    in_channels: int,
    out_channels: int,
    kernel_size: int,
    stride: int = 1,
    *,
    groups: int = 1,
    bias: bool = True,
) -> nn.Sequential:
    """Conv2d ('same' padding for odd kernels) -> BatchNorm2d -> ReLU."""
    conv = nn.Conv2d(
        in_channels,
        out_channels,
        kernel_size,
        stride=stride,
        padding=kernel_size // 2,
        groups=groups,
        bias=bias,
    )
    return nn.Sequential(conv, nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True))


def classifier_head(in_features: int, num_classes: int) -> nn.Sequential:
    """Global average pool -> flatten -> Linear: any input size gives `num_classes` outputs."""
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(in_features, num_classes))
