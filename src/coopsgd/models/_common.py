"""Shared validation helpers for the model constructors."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from coopsgd.errors import ConfigError, check_int

__all__ = ["as_shape", "image_shape"]


def as_shape(value: Any, field: str = "input_shape") -> tuple[int, ...]:
    """``value`` as a tuple of positive ints, or a ConfigError naming ``field``."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value,)
    if not isinstance(value, Sequence) or isinstance(value, str):
        raise ConfigError.invalid(field, value, "must be a tuple of positive integers, e.g. (3, 32, 32)")
    try:
        return tuple(check_int(field, v, minimum=1) for v in value)
    except ConfigError:
        raise ConfigError.invalid(
            field, value, "must be a tuple of positive integers, e.g. (3, 32, 32)"
        ) from None


def image_shape(value: Any, model: str, *, min_size: int = 1) -> tuple[int, int, int]:
    """Validate an image input shape ``(C, H, W)`` for ``model`` (H, W >= ``min_size``)."""
    shape = as_shape(value)
    if len(shape) != 3:
        raise ConfigError.invalid("input_shape", value, f"model={model!r} needs an image shape (C, H, W)")
    if min(shape[1:]) < min_size:
        raise ConfigError.invalid(
            "input_shape", value, f"model={model!r} needs height and width >= {min_size}"
        )
    return shape[0], shape[1], shape[2]
