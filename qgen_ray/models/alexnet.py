"""A CIFAR-sized AlexNet (Krizhevsky et al. 2012): 5 convs + 3 fully connected layers.

The QAR benchmark (Malchiodi et al. 2026) names "AlexNet on CIFAR-10" without the layer table, so
this is the common CIFAR-10 adaptation: torchvision's channel plan (64, 192, 384, 256,
256) with 3x3 kernels and a stride-2 first conv, three 2x2 max pools, then an adaptive
average pool to 2x2 (so any input size works; a no-op on 32x32 inputs) and the
classifier Dropout -> FC 4096 -> ReLU -> Dropout -> FC 4096 -> ReLU -> FC classes.
No BatchNorm, as in the original.
"""

from __future__ import annotations

from torch import Tensor, nn

from qgen_ray.models.registry import register_model

CONV_CHANNELS = (64, 192, 384, 256, 256)
POOL_AFTER = (0, 1, 4)  # indices of the convs followed by a 2x2 max pool
POOLED_SIZE = 2  # side of the feature map fed to the classifier
FC_WIDTH = 4096


class CifarAlexNet(nn.Module):
    """`features` (5 convs) -> `avgpool` -> `classifier` (3 Linear, the last one `classifier.6`)."""

    def __init__(self, num_classes: int, in_channels: int, dropout: float):
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_channels
        for i, out in enumerate(CONV_CHANNELS):
            layers += [nn.Conv2d(channels, out, 3, stride=2 if i == 0 else 1, padding=1)]
            layers += [nn.ReLU(inplace=True)]
            if i in POOL_AFTER:
                layers.append(nn.MaxPool2d(2, 2, ceil_mode=True))
            channels = out
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(POOLED_SIZE)
        self.classifier = nn.Sequential(
            nn.Dropout(dropout),
            nn.Linear(channels * POOLED_SIZE**2, FC_WIDTH),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(FC_WIDTH, FC_WIDTH),
            nn.ReLU(inplace=True),
            nn.Linear(FC_WIDTH, num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.avgpool(self.features(x)).flatten(1))


@register_model("alexnet_cifar", head="classifier.6")
def alexnet_cifar(
    num_classes: int, in_channels: int, image_size: int, *, dropout: float = 0.5
) -> CifarAlexNet:
    """CIFAR AlexNet; `dropout`: probability before each hidden FC layer (torchvision: 0.5)."""
    return CifarAlexNet(num_classes, in_channels, dropout)
