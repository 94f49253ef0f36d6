"""Compressed communication (SPEC §11): compressors of one node's row, their exact payload sizes and
qualities, error feedback, and a numpy reference of each.

A compressor Q maps a node's flat row (or each tensor of it, for PowerSGD) to a payload and back. It is
biased with δ (‖Q(x) − x‖² ≤ (1 − δ)‖x‖²) or unbiased with ω (E Q(x) = x, E‖Q(x) − x‖² ≤ ω‖x‖²), and
``payload_bytes(d, dtype)`` is exactly what one node sends (values, indices, scales). All compressors work on
stacked rows (r, d) with batched torch operations, and are deterministic: random draws come from a
counter-based hash of (seed, round, node) (:mod:`coopsgd.compression.rng`), so node i's result does not
depend on the other rows of the batch: the simulator (every row at once) and the distributed engine (one
row per rank) compute the same bits. ``parse_compressor("topk:0.01")`` builds one from its spec string.
See docs/compression.md.

This package is pure: it imports torch, numpy and ``coopsgd.errors`` only, never an engine.
"""

from coopsgd.compression.base import Compressor, Payload, Roundtrip, index_dtype, row_sum
from coopsgd.compression.feedback import ErrorFeedback, FeedbackStep
from coopsgd.compression.powersgd import PowerSGD
from coopsgd.compression.quantize import BF16, FP16, QSGD, Cast, Int4, Int8, NoCompression, ScaledSign
from coopsgd.compression.reference import reference_roundtrip
from coopsgd.compression.sparse import RandK, TopK
from coopsgd.compression.spec import COMPRESSOR_SPECS, parse_compressor

__all__ = [
    "Compressor",
    "Payload",
    "Roundtrip",
    "ErrorFeedback",
    "FeedbackStep",
    "NoCompression",
    "Cast",
    "FP16",
    "BF16",
    "Int8",
    "Int4",
    "QSGD",
    "ScaledSign",
    "TopK",
    "RandK",
    "PowerSGD",
    "parse_compressor",
    "reference_roundtrip",
    "index_dtype",
    "row_sum",
    "COMPRESSOR_SPECS",
]
