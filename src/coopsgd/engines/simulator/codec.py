"""Measure a compressor's encode and decode throughputs on this machine (:class:`~coopsgd.theory.codec.CodecSpeed`).

The clock charges compressed rounds their codec time (:mod:`coopsgd.theory.codec`) from stated throughputs by
default; :func:`calibrate` measures them instead, once, on one row of the run's width: the median of ``reps``
timed calls after a warm-up, with the torch thread count the caller set.

``encode`` is what a node does with its own row in a round with error feedback, as the distributed engine
does it: c = x − x_ref + e, :meth:`~coopsgd.compression.Compressor.compress` of c (one row), e ← c − Q(c) by
:meth:`~coopsgd.compression.Compressor.decompress_add`, and the round's result written into the row (four
memory passes besides the compressor's). ``decode`` is ``decompress_add`` of one payload into a dense row (what
a node does per payload it adds: a sparse payload adds its k values alone). Measured times follow the
machine's load: two calibrations differ.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterable, Sequence

import torch

from coopsgd.compression import Compressor, parse_compressor
from coopsgd.errors import check_int
from coopsgd.theory.codec import CodecSpeed

__all__ = ["calibrate", "calibrate_all", "median_seconds"]


def median_seconds(fn: Callable[[], object], reps: int, *, before: Callable[[], object] | None = None) -> float:
    """The median wall-clock seconds of ``reps`` calls of ``fn`` after one untimed warm-up call (at least 1e-9);
    ``before`` runs untimed before each call."""
    fn()  # warm-up
    times = []
    for _ in range(reps):
        if before is not None:
            before()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return max(statistics.median(times), 1e-9)


#: Bytes written before each timed call of a cold calibration: twice the last-level cache of common x86 servers.
EVICT_BYTES = 64 << 20


def calibrate(compressor: Compressor | str, width: int, dtype: torch.dtype = torch.float32, *, reps: int = 5,
              layout: Sequence[Sequence[int]] | None = None, seed: int = 0, cold: bool = True) -> CodecSpeed:
    """The throughputs of ``compressor`` measured on one Gaussian row of ``width`` coordinates of ``dtype``
    (bytes of the dense row per second); ``layout`` as for PowerSGD.

    ``cold`` (the default) evicts the caches before each timed call (an untimed pass over :data:`EVICT_BYTES`),
    as a round meets them: x_ref and the residual were last touched a round ago, and the payloads are added
    after a wait on the network. ``cold=False`` times back-to-back calls on warm caches (faster)."""
    q = parse_compressor(compressor, layout=layout) if isinstance(compressor, str) else compressor.with_layout(layout)
    d = check_int("width", width, minimum=1)
    reps = check_int("reps", reps, minimum=1)
    g = torch.Generator().manual_seed(seed)
    row = torch.randn(1, d, generator=g, dtype=torch.float64).to(dtype)
    nodes = [0]
    state = q.init_state(1, d, seed=seed, dtype=dtype) if hasattr(q, "init_state") else None
    ref = torch.randn(1, d, generator=g, dtype=torch.float64).to(dtype)
    residual = torch.zeros(1, d, dtype=dtype)
    result = torch.empty(1, d, dtype=dtype)
    rounds = iter(range(1 << 62))

    def encode() -> None:  # a sender with error feedback: c = x - x_ref + e, Q(c), e <- c - Q(c), x <- result
        c = torch.sub(row, ref).add_(residual)
        sent = q.compress(c, round=next(rounds), nodes=nodes, seed=seed, state=state)
        q.decompress_add(sent, residual.copy_(c), -1.0)
        result.copy_(ref)

    evict = None
    if cold:
        junk = torch.empty(EVICT_BYTES // 4, dtype=torch.float32)
        evict = lambda: junk.fill_(1.0)  # noqa: E731
    enc = median_seconds(encode, reps, before=evict)
    payload = q.compress(row, round=0, nodes=nodes, seed=seed, state=state)
    acc = torch.zeros(1, d, dtype=dtype)
    dec = median_seconds(lambda: q.decompress_add(payload, acc), reps, before=evict)
    D = float(d * row.element_size())
    return CodecSpeed(D / enc, D / dec, f"calibrated: d = {d}, {str(dtype).removeprefix('torch.')}, "
                                        f"{torch.get_num_threads()} thread(s), median of {reps}"
                                        f"{', cold caches' if cold else ''}")


def calibrate_all(specs: Iterable[str], width: int, dtype: torch.dtype = torch.float32, *, reps: int = 5,
                  layout: Sequence[Sequence[int]] | None = None, cold: bool = True) -> dict[str, CodecSpeed]:
    """:func:`calibrate` for each spec, keyed by the compressor's name (what ``SimClock(codec=...)`` takes);
    ``none`` is skipped (it costs nothing)."""
    out: dict[str, CodecSpeed] = {}
    for spec in specs:
        q = parse_compressor(spec, layout=layout)
        if q.name != "none":
            out[q.name] = calibrate(q, width, dtype, reps=reps, layout=layout, cold=cold)
    return out
