"""``parse_compressor``: spec strings (``topk:0.01``, ``int8``, ``qsgd:4`` ...) to compressors."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from coopsgd.compression.base import Compressor
from coopsgd.compression.powersgd import PowerSGD
from coopsgd.compression.quantize import (
    BF16,
    FP16,
    INT4_CHUNK,
    INT8_CHUNK,
    QSGD,
    Int4,
    Int8,
    NoCompression,
    ScaledSign,
)
from coopsgd.compression.sparse import RandK, TopK
from coopsgd.errors import ConfigError

__all__ = ["parse_compressor", "COMPRESSOR_SPECS", "FIELD"]

#: The config field / CLI flag that spec strings come from; every error names it.
FIELD = "compress"

#: The grammar, as the error messages and ``--help`` show it.
COMPRESSOR_SPECS = (
    "none, fp16, bf16, int8[:CHUNK], int4[:CHUNK], qsgd:S, sign, topk:F, randk:F[:unbiased], powersgd:R "
    "(F a fraction in (0, 1], S, R and CHUNK integers >= 1)"
)


def _bad(spec: str, why: str) -> ConfigError:
    return ConfigError.invalid(FIELD, spec, f"{why}; allowed: {COMPRESSOR_SPECS}")


def _integer(spec: str, text: str, what: str) -> int:
    if not text.strip().isdigit():
        raise _bad(spec, f"{what} must be an integer >= 1, got {text!r}")
    value = int(text)
    if not 1 <= value <= 2**31 - 1:
        raise _bad(spec, f"{what} must be an integer in [1, 2^31), got {value}")
    return value


def _fraction(spec: str, text: str, name: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise _bad(spec, f"{name}'s fraction F must be a number in (0, 1], got {text!r}") from None
    if not 0.0 < value <= 1.0:  # also refuses nan and inf
        raise _bad(spec, f"{name}'s fraction F must be in (0, 1], got {text}")
    return value


def _randk(spec: str, args: list[str]) -> Compressor:
    if len(args) == 2 and args[1].strip() != "unbiased":
        raise _bad(spec, f"randk's option must be 'unbiased', got {args[1]!r}")
    return RandK(_fraction(spec, args[0], "randk"), unbiased=len(args) == 2)


# name -> (the number of arguments allowed, the builder from the spec and its arguments)
_BUILDERS: dict[str, tuple[tuple[int, ...], Callable[[str, list[str]], Compressor]]] = {
    "none": ((0,), lambda spec, a: NoCompression()),
    "fp16": ((0,), lambda spec, a: FP16()),
    "bf16": ((0,), lambda spec, a: BF16()),
    "sign": ((0,), lambda spec, a: ScaledSign()),
    "int8": ((0, 1), lambda spec, a: Int8(_integer(spec, a[0], "int8's CHUNK") if a else INT8_CHUNK)),
    "int4": ((0, 1), lambda spec, a: Int4(_integer(spec, a[0], "int4's CHUNK") if a else INT4_CHUNK)),
    "qsgd": ((1,), lambda spec, a: QSGD(_integer(spec, a[0], "qsgd's levels S"))),
    "topk": ((1,), lambda spec, a: TopK(_fraction(spec, a[0], "topk"))),
    "randk": ((1, 2), _randk),
    "powersgd": ((1,), lambda spec, a: PowerSGD(_integer(spec, a[0], "powersgd's rank R"))),
}


def parse_compressor(spec: str | Compressor | None, *, layout: Sequence[Sequence[int]] | None = None) -> Compressor:
    """The compressor a spec names (a :class:`Compressor` is returned as it is, ``None`` is ``none``).

    ``layout``: the shapes of the tensors a row is made of, in order (PowerSGD compresses each matrix-shaped
    one; the others ignore it). A bad spec raises :class:`ConfigError` naming the field ``compress``, the
    value and the grammar."""
    if spec is None:
        compressor: Compressor = NoCompression()
    elif isinstance(spec, Compressor):
        compressor = spec
    elif not isinstance(spec, str):
        raise ConfigError.invalid(FIELD, spec, f"must be a spec string; allowed: {COMPRESSOR_SPECS}")
    else:
        name, *args = spec.strip().split(":")
        entry = _BUILDERS.get(name.strip().lower())
        if entry is None:
            raise _bad(spec, f"unknown compressor {name.strip()!r}")
        counts, build = entry
        if len(args) not in counts:
            wanted = " or ".join(str(c) for c in counts)
            raise _bad(spec, f"{name.strip().lower()} takes {wanted} argument(s) after ':', got {len(args)}")
        compressor = build(spec, args)
    return compressor.with_layout(layout) if layout is not None else compressor
