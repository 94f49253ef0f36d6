"""CNN-7: the compact 7-layer CNN of the EASGD / LSGD CIFAR-10 experiments.

Zhang, Choromanska and LeCun (EASGD, 2015) and Teng et al. (LSGD, 2019) train a "7-layer CNN" on
CIFAR-10 random 28x28 crops. This module is a faithful-looking, compact re-creation (not a byte-exact
copy of their Lua/Torch model): 7 weight layers, no normalisation layers,

=====  ===============================================  ===========
layer  operation                                        output (32)
=====  ===============================================  ===========
1      conv 3x3, 64, pad 1 -> ReLU                      64x32x32
2      conv 3x3, 128, pad 1 -> ReLU -> maxpool 2        128x16x16
3      conv 3x3, 256, pad 1 -> ReLU -> maxpool 2        256x8x8
4      conv 3x3, 256, pad 1 -> ReLU -> maxpool 2        256x4x4
5      fc 256 -> ReLU                                   256
6      fc 256 -> ReLU                                   256
7      fc num_classes                                   10
=====  ===============================================  ===========

Inputs of 28x28 (the papers' crops) give 256x3x3 features; any H, W >= 8 works. About 2.1M
parameters at 32x32, 1.6M at 28x28 (10 classes).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from coopsgd.errors import check_int
from coopsgd.models._common import image_shape

__all__ = ["CNN7"]


class CNN7(nn.Module):
    """4 convolutions + 3 fully connected layers (see the module docstring)."""

    def __init__(self, input_shape: Sequence[int], num_classes: int, width: int = 64) -> None:
        super().__init__()
        c, h, w = image_shape(input_shape, "cnn7", min_size=8)
        num_classes = check_int("num_classes", num_classes, minimum=1)
        k = check_int("width", width, minimum=1)
        self.features = nn.Sequential(
            nn.Conv2d(c, k, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(k, 2 * k, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(2 * k, 4 * k, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(4 * k, 4 * k, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
        )
        self.classifier = nn.Sequential(
            nn.Linear(4 * k * (h // 8) * (w // 8), 256),
            nn.ReLU(),
            nn.Linear(256, 256),
            nn.ReLU(),
            nn.Linear(256, num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``(B, num_classes)``."""
        return self.classifier(self.features(x))
