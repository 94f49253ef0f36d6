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
from coopsgd.compression.rng import STREAM_RANDK, hash_blocks, hash_words_torch, row_keys
from coopsgd.errors import ConfigError

__all__ = ["TopK", "RandK", "as_fraction", "format_fraction", "topk_mask", "topk_indices", "randk_indices"]


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


#: Sample size of :func:`topk_indices`'s threshold estimate (positions spread over the row).
TOPK_SAMPLE = 1 << 14
#: Rows shorter than this (or with k too close to d for a sample to narrow anything) take the full top-k.
TOPK_FAST_MIN_D = 1 << 12
#: A row takes the full top-k when more than d / TOPK_CANDIDATES of its coordinates are candidates (there
#: the candidates' own selection costs more than the whole row's).
TOPK_CANDIDATES = 16
#: Standard deviations above k of the candidates :func:`randk_indices` expects per row.
RANDK_MARGIN = 4.0


def topk_mask(rows: torch.Tensor, k: int) -> torch.Tensor:
    """(r, d) bool: exactly k coordinates per row, the largest |x|, ties at the threshold to the lower index
    (NaN counts as +inf): the coordinates of :func:`topk_indices`."""
    idx = topk_indices(rows, k)
    return torch.zeros(rows.shape, dtype=torch.bool, device=rows.device).scatter_(1, idx, True)


def _magnitudes(rows: torch.Tensor) -> torch.Tensor:
    """|x| with NaN as +inf (a diverged row stays non-finite for the NaN policy to see, instead of breaking
    the selection)."""
    return torch.abs(rows).nan_to_num_(nan=math.inf, posinf=math.inf)


def _topk_full(mag: torch.Tensor, k: int) -> torch.Tensor:
    """(r, k) ascending indices by the definition, over whole rows of magnitudes (NaN already +inf):
    ``torch.topk`` gives the k-th largest magnitude (its value does not depend on how ties are ordered); every
    coordinate above it is kept, and the remaining slots go to the lowest indices equal to it."""
    threshold = torch.topk(mag, k, dim=1, sorted=False).values.amin(dim=1, keepdim=True)
    above = mag > threshold
    at = mag == threshold
    room = k - above.sum(dim=1, keepdim=True)
    keep = above | (at & (torch.cumsum(at, dim=1) <= room))
    return keep.nonzero()[:, 1].reshape(mag.shape[0], k)


def _sample_positions(d: int, s: int, device: torch.device) -> torch.Tensor:
    """s positions of a d-row, one in each of s equal strata at an offset that varies from stratum to stratum
    (a multiplicative hash of its number), so that a periodic layout does not bias the sample."""
    width = d // s
    i = torch.arange(s, dtype=torch.int64, device=device)
    return i * width + ((i * 0x9E3779B1) >> 7) % width


def _topk_candidates(mag: torch.Tensor, flat: torch.Tensor, counts: torch.Tensor, k: int) -> torch.Tensor:
    """(R, k) ascending indices by the definition, from each row's candidates: ``flat`` (N,) the candidates'
    positions in ``mag`` (R, d) flattened, ascending (so grouped by row), ``counts`` (R,) per row, each ≥ k,
    the candidates holding every coordinate at least as large as the row's k-th largest magnitude. The
    threshold, the coordinates above it and the lowest-indexed ties are then those of the whole row. ``mag``
    is |x| with NaN left as NaN: it is +inf here, as in the definition."""
    R, d, dev = counts.shape[0], mag.shape[1], mag.device
    vals = mag.reshape(-1).index_select(0, flat).nan_to_num_(nan=math.inf, posinf=math.inf)
    if R == 1:
        padded = vals.reshape(1, -1)
    else:  # one row of candidates per row, padded with -1 (every magnitude is >= 0)
        rid = torch.repeat_interleave(torch.arange(R, dtype=torch.int64, device=dev), counts)
        starts = torch.cumsum(counts, 0).sub_(counts)
        width = int(counts.max())
        at_pos = torch.arange(flat.shape[0], dtype=torch.int64, device=dev).sub_(starts[rid]).add_(rid * width)
        padded = torch.full((R, width), -1.0, dtype=mag.dtype, device=dev)
        padded.reshape(-1).index_copy_(0, at_pos, vals)
    threshold = torch.topk(padded, k, dim=1, sorted=False).values.amin(dim=1)
    per = (lambda t: t) if R == 1 else (lambda t: torch.repeat_interleave(t, counts))
    t = per(threshold)
    above = vals > t
    at = vals == t
    ties = torch.cumsum(at, 0)  # ties up to and including each candidate, over all rows
    if R == 1:
        room = k - above.sum()
    else:
        n_above = torch.zeros(R, dtype=torch.int64, device=dev).index_add_(0, rid, above.to(torch.int64))
        ties.sub_(per((ties - at.to(torch.int64))[starts]))  # ... counted from the row's first candidate
        room = per(k - n_above)
    keep = above.logical_or_(at.logical_and_(ties <= room))
    return flat[keep].remainder_(d).reshape(R, k)


def topk_indices(rows: torch.Tensor, k: int) -> torch.Tensor:
    """(r, k) int64 ascending: each row's k coordinates largest in |x|, ties at the threshold to the lower
    index, NaN counted as +inf (the definition, :func:`_topk_full`).

    Computed without a top-k over the whole row where that is safe: a threshold t₀ is taken from a sample of
    the row (s = 2^14 spread positions; t₀ the j-th largest sampled magnitude, j a few standard deviations
    above the k·s/d expected), and the candidates, the coordinates not below t₀ (NaN included), are found in
    one pass. When a row has at least k of them, its k-th largest magnitude is among them and so is every
    coordinate the definition keeps: the exact threshold and the ties are resolved on the candidates alone.
    A row with fewer than k candidates (an unlucky sample), or with more than d/16 (many equal magnitudes,
    e.g. t₀ = 0 on a sparse row; foreseen from the sample, or counted), takes the full top-k, which is then
    the cheaper. Either way the indices are those of the definition, bit for bit; only the time differs."""
    r, d = rows.shape
    s = min(TOPK_SAMPLE, d // 4)
    expected = k * s / d
    j = math.ceil(expected + 4.0 * math.sqrt(expected) + 4.0)
    if d < TOPK_FAST_MIN_D or TOPK_CANDIDATES * j > s or r == 0:
        return _topk_full(_magnitudes(rows), k)
    mag = torch.abs(rows)  # NaN stays NaN: never below t0, so always a candidate
    sample = mag.index_select(1, _sample_positions(d, s, mag.device)).nan_to_num_(nan=math.inf, posinf=math.inf)
    t0 = torch.topk(sample, j, dim=1, sorted=False).values.amin(dim=1, keepdim=True)
    many = torch.ge(sample, t0).sum(dim=1) > s // TOPK_CANDIDATES  # ties at t0 fill the sample: most of the row
    if not bool(many.any()):
        return _from_candidates(mag, t0, k)
    if bool(many.all()):
        return _topk_full(mag.nan_to_num_(nan=math.inf, posinf=math.inf), k)
    out = torch.empty((r, k), dtype=torch.int64, device=rows.device)
    bad = many.nonzero().reshape(-1)
    out[bad] = _topk_full(mag.index_select(0, bad).nan_to_num_(nan=math.inf, posinf=math.inf), k)
    fast = (~many).nonzero().reshape(-1)
    if fast.numel():
        out[fast] = _from_candidates(mag.index_select(0, fast), t0.index_select(0, fast), k)
    return out


def _from_candidates(mag: torch.Tensor, t0: torch.Tensor, k: int) -> torch.Tensor:
    """:func:`topk_indices` of rows of magnitudes ``mag`` (NaN left as NaN) with thresholds ``t0`` (r, 1): from
    the candidates of each row, or by the full top-k for a row with fewer than k or more than d/16 (``mag`` is
    scratch: it may be overwritten)."""
    r, d = mag.shape
    flat = torch.lt(mag, t0).logical_not_().reshape(-1).nonzero().reshape(-1)
    counts = torch.bincount(flat.div(d, rounding_mode="floor"), minlength=r)
    good = (counts >= k) & (counts <= d // TOPK_CANDIDATES)
    if bool(good.all()):
        return _topk_candidates(mag, flat, counts, k)
    if not bool(good.any()):
        return _topk_full(mag.nan_to_num_(nan=math.inf, posinf=math.inf), k)
    out = torch.empty((r, k), dtype=torch.int64, device=mag.device)
    bad = (~good).nonzero().reshape(-1)
    out[bad] = _topk_full(mag.index_select(0, bad).nan_to_num_(nan=math.inf, posinf=math.inf), k)
    fast = good.nonzero().reshape(-1)
    if fast.numel():
        row = flat.div(d, rounding_mode="floor")
        keep = good[row]
        renumber = torch.cumsum(good, 0).sub_(1)  # a good row's place among the good rows
        flat = flat[keep].sub_(row[keep].sub_(renumber[row[keep]]).mul_(d))
        out[fast] = _topk_candidates(mag.index_select(0, fast), flat, counts[fast], k)
    return out


def randk_indices(ids: torch.Tensor, d: int, k: int, *, seed: int, round: int) -> torch.Tensor:
    """(r, k) int64 ascending: the k coordinates of each row with the smallest 32-bit keys
    ``hash(seed, round, node, j)``, ties (hash collisions) to the lower index: a uniform k-subset per node,
    the same whichever rows are drawn together. Needs d ≤ 2^31 (key·2^31 + j fits int64).

    The order key·2^31 + j is unique per coordinate, so the k smallest are one set, found among the
    candidates whose key is below a threshold a few standard deviations above the k-th smallest's expected
    value (k·2^32/d): a row with at least k candidates holds all k there; a row with fewer (never seen: the
    keys are uniform) takes the full selection. The same indices either way."""
    if d > 2**31:
        raise ConfigError.invalid("d", d, "randk supports rows of at most 2^31 coordinates")
    keys = row_keys(ids, seed=seed, round=round, stream=STREAM_RANDK)
    r = keys[0].shape[0]
    expected = k + RANDK_MARGIN * math.sqrt(k) + 8.0
    limit = math.ceil(expected * 2.0**32 / d)
    if d < TOPK_FAST_MIN_D or 8 * expected > d or r == 0:
        return _smallest_orders(hash_words_torch(keys, d, device=ids.device), k)
    # the candidates, block by block as the keys are hashed (no (r, d) array of keys): row, order
    rows_of, orders = [], []
    for start, _, words in hash_blocks(keys, d, device=ids.device):
        hit = torch.lt(words, limit).nonzero()
        rows_of.append(hit[:, 0])
        col = hit[:, 1]
        orders.append(words[hit[:, 0], col].bitwise_left_shift_(31).bitwise_or_(col.add_(start)))
    rid, order = torch.cat(rows_of), torch.cat(orders)
    counts = torch.bincount(rid, minlength=r)
    if not bool((counts >= k).all()):
        return _smallest_orders(hash_words_torch(keys, d, device=ids.device), k)
    if r == 1:
        padded = order.reshape(1, -1)
    else:  # one row of candidates per row, padded with the largest int64 (above every order)
        rid, perm = torch.sort(rid, stable=True)
        width = int(counts.max())
        at = torch.arange(rid.shape[0], dtype=torch.int64, device=ids.device)
        at.sub_((torch.cumsum(counts, 0).sub_(counts))[rid]).add_(rid * width)
        padded = torch.full((r, width), 2**63 - 1, dtype=torch.int64, device=ids.device)
        padded.reshape(-1).index_copy_(0, at, order.index_select(0, perm))
    # the k smallest orders; their low 31 bits are the coordinates
    picked = torch.topk(padded, k, dim=1, largest=False, sorted=False).values.bitwise_and_(2**31 - 1)
    return torch.sort(picked, dim=1).values


def _smallest_orders(words: torch.Tensor, k: int) -> torch.Tensor:
    """:func:`randk_indices`' selection over whole rows of keys (the definition)."""
    j = torch.arange(words.shape[1], dtype=torch.int64, device=words.device).reshape(1, -1)
    order = words.bitwise_left_shift_(31).bitwise_or_(j)
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
        idx = topk_indices(rows, k)
        parts = {"values": torch.gather(rows, 1, idx), "indices": idx.to(index_dtype(d))}
        return self._payload(rows, parts, round, as_nodes(nodes, r), seed)

    def decompress(self, payload: Payload) -> torch.Tensor:
        values = payload.parts["values"]
        out = torch.zeros(payload.shape, dtype=payload.dtype, device=values.device)
        return out.scatter_(1, payload.parts["indices"].to(torch.int64), values)

    def decompress_add(self, payload: Payload, out: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
        values = payload.parts["values"]
        return out.scatter_add_(1, payload.parts["indices"].to(torch.int64), values if alpha == 1.0 else values * alpha)

    def roundtrip(self, rows: torch.Tensor, *, round: int, nodes: Sequence[int] | torch.Tensor, seed: int,
                  state: Any = None) -> Roundtrip:
        check_rows(rows)
        as_nodes(nodes, rows.shape[0])
        idx = topk_indices(rows, self.k(rows.shape[1]))
        decoded = torch.zeros_like(rows).scatter_(1, idx, torch.gather(rows, 1, idx))
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

    def decompress_add(self, payload: Payload, out: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
        r, d = payload.shape
        idx = randk_indices(payload.nodes, d, self.k(d), seed=payload.seed, round=payload.round)
        values = payload.parts["values"]
        if self.unbiased:
            values = values * self.scale(d)
        return out.scatter_add_(1, idx, values if alpha == 1.0 else values * alpha)
