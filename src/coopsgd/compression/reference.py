"""The numpy reference of every compressor: one node's row at a time, written as the definition.

``reference_roundtrip(compressor, x, round=, node=, seed=, state=)`` returns Q(x) (the decoded row) and the
node's next state. The torch versions must agree: exactly for ``none``, ``fp16``, ``bf16``, ``int8``, ``int4``,
``topk`` and ``randk`` (the same elementwise operations, each correctly rounded); to a few ulps for
``qsgd``, ``sign`` and ``powersgd``, whose norms, sums and matrix products add in a different order (numpy's
pairwise sum and BLAS against torch's blocked :func:`~coopsgd.compression.base.row_sum`), and a ``qsgd``
level may then differ where u_j lands within those ulps of the rounding threshold (probability ~1e-16 each).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

from coopsgd.compression.base import Compressor
from coopsgd.compression.powersgd import PowerSGD
from coopsgd.compression.quantize import QSGD, Cast, Int4, Int8, NoCompression, ScaledSign
from coopsgd.compression.rng import (
    MASK32,
    STREAM_POWERSGD,
    STREAM_QSGD,
    STREAM_RANDK,
    hash_words,
    row_keys_np,
    uniform53_np,
)
from coopsgd.compression.sparse import RandK, TopK

__all__ = ["reference_roundtrip", "randk_indices_np", "powersgd_init_np"]


def _none(c: Compressor, x: np.ndarray, round: int, node: int, seed: int, state: Any) -> tuple[np.ndarray, Any]:
    return x.copy(), None


def _cast(c: Compressor, x: np.ndarray, round: int, node: int, seed: int, state: Any) -> tuple[np.ndarray, Any]:
    assert isinstance(c, Cast)
    # Both go through float32 first, as torch's casts do (a float64 value is rounded twice).
    if c.name == "fp16":
        return x.astype(np.float32).astype(np.float16).astype(x.dtype), None
    # bfloat16: round to nearest even on the top 16 bits of the float32 pattern (numpy has no bfloat16).
    bits = x.astype(np.float32).view(np.uint32).astype(np.uint64)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
    return rounded.astype(np.uint32).view(np.float32).astype(x.dtype), None


def _int8(c: Compressor, x: np.ndarray, round: int, node: int, seed: int, state: Any) -> tuple[np.ndarray, Any]:
    assert isinstance(c, Int8)
    out = np.empty_like(x)
    for start in range(0, x.size, c.chunk):
        chunk = x[start : start + c.chunk]
        scale = np.abs(chunk).max() / x.dtype.type(127.0)
        q = np.clip(np.round(chunk / scale), -127, 127) if scale > 0 else np.zeros_like(chunk)
        out[start : start + c.chunk] = q * scale
    return out, None


def _int4(c: Compressor, x: np.ndarray, round: int, node: int, seed: int, state: Any) -> tuple[np.ndarray, Any]:
    assert isinstance(c, Int4)
    out = np.empty_like(x)
    for start in range(0, x.size, c.chunk):
        chunk = x[start : start + c.chunk]
        scale = np.abs(chunk).max() / x.dtype.type(c.LEVEL)
        q = np.clip(np.round(chunk / scale), -c.LEVEL, c.LEVEL) if scale > 0 else np.zeros_like(chunk)
        out[start : start + c.chunk] = q * scale
    return out, None


def _qsgd(c: Compressor, x: np.ndarray, round: int, node: int, seed: int, state: Any) -> tuple[np.ndarray, Any]:
    assert isinstance(c, QSGD)
    norm = np.sqrt(np.sum(x * x))
    y = np.abs(x) / (norm if norm > 0 else x.dtype.type(1)) * x.dtype.type(c.levels)
    low = np.floor(y)
    u = uniform53_np(row_keys_np(node, seed=seed, round=round, stream=STREAM_QSGD), x.size)
    xi = low + (u < (y - low).astype(np.float64)).astype(x.dtype)
    return np.sign(x) * xi * (norm / x.dtype.type(c.levels)), None


def _sign(c: Compressor, x: np.ndarray, round: int, node: int, seed: int, state: Any) -> tuple[np.ndarray, Any]:
    scale = np.sum(np.abs(x)) / x.dtype.type(x.size)
    return np.where(x >= 0, scale, -scale).astype(x.dtype), None


def _topk(c: Compressor, x: np.ndarray, round: int, node: int, seed: int, state: Any) -> tuple[np.ndarray, Any]:
    assert isinstance(c, TopK)
    mag = np.nan_to_num(np.abs(x), nan=np.inf, posinf=np.inf)  # NaN counts as +inf
    keep = np.sort(np.argsort(-mag, kind="stable")[: c.k(x.size)])  # stable: ties to the lower index
    out = np.zeros_like(x)
    out[keep] = x[keep]
    return out, None


def randk_indices_np(node: int, d: int, k: int, *, seed: int, round: int) -> np.ndarray:
    """The k coordinates node draws: the smallest keys hash(seed, round, node, j), ties to the lower j."""
    keys = row_keys_np(node, seed=seed, round=round, stream=STREAM_RANDK)
    words = hash_words(np.arange(d, dtype=np.int64), keys[0], keys[1]) & MASK32
    return np.sort(np.lexsort((np.arange(d), words))[:k])


def _randk(c: Compressor, x: np.ndarray, round: int, node: int, seed: int, state: Any) -> tuple[np.ndarray, Any]:
    assert isinstance(c, RandK)
    idx = randk_indices_np(node, x.size, c.k(x.size), seed=seed, round=round)
    out = np.zeros_like(x)
    out[idx] = x[idx] * x.dtype.type(c.scale(x.size)) if c.unbiased else x[idx]
    return out, None


def powersgd_init_np(c: PowerSGD, d: int, seed: int, dtype: Any = np.float64) -> list[np.ndarray]:
    """The first factor (m × R) of each compressed matrix: uniform on [−1, 1) from (seed, tensor index)."""
    out = []
    for s in c.segments(d):
        if s.compressed:
            keys = row_keys_np(s.index, seed=seed, round=0, stream=STREAM_POWERSGD)
            out.append((uniform53_np(keys, s.m * c.rank) * 2 - 1).astype(dtype).reshape(s.m, c.rank))
    return out


def _gram_schmidt(p: np.ndarray) -> np.ndarray:
    p = p.copy()
    for i in range(p.shape[1]):
        norm = math.sqrt(float(np.sum(p[:, i] ** 2)))
        if norm > 0:
            p[:, i] /= norm
        p[:, i + 1 :] -= np.outer(p[:, i], p[:, i] @ p[:, i + 1 :])
    return p


def _powersgd(c: Compressor, x: np.ndarray, round: int, node: int, seed: int, state: Any) -> tuple[np.ndarray, Any]:
    assert isinstance(c, PowerSGD)
    factors = list(state) if state is not None else powersgd_init_np(c, x.size, seed, x.dtype)
    out, new_state = x.copy(), list[np.ndarray]()
    for s in c.segments(x.size):
        if s.compressed:
            matrix = x[s.offset : s.offset + s.n * s.m].reshape(s.n, s.m)
            p = _gram_schmidt(matrix @ factors[len(new_state)])
            q = matrix.T @ p
            out[s.offset : s.offset + s.n * s.m] = (p @ q.T).reshape(-1)
            new_state.append(q)
    return out, new_state


_REFERENCE: dict[type, Callable[[Any, np.ndarray, int, int, int, Any], tuple[np.ndarray, Any]]] = {
    NoCompression: _none,
    Int8: _int8,
    Int4: _int4,
    QSGD: _qsgd,
    ScaledSign: _sign,
    TopK: _topk,
    RandK: _randk,
    PowerSGD: _powersgd,
}


def reference_roundtrip(compressor: Compressor, x: np.ndarray, *, round: int, node: int, seed: int,
                        state: Any = None) -> tuple[np.ndarray, Any]:
    """Q(x) of one node's row ``x`` (1-D float array) and the node's next state (PowerSGD's factors)."""
    if isinstance(compressor, Cast):
        return _cast(compressor, x, round, node, seed, state)
    return _REFERENCE[type(compressor)](compressor, x, round, node, seed, state)
