"""Dense compressors: ``none``, ``fp16`` / ``bf16`` casts, ``int8`` and ``int4`` with per-chunk scales,
``qsgd:S`` and the scaled ``sign``. Each sends every coordinate, at fewer bits."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, ClassVar

import torch

from coopsgd.compression.base import Compressor, Payload, as_nodes, check_rows, int_dtype_for, row_sum
from coopsgd.compression.rng import STREAM_QSGD, hash_blocks, row_keys
from coopsgd.errors import ConfigError

__all__ = ["NoCompression", "Cast", "FP16", "BF16", "Int8", "Int4", "QSGD", "ScaledSign", "INT8_CHUNK", "INT4_CHUNK",
           "FP16_UNIT", "BF16_UNIT"]

#: Default number of consecutive coordinates that share one int8 scale.
INT8_CHUNK = 1024
#: Default number of consecutive coordinates that share one int4 scale (delta = 1 - 64/14^2 ~ 0.67).
INT4_CHUNK = 64
#: Unit roundoff of the casts (round to nearest): |fl(x) − x| ≤ u|x| for x in the format's normal range.
FP16_UNIT = 2.0**-11
BF16_UNIT = 2.0**-8

_BIT_WEIGHTS = (128, 64, 32, 16, 8, 4, 2, 1)


class NoCompression(Compressor):
    """``none``: the row itself, d·itemsize bytes. The decoded rows ARE the input rows (no copy)."""

    name = "none"
    biased = True

    @property
    def spec(self) -> str:
        return "none"

    def delta(self, d: int) -> float:
        return 1.0

    def payload_bytes(self, d: int, dtype: torch.dtype = torch.float32) -> int:
        return d * dtype.itemsize

    def compress(self, rows: torch.Tensor, *, round: int, nodes: Sequence[int] | torch.Tensor, seed: int,
                 state: Any = None) -> Payload:
        check_rows(rows)
        return self._payload(rows, {"values": rows}, round, as_nodes(nodes, rows.shape[0]), seed)

    def decompress(self, payload: Payload) -> torch.Tensor:
        return payload.parts["values"]


class Cast(Compressor):
    """``fp16`` / ``bf16``: each coordinate rounded to nearest in the 16-bit format, 2·d bytes.

    δ = 1 − u² (u the unit roundoff: 2^-11 for fp16, 2^-8 for bf16) for coordinates in the format's normal
    range; fp16 overflows to ±inf above 65504 and loses relative precision below 6.1e-5 (bf16 has float32's
    range)."""

    biased = True
    wire: ClassVar[torch.dtype]
    unit: ClassVar[float]

    @property
    def spec(self) -> str:
        return self.name

    def delta(self, d: int) -> float:
        return 1.0 - self.unit**2

    def payload_bytes(self, d: int, dtype: torch.dtype = torch.float32) -> int:
        return d * self.wire.itemsize

    def compress(self, rows: torch.Tensor, *, round: int, nodes: Sequence[int] | torch.Tensor, seed: int,
                 state: Any = None) -> Payload:
        check_rows(rows)
        return self._payload(rows, {"values": rows.to(self.wire)}, round, as_nodes(nodes, rows.shape[0]), seed)

    def decompress(self, payload: Payload) -> torch.Tensor:
        return payload.parts["values"].to(payload.dtype)


class FP16(Cast):
    """``fp16``: IEEE half precision (see :class:`Cast`)."""

    name = "fp16"
    wire = torch.float16
    unit = FP16_UNIT


class BF16(Cast):
    """``bf16``: bfloat16 (see :class:`Cast`)."""

    name = "bf16"
    wire = torch.bfloat16
    unit = BF16_UNIT


class Int8(Compressor):
    """``int8[:C]``: chunks of C consecutive coordinates (the last one shorter) share a scale
    s = max|x_chunk| / 127; q = round(x / s) to nearest (ties to even), in [−127, 127]; decoded q·s.
    Bytes d + ⌈d/C⌉·itemsize (the scales travel in the rows' dtype). δ = 1 − min(C, d)/254²."""

    name = "int8"
    biased = True

    def __init__(self, chunk: int = INT8_CHUNK) -> None:
        if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
            raise ConfigError.invalid("compress", f"int8:{chunk}", "the int8 chunk must be an integer >= 1")
        self.chunk = chunk

    @property
    def spec(self) -> str:
        return "int8" if self.chunk == INT8_CHUNK else f"int8:{self.chunk}"

    def delta(self, d: int) -> float:
        return max(0.0, 1.0 - min(self.chunk, d) / 254.0**2)

    def payload_bytes(self, d: int, dtype: torch.dtype = torch.float32) -> int:
        return d + math.ceil(d / self.chunk) * dtype.itemsize

    def _chunks(self, rows: torch.Tensor) -> torch.Tensor:
        """(r, n, C): the rows padded with zeros to n·C coordinates."""
        r, d = rows.shape
        n = math.ceil(d / self.chunk)
        if n * self.chunk != d:
            rows = torch.nn.functional.pad(rows, (0, n * self.chunk - d))
        return rows.reshape(r, n, self.chunk)

    def compress(self, rows: torch.Tensor, *, round: int, nodes: Sequence[int] | torch.Tensor, seed: int,
                 state: Any = None) -> Payload:
        check_rows(rows)
        r, d = rows.shape
        chunks = self._chunks(rows)
        scales = chunks.abs().amax(dim=2) / 127.0
        safe = torch.where(scales > 0, scales, torch.ones_like(scales))
        q = torch.round(chunks / safe.unsqueeze(2)).clamp_(-127, 127).to(torch.int8).reshape(r, -1)[:, :d]
        return self._payload(rows, {"values": q, "scales": scales}, round, as_nodes(nodes, r), seed)

    def decompress(self, payload: Payload) -> torch.Tensor:
        r, d = payload.shape
        q = self._chunks(payload.parts["values"].to(payload.dtype))
        return (q * payload.parts["scales"].unsqueeze(2)).reshape(r, -1)[:, :d]


class Int4(Int8):
    """``int4[:C]``: chunks of C consecutive coordinates (the last one shorter) share a scale
    s = max|x_chunk| / 7; q = round(x / s) to nearest (ties to even), in [−7, 7]; decoded q·s. The levels
    travel as q + 8 in 4 bits, two per byte (coordinate 2j in the low half of byte j, 2j + 1 in the high
    half; an odd d pads the last byte). Bytes ⌈d/2⌉ + ⌈d/C⌉·itemsize. Each coordinate is off by at most s/2,
    so ‖Q(x) − x‖² ≤ min(C, d) max|x|²/14² ≤ (min(C, d)/14²) ‖x‖²: δ = 1 − min(C, d)/196 (0 when C ≥ 196)."""

    name = "int4"
    LEVEL: ClassVar[int] = 7

    def __init__(self, chunk: int = INT4_CHUNK) -> None:
        if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
            raise ConfigError.invalid("compress", f"int4:{chunk}", "the int4 chunk must be an integer >= 1")
        self.chunk = chunk

    @property
    def spec(self) -> str:
        return "int4" if self.chunk == INT4_CHUNK else f"int4:{self.chunk}"

    def delta(self, d: int) -> float:
        return max(0.0, 1.0 - min(self.chunk, d) / (2.0 * self.LEVEL) ** 2)

    def payload_bytes(self, d: int, dtype: torch.dtype = torch.float32) -> int:
        return math.ceil(d / 2) + math.ceil(d / self.chunk) * dtype.itemsize

    def compress(self, rows: torch.Tensor, *, round: int, nodes: Sequence[int] | torch.Tensor, seed: int,
                 state: Any = None) -> Payload:
        check_rows(rows)
        r, d = rows.shape
        chunks = self._chunks(rows)
        scales = chunks.abs().amax(dim=2) / float(self.LEVEL)
        safe = torch.where(scales > 0, scales, torch.ones_like(scales))
        q = torch.round(chunks / safe.unsqueeze(2)).clamp_(-self.LEVEL, self.LEVEL).reshape(r, -1)[:, :d]
        nib = (q + 8).to(torch.uint8)
        if d % 2:
            nib = torch.nn.functional.pad(nib, (0, 1), value=8)
        packed = nib[:, 0::2] | (nib[:, 1::2] << 4)
        return self._payload(rows, {"values": packed, "scales": scales}, round, as_nodes(nodes, r), seed)

    def decompress(self, payload: Payload) -> torch.Tensor:
        r, d = payload.shape
        packed = payload.parts["values"]
        nib = torch.stack([packed & 0x0F, packed >> 4], dim=2).reshape(r, -1)[:, :d]
        q = self._chunks(nib.to(payload.dtype) - 8.0)
        return (q * payload.parts["scales"].unsqueeze(2)).reshape(r, -1)[:, :d]


class QSGD(Compressor):
    """``qsgd:S`` (Alistarh et al., NeurIPS 2017, §3.1): Q(x)_j = ‖x‖₂ · sign(x_j) · ξ_j / S, where
    ξ_j = ⌊y_j⌋ + [u_j < y_j − ⌊y_j⌋] with y_j = |x_j| / ‖x‖₂ · S and u_j uniform from (seed, round, node):
    unbiased, ω = min(d/S², √d/S) (their Lemma 3.1). Bytes d·size(levels) + itemsize: the signed levels in
    the smallest signed integer type holding ±S (int8 for S ≤ 127) and the norm in the rows' dtype."""

    name = "qsgd"
    biased = False

    def __init__(self, levels: int) -> None:
        if isinstance(levels, bool) or not isinstance(levels, int) or not 1 <= levels <= 2**31 - 1:
            raise ConfigError.invalid("compress", f"qsgd:{levels}", "qsgd's levels S must be an integer in [1, 2^31)")
        self.levels = levels

    @property
    def spec(self) -> str:
        return f"qsgd:{self.levels}"

    def omega(self, d: int) -> float:
        return min(d / self.levels**2, math.sqrt(d) / self.levels)

    def payload_bytes(self, d: int, dtype: torch.dtype = torch.float32) -> int:
        return d * int_dtype_for(self.levels).itemsize + dtype.itemsize

    def compress(self, rows: torch.Tensor, *, round: int, nodes: Sequence[int] | torch.Tensor, seed: int,
                 state: Any = None) -> Payload:
        check_rows(rows)
        r, d = rows.shape
        ids = as_nodes(nodes, r, rows.device)
        norm = row_sum(rows * rows).sqrt()
        safe = torch.where(norm > 0, norm, torch.ones_like(norm))
        y = rows.abs().div_(safe).mul_(self.levels)
        low = torch.floor(y)
        frac = y.sub_(low)  # y − ⌊y⌋
        # up_j = [u_j < frac_j], u_j the 53-bit uniforms (rng.uniform53), compared block by block as they are
        # hashed: no (r, d) array of draws
        up = torch.empty((r, d), dtype=torch.bool, device=rows.device)
        keys = row_keys(ids, seed=seed, round=round, stream=STREAM_QSGD)
        for start, stop, words in hash_blocks(keys, d, device=rows.device, wide=True):
            u = words.to(torch.float64).mul_(2.0**-53)
            torch.lt(u, frac[:, start:stop].to(torch.float64), out=up[:, start:stop])
        levels = low.add_(up.to(rows.dtype)).mul_(torch.sign(rows)).to(int_dtype_for(self.levels))
        return self._payload(rows, {"levels": levels, "norm": norm}, round, ids, seed)

    def decompress(self, payload: Payload) -> torch.Tensor:
        return payload.parts["levels"].to(payload.dtype) * (payload.parts["norm"] / self.levels)


class ScaledSign(Compressor):
    """``sign`` (Karimireddy et al., ICML 2019, EF-SignSGD): Q(x) = ‖x‖₁/d · sign(x) with sign(0) = +1, so one
    bit per coordinate: bytes ⌈d/8⌉ + itemsize (bits packed most significant first, the scale in the rows'
    dtype). ‖Q(x) − x‖² = ‖x‖² − ‖x‖₁²/d, so δ = ‖x‖₁²/(d‖x‖²) ≥ 1/d (the worst case, a 1-sparse x)."""

    name = "sign"
    biased = True

    @property
    def spec(self) -> str:
        return "sign"

    def delta(self, d: int) -> float:
        return 1.0 / d

    def payload_bytes(self, d: int, dtype: torch.dtype = torch.float32) -> int:
        return math.ceil(d / 8) + dtype.itemsize

    def compress(self, rows: torch.Tensor, *, round: int, nodes: Sequence[int] | torch.Tensor, seed: int,
                 state: Any = None) -> Payload:
        check_rows(rows)
        r, d = rows.shape
        scale = row_sum(rows.abs()) / d
        bits = (rows >= 0).to(torch.uint8)
        nbytes = math.ceil(d / 8)
        if nbytes * 8 != d:
            bits = torch.nn.functional.pad(bits, (0, nbytes * 8 - d))
        weights = torch.tensor(_BIT_WEIGHTS, dtype=torch.uint8, device=rows.device)
        packed = (bits.reshape(r, nbytes, 8) * weights).sum(dim=2, dtype=torch.uint8)
        return self._payload(rows, {"bits": packed, "scale": scale}, round, as_nodes(nodes, r), seed)

    def decompress(self, payload: Payload) -> torch.Tensor:
        r, d = payload.shape
        packed = payload.parts["bits"]
        shifts = torch.arange(7, -1, -1, dtype=torch.uint8, device=packed.device)
        bits = ((packed.unsqueeze(2) >> shifts) & 1).reshape(r, -1)[:, :d]
        return (bits.to(payload.dtype) * 2 - 1) * payload.parts["scale"]
