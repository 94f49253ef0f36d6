"""Compressors (SPEC §11, issue 23 item 1): spec parsing, exact payload sizes, hand-computed values, δ/ω
checked empirically, determinism and batch independence (what lets every engine compute the same bits),
torch against the numpy reference, error feedback's invariant and PowerSGD's recovery."""

from __future__ import annotations

import ast
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from coopsgd.compression import (
    COMPRESSOR_SPECS,
    ErrorFeedback,
    PowerSGD,
    RandK,
    TopK,
    parse_compressor,
    reference_roundtrip,
    row_sum,
)
from coopsgd.compression.base import index_dtype
from coopsgd.compression.reference import randk_indices_np
from coopsgd.compression.sparse import randk_indices
from coopsgd.errors import ConfigError

LAYOUT = ((12, 5), (7,), (3, 2, 4), (2, 2))  # d = 60 + 7 + 24 + 4 = 95; the (2, 2) matrix is not worth it
D_LAYOUT = 95
SPECS = ["none", "fp16", "bf16", "int8", "int8:16", "qsgd:4", "qsgd:300", "sign", "topk:0.1", "topk:1",
         "randk:0.1", "randk:0.25:unbiased", "powersgd:2"]
# torch and numpy agree bit for bit on these (the same correctly rounded elementwise operations)
EXACT = {"none", "fp16", "bf16", "int8", "int8:16", "topk:0.1", "topk:1", "randk:0.1", "randk:0.25:unbiased"}
# error feedback's c − Q(c) is exact on these (every decoded coordinate is 0, c_j, or within 2x of c_j)
EF_EXACT = EXACT - {"randk:0.25:unbiased"}


def make(spec: str) -> object:
    return parse_compressor(spec, layout=LAYOUT if spec.startswith("powersgd") else None)


def rows64(r: int = 8, d: int = D_LAYOUT, seed: int = 0) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).standard_normal((r, d)))


# ---------------------------------------------------------------- specs


@pytest.mark.parametrize("spec", SPECS + ["randk:0.01", "int8:1024", " TopK:0.010 "])
def test_spec_round_trips(spec: str) -> None:
    c = parse_compressor(spec)
    assert parse_compressor(c.spec) == c and parse_compressor(c) is c
    assert c.spec in {"int8", "topk:0.01"} or c.spec == spec.strip()


@pytest.mark.parametrize("spec, names", [
    ("zip", "unknown compressor 'zip'"), ("", "unknown compressor ''"), ("topk", "takes 1 argument"),
    ("topk:0", "(0, 1]"), ("topk:1.5", "(0, 1]"), ("topk:-0.1", "(0, 1]"), ("topk:abc", "must be a number"),
    ("topk:nan", "(0, 1]"), ("randk:inf", "(0, 1]"), ("randk:0.1:scaled", "'unbiased'"),
    ("qsgd:0", "integer in [1, 2^31)"), ("qsgd:-1", "integer >= 1"), ("qsgd:2.5", "integer >= 1"),
    ("powersgd:0", "integer in [1, 2^31)"), ("powersgd:x", "rank R must be an integer"), ("int8:0", "CHUNK"),
    ("none:1", "takes 0 argument"), ("sign:2", "takes 0 argument"), ("qsgd:99999999999", "2^31"),
])
def test_bad_specs_are_refused_naming_the_field(spec: str, names: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_compressor(spec)
    message = str(info.value)
    assert message.startswith(f"compress={spec!r} is invalid: ") and "\n" not in message
    assert names in message and COMPRESSOR_SPECS in message and info.value.field == "compress"


def test_constructors_refuse_bad_arguments() -> None:
    for build in (lambda: TopK(0.0), lambda: TopK(2), lambda: RandK("x"), lambda: PowerSGD(0)):
        with pytest.raises(ConfigError, match="^compress="):
            build()


# ---------------------------------------------------------------- payload sizes


@pytest.mark.parametrize("d", [1, 7, 100, 129, 1000, 40000])
def test_payload_bytes_by_hand(d: int) -> None:
    f32, f64 = torch.float32, torch.float64
    b = {s: parse_compressor(s).payload_bytes(d, f32) for s in SPECS if s != "powersgd:2"}
    k1 = max(1, math.ceil(d / 10))
    idx = 1 if d <= 128 else 2 if d <= 32768 else 4
    assert b["none"] == 4 * d and parse_compressor("none").payload_bytes(d, f64) == 8 * d
    assert b["fp16"] == b["bf16"] == 2 * d
    assert b["int8"] == d + 4 * math.ceil(d / 1024) and b["int8:16"] == d + 4 * math.ceil(d / 16)
    assert b["qsgd:4"] == d + 4 and b["qsgd:300"] == 2 * d + 4
    assert b["sign"] == math.ceil(d / 8) + 4 and parse_compressor("sign").payload_bytes(d, f64) == math.ceil(d / 8) + 8
    assert b["topk:0.1"] == k1 * (4 + idx) and b["topk:1"] == d * (4 + idx)
    assert b["randk:0.1"] == 4 * k1 and b["randk:0.25:unbiased"] == 4 * max(1, math.ceil(d / 4))


def test_k_index_types_and_powersgd_bytes() -> None:
    assert TopK(0.01).k(300) == 3 and TopK(0.01).k(301) == 4 and TopK(0.01).k(5) == 1  # k = max(1, ⌈F·d⌉)
    assert [index_dtype(d) for d in (128, 129, 32768, 32769, 2**31)] == [
        torch.int8, torch.int16, torch.int16, torch.int32, torch.int32]
    p = parse_compressor("powersgd:2", layout=LAYOUT)
    # (12, 5): 2·(12 + 5); (7,): 7; (3, 2·4): 2·(3 + 8); (2, 2): 2·(2+2) = 8 > 4 -> sent as 4 values
    assert p.payload_bytes(D_LAYOUT, torch.float64) == 8 * (34 + 7 + 22 + 4)
    assert parse_compressor("powersgd:2").payload_bytes(50) == 200  # no layout: one vector, sent whole


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_payload_row_bytes_are_the_formula(spec: str, dtype: torch.dtype) -> None:
    c = make(spec)
    payload = c.compress(rows64().to(dtype), round=3, nodes=range(8), seed=1)
    assert payload.row_bytes() == c.payload_bytes(D_LAYOUT, dtype)
    rt = c.roundtrip(rows64().to(dtype), round=3, nodes=range(8), seed=1)
    assert rt.row_bytes == c.payload_bytes(D_LAYOUT, dtype)
    assert torch.equal(rt.decoded, c.decompress(payload))  # the fused path is the same bits
    assert all(t.shape[0] == 8 for t in payload.parts.values())


# ---------------------------------------------------------------- hand-computed values


def one(spec: str, x: list[float], **kw: object) -> list[float]:
    rows = torch.tensor([x], dtype=torch.float64)
    return parse_compressor(spec).roundtrip(rows, round=0, nodes=[0], seed=0).decoded[0].tolist()


def test_known_values() -> None:
    x = [3.0, -5.0, 5.0, 1.0]
    assert one("topk:0.25", x) == [0, -5, 0, 0]  # |−5| = |5|: the tie goes to the lower index
    assert one("topk:0.5", x) == [0, -5, 5, 0] and one("topk:0.75", x) == [3, -5, 5, 0]
    assert one("topk:0.5", [1.0, 1.0, 1.0, 1.0]) == [1, 1, 0, 0]
    assert one("sign", [1.0, -2.0, 0.0, 3.0]) == [1.5, -1.5, 1.5, 1.5]  # ‖x‖₁/d = 6/4; sign(0) = +
    s, t = 2.0 / 127, 0.5 / 127  # the two chunks' scales; 1/s = 0.25/t = 63.5 rounds to the even 64
    assert one("int8:2", [1.0, -2.0, 0.5, 0.25]) == [64 * s, -127 * s, 127 * t, 64 * t]
    assert one("none", x) == x and one("fp16", [1.0 + 2.0**-12]) == [1.0] and one("bf16", [1.0 + 2.0**-8]) == [1.0]
    for value in {tuple(one("qsgd:1", [3.0, -4.0], seed=k)) for k in range(5)}:
        assert value[0] in (0.0, 5.0) and value[1] in (0.0, -5.0)  # ‖x‖ = 5, one level
    assert one("randk:0.5", x) in ([3, -5, 0, 0], [3, 0, 5, 0], [3, 0, 0, 1], [0, -5, 5, 0], [0, -5, 0, 1],
                                   [0, 0, 5, 1])
    assert sorted(abs(v) for v in one("randk:0.5:unbiased", [1.0, 1.0, 1.0, 1.0])) == [0, 0, 2, 2]


def test_topk_keeps_non_finite_values_visible() -> None:
    x = [1.0, float("nan"), -float("inf"), 2.0, float("nan")]
    got = one("topk:0.4", x)  # k = 2: NaN and inf count as +inf, ties to the lower index
    assert math.isnan(got[1]) and got[2] == -math.inf and got[0] == got[3] == 0 and got[4] == 0
    ref, _ = reference_roundtrip(TopK(0.4), np.array(x), round=0, node=0, seed=0)
    np.testing.assert_array_equal(ref, np.array(got))


def test_none_is_the_identity_and_zero_rows_are_fine() -> None:
    rows = rows64()
    payload = parse_compressor("none").compress(rows, round=0, nodes=range(8), seed=0)
    assert parse_compressor("none").decompress(payload) is rows and payload.row_bytes() == 8 * D_LAYOUT
    for spec in SPECS:
        zero = torch.zeros(3, D_LAYOUT, dtype=torch.float64)
        assert torch.equal(make(spec).roundtrip(zero, round=0, nodes=[0, 1, 2], seed=0).decoded, zero)


# ---------------------------------------------------------------- determinism, batch independence, numpy


@pytest.mark.parametrize("spec", SPECS)
def test_rows_together_equal_rows_alone(spec: str) -> None:
    c, rows, nodes = make(spec), rows64(), [5, 0, 9, 2, 7, 1, 4, 3]
    together = c.roundtrip(rows, round=11, nodes=nodes, seed=42).decoded
    assert torch.equal(together, c.roundtrip(rows, round=11, nodes=nodes, seed=42).decoded)
    for i in range(8):
        alone = c.roundtrip(rows[i : i + 1].clone(), round=11, nodes=[nodes[i]], seed=42).decoded
        assert torch.equal(alone[0], together[i]), (spec, i)


@pytest.mark.parametrize("spec", SPECS + ["int4"])
def test_decompress_add_is_adding_the_decoded_rows(spec: str) -> None:
    # the combine of a compressed round: out + alpha * Q(x); sparse payloads add their k values alone
    c, rows, nodes = make(spec), rows64(), [5, 0, 9, 2, 7, 1, 4, 3]
    state = c.init_state(8, rows.shape[1], seed=42, dtype=rows.dtype) if hasattr(c, "init_state") else None
    payload = c.compress(rows, round=3, nodes=nodes, seed=42, state=state)
    base = torch.randn(rows.shape, generator=torch.Generator().manual_seed(1), dtype=rows.dtype)
    decoded = c.decompress(payload)
    for alpha in (1.0, -1.0, 0.3):
        out = base.clone()
        assert c.decompress_add(payload, out, alpha) is out
        want = base.clone().add_(decoded, alpha=alpha)
        if alpha in (1.0, -1.0):  # the product by +-1 is exact: the same bits
            assert torch.equal(out, want), (spec, alpha)
        else:  # a fused multiply-add may round once where the product and the sum round twice
            torch.testing.assert_close(out, want, rtol=0, atol=1e-15)
    # error feedback's residual through it: (c + (-1) Q(c)) equals c - Q(c) exactly
    assert torch.equal(c.decompress_add(payload, rows.clone(), -1.0), rows - decoded)


@pytest.mark.parametrize("spec", ["qsgd:16", "sign", "randk:0.001", "int8"])
def test_long_rows_together_equal_rows_alone(spec: str) -> None:
    rows = torch.from_numpy(np.random.default_rng(1).standard_normal((4, 70_001)))
    c = parse_compressor(spec)
    together = c.roundtrip(rows, round=2, nodes=range(4), seed=0).decoded
    alone = torch.cat([c.roundtrip(rows[i : i + 1].clone(), round=2, nodes=[i], seed=0).decoded for i in range(4)])
    assert torch.equal(together, alone)


def test_row_sum_order_does_not_depend_on_the_batch_or_the_threads() -> None:
    t = torch.from_numpy(np.random.default_rng(2).standard_normal((3, 100_003)))
    one_thread = row_sum(t[1:2].clone())
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # a plain sum of one long row would now be split over two threads
    try:
        assert torch.equal(row_sum(t)[1], one_thread[0]) and torch.equal(row_sum(t[1:2].clone()), one_thread)
    finally:
        torch.set_num_threads(threads)
    assert float(row_sum(t)[0, 0]) == pytest.approx(float(t[0].sum()), rel=1e-12)


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_torch_matches_the_numpy_reference(spec: str, dtype: torch.dtype) -> None:
    c, rows, nodes = make(spec), rows64(seed=3).to(dtype), [4, 1, 0, 6, 2, 5, 3, 7]
    decoded = c.roundtrip(rows, round=5, nodes=nodes, seed=9).decoded.numpy()
    for i in range(8):
        ref, _ = reference_roundtrip(c, rows[i].numpy(), round=5, node=nodes[i], seed=9)
        assert ref.dtype == rows[i].numpy().dtype
        if spec in EXACT:
            np.testing.assert_array_equal(decoded[i], ref)
        else:
            tol = 1e-14 if dtype == torch.float64 else 1e-5
            np.testing.assert_allclose(decoded[i], ref, rtol=tol, atol=tol * np.abs(ref).max())


def test_randk_draws_depend_on_seed_round_and_node_only() -> None:
    ids = torch.tensor([0, 1, 2])
    base = randk_indices(ids, 1000, 10, seed=1, round=4)
    assert torch.equal(base, randk_indices(ids, 1000, 10, seed=1, round=4))
    assert torch.equal(base[2], randk_indices(ids[2:], 1000, 10, seed=1, round=4)[0])
    assert not torch.equal(base[0], base[1])
    assert not torch.equal(base, randk_indices(ids, 1000, 10, seed=1, round=5))
    assert not torch.equal(base, randk_indices(ids, 1000, 10, seed=2, round=4))
    np.testing.assert_array_equal(base[1].numpy(), randk_indices_np(1, 1000, 10, seed=1, round=4))
    assert bool((base[:, 1:] > base[:, :-1]).all())  # ascending, distinct
    # uniform: over 2000 nodes every coordinate of 20 is drawn ~ 2000·5/20 = 500 times
    counts = torch.bincount(randk_indices(torch.arange(2000), 20, 5, seed=0, round=0).reshape(-1), minlength=20)
    assert int(counts.min()) > 400 and int(counts.max()) < 600


# ---------------------------------------------------------------- quality: δ and ω


def test_delta_bounds_hold_on_random_and_adversarial_vectors() -> None:
    g = np.random.default_rng(4)
    d = 600
    x = g.standard_normal((64, d)) * np.exp(g.standard_normal((64, 1)) * 3)
    x[:8] *= g.random((8, d)) < 0.02  # sparse rows: sign's worst cases
    x[8:16] = g.standard_normal((8, d)) ** 5  # heavy tails: int8's worst cases
    rows = torch.from_numpy(x)
    for spec in ["none", "fp16", "bf16", "int8", "int8:64", "sign", "topk:0.05", "topk:0.3"]:
        c = parse_compressor(spec)
        err = (c.roundtrip(rows, round=0, nodes=range(64), seed=0).decoded - rows).square().sum(1)
        delta = c.delta(d)
        assert delta is not None and c.omega(d) is None and c.biased
        assert bool((err <= (1 - delta) * rows.square().sum(1) * (1 + 1e-12)).all()), spec
    assert parse_compressor("topk:0.05").delta(d) == 30 / 600 and parse_compressor("sign").delta(d) == 1 / 600
    assert parse_compressor("int8").delta(d) == 1 - 600 / 254**2


def repeat_draws(spec: str, x: np.ndarray, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    rows = torch.from_numpy(np.tile(x, (n, 1)))
    return rows, parse_compressor(spec).roundtrip(rows, round=0, nodes=range(n), seed=7).decoded


@pytest.mark.parametrize("spec", ["qsgd:1", "qsgd:4", "randk:0.1:unbiased"])
def test_unbiased_compressors_mean_and_variance(spec: str) -> None:
    d, n = 40, 20_000
    x = np.random.default_rng(5).standard_normal(d)
    rows, q = repeat_draws(spec, x, n)
    c = parse_compressor(spec)
    omega = c.omega(d)
    assert omega is not None and c.delta(d) is None and not c.biased
    err = (q - rows).square().sum(1)
    # randk's bound is an equality in expectation: allow the sampling error of the mean (~0.5% here)
    assert float(err.mean()) <= omega * float(np.sum(x**2)) * 1.02
    # the mean of n independent draws is x up to the sampling error: E‖mean − x‖² = E‖Q − x‖² / n
    gap = float((q.mean(0) - rows[0]).square().sum())
    assert gap <= 3 * float(err.mean()) / n


def test_randk_biased_keeps_a_fraction_of_the_energy_on_average() -> None:
    d, n = 40, 5000
    x = np.random.default_rng(6).standard_normal(d)
    rows, q = repeat_draws("randk:0.1", x, n)
    ratio = float((q - rows).square().sum(1).mean()) / float(np.sum(x**2))
    assert RandK(0.1).delta(d) == 0.1 and ratio == pytest.approx(0.9, abs=0.02)
    assert RandK(0.1, unbiased=True).omega(d) == pytest.approx(9.0)
    assert parse_compressor("qsgd:4").omega(10_000) == 25.0 and parse_compressor("qsgd:4").omega(16) == 1.0


# ---------------------------------------------------------------- error feedback


@pytest.mark.parametrize("spec", SPECS)
def test_error_feedback_invariant(spec: str) -> None:
    c, g = make(spec), np.random.default_rng(7)
    ef = ErrorFeedback(c, enabled=True)
    residual, state = None, None
    for round in range(4):
        values = torch.from_numpy(g.standard_normal((8, D_LAYOUT)))
        corrected = values if residual is None else values + residual
        step = ef.step(values, residual, round=round, nodes=range(8), seed=3, state=state)
        assert step.residual is not None
        if spec in EF_EXACT:
            assert torch.equal(step.decoded + step.residual, corrected), spec
        else:  # one rounding of e'
            ulp = torch.finfo(torch.float64).eps * step.residual.abs()
            assert bool(((step.decoded + step.residual - corrected).abs() <= ulp).all()), spec
        residual, state = step.residual, step.payload.state


def test_error_feedback_defaults_and_off() -> None:
    assert ErrorFeedback(parse_compressor("topk:0.1")).enabled and not ErrorFeedback(parse_compressor("qsgd:4")).enabled
    rows = rows64()
    step = ErrorFeedback(parse_compressor("topk:0.1"), enabled=False).step(rows, rows, round=0, nodes=range(8), seed=0)
    assert step.residual is None
    assert torch.equal(step.decoded, parse_compressor("topk:0.1").roundtrip(rows, round=0, nodes=range(8), seed=0).decoded)


# ---------------------------------------------------------------- PowerSGD


def test_powersgd_recovers_a_rank_r_matrix_and_sends_vectors_whole() -> None:
    g = np.random.default_rng(8)
    c = PowerSGD(3, [(30, 20), (9,)])
    low_rank = np.stack([(g.standard_normal((30, 3)) @ g.standard_normal((3, 20))).ravel() for _ in range(4)])
    rows = torch.from_numpy(np.concatenate([low_rank, g.standard_normal((4, 9))], axis=1))
    payload = c.compress(rows, round=0, nodes=range(4), seed=0)
    decoded = c.decompress(payload)
    assert torch.equal(decoded[:, 600:], rows[:, 600:])  # the vector travels as it is
    torch.testing.assert_close(decoded[:, :600], rows[:, :600], rtol=0, atol=1e-12)
    assert [tuple(q.shape) for q in payload.state] == [(4, 20, 3)]
    assert set(payload.parts) == {"p0", "q0", "raw"} and c.payload_bytes(609, torch.float64) == 8 * (50 * 3 + 9)


def test_powersgd_warm_start_converges_to_the_best_rank_r_error() -> None:
    g = np.random.default_rng(9)
    u, _ = np.linalg.qr(g.standard_normal((40, 40)))
    v, _ = np.linalg.qr(g.standard_normal((25, 25)))
    m = (u[:, :25] * 0.7 ** np.arange(25)) @ v.T  # singular values 0.7^i: a gap after every rank
    best = float(np.sum((0.7 ** np.arange(25))[2:] ** 2))  # Eckart–Young, rank 2
    c, rows, state = PowerSGD(2, [(40, 25)]), torch.from_numpy(m.reshape(1, -1)), None
    errors = []
    for round in range(40):
        rt = c.roundtrip(rows, round=round, nodes=[0], seed=0, state=state)
        state = rt.state
        errors.append(float((rt.decoded - rows).square().sum()))
    assert errors[0] > 1.01 * best and errors[-1] == pytest.approx(best, rel=1e-6)
    ref_state = None
    for round in range(40):  # the numpy reference follows the same iterates
        ref, ref_state = reference_roundtrip(c, m.ravel(), round=round, node=0, seed=0, state=ref_state)
    np.testing.assert_allclose(ref, rt.decoded[0].numpy(), rtol=0, atol=1e-12)


# ---------------------------------------------------------------- purity


def test_the_package_imports_only_torch_numpy_and_errors() -> None:
    allowed = ("torch", "numpy", "coopsgd.errors", "coopsgd.settings", "coopsgd.compression", "__future__",
               "abc", "math", "collections", "dataclasses", "fractions", "typing")
    package = Path(__file__).resolve().parents[2] / "src" / "coopsgd" / "compression"
    for path in package.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            for name in names:
                assert any(name == a or name.startswith(a + ".") for a in allowed), f"{path.name} imports {name}"
