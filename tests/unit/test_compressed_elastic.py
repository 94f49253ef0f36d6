"""Compressed elastic rounds (SPEC §11, issue 23; docs/compression.md, "Elastic rounds").

* with ``none`` the engines run the uncompressed round (bit for bit); the elastic path itself with an exact
  compressor (``topk:1``) equals the uncompressed run to rounding;
* the simulator equals the reference engine (float64, 1e-10) on least squares for easgd, generalized_elastic and
  hierarchical (group rounds and global rounds, complete and ring auxiliary graphs) with several compressors,
  PowerSGD on a matrix-shaped model;
* one round against a hand computation of the definition; the error-feedback invariant of the workers' uploads
  (exact) and of the centre's replies (to rounding);
* bytes: the busiest node's payloads, sent and received; the clock charges them;
* a checkpoint with non-zero residuals and copies resumes bit-exactly (simulator, reference engine); the
  NaN-skip rollback restores the copies;
* DOWNPOUR's pushes: the same (simulator == reference, a round by hand, bytes, resume with the clock's order);
* rounds outside the definition are refused naming ``compress`` (lsgd: ``tests/unit/test_compressed_lsgd.py``).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from coopsgd.algorithms import presets
from coopsgd.algorithms.communication import (
    Compression,
    elastic_of,
    elastic_round_cost,
    elastic_spec_cost,
    pushes_of,
)
from coopsgd.algorithms.schedules import DownpourSchedule, MixContext
from coopsgd.algorithms.spec import AlgorithmSpec
from coopsgd.compression import parse_compressor
from coopsgd.engines.compressed import CompressedRounds, ReferenceCompressedRounds
from coopsgd.engines.kernel import InProcess
from coopsgd.engines.mixing import plan_round
from coopsgd.engines.reference import ReferenceEngine
from coopsgd.engines.simulator import Simulator
from coopsgd.errors import ConfigError
from coopsgd.theory.bounds import easgd_mixing
from coopsgd.theory.codec import STATED

D, N, B, LR, TOL = 5, 40, 6, 0.05, 1e-10


class LeastSquares:
    """Mean squared error of W a_n − y_n, W of shape (out, D) (nn.Linear's weight, row-major); worker i's k-th
    gradient uses its k-th deterministic batch, the one the simulator is fed for it."""

    def __init__(self, workers: int, out: int = 1, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.out, self.dim = out, out * D
        self.A = rng.standard_normal((N, D))
        self.Y = self.A @ rng.standard_normal((D, out)) + 0.3 * rng.standard_normal((N, out))
        self.calls = [0] * workers
        self.seed = seed

    def _idx(self, worker: int, k: int) -> np.ndarray:
        return np.random.default_rng([self.seed, worker, k]).choice(N, size=B, replace=False)

    def torch_batch(self, worker: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        idx = self._idx(worker, k)
        return torch.from_numpy(self.A[idx]), torch.from_numpy(self.Y[idx])

    def value(self, x: np.ndarray) -> np.ndarray | float:
        X = np.atleast_2d(x).reshape(-1, self.out, D)
        r = np.einsum("wod,nd->wno", X, self.A) - self.Y
        v = np.mean(r * r, axis=(1, 2))
        return float(v[0]) if np.ndim(x) == 1 else v

    def gradient(self, x: np.ndarray, worker: int, rng: np.random.Generator) -> np.ndarray:
        idx = self._idx(worker, self.calls[worker])
        self.calls[worker] += 1
        A, W = self.A[idx], x.reshape(self.out, D)
        return (2.0 / (B * self.out) * (A @ W.T - self.Y[idx]).T @ A).reshape(-1)

    def initial_point(self, rng: np.random.Generator) -> np.ndarray:
        return rng.standard_normal(self.dim)


def _simulator(spec: AlgorithmSpec, out: int = 1, dtype: torch.dtype = torch.float64, **kw) -> Simulator:
    return Simulator(spec, lambda: nn.Linear(D, out, bias=False), loss_fn=F.mse_loss, dtype=dtype,
                     executor="loop", seed=4, optimizer="sgd", **kw)


def _feed(sim: Simulator, obj: LeastSquares, counters: list[int], nan_worker: int | None = None):
    batches = []
    for i in range(sim.m):
        x, y = obj.torch_batch(i, counters[i])
        counters[i] += 1
        batches.append((torch.full_like(x, float("nan")) if i == nan_worker else x, y))
    return sim.step(batches, LR)


def _pair(make: Callable[[], AlgorithmSpec], steps: int, out: int = 1) -> tuple[Simulator, ReferenceEngine]:
    spec_ref, spec_sim = make(), make()
    m = spec_ref.workers
    sim = _simulator(spec_sim, out)
    eng = ReferenceEngine(spec_ref, LeastSquares(m, out), sim.params[0].numpy().copy(), seed=4,
                          layout=[(out, D)] if out > 1 else None)
    obj, counters = LeastSquares(m, out), [0] * m
    for _ in range(steps):
        ref_stats, stats = eng.step(None, LR), _feed(sim, obj, counters)
        assert stats.communicated == ref_stats.communicated
    return sim, eng


def _run(spec: AlgorithmSpec, steps: int) -> Simulator:
    sim = _simulator(spec)
    obj, counters = LeastSquares(spec.workers), [0] * spec.workers
    for _ in range(steps):
        _feed(sim, obj, counters)
    return sim


ELASTIC = {
    "easgd": lambda c: presets.easgd(4, 2, compression=c),
    "generalized_elastic": lambda c: presets.generalized_elastic(5, 2, compression=c),
    # tau = 1, q = 2: group rounds every step, a global round (group and auxiliary matrices fused) every 2nd
    "hierarchical": lambda c: presets.hierarchical(4, 1, compression=c),
    "hierarchical_ring": lambda c: presets.hierarchical(6, 1, groups=3, q=2, aux_topology="ring", compression=c),
    "downpour": lambda c: presets.downpour(3, 2, seed=1, compression=c),
}
COMPRESSORS = ["topk:0.4", "int8:3", "qsgd:4", "randk:0.4", "sign", "fp16", "randk:0.6:unbiased"]


# -- none and exact compressors ----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(ELASTIC))
def test_none_is_the_uncompressed_run_bit_for_bit(name: str) -> None:
    spec = ELASTIC[name]("none")
    assert spec.compressed is None  # the engines take the uncompressed round
    assert torch.equal(_run(spec, 8).params, _run(ELASTIC[name](None), 8).params)


@pytest.mark.parametrize("name", list(ELASTIC))
def test_the_elastic_path_with_an_exact_compressor_is_the_uncompressed_run_to_rounding(name: str) -> None:
    """topk:1 sends every coordinate (Q = identity), through the copies: ẑ + (z − ẑ) rounds, so the iterates
    agree to rounding, not bit for bit."""
    sim, eng = _pair(lambda: ELASTIC[name]("topk:1"), 10)
    plain_sim, plain_eng = _pair(lambda: ELASTIC[name](None), 10)
    assert sim._compressed is not None and sim._compressed.calls > 0
    assert (sim._compressed.copies is not None) == (name != "downpour")  # DOWNPOUR's copies b_i are state rows
    np.testing.assert_allclose(eng.state, plain_eng.state, rtol=0, atol=1e-12)
    torch.testing.assert_close(sim.params, plain_sim.params, rtol=0, atol=1e-12)


def test_compression_is_accepted_for_the_elastic_presets() -> None:
    for name, make in ELASTIC.items():
        assert make("int8").compressed == Compression("int8"), name
    assert presets.easgd(4, compression="powersgd:1").compressed is not None


# -- simulator == reference engine --------------------------------------------------------------------------------

@pytest.mark.parametrize("compressor", COMPRESSORS)
@pytest.mark.parametrize("name", list(ELASTIC))
def test_simulator_equals_reference(name: str, compressor: str) -> None:
    make = ELASTIC[name]
    sim, eng = _pair(lambda: make(compressor), 10)
    np.testing.assert_allclose(sim.params.numpy(), eng.state, rtol=0, atol=TOL)
    plain = _pair(lambda: make(None), 10)[1].state
    assert not np.allclose(eng.state, plain, rtol=0, atol=1e-12)  # the compressed rounds ran


@pytest.mark.parametrize("name", ["easgd", "hierarchical", "downpour"])
def test_powersgd_on_a_matrix_model_simulator_equals_reference(name: str) -> None:
    sim, eng = _pair(lambda: ELASTIC[name]("powersgd:1"), 10, out=4)
    np.testing.assert_allclose(sim.params.numpy(), eng.state, rtol=0, atol=TOL)
    assert sim._compressed is not None and sim._compressed.factors is not None


def test_error_feedback_off_keeps_no_residual() -> None:
    sim, eng = _pair(lambda: presets.easgd(4, 1, compression=Compression("topk:0.4", "off")), 6)
    assert sim._compressed is not None and sim._compressed.residual is None
    np.testing.assert_allclose(sim.params.numpy(), eng.state, rtol=0, atol=TOL)
    on = _pair(lambda: presets.easgd(4, 1, compression="topk:0.4"), 6)[1].state
    assert not np.allclose(eng.state, on)


# -- the definition, by hand ----------------------------------------------------------------------------------------

def _stage(spec: str, n: int, m: int, w: int) -> CompressedRounds:
    return CompressedRounds(Compression(spec), nodes=n, workers=m, width=w, dtype=torch.float64,
                            device=torch.device("cpu"), seed=3, layout=None, start=torch.zeros(w, dtype=torch.float64))


@pytest.mark.parametrize("compressor", ["topk:0.3", "randk:0.3", "int8:4"])
def test_an_easgd_round_is_the_definition_and_keeps_the_invariants(compressor: str) -> None:
    """EASGD (m = 4, alpha = 0.2): reply ρ = Q(z − ẑ), ẑ ← ẑ + ρ; uploads u_i = Q(x_i − ẑ + e_i),
    e_i ← (x_i − ẑ + e_i) − u_i; x_i ← (1 − α) x_i + α ẑ; z ← (1 − mα) z + α Σ_i (ẑ + u_i). Error feedback:
    u_i + e_i' = (x_i − ẑ) + e_i exactly; the centre: ρ + (z − ẑ') = (z − ẑ), its residual z − ẑ, to rounding."""
    m, w, a = 4, 12, 0.2
    S = easgd_mixing(a, m)
    stage = _stage(compressor, m + 1, m, w)
    rnd = plan_round(S)
    gen = torch.Generator().manual_seed(1)
    rows = torch.randn(m + 1, w, dtype=torch.float64, generator=gen)
    zhat, e = rows[m].clone(), torch.zeros(m, w, dtype=torch.float64)  # the copy starts at z's value
    q = stage.compressor
    for t in range(5):
        rows[:m] += 0.3 * torch.randn(m, w, dtype=torch.float64, generator=gen)  # local steps (z moves in rounds)
        X = rows.clone()
        stage.communicate(rows, rnd, InProcess())
        rho = q.roundtrip((X[m] - zhat).unsqueeze(0), round=2 * t, nodes=[m], seed=3).decoded[0]
        zhat_new = zhat + rho
        assert stage.copies is not None and torch.equal(stage.copies[m], zhat_new)
        torch.testing.assert_close(rho + (X[m] - zhat_new), X[m] - zhat, rtol=0, atol=1e-14)  # the centre's residual
        c = X[:m] - zhat_new + e
        u = q.roundtrip(c, round=2 * t + 1, nodes=range(m), seed=3).decoded
        assert stage.residual is not None
        e_new = stage.residual[:m]
        assert torch.equal(u + e_new, c)  # sent + residual = input + previous residual, exactly
        want_x = (1 - a) * X[:m] + a * zhat_new
        want_z = (1 - m * a) * X[m] + a * (zhat_new + u).sum(0)
        torch.testing.assert_close(rows[:m], want_x, rtol=0, atol=1e-14)
        torch.testing.assert_close(rows[m], want_z, rtol=0, atol=1e-14)
        zhat, e = zhat_new, e_new.clone()
    # the numpy definition agrees
    ref = ReferenceCompressedRounds(Compression(compressor), nodes=m + 1, workers=m, width=w, seed=3, layout=None,
                                    start=np.zeros(w))
    stage2 = _stage(compressor, m + 1, m, w)
    Xn = np.random.default_rng(0).standard_normal((m + 1, w))
    Xt = torch.from_numpy(Xn.copy())
    for _ in range(3):
        Xn = ref.communicate(Xn, rnd) + 0.1
        stage2.communicate(Xt, rnd, InProcess())
        Xt += 0.1
    np.testing.assert_allclose(Xt.numpy(), Xn, rtol=0, atol=1e-14)


@pytest.mark.parametrize("compressor", ["topk:0.3", "int8:4", "qsgd:2"])
def test_a_downpour_round_is_the_definition(compressor: str) -> None:
    """In the round's order: u_i = Q(x_i − b_i + e_i), z ← z + u_i; r_i = Q(z − b_i) (/(1 + ω) if unbiased),
    b_i ← b_i + r_i, x_i ← b_i; with error feedback u_i + e_i' = (x_i − b_i) + e_i exactly."""
    m, w = 3, 10
    spec = presets.downpour(m, 1, seed=2, compression=compressor)
    mix = spec.schedule.advance(0, MixContext(step=0), spec.schedule.init_state())[0]
    order = mix.info["order"]
    stage = _stage(compressor, 2 * m + 1, m, w)
    q, scale = stage.compressor, 1.0 / (1.0 + (stage.compressor.omega(w) or 0.0))
    rows = torch.randn(2 * m + 1, w, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    want, e, call = rows.clone(), torch.zeros(m, w, dtype=torch.float64), 0
    stage.communicate(rows, plan_round(mix), InProcess())
    for i in order:
        b = m + 1 + i
        c = want[i] - want[b] + (e[i] if stage.feedback else 0.0)
        u = q.roundtrip(c.unsqueeze(0), round=call, nodes=[i], seed=3).decoded[0]
        if stage.feedback:
            e[i] = c - u
            assert stage.residual is not None and torch.equal(u + stage.residual[i], c)
        want[m] = want[m] + u
        r = q.roundtrip((want[m] - want[b]).unsqueeze(0), round=call + 1, nodes=[b], seed=3).decoded[0]
        want[b] = want[b] + (r * scale if scale != 1.0 else r)
        want[i] = want[b]
        call += 2
    assert stage.feedback == (compressor != "qsgd:2")
    torch.testing.assert_close(rows, want, rtol=0, atol=1e-14)


# -- bytes ----------------------------------------------------------------------------------------------------------

def test_bytes_are_the_busiest_nodes_payloads() -> None:
    p = parse_compressor("topk:0.4").payload_bytes(D, torch.float64)
    sim = _run(presets.easgd(4, 1, compression="topk:0.4"), 3)
    assert sim.bytes_sent == 3 * 2 * 4 * p  # the centre: 4 uploads in, its reply to 4 workers out
    # generalized elastic on a ring of 5: the centre 5 + 5, a worker 3 out (2 neighbours, the centre) + 3 in
    sim = _run(presets.generalized_elastic(5, 1, compression="topk:0.4"), 1)
    assert sim.bytes_sent == 10 * p
    ex = elastic_of(presets.generalized_elastic(5).schedule.matrices()[0], 5)
    assert ex is not None and (ex.payloads, ex.handshakes, ex.total) == (10, 5, 5 * 3 + 5)
    # hierarchical, 2 groups of 2: a group round costs 2 + 2 at a centre plus its reply to the other centre and
    # the other's reply (every centre keeps every copy for the global round); the global round (the centres
    # read each other and every worker) 8 at a centre: 4 uploads and the other's reply in, its reply to 3 out
    h = presets.hierarchical(4, 1, compression="topk:0.4")
    sim = _run(h, 2)
    assert sim.bytes_sent == (6 + 8) * p
    cost = elastic_round_cost(ex, bytes_per_param=8, payload_bytes=p)
    assert (cost.bytes_sent, cost.handshakes, cost.floats_sent) == (10 * p, 5, 10 * p / 8)
    assert elastic_spec_cost(h.schedule, 4, bytes_per_param=8, payload_bytes=p).bytes_sent == 8 * p
    assert elastic_spec_cost(presets.local_sgd(4, 2).schedule, 4, bytes_per_param=8, payload_bytes=p) is None
    # DOWNPOUR: every push and every reply passes through the server, 2m payloads a round
    sim = _run(presets.downpour(3, 1, compression="topk:0.4"), 2)
    assert sim.bytes_sent == 2 * 2 * 3 * p
    assert elastic_spec_cost(presets.downpour(3).schedule, 3, bytes_per_param=8, payload_bytes=p).bytes_sent == 6 * p


def test_the_clock_charges_the_payloads() -> None:
    sim = _run(presets.easgd(4, 1, compression="int8"), 1)
    p = parse_compressor("int8").payload_bytes(D, torch.float64)
    net = sim.clock.network
    # the transfer, plus the codec time at the stated int8 throughputs: the upload and the reply encoded, the
    # centre's 4 uploads and a worker's reply decoded (coopsgd.theory.codec)
    row = D * 8
    codec = 2 * row / STATED["int8"].encode_Bps + 5 * row / STATED["int8"].decode_Bps
    assert sim.clock.communication_s == pytest.approx(4 * net.latency_s + 8 * p / net.bandwidth_Bps + codec,
                                                      rel=1e-12)
    plain = _run(presets.easgd(4, 1), 1)
    assert plain.bytes_sent == 2 * D * 8  # uncompressed EASGD stays an all-reduce ([CSGD] Table 3)


# -- checkpoints and rollbacks --------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["easgd", "hierarchical_ring", "downpour"])
def test_resume_mid_run_is_bit_exact(name: str) -> None:
    make = lambda: ELASTIC[name]("topk:0.4")  # noqa: E731
    m = make().workers
    kw = {"downpour_order": "clock"} if name == "downpour" else {}  # pushes in the simulated clock's order
    full = _simulator(make(), **kw)
    obj, counters = LeastSquares(m), [0] * m
    for _ in range(5):
        _feed(full, obj, counters)
    saved, at = full.state_dict(), list(counters)
    comp = saved["payload"]["compression"]
    assert bool(comp["residual"].abs().max() > 0)
    assert name == "downpour" or bool((comp["copies"][m:] != 0).any())  # DOWNPOUR's copies b_i are state rows
    for _ in range(6):
        _feed(full, obj, counters)
    resumed = _simulator(make(), **kw)
    resumed.load_state_dict(saved)
    obj2 = LeastSquares(m)
    for _ in range(6):
        _feed(resumed, obj2, at)
    assert torch.equal(resumed.params, full.params)
    assert resumed.bytes_sent == full.bytes_sent


def test_reference_engine_resumes_bit_exactly() -> None:
    def eng() -> ReferenceEngine:
        return ReferenceEngine(presets.generalized_elastic(5, 1, compression="sign"), LeastSquares(5), seed=1)

    a = eng()
    for _ in range(4):
        a.step(None, LR)
    saved = a.state_dict()
    assert saved["payload"]["compression"]["copies"] is not None
    b = eng()
    b.load_state_dict(saved)
    b.objective.calls = list(a.objective.calls)
    for _ in range(4):
        a.step(None, LR)
        b.step(None, LR)
    assert np.array_equal(a.state, b.state)


def test_nan_skip_rollback_restores_the_copies() -> None:
    sim = _simulator(presets.easgd(4, 1, compression="topk:0.4"), nan_policy="skip")
    obj, counters = LeastSquares(4), [0] * 4
    for _ in range(3):
        _feed(sim, obj, counters)
        assert sim.check_health() is None
    assert sim._compressed is not None
    good, params = sim._compressed.snapshot(), sim.params.clone()
    assert _feed(sim, obj, counters, nan_worker=1).skipped
    assert sim.check_health() is not None
    after = sim._compressed.snapshot()
    assert torch.equal(after["copies"], good["copies"]) and torch.equal(after["residual"], good["residual"])
    assert after["calls"] == good["calls"] and torch.equal(sim.params, params)


# -- refusals -----------------------------------------------------------------------------------------------------

def test_pushes_are_recognised_from_the_matrix_and_its_order() -> None:
    for m in (1, 2, 5):
        sched = DownpourSchedule(m, 1, seed=3)
        for r in range(3):
            order = sched.order(r).tolist()
            S = sched.round_matrix(order)
            assert pushes_of(S, m, order)
            assert m == 1 or not pushes_of(S, m, order[::-1])
            assert not pushes_of(S, m + 1, order) and not pushes_of(np.eye(2 * m + 1), m, order)
    assert not pushes_of(DownpourSchedule(3, 1).round_matrix([0, 1, 2]), 3, [0, 1, 1])


def test_rounds_outside_the_definition_are_refused() -> None:
    m = 2
    S = np.eye(4)  # worker 0 is read by worker 1 and reads two auxiliary nodes: no single centre
    S[:, 0] = [0.5, 0.0, 0.25, 0.25]
    S[:, 1] = [0.5, 0.5, 0.0, 0.0]
    assert elastic_of(S, m) is None
    assert elastic_of(np.eye(4), m) is None
    stage = _stage("int8", 4, m, 3)
    with pytest.raises(ConfigError, match="compress"):
        stage.communicate(torch.zeros(4, 3, dtype=torch.float64), plan_round(S), InProcess())
