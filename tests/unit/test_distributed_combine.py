"""The distributed engine's compressed averaging round, one rank, against its definition (issue 23).

x_ref ← x_ref Σ w_i + Σ_i w_i Q(c_i), c_i = x_i − x_ref (+ e_i), e_i ← c_i − Q(c_i), with the payloads added one
by one into x_ref (``Compressor.decompress_add``). Auxiliary sources on rows that are not consecutive take the
path that gathers them; a 16-bit cast to the rows' own dtype returns the rows themselves as its payload, which
error feedback must not overwrite before the payload is packed.
"""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch

from coopsgd.algorithms.communication import Compression
from coopsgd.engines.distributed.compressed import CompressedMixer
from coopsgd.engines.mixing import Round, average_plan


class _OneRank:
    """A world of one rank: the all-gather returns this rank's buffer."""

    rank, m, pending, placed = 0, 1, False, False

    def finalize(self) -> None:
        pass

    def gather_bytes(self, buf: torch.Tensor) -> torch.Tensor:
        return buf.reshape(1, -1).clone()

    def broadcast_bytes(self, buf: torch.Tensor, src: int) -> None:
        pass

    def exchange_bytes(self, *args: object, **kwargs: object) -> None:
        raise AssertionError("an averaging round exchanges nothing with neighbours")

    def charge(self, *args: object, **kwargs: object) -> None:
        pass


class _NoGraph:
    def matrices(self, n: int) -> None:
        return None


@pytest.mark.parametrize("spec, dtype, sources, atol", [
    ("topk:0.25", torch.float64, [0, 2], 1e-14),
    ("int8", torch.float64, [0, 1, 2], 1e-14),
    ("fp16", torch.float16, [0, 1], 2e-3),   # consecutive rows
    ("fp16", torch.float16, [0, 2], 2e-3),   # rows 0 and 2: the gathered path
    ("bf16", torch.bfloat16, [0, 2], 1.6e-2),
])
def test_the_round_is_its_definition(spec: str, dtype: torch.dtype, sources: list[int], atol: float) -> None:
    m, v, width = 1, 2, 64
    g = torch.Generator().manual_seed(0)
    start = torch.randn(width, generator=g, dtype=torch.float64).to(dtype)
    rows = torch.randn(1 + v, width, generator=g, dtype=torch.float64).to(dtype)
    shape = types.SimpleNamespace(workers=m, auxiliaries=v, schedule=_NoGraph())
    mixer = CompressedMixer(_OneRank(), Compression(spec), spec=shape, width=width, params=width, dtype=dtype,
                            device=torch.device("cpu"), seed=1, layout=None, start=start)
    weights = [1.0 / len(sources)] * len(sources)
    plan = average_plan(m + v, np.array(sources), np.array(weights))
    local = [0 if j < m else 1 + j - m for j in sources]
    c = rows[local].double() - start.double()
    q = mixer.compressor
    sent = q.decompress(q.compress(c.to(dtype), round=0, nodes=sources, seed=1)).double()
    want = start.double() * sum(weights) + (torch.tensor(weights, dtype=torch.float64)[:, None] * sent).sum(0)
    mixer.communicate(rows, Round(plan, None, plan.matrix()))
    torch.testing.assert_close(rows[0].double(), want, rtol=0, atol=atol)
    if mixer.residual is not None:
        torch.testing.assert_close(mixer.residual[local].double(), c - sent, rtol=0, atol=atol)
