"""LeNet-5-style CNN (LeCun et al. 1998) with ReLU and max pooling, sized to the input.

Layout: conv 6@5x5 -> ReLU -> maxpool 2 -> conv 16@5x5 -> ReLU -> maxpool 2 -> fc 120 -> ReLU -> fc 84 ->
ReLU -> fc num_classes. Adaptive sizing: the first convolution is zero-padded by 2 when the input is
smaller than 32x32 (so 1x28x28 MNIST behaves like the classic 32x32 LeNet input), the second one when
its input map is smaller than 10x10 (so 8x8 digits still work). 1x28x28 and 3x32x32 both give 16x5x5
features (61,706 / 62,006 parameters for 10 classes).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from coopsgd.errors import check_int
from coopsgd.models._common import image_shape

__all__ = ["LeNet"]


class LeNet(nn.Module):
    """LeNet-5-style CNN for any ``(C, H, W)`` input with H, W >= 4."""

    def __init__(self, input_shape: Sequence[int], num_classes: int) -> None:
        super().__init__()
        c, h, w = image_shape(input_shape, "lenet", min_size=4)
        num_classes = check_int("num_classes", num_classes, minimum=1)
        pad1 = 2 if min(h, w) < 32 else 0
        h1, w1 = (h + 2 * pad1 - 4) // 2, (w + 2 * pad1 - 4) // 2
        pad2 = 2 if min(h1, w1) < 10 else 0
        h2, w2 = (h1 + 2 * pad2 - 4) // 2, (w1 + 2 * pad2 - 4) // 2
        self.features = nn.Sequential(
            nn.Conv2d(c, 6, 5, padding=pad1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5, padding=pad2),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
        )
        self.classifier = nn.Sequential(
            nn.Linear(16 * h2 * w2, 120),
            nn.ReLU(),
            nn.Linear(120, 84),
            nn.ReLU(),
            nn.Linear(84, num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``(B, num_classes)``."""
        return self.classifier(self.features(x))
