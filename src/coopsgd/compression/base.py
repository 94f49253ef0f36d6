"""The compressor interface: :class:`Compressor`, its wire :class:`Payload`, and shared helpers.

A compressor works on STACKED rows (r, d), one row per node, with batched torch operations (never a
Python loop over rows), and is deterministic: the result for a node depends only on its row and on
(seed, round, node), never on which other rows are in the batch.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, ClassVar, NamedTuple

import torch

from coopsgd.errors import ConfigError

__all__ = [
    "Payload",
    "Roundtrip",
    "Compressor",
    "as_nodes",
    "index_dtype",
    "int_dtype_for",
    "count_of",
    "row_sum",
    "SUM_CHUNK",
]

FIELD = "compress"

#: Width of the blocks of :func:`row_sum` (see there).
SUM_CHUNK = 256


@dataclass(frozen=True, eq=False)
class Payload:
    """What r nodes send: the wire tensors (``parts``, each with a leading dimension r) and what every
    receiver already knows (the spec, shape, dtype, seed, round and nodes; never counted as bytes).

    ``state`` is the compressor's next per-node state (PowerSGD's warm-start factors), kept by the sender
    and not sent; it is ``None`` for stateless compressors."""

    spec: str
    shape: tuple[int, int]
    dtype: torch.dtype
    parts: Mapping[str, torch.Tensor]
    round: int
    nodes: torch.Tensor
    seed: int
    state: Any = field(default=None)

    def row_bytes(self) -> int:
        """Bytes one node sends: the sum over the wire tensors of one row's elements times their size."""
        r = self.shape[0]
        return sum((t.numel() // r) * t.element_size() for t in self.parts.values()) if r else 0


class Roundtrip(NamedTuple):
    """The fused encode + decode: the decoded rows, the bytes each row's payload has, the next state."""

    decoded: torch.Tensor
    row_bytes: int
    state: Any


class Compressor(abc.ABC):
    """A compressor Q of one node's flat row (SPEC §11): exact payload size and a quality.

    Biased compressors have ``delta(d)``: ‖Q(x) − x‖² ≤ (1 − δ)‖x‖² (in expectation for random ones);
    unbiased ones have ``omega(d)``: E Q(x) = x and E‖Q(x) − x‖² ≤ ω‖x‖². Exactly one of the two is not None.
    """

    name: ClassVar[str]
    biased: bool

    @property
    @abc.abstractmethod
    def spec(self) -> str:
        """The canonical spec string (``parse_compressor(c.spec)`` rebuilds an equal compressor)."""

    def delta(self, d: int) -> float | None:
        """δ of a biased compressor on vectors of dimension d (None for unbiased ones)."""
        return None

    def omega(self, d: int) -> float | None:
        """ω of an unbiased compressor on vectors of dimension d (None for biased ones)."""
        return None

    @abc.abstractmethod
    def payload_bytes(self, d: int, dtype: torch.dtype = torch.float32) -> int:
        """The exact bytes one node's payload has for a row of d elements of ``dtype``."""

    @abc.abstractmethod
    def compress(
        self, rows: torch.Tensor, *, round: int, nodes: Sequence[int] | torch.Tensor, seed: int, state: Any = None
    ) -> Payload:
        """Encode stacked rows (r, d); row i belongs to node ``nodes[i]``."""

    @abc.abstractmethod
    def decompress(self, payload: Payload) -> torch.Tensor:
        """Decode a payload back to (r, d) rows of the payload's dtype."""

    def decompress_add(self, payload: Payload, out: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
        """``out += alpha · decompress(payload)`` in place (``out``: (r, d) of the payload's dtype), and ``out``.

        What a receiver does with each payload of a round (the clock's *decode*, :mod:`coopsgd.theory.codec`).
        Sparse compressors add their k values alone, without the dense decoded row; the others decode and add."""
        return out.add_(self.decompress(payload), alpha=alpha)

    def roundtrip(
        self, rows: torch.Tensor, *, round: int, nodes: Sequence[int] | torch.Tensor, seed: int, state: Any = None
    ) -> Roundtrip:
        """``decompress(compress(rows))`` with its byte count and next state (bit-identical to the two calls;
        compressors may fuse them)."""
        payload = self.compress(rows, round=round, nodes=nodes, seed=seed, state=state)
        return Roundtrip(self.decompress(payload), payload.row_bytes(), payload.state)

    def with_layout(self, layout: Sequence[Sequence[int]] | None) -> Compressor:
        """The compressor for rows made of tensors of these shapes (only shape-aware ones use it)."""
        return self

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.spec!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Compressor) and type(other) is type(self) and other.spec == self.spec

    def __hash__(self) -> int:
        return hash((type(self).__name__, self.spec))

    def _payload(self, rows: torch.Tensor, parts: Mapping[str, torch.Tensor], round: int,
                 nodes: torch.Tensor, seed: int, state: Any = None) -> Payload:
        return Payload(self.spec, (rows.shape[0], rows.shape[1]), rows.dtype, dict(parts), round, nodes, seed, state)


def check_rows(rows: torch.Tensor) -> None:
    if not isinstance(rows, torch.Tensor) or rows.ndim != 2 or not rows.is_floating_point():
        raise ConfigError.invalid("rows", getattr(rows, "shape", rows), "must be a 2-D floating-point tensor (r, d)")


def as_nodes(nodes: Sequence[int] | torch.Tensor, r: int, device: torch.device | None = None) -> torch.Tensor:
    """The node ids of r rows as an int64 tensor (values in [0, 2^32): they are hashed as one word)."""
    t = torch.as_tensor(nodes, dtype=torch.int64, device=device).reshape(-1)
    if t.numel() != r:
        raise ConfigError.invalid("nodes", list(t.tolist()), f"must have one node id per row ({r} rows)")
    if t.numel() and (int(t.min()) < 0 or int(t.max()) > 0xFFFFFFFF):
        raise ConfigError.invalid("nodes", list(t.tolist()), "node ids must be in [0, 2^32)")
    return t


def int_dtype_for(largest: int) -> torch.dtype:
    """The smallest signed integer dtype (int8, int16, int32, int64) holding values in [-largest, largest]."""
    for dtype, top in ((torch.int8, 2**7 - 1), (torch.int16, 2**15 - 1), (torch.int32, 2**31 - 1)):
        if largest <= top:
            return dtype
    return torch.int64


def index_dtype(d: int) -> torch.dtype:
    """The dtype of coordinate indices of a d-element row: the smallest signed type holding d − 1."""
    return int_dtype_for(max(d - 1, 0))


def count_of(fraction: Fraction, d: int) -> int:
    """k = min(d, max(1, ⌈F·d⌉)), with F the exact decimal it was written as (so 0.01·300 = 3, not 4)."""
    return min(d, max(1, math.ceil(fraction * d)))


def row_sum(t: torch.Tensor) -> torch.Tensor:
    """Per-row sums of (r, n) as (r, 1), in an order that does not depend on r or on the thread count.

    torch splits a single long reduction over threads (changing the order of the additions) but computes
    each of many short ones in one thread; summing blocks of :data:`SUM_CHUNK` and then the block sums
    (recursively) keeps every reduction short, so a row alone and the same row in a batch give the same bits.
    """
    n = t.shape[1]
    if n <= SUM_CHUNK:
        return t.sum(dim=1, keepdim=True)
    full = (n // SUM_CHUNK) * SUM_CHUNK
    blocks = t[:, :full].reshape(t.shape[0], -1, SUM_CHUNK).sum(dim=2)
    if full < n:
        blocks = torch.cat([blocks, t[:, full:].sum(dim=1, keepdim=True)], dim=1)
    return row_sum(blocks)
