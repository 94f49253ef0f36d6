"""The ``int4`` compressor (issue 27: Streaming DiLoCo's outer updates "down to 4 bits"): per-chunk scales,
levels in [-7, 7] rounded to nearest, two levels per byte; its payload size, its delta bound (checked on random
and heavy-tailed vectors), hand-computed values and its numpy reference."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from coopsgd.compression import Int4, parse_compressor, reference_roundtrip
from coopsgd.errors import ConfigError


@pytest.mark.parametrize("d", [1, 2, 7, 95, 128, 1000])
@pytest.mark.parametrize("spec", ["int4", "int4:5", "int4:1"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_payload_bytes_are_exact(spec: str, d: int, dtype: torch.dtype) -> None:
    c = parse_compressor(spec)
    chunk = 64 if spec == "int4" else int(spec.split(":")[1])
    assert c.payload_bytes(d, dtype) == math.ceil(d / 2) + math.ceil(d / chunk) * dtype.itemsize
    rows = torch.from_numpy(np.random.default_rng(d).standard_normal((3, d))).to(dtype)
    payload = c.compress(rows, round=0, nodes=range(3), seed=0)
    assert payload.parts["values"].dtype == torch.uint8 and payload.parts["values"].shape == (3, math.ceil(d / 2))
    assert payload.row_bytes() == c.payload_bytes(d, dtype)
    rt = c.roundtrip(rows, round=0, nodes=range(3), seed=0)
    assert rt.row_bytes == c.payload_bytes(d, dtype) and torch.equal(rt.decoded, c.decompress(payload))


def test_known_values_and_packing() -> None:
    c = parse_compressor("int4:2")
    x = torch.tensor([[1.0, -2.0, 0.5, 0.25, -0.1]], dtype=torch.float64)
    s, t = 2.0 / 7, 0.5 / 7  # the chunks' scales; 1/s = 3.5 and 0.25/t = 3.5 round to the even 4
    out = c.roundtrip(x, round=0, nodes=[0], seed=0).decoded[0].tolist()
    assert out == pytest.approx([4 * s, -7 * s, 7 * t, 4 * t, -0.1], rel=0, abs=1e-15)
    packed = c.compress(x, round=0, nodes=[0], seed=0).parts["values"][0].tolist()
    assert packed == [(4 + 8) | ((-7 + 8) << 4), (7 + 8) | ((4 + 8) << 4), (-7 + 8) | (8 << 4)]
    zero = c.roundtrip(torch.zeros(1, 4, dtype=torch.float64), round=0, nodes=[0], seed=0).decoded
    assert torch.equal(zero, torch.zeros(1, 4, dtype=torch.float64))


def test_delta_bound_holds_on_random_and_heavy_tailed_vectors() -> None:
    g = np.random.default_rng(5)
    d = 300
    x = g.standard_normal((48, d)) * np.exp(g.standard_normal((48, 1)) * 3)
    x[8:16] = g.standard_normal((8, d)) ** 5  # heavy tails
    x[16:20] *= g.random((4, d)) < 0.05  # sparse
    rows = torch.from_numpy(x)
    for spec in ["int4", "int4:16", "int4:1", "int4:150"]:
        c = parse_compressor(spec)
        delta = c.delta(d)
        assert delta is not None and c.omega(d) is None and c.biased
        err = (c.roundtrip(rows, round=0, nodes=range(48), seed=0).decoded - rows).square().sum(1)
        assert bool((err <= (1 - delta) * rows.square().sum(1) * (1 + 1e-12)).all()), spec
        # no coordinate is off by more than half its chunk's scale
        chunk = c.chunk  # type: ignore[attr-defined]
        dec = c.roundtrip(rows, round=0, nodes=range(48), seed=0).decoded
        for start in range(0, d, chunk):
            block = rows[:, start : start + chunk]
            scale = block.abs().amax(dim=1, keepdim=True) / 7
            assert bool(((dec[:, start : start + chunk] - block).abs() <= scale / 2 * (1 + 1e-12)).all())
    assert parse_compressor("int4").delta(d) == 1 - 64 / 196 and parse_compressor("int4:1").delta(d) == 1 - 1 / 196
    assert parse_compressor("int4:200").delta(d) == 0.0


@pytest.mark.parametrize("spec", ["int4", "int4:3"])
def test_numpy_reference_agrees_bit_for_bit(spec: str) -> None:
    c = parse_compressor(spec)
    x = np.random.default_rng(2).standard_normal((4, 95))
    got = c.roundtrip(torch.from_numpy(x), round=1, nodes=range(4), seed=3).decoded.numpy()
    for i in range(4):
        ref, _ = reference_roundtrip(c, x[i], round=1, node=i, seed=3)
        assert np.array_equal(ref, got[i])


def test_spec_grammar() -> None:
    assert isinstance(parse_compressor("int4"), Int4) and parse_compressor("int4").spec == "int4"
    assert parse_compressor("int4:64").spec == "int4" and parse_compressor(" INT4:8 ").spec == "int4:8"
    for bad in ("int4:0", "int4:x", "int4:2:3"):
        with pytest.raises(ConfigError, match="compress"):
            parse_compressor(bad)
