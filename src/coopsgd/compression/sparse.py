"""Sparsifiers: ``topk:F`` (the largest magnitudes, ties to the lower index) and ``randk:F`` (coordinates
drawn from (seed, round, node), so the receiver regenerates the indices and only the values travel)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from fractions import Fraction
from typing import Any

import torch

from coopsgd.compression.base import (
    Compressor,
    Payload,
    Roundtrip,
    as_nodes,
    check_rows,
    count_of,
    index_dtype,
)
from coopsgd.compression.rng import STREAM_RANDK, hash_words_torch, row_keys
from coopsgd.errors import ConfigError

__all__ = ["TopK", "RandK", "as_fraction", "format_fraction", "topk_mask", "randk_indices"]


def as_fraction(name: str, value: float | str | Fraction) -> Fraction:
    """F as the shortest decimal that round-trips its float (so ``0.01`` is exactly 1/100), in (0, 1]."""
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise ConfigError.invalid("compress", f"{name}:{value}", f"{name}'s fraction F must be a number in (0, 1]") from None
    if not (math.isfinite(x) and 0.0 < x <= 1.0):
        raise ConfigError.invalid("compress", f"{name}:{value}", f"{name}'s fraction F must be in (0, 1], e.g. {name}:0.01")
    return Fraction(repr(x))


def format_fraction(fraction: Fraction) -> str:
    """F as a spec writes it: the shortest round-trip decimal, without a trailing ``.0`` (1, 0.01, 1e-05)."""
    text = repr(float(fraction))
    return text[:-2] if text.endswith(".0") else text


def topk_mask(rows: torch.Tensor, k: int) -> torch.Tensor:
    """(r, d) bool: exactly k coordinates per row, the largest |x|, ties at the threshold to the lower index.

    ``torch.topk`` gives the k-th largest magnitude (its value does not depend on how ties are ordered); all
    coordinates above it are kept, and the remaining slots go to the lowest indices equal to it. NaN counts
    as +inf (a diverged row stays non-finite for the NaN policy to see, instead of breaking the selection)."""
    mag = torch.nan_to_num(rows.abs(), nan=math.inf, posinf=math.inf)
    threshold = torch.topk(mag, k, dim=1, sorted=False).values.amin(dim=1, keepdim=True)
    above = mag > threshold
    at = mag == threshold
    room = k - above.sum(dim=1, keepdim=True)
    return above | (at & (torch.cumsum(at, dim=1) <= room))


def randk_indices(ids: torch.Tensor, d: int, k: int, *, seed: int, round: int) -> torch.Tensor:
    """(r, k) int64 ascending: the k coordinates of each row with the smallest 32-bit keys
    ``hash(seed, round, node, j)``, ties (hash collisions) to the lower index: a uniform k-subset per node,
    the same whichever rows are drawn together. Needs d ≤ 2^31 (key·2^31 + j fits int64)."""
    if d > 2**31:
        raise ConfigError.invalid("d", d, "randk supports rows of at most 2^31 coordinates")
    keys = row_keys(ids, seed=seed, round=round, stream=STREAM_RANDK)
    j = torch.arange(d, dtype=torch.int64, device=ids.device).reshape(1, -1)
    order = hash_words_torch(keys, d, device=ids.device).bitwise_left_shift_(31).bitwise_or_(j)
    picked = torch.topk(order, k, dim=1, largest=False, sorted=False).indices
    return torch.sort(picked, dim=1).values


class TopK(Compressor):
    """``topk:F``: the k = min(d, max(1, ⌈F·d⌉)) coordinates largest in magnitude (ties to the lower index),
    sent as k values (the rows' dtype) and k ascending indices (the smallest signed integer type holding
    d − 1: int8, int16, int32 or int64). Bytes k·(itemsize + index size). δ = k/d (deterministic)."""

    name = "topk"
    biased = True

    def __init__(self, fraction: float | str | Fraction) -> None:
        self.fraction = as_fraction("topk", fraction)

    @property
    def spec(self) -> str:
        return f"topk:{format_fraction(self.fraction)}"

    def k(self, d: int) -> int:
        return count_of(self.fraction, d)

    def delta(self, d: int) -> float:
        return self.k(d) / d

    def payload_bytes(self, d: int, dtype: torch.dtype = torch.float32) -> int:
        return self.k(d) * (dtype.itemsize + index_dtype(d).itemsize)

    def compress(self, rows: torch.Tensor, *, round: int, nodes: Sequence[int] | torch.Tensor, seed: int,
                 state: Any = None) -> Payload:
        check_rows(rows)
        r, d = rows.shape
        k = self.k(d)
        idx = topk_mask(rows, k).nonzero()[:, 1].reshape(r, k)
        parts = {"values": torch.gather(rows, 1, idx), "indices": idx.to(index_dtype(d))}
        return self._payload(rows, parts, round, as_nodes(nodes, r), seed)

    def decompress(self, payload: Payload) -> torch.Tensor:
        values = payload.parts["values"]
        out = torch.zeros(payload.shape, dtype=payload.dtype, device=values.device)
        return out.scatter_(1, payload.parts["indices"].to(torch.int64), values)

    def roundtrip(self, rows: torch.Tensor, *, round: int, nodes: Sequence[int] | torch.Tensor, seed: int,
                  state: Any = None) -> Roundtrip:
        check_rows(rows)
        as_nodes(nodes, rows.shape[0])
        keep = topk_mask(rows, self.k(rows.shape[1]))
        decoded = torch.where(keep, rows, torch.zeros((), dtype=rows.dtype, device=rows.device))
        return Roundtrip(decoded, self.payload_bytes(rows.shape[1], rows.dtype), None)


class RandK(Compressor):
    """``randk:F`` / ``randk:F:unbiased``: k = min(d, max(1, ⌈F·d⌉)) coordinates drawn uniformly without
    replacement from (seed, round, node) (:func:`randk_indices`). Only the k values travel (bytes
    k·itemsize): every receiver knows (seed, round, sender) and draws the same indices.

    ``randk:F`` keeps the values as they are (biased, as CHOCO-SGD's rand_k: E‖Q(x) − x‖² = (1 − k/d)‖x‖²,
    δ = k/d in expectation); ``randk:F:unbiased`` scales them by d/k (E Q(x) = x, ω = d/k − 1)."""

    name = "randk"

    def __init__(self, fraction: float | str | Fraction, *, unbiased: bool = False) -> None:
        self.fraction = as_fraction("randk", fraction)
        self.unbiased = bool(unbiased)
        self.biased = not self.unbiased

    @property
    def spec(self) -> str:
        return f"randk:{format_fraction(self.fraction)}" + (":unbiased" if self.unbiased else "")

    def k(self, d: int) -> int:
        return count_of(self.fraction, d)

    def scale(self, d: int) -> float:
        """The factor the decoder applies to the values: d/k when unbiased, else 1."""
        return d / self.k(d) if self.unbiased else 1.0

    def delta(self, d: int) -> float | None:
        return None if self.unbiased else self.k(d) / d

    def omega(self, d: int) -> float | None:
        return d / self.k(d) - 1.0 if self.unbiased else None

    def payload_bytes(self, d: int, dtype: torch.dtype = torch.float32) -> int:
        return self.k(d) * dtype.itemsize

    def compress(self, rows: torch.Tensor, *, round: int, nodes: Sequence[int] | torch.Tensor, seed: int,
                 state: Any = None) -> Payload:
        check_rows(rows)
        r, d = rows.shape
        ids = as_nodes(nodes, r, rows.device)
        idx = randk_indices(ids, d, self.k(d), seed=seed, round=round)
        return self._payload(rows, {"values": torch.gather(rows, 1, idx)}, round, ids, seed)

    def decompress(self, payload: Payload) -> torch.Tensor:
        r, d = payload.shape
        values = payload.parts["values"]
        idx = randk_indices(payload.nodes, d, self.k(d), seed=payload.seed, round=payload.round)
        if self.unbiased:
            values = values * self.scale(d)
        out = torch.zeros(payload.shape, dtype=payload.dtype, device=values.device)
        return out.scatter_(1, idx, values)
