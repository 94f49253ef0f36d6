"""Multi-layer perceptron: flatten -> (Linear -> ReLU) x len(hidden) -> Linear."""

from __future__ import annotations

import math
from collections.abc import Sequence

from torch import Tensor, nn

from coopsgd.errors import ConfigError, check_int
from coopsgd.models._common import as_shape

__all__ = ["MLP"]


class MLP(nn.Module):
    """Fully connected classifier on flattened inputs.

    Args:
        input_shape: shape of one sample (any rank; flattened).
        num_classes: output logits.
        hidden: hidden layer widths, default ``(200, 200)``; ``()`` gives multinomial logistic regression.
    """

    def __init__(
        self, input_shape: Sequence[int], num_classes: int, hidden: Sequence[int] = (200, 200)
    ) -> None:
        super().__init__()
        shape = as_shape(input_shape)
        num_classes = check_int("num_classes", num_classes, minimum=1)
        if isinstance(hidden, (str, bytes)) or not isinstance(hidden, Sequence):
            raise ConfigError.invalid(
                "hidden", hidden, "must be a list of positive layer widths, e.g. [200, 200]"
            )
        widths = [check_int("hidden", h, minimum=1) for h in hidden]
        layers: list[nn.Module] = [nn.Flatten()]
        prev = math.prod(shape)
        for w in widths:
            layers += [nn.Linear(prev, w), nn.ReLU()]
            prev = w
        layers.append(nn.Linear(prev, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``(B, num_classes)`` of inputs ``(B, *input_shape)``."""
        return self.net(x)
