"""Error feedback (Seide et al. 2014; Karimireddy et al., ICML 2019; SPEC §11): node i sends
Q(v_i + e_i) and keeps e_i ← (v_i + e_i) − Q(v_i + e_i)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import torch

from coopsgd.compression.base import Compressor, Payload

__all__ = ["ErrorFeedback", "FeedbackStep"]


class FeedbackStep(NamedTuple):
    """One compressed send with error feedback: what is sent, its decoding, and the new residual
    (``None`` when error feedback is off)."""

    payload: Payload
    decoded: torch.Tensor
    residual: torch.Tensor | None


class ErrorFeedback:
    """Compress with error feedback: ``step(v, e)`` sends c = v + e (one rounding) and keeps
    e' = c − Q(c) (one rounding), so decoded + e' = c.

    The identity is exact, bit for bit, whenever the subtraction c − Q(c) is exact, i.e. every decoded
    coordinate is 0, c_j itself, or within a factor 2 of c_j (Sterbenz): always for ``none``, ``topk``,
    ``randk``, ``fp16`` and ``bf16`` (in range) and ``int8``. ``qsgd``, ``sign``, ``randk:F:unbiased`` and
    ``powersgd`` may decode a coordinate to more than twice its value; there the identity holds to one
    rounding of e'_j (|decoded_j + e'_j − c_j| ≤ ulp(e'_j)/2).

    ``enabled`` defaults to the compressor being biased (SPEC §11: on by default for biased compressors)."""

    def __init__(self, compressor: Compressor, *, enabled: bool | None = None) -> None:
        self.compressor = compressor
        self.enabled = compressor.biased if enabled is None else bool(enabled)

    def step(self, values: torch.Tensor, residual: torch.Tensor | None, *, round: int,
             nodes: Sequence[int] | torch.Tensor, seed: int, state: Any = None) -> FeedbackStep:
        """Send Q(values + residual) (``residual`` None: zero); return the payload, its decoding and e'."""
        corrected = values if residual is None or not self.enabled else values + residual
        payload = self.compressor.compress(corrected, round=round, nodes=nodes, seed=seed, state=state)
        decoded = self.compressor.decompress(payload)
        return FeedbackStep(payload, decoded, corrected - decoded if self.enabled else None)
