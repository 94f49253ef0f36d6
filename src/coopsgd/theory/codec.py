"""Encode and decode time of compressed rounds (SPEC §11): the part of a compressed round's time the α–β model
of :mod:`coopsgd.theory.cost` does not see.

A compressed round costs its transfer (handshakes · α + bytes · β, :meth:`NetworkModel.transfer_time`) plus the
compressor's work on the round's critical path, ``RoundCost.codec_s``:

    codec_s = encodes · D / encode_Bps + decodes · D / decode_Bps,

with D = d · b the bytes of one dense row (d coordinates of b bytes), ``encode_Bps`` the throughput of one
node's *encode* (what a node does with its own row: form c = x − x_ref + e, compress it, keep e ← c − Q(c),
and write the round's result into its row) and ``decode_Bps`` that of adding one payload into a dense row
(:meth:`Compressor.decompress_add`: the combine; a sparse payload adds its k values alone). Both are in bytes
of the dense row per second, so a compressor's time grows with d and does not depend on its ratio. Which encodes and decodes lie on the
critical path (the busiest node's, as the α–β model charges the busiest node's bytes) depends on the round
(:func:`coopsgd.algorithms.communication.compressed_round_cost` and its siblings):

=============================================  =======  ========================================
round                                          encodes  decodes
=============================================  =======  ========================================
averaging, all-gathered (m workers)            1        m (every payload, its own included, is
                                                        added into x_ref)
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
coordinates with cold caches (as a round meets them), one torch thread, on this project's 2-core x86-64 VM
(torch 2.13, 2026-12-06, the machine otherwise quiet), the fastest of five calibrations rounded down to two
significant figures. ``none`` costs nothing
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
#: calibrations (:func:`~coopsgd.engines.simulator.codec.calibrate`, cold caches: one row of 2^20 float32, error
#: feedback's passes and the result's write included, 1 thread, the project's 2-core x86-64 VM, 2026-12-06 23:06
#: UTC, load average 0.6-0.8), rounded down to two significant figures; encode / decode ms of the 4.19 MB row:
#: fp16 2.8 / 0.92, bf16 2.7 / 0.92, int8 4.4 / 1.4, qsgd:4 25 / 1.3, sign 7.8 / 2.7, topk:0.01 5.6 / 0.27,
#: randk:0.01 25 / 12, powersgd:4 (four 512 x 512 matrices) 9.0 / 2.0, int4 8.5 / 2.0. fp16 and bf16 are one
#: cast each way; int8 and int4 ~4 passes; sign packs bits; topk selects among candidates past a sampled
#: threshold, and its decode adds k values alone (one scatter-add); randk hashes every coordinate (encode and
#: decode) and qsgd draws a hashed uniform per coordinate; powersgd is two matrix products and an
#: orthogonalisation per matrix.
STATED: Mapping[str, CodecSpeed] = {
    "fp16": _gbps(1.5, 4.5),
    "bf16": _gbps(1.5, 4.5),
    "int8": _gbps(0.95, 3.0),
    "int4": _gbps(0.49, 2.1),
    "qsgd": _gbps(0.16, 3.3),
    "sign": _gbps(0.54, 1.5),
    "topk": _gbps(0.74, 15.0),
    "randk": _gbps(0.16, 0.35),
    "powersgd": _gbps(0.46, 2.1),
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
