"""Counter-based random numbers keyed by (seed, round, node, stream): the same bits in torch and numpy.

A compressor that draws (``qsgd``'s stochastic rounding, ``randk``'s coordinates, PowerSGD's first factor)
must give node i the same draws whether its row is compressed alone (the distributed engine: one row per
rank) or stacked with others (the simulator: every row at once), and the numpy reference must reproduce
them. A ``torch.Generator`` per row would need a Python loop over rows and has no numpy twin, so the draws
come from a keyed integer hash instead, evaluated on whole tensors:

* four 32-bit key words per row, absorbed from (lane, seed, round, stream, node) with :func:`mix32`;
* coordinate j of a row: ``word(j) = mix32((mix32(j ^ k1) + k2) mod 2^32)``, a bijection of j for fixed keys;
* a uniform on [0, 1) with 53 random bits: ``(word_{k1,k2}(j) * 2^21 + word_{k3,k4}(j) >> 11) * 2^-53``.

:func:`mix32` is the xor-shift-multiply finaliser with multiplier ``0x45d9f3b`` (< 2^27), so every product of
a 32-bit value stays below 2^59: the arithmetic is exact in int64 on every backend (no overflow), and the
same expression runs on Python ints, numpy int64 arrays and torch int64 tensors with identical results.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TypeVar

import numpy as np
import torch

from coopsgd.errors import ConfigError

__all__ = [
    "MASK32",
    "STREAM_QSGD",
    "STREAM_RANDK",
    "STREAM_POWERSGD",
    "mix32",
    "row_keys",
    "row_keys_np",
    "hash_words",
    "hash_words_torch",
    "hash_blocks",
    "uniform53",
    "uniform53_np",
    "check_draw_args",
]

MASK32 = 0xFFFFFFFF
_MUL = 0x45D9F3B
# Distinct constants per key lane and per stream, so that no two draws share a key.
_LANES = (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344)
STREAM_QSGD = 1
STREAM_RANDK = 2
STREAM_POWERSGD = 3

T = TypeVar("T", int, np.ndarray, torch.Tensor)


def mix32(x: T) -> T:
    """The 32-bit integer hash (a bijection of [0, 2^32)); ``x`` holds values in [0, 2^32)."""
    x = (((x >> 16) ^ x) * _MUL) & MASK32
    x = (((x >> 16) ^ x) * _MUL) & MASK32
    return (x >> 16) ^ x


def check_draw_args(round: int, seed: int) -> None:
    """The round and seed of a draw: non-negative int64 values (both are absorbed as two 32-bit words)."""
    if isinstance(round, bool) or not isinstance(round, int) or round < 0 or round >= 2**63:
        raise ConfigError.invalid("round", round, "must be an integer in [0, 2^63)")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0 or seed >= 2**63:
        raise ConfigError.invalid("seed", seed, "must be an integer in [0, 2^63)")


def _prefix(lane: int, seed: int, round: int, stream: int) -> int:
    """The key state of (lane, seed, round, stream) before the node is absorbed (Python ints, exact)."""
    h = mix32(_LANES[lane])
    for word in (seed & MASK32, seed >> 32, round & MASK32, round >> 32, stream):
        h = mix32((h ^ word) & MASK32)
    return h


def row_keys(nodes: torch.Tensor, *, seed: int, round: int, stream: int) -> list[torch.Tensor]:
    """Four (r, 1) int64 key words, one row per entry of ``nodes`` (int64, values in [0, 2^32))."""
    check_draw_args(round, seed)
    keys = []
    for lane in range(4):
        h = mix32((nodes ^ _prefix(lane, seed, round, stream)) & MASK32)
        keys.append(mix32((h + 0x9E3779B9) & MASK32).reshape(-1, 1))
    return keys


def row_keys_np(node: int, *, seed: int, round: int, stream: int) -> list[int]:
    """The four key words of one node (the numpy reference's twin of :func:`row_keys`)."""
    check_draw_args(round, seed)
    keys = []
    for lane in range(4):
        h = mix32((node ^ _prefix(lane, seed, round, stream)) & MASK32)
        keys.append(mix32((h + 0x9E3779B9) & MASK32))
    return keys


def hash_words(j: T, k1: T | int, k2: T | int) -> T:
    """32-bit words of coordinates ``j`` under keys (k1, k2); any backend, broadcasting as usual (the
    definition; the compressors use :func:`hash_words_torch`, the same arithmetic in place)."""
    return mix32((mix32(j ^ k1) + k2) & MASK32)


#: Elements per block of the torch hash: its scratch tensors (three of r × width int64) stay in cache, where
#: a whole (r, d) int64 temporary per operation would cost more in memory traffic than the arithmetic.
HASH_BLOCK = 1 << 15


def _mix32_(x: torch.Tensor, tmp: torch.Tensor) -> torch.Tensor:
    """:func:`mix32` in place (``tmp``: scratch of x's shape)."""
    for _ in range(2):
        torch.bitwise_right_shift(x, 16, out=tmp)
        x.bitwise_xor_(tmp).mul_(_MUL).bitwise_and_(MASK32)
    torch.bitwise_right_shift(x, 16, out=tmp)
    return x.bitwise_xor_(tmp)


def _hash_into(out: torch.Tensor, j: torch.Tensor, k1: torch.Tensor, k2: torch.Tensor, tmp: torch.Tensor) -> None:
    """``out`` ← :func:`hash_words` (j, k1, k2), in place: j (1, w), keys (r, 1), out and tmp (r, w)."""
    torch.bitwise_xor(j, k1, out=out)
    _mix32_(out, tmp).add_(k2).bitwise_and_(MASK32)
    _mix32_(out, tmp)


def _blocks(r: int, d: int) -> list[tuple[int, int]]:
    width = max(64, HASH_BLOCK // max(r, 1))
    return [(start, min(d, start + width)) for start in range(0, d, width)]


def hash_blocks(keys: list[torch.Tensor], d: int, *, device: torch.device | None = None,
                wide: bool = False) -> Iterator[tuple[int, int, torch.Tensor]]:
    """(start, stop, words) for consecutive column blocks of :func:`hash_words_torch`'s (r, d) result: words
    (r, stop − start) int64, computed with in-place operations in scratch that stays in cache and is reused
    by the next block (consume it before advancing). The same arithmetic, so the same bits."""
    r = keys[0].shape[0]
    blocks = _blocks(r, d)
    width = blocks[0][1] if blocks else 0
    hi_s, lo_s, tmp_s = (torch.empty((r, width), dtype=torch.int64, device=device) for _ in range(3))
    for start, stop in blocks:
        w = stop - start
        hi, lo, tmp = (t if w == width else t[:, :w] for t in (hi_s, lo_s, tmp_s))
        j = torch.arange(start, stop, dtype=torch.int64, device=device).reshape(1, -1)
        _hash_into(hi, j, keys[0], keys[1], tmp)
        if wide:
            _hash_into(lo, j, keys[2], keys[3], tmp)
            hi.bitwise_left_shift_(21).bitwise_or_(lo.bitwise_right_shift_(11))
        yield start, stop, hi


def hash_words_torch(keys: list[torch.Tensor], d: int, *, device: torch.device | None = None,
                     wide: bool = False) -> torch.Tensor:
    """(r, d) int64: :func:`hash_words` of coordinates 0..d−1 under each row's keys (k1, k2), computed in
    column blocks with in-place operations (:func:`hash_blocks`: the same arithmetic, so the same bits);
    ``wide`` returns the 53-bit words ``hash(k1, k2) · 2^21 + hash(k3, k4) >> 11`` instead."""
    out = torch.empty((keys[0].shape[0], d), dtype=torch.int64, device=device)
    for start, stop, words in hash_blocks(keys, d, device=device, wide=wide):
        out[:, start:stop] = words
    return out


def uniform53(keys: list[torch.Tensor], d: int, *, device: torch.device | None = None) -> torch.Tensor:
    """(r, d) float64 uniforms on [0, 1) with 53 random bits, from the four key words of each row."""
    return hash_words_torch(keys, d, device=device, wide=True).to(torch.float64).mul_(2.0**-53)


def uniform53_np(keys: list[int], d: int) -> np.ndarray:
    """(d,) float64 uniforms of one row: the same bits as :func:`uniform53`."""
    j = np.arange(d, dtype=np.int64)
    hi = hash_words(j, keys[0], keys[1])
    lo = hash_words(j, keys[2], keys[3])
    return ((hi << 21) | (lo >> 11)).astype(np.float64) * 2.0**-53
