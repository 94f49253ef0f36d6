"""ResNet-20 for CIFAR (He, Zhang, Ren, Sun 2016, "Deep Residual Learning", §4.2).

Depth 6n+2 with n=3: conv 3x3 16 -> BN -> ReLU, then three stages of n basic blocks with 16, 32, 64
channels (the first block of stages 2 and 3 has stride 2), global average pooling and a linear head.
A basic block is conv3x3 -> BN -> ReLU -> conv3x3 -> BN, plus the shortcut, then ReLU.

Shortcuts where the shape changes:

* ``"A"`` (default, the paper's CIFAR choice): identity on a stride-2 subsample, with the extra channels
  zero-padded -- no parameters; 0.27M parameters in all (269,722 for 10 classes).
* ``"B"``: a 1x1 convolution with stride 2 followed by BatchNorm (projection); 0.27M + ~3k.

Everything is functional (no in-place ops on activations that autograd or vmap would trip over), so
the model runs under ``torch.func.functional_call`` + ``vmap(grad)``, BatchNorm buffers included.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from coopsgd.errors import ConfigError, check_int
from coopsgd.models._common import image_shape

__all__ = ["ResNet", "BasicBlock", "resnet20"]


class BasicBlock(nn.Module):
    """Two 3x3 conv/BN layers with a residual shortcut (option A or B when the shape changes)."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1, shortcut: str = "A") -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.stride = stride
        self.extra_channels = planes - in_planes
        self.projection: nn.Module | None = None
        if (stride != 1 or in_planes != planes) and shortcut == "B":
            self.projection = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )

    def _shortcut(self, x: Tensor) -> Tensor:
        if self.projection is not None:
            return self.projection(x)
        if self.stride != 1:
            x = x[:, :, :: self.stride, :: self.stride]
        if self.extra_channels > 0:
            half = self.extra_channels // 2
            x = F.pad(x, (0, 0, 0, 0, half, self.extra_channels - half))
        return x

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self._shortcut(x))


class ResNet(nn.Module):
    """CIFAR-style ResNet of depth 6n+2 (n blocks per stage; n=3 is ResNet-20)."""

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        blocks_per_stage: int = 3,
        shortcut: str = "A",
        width: int = 16,
    ) -> None:
        super().__init__()
        c, _, _ = image_shape(input_shape, "resnet20", min_size=4)
        num_classes = check_int("num_classes", num_classes, minimum=1)
        n = check_int("blocks_per_stage", blocks_per_stage, minimum=1)
        k = check_int("width", width, minimum=1)
        if shortcut not in ("A", "B"):
            raise ConfigError.invalid(
                "shortcut", shortcut, "must be 'A' (zero-padded identity) or 'B' (1x1 projection)"
            )
        self.conv1 = nn.Conv2d(c, k, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(k)
        stages: list[nn.Module] = []
        in_planes = k
        for i, planes in enumerate((k, 2 * k, 4 * k)):
            blocks: list[nn.Module] = []
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(BasicBlock(in_planes, planes, stride, shortcut))
                in_planes = planes
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4 * k, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``(B, num_classes)``."""
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        return self.fc(self.pool(out).flatten(1))


def resnet20(input_shape: Sequence[int], num_classes: int, shortcut: str = "A", width: int = 16) -> ResNet:
    """ResNet-20 (n = 3)."""
    return ResNet(input_shape, num_classes, blocks_per_stage=3, shortcut=shortcut, width=width)
