"""VGG-16 with BatchNorm, CIFAR variant (Simonyan & Zisserman 2015, configuration D; BN after each conv).

13 conv 3x3 layers (64, 64, M, 128, 128, M, 256x3, M, 512x3, M, 512x3, M), each conv -> BN -> ReLU, then
a single linear head 512 -> num_classes (the adaptation common in CIFAR code bases, instead of
ImageNet's three 4096-wide layers). 14.73M parameters for 10 classes.
Inputs must be at least 32x32 (five 2x2 poolings); larger inputs are average-pooled to 1x1 at the end.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from coopsgd.errors import check_int
from coopsgd.models._common import image_shape

__all__ = ["VGG", "VGG16_CONFIG"]

#: Channel plan of VGG-16 ("M" = 2x2 max pooling).
VGG16_CONFIG: tuple[int | str, ...] = (
    64,
    64,
    "M",
    128,
    128,
    "M",
    256,
    256,
    256,
    "M",
    512,
    512,
    512,
    "M",
    512,
    512,
    512,
    "M",
)


class VGG(nn.Module):
    """VGG with BatchNorm for small images; ``config`` defaults to VGG-16."""

    def __init__(
        self, input_shape: Sequence[int], num_classes: int, config: Sequence[int | str] = VGG16_CONFIG
    ) -> None:
        super().__init__()
        pools = sum(1 for v in config if v == "M")
        c, _, _ = image_shape(input_shape, "vgg16", min_size=2**pools)
        num_classes = check_int("num_classes", num_classes, minimum=1)
        layers: list[nn.Module] = []
        prev = c
        for v in config:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                width = check_int("config", v, minimum=1)
                layers += [nn.Conv2d(prev, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU()]
                prev = width
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(prev, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``(B, num_classes)``."""
        return self.classifier(self.features(x))
