"""``powersgd:R`` (Vogels, Karimireddy, Jaggi, NeurIPS 2019, Algorithm 1, one node's share): a rank-R
approximation of every matrix-shaped tensor of the row by one power iteration from a warm-started factor."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from coopsgd.compression.base import Compressor, Payload, as_nodes, check_rows, row_sum
from coopsgd.compression.rng import STREAM_POWERSGD, row_keys, uniform53
from coopsgd.errors import ConfigError

__all__ = ["PowerSGD", "Segment", "orthogonalize", "plan_segments"]

Layout = tuple[tuple[int, ...], ...]


@dataclass(frozen=True)
class Segment:
    """One tensor of the row: coordinates [offset, offset + n·m), viewed as an (n, m) matrix (row-major:
    shape[0] × prod(shape[1:])); ``index`` is its place in the layout, ``compressed`` whether it is
    approximated (ndim ≥ 2 and R·(n + m) < n·m: the factors are smaller than the tensor)."""

    index: int
    offset: int
    n: int
    m: int
    compressed: bool


def plan_segments(layout: Layout | None, d: int, rank: int) -> list[Segment]:
    """The segments of a d-element row (no layout: the row is one vector, sent as it is)."""
    shapes = layout if layout is not None else ((d,),)
    segments, offset = [], 0
    for index, shape in enumerate(shapes):
        n = shape[0] if shape else 1
        m = math.prod(shape[1:])
        compressed = len(shape) >= 2 and rank * (n + m) < n * m
        segments.append(Segment(index, offset, n, m, compressed))
        offset += n * m
    if offset != d:
        raise ConfigError.invalid("layout", shapes, f"the tensors' sizes must add up to the row's length {d}")
    return segments


def orthogonalize(p: torch.Tensor) -> torch.Tensor:
    """Gram–Schmidt on the columns of each (n, R) matrix of a batch (r, n, R), in place, as PyTorch's
    PowerSGD hook does; a zero column stays zero. Sums use :func:`row_sum` (batch-independent order)."""
    r, n, rank = p.shape
    for i in range(rank):
        col = p[:, :, i : i + 1]
        norm = row_sum(col.reshape(r, n).square()).sqrt().unsqueeze(2)
        col /= torch.where(norm > 0, norm, torch.ones_like(norm))
        if i + 1 < rank:
            rest = p[:, :, i + 1 :]
            dots = row_sum((col * rest).transpose(1, 2).reshape(-1, n)).reshape(r, 1, -1)
            rest -= dots * col
    return p


class PowerSGD(Compressor):
    """``powersgd:R``: for each matrix-shaped tensor M (n × m) of the row, with the node's factor Q (m × R)
    from the last round (warm start): P = orth(M Q) (Gram–Schmidt), Q' = Mᵀ P; sends P and Q'; decoded P Q'ᵀ;
    Q' is the node's next warm start (``Payload.state``, one (r, m, R) tensor per compressed matrix).
    Vectors (1-D tensors) and matrices whose factors would not be smaller travel uncompressed.

    The first factor is uniform on [−1, 1) from (seed, tensor index), the same for every node. Bytes
    Σ_compressed (n + m)·R·itemsize + Σ_other numel·itemsize. A biased compressor with no worst-case δ
    (``delta`` is 0): one power iteration from a bad Q may capture little of M; used with error feedback.
    Needs the row's tensor shapes: :meth:`with_layout` (without one, the row is a vector, sent whole)."""

    name = "powersgd"
    biased = True

    def __init__(self, rank: int, layout: Sequence[Sequence[int]] | None = None) -> None:
        if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= 2**31 - 1:
            raise ConfigError.invalid("compress", f"powersgd:{rank}", "powersgd's rank R must be an integer >= 1")
        self.rank = rank
        self.layout: Layout | None = None if layout is None else tuple(tuple(int(s) for s in sh) for sh in layout)

    @property
    def spec(self) -> str:
        return f"powersgd:{self.rank}"

    def with_layout(self, layout: Sequence[Sequence[int]] | None) -> PowerSGD:
        return PowerSGD(self.rank, layout)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PowerSGD) and (other.rank, other.layout) == (self.rank, self.layout)

    def __hash__(self) -> int:
        return hash(("PowerSGD", self.rank, self.layout))

    def delta(self, d: int) -> float:
        return 0.0

    def payload_bytes(self, d: int, dtype: torch.dtype = torch.float32) -> int:
        numel = sum((s.n + s.m) * self.rank if s.compressed else s.n * s.m for s in self.segments(d))
        return numel * dtype.itemsize

    def segments(self, d: int) -> list[Segment]:
        return plan_segments(self.layout, d, self.rank)

    def init_state(self, r: int, d: int, *, seed: int, dtype: torch.dtype = torch.float32,
                   device: torch.device | None = None) -> tuple[torch.Tensor, ...]:
        """The first warm-start factors of r nodes: one (r, m, R) tensor per compressed matrix."""
        out = []
        for s in self.segments(d):
            if s.compressed:
                index = torch.tensor([s.index], dtype=torch.int64, device=device)
                keys = row_keys(index, seed=seed, round=0, stream=STREAM_POWERSGD)
                q = (uniform53(keys, s.m * self.rank, device=device) * 2 - 1).to(dtype)
                out.append(q.reshape(1, s.m, self.rank).expand(r, -1, -1).clone())
        return tuple(out)

    def compress(self, rows: torch.Tensor, *, round: int, nodes: Sequence[int] | torch.Tensor, seed: int,
                 state: Any = None) -> Payload:
        check_rows(rows)
        r, d = rows.shape
        ids = as_nodes(nodes, r, rows.device)
        if state is None:
            state = self.init_state(r, d, seed=seed, dtype=rows.dtype, device=rows.device)
        parts: dict[str, torch.Tensor] = {}
        raw: list[torch.Tensor] = []
        factors: list[torch.Tensor] = []
        for s in self.segments(d):
            block = rows[:, s.offset : s.offset + s.n * s.m]
            if not s.compressed:
                raw.append(block)
                continue
            matrix = block.reshape(r, s.n, s.m)
            q = state[len(factors)]
            p = orthogonalize(torch.bmm(matrix, q))
            q_next = torch.bmm(matrix.transpose(1, 2), p)
            parts[f"p{s.index}"], parts[f"q{s.index}"] = p, q_next
            factors.append(q_next)
        parts["raw"] = torch.cat(raw, dim=1) if raw else rows.new_zeros((r, 0))
        return self._payload(rows, parts, round, ids, seed, tuple(factors))

    def decompress(self, payload: Payload) -> torch.Tensor:
        r, d = payload.shape
        pieces, raw_at = [], 0
        raw = payload.parts["raw"]
        for s in self.segments(d):
            if s.compressed:
                p, q = payload.parts[f"p{s.index}"], payload.parts[f"q{s.index}"]
                pieces.append(torch.bmm(p, q.transpose(1, 2)).reshape(r, -1))
            else:
                pieces.append(raw[:, raw_at : raw_at + s.n * s.m])
                raw_at += s.n * s.m
        return torch.cat(pieces, dim=1)
