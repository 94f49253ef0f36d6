"""Encode and decode time of compressed rounds (SPEC §11): the part of a compressed round's time the α–β model
of :mod:`coopsgd.theory.cost` does not see.

A compressed round costs its transfer (handshakes · α + bytes · β, :meth:`NetworkModel.transfer_time`) plus the
compressor's work on the round's critical path, ``RoundCost.codec_s``:

    codec_s = encodes · D / encode_Bps + decodes · D / decode_Bps,

with D = d · b the bytes of one dense row (d coordinates of b bytes), ``encode_Bps`` the throughput of one
node's *encode* (what a sender does: form c = x − x_ref + e, compress it and decode its own payload --
:meth:`Compressor.roundtrip` on one row -- and keep e ← c − Q(c)) and ``decode_Bps`` that of decoding one
received payload and adding it into a dense row (the combine). Both are in bytes of the dense row per second,
so a compressor's time grows with d and does not depend on its ratio. Which encodes and decodes lie on the
critical path (the busiest node's, as the α–β model charges the busiest node's bytes) depends on the round
(:func:`coopsgd.algorithms.communication.compressed_round_cost` and its siblings):

=============================================  =======  ========================================
round                                          encodes  decodes
=============================================  =======  ========================================
averaging, all-gathered (m workers)            1        m − 1 (every other node's payload)
gossip (CHOCO; max degree k)                   1        k (each neighbour's payload)
compressed uploads, dense reply (m workers)    1        m (the server decodes every upload)
elastic (centre with h peers)                  2        h + 1 (the uploads at the centre; the
                                                        reply at a worker), after the upload
                                                        and the reply were encoded
DOWNPOUR's pushes (m workers, sequential)      2m       2m (each push and each reply, in turn)
=============================================  =======  ========================================

**Stated throughputs** (:data:`STATED`, the default): deterministic, like
:data:`~coopsgd.engines.simulator.clock.DEFAULT_GFLOPS`: the same run gives the same simulated times on every
machine. Where they come from: :func:`coopsgd.engines.simulator.codec.calibrate` on one row of d = 2^20 float32
coordinates, one torch thread, on this project's 2-core x86-64 VM (torch 2.13, 2026-12-06), the fastest of five
calibrations rounded down to two significant figures (:data:`STATED`: the machine was shared, load ~4, so
these are conservative). ``none`` costs nothing
(the rows are sent as they are). A compressor without a stated figure is charged :data:`FALLBACK` (int8's).
They are an assumption about the nodes, not a measurement of the machine a run is on: pass measured ones
(``calibrate``) to the simulator's clock (``SimClock(codec=...)``) to model another machine.

Pure Python; importing it imports no torch.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from coopsgd.errors import ConfigError, check_float

__all__ = ["CodecSpeed", "CodecTime", "STATED", "FALLBACK", "codec_speed", "codec_time"]


@dataclass(frozen=True)
class CodecSpeed:
    """A compressor's throughputs in bytes of the dense row per second: ``encode_Bps`` (compress one row and
    decode its own payload) and ``decode_Bps`` (decode one received payload and add it into a row);
    ``source`` says where they come from."""

    encode_Bps: float
    decode_Bps: float
    source: str = "stated"

    def __post_init__(self) -> None:
        object.__setattr__(self, "encode_Bps", check_float("encode_Bps", self.encode_Bps, low=0.0, low_open=True))
        object.__setattr__(self, "decode_Bps", check_float("decode_Bps", self.decode_Bps, low=0.0, low_open=True))


@dataclass(frozen=True)
class CodecTime:
    """Seconds of one encode and of one decode of a row of the run's width (:func:`codec_time`)."""

    encode_s: float = 0.0
    decode_s: float = 0.0

    def seconds(self, encodes: float, decodes: float) -> float:
        """``encodes`` encodes and ``decodes`` decodes, in sequence."""
        return float(encodes) * self.encode_s + float(decodes) * self.decode_s


def _gbps(encode: float, decode: float) -> CodecSpeed:
    return CodecSpeed(encode * 1e9, decode * 1e9, "stated")


#: Stated throughputs in GB/s of the dense row (module docstring), by compressor name: the fastest of five
#: calibrations (:func:`~coopsgd.engines.simulator.codec.calibrate`: one row of 2^20 float32, error feedback's
#: passes included, 1 thread, the project's 2-core VM, 2026-12-06 20:25 UTC, load average 4.1-4.3 from other
#: jobs), rounded down to two significant figures; encode / decode ms of the 4.19 MB row: fp16 1.2 / 0.18,
#: bf16 1.1 / 0.19, int8 2.2 / 0.30, qsgd:4 21 / 0.32, sign 6.0 / 1.6, topk:0.01 4.3 / 0.17, randk:0.01 23 / 11,
#: powersgd:4 (four 512 x 512 matrices) 6.1 / 0.56. fp16 and bf16 are one cast each way; int8 ~4 passes; sign
#: packs bits; topk selects among candidates past a sampled threshold and decodes by one scatter; randk hashes
#: every coordinate (encode and decode) and qsgd draws a hashed uniform per coordinate; powersgd is two matrix
#: products and an orthogonalisation per matrix. A 4 MB row stays in the caches: 8 stacked rows take longer
#: per byte (``benchmarks/README.md``, part (a)).
STATED: Mapping[str, CodecSpeed] = {
    "fp16": _gbps(3.4, 23.0),
    "bf16": _gbps(3.7, 21.0),
    "int8": _gbps(1.8, 13.0),
    "qsgd": _gbps(0.19, 13.0),
    "sign": _gbps(0.69, 2.6),
    "topk": _gbps(0.96, 24.0),
    "randk": _gbps(0.18, 0.37),
    "powersgd": _gbps(0.68, 7.4),
}
#: The figure of a compressor :data:`STATED` does not list (int8's).
FALLBACK: CodecSpeed = STATED["int8"]


def codec_speed(name: str, speeds: Mapping[str, CodecSpeed] | None = None) -> CodecSpeed | None:
    """The throughputs of compressor ``name`` (its spec's name: ``"topk"``, ``"int8"``, ...): from ``speeds``
    (measured ones) when it lists it, else :data:`STATED`, else :data:`FALLBACK`; ``None`` for ``none``."""
    if name == "none":
        return None
    if speeds is not None and name in speeds:
        s = speeds[name]
        if not isinstance(s, CodecSpeed):
            raise ConfigError.invalid("codec", s, "must map compressor names to coopsgd.theory.codec.CodecSpeed")
        return s
    return STATED.get(name, FALLBACK)


def codec_time(name: str, row_bytes: float, speeds: Mapping[str, CodecSpeed] | None = None) -> CodecTime:
    """Seconds of one encode and one decode by compressor ``name`` of a dense row of ``row_bytes`` bytes
    (d · b); zero for ``none``."""
    s = codec_speed(name, speeds)
    D = check_float("row_bytes", row_bytes, low=0.0)
    if s is None or D == 0.0:
        return CodecTime()
    return CodecTime(D / s.encode_Bps, D / s.decode_Bps)
