"""Compressed LSGD (SPEC §11, issue 23; docs/compression.md, "LSGD (leader refresh)").

The slot row s is the public copy of the leader's model that every worker holds; a refresh sends
Q(x_L − s), s ← s + Q(·), and the others are pulled toward s. Checked:

* ``none`` is LSGD bit for bit; ``topk:1`` (every coordinate) is LSGD to rounding;
* the simulator equals the reference engine (float64, 1e-10) on least squares, several compressors and
  PowerSGD on a matrix-shaped model, electing the same leaders (both on the full objective);
* one refresh against the definition by hand; the copy's invariant (what was not sent stays in x_L − s);
* bytes: the election's loss floats plus the leader's payload down the broadcast tree; no bytes between
  refreshes;
* multi-level LSGD (a slot per group and a global one) likewise; a checkpoint resumes bit-exactly.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pytest
import torch
from test_compressed_elastic import LR, TOL, D, LeastSquares, _feed, _simulator  # same directory

from coopsgd.algorithms import presets
from coopsgd.algorithms.communication import Compression, leader_round_of
from coopsgd.algorithms.spec import AlgorithmSpec
from coopsgd.compression import parse_compressor
from coopsgd.engines.compressed import CompressedRounds, ReferenceCompressedRounds
from coopsgd.engines.distributed.compressed import check_distributed_compression
from coopsgd.engines.kernel import InProcess
from coopsgd.engines.mixing import plan_round
from coopsgd.engines.reference import ReferenceEngine
from coopsgd.engines.simulator import Simulator


def _lsgd_sim(spec: AlgorithmSpec, obj: LeastSquares, out: int = 1) -> Simulator:
    """The simulator electing on the full objective, as the reference engine does."""
    return _simulator(spec, out, loss_estimate="probe", probe_batch=(torch.from_numpy(obj.A), torch.from_numpy(obj.Y)))


def _pair(make: Callable[[], AlgorithmSpec], steps: int, out: int = 1) -> tuple[Simulator, ReferenceEngine]:
    spec_ref, spec_sim = make(), make()
    m = spec_ref.workers
    obj = LeastSquares(m, out)
    sim = _lsgd_sim(spec_sim, obj, out)
    eng = ReferenceEngine(spec_ref, LeastSquares(m, out), sim.params[0].numpy().copy(), seed=4,
                          layout=[(out, D)] if out > 1 else None)
    counters = [0] * m
    for _ in range(steps):
        ref_stats, stats = eng.step(None, LR), _feed(sim, obj, counters)
        assert ref_stats.info.get("leader") == stats.info.get("leader")
        assert ref_stats.communicated == stats.communicated
    return sim, eng


COMPRESSORS = ["topk:0.4", "int8:3", "qsgd:4", "randk:0.4", "sign", "randk:0.6:unbiased"]


def test_none_is_lsgd_bit_for_bit() -> None:
    spec = presets.lsgd(4, 2, compression="none")
    assert spec.compressed is None
    a, b = _pair(lambda: presets.lsgd(4, 2, compression="none"), 10), _pair(lambda: presets.lsgd(4, 2), 10)
    assert torch.equal(a[0].params, b[0].params) and np.array_equal(a[1].state, b[1].state)


def test_an_exact_compressor_is_lsgd_to_rounding() -> None:
    sim, eng = _pair(lambda: presets.lsgd(4, 2, compression="topk:1"), 10)
    plain_sim, plain_eng = _pair(lambda: presets.lsgd(4, 2), 10)
    assert sim._compressed is not None and sim._compressed.calls == 5  # one compressor call per refresh
    np.testing.assert_allclose(eng.state, plain_eng.state, rtol=0, atol=1e-12)
    torch.testing.assert_close(sim.params, plain_sim.params, rtol=0, atol=1e-12)


@pytest.mark.parametrize("compressor", COMPRESSORS)
def test_simulator_equals_reference(compressor: str) -> None:
    sim, eng = _pair(lambda: presets.lsgd(4, 2, lam=0.3, compression=compressor), 10)
    np.testing.assert_allclose(sim.params.numpy(), eng.state, rtol=0, atol=TOL)
    plain = _pair(lambda: presets.lsgd(4, 2, lam=0.3), 10)[1].state
    assert not np.allclose(eng.state, plain, rtol=0, atol=1e-12)  # the compressed refreshes ran


def test_powersgd_on_a_matrix_model_simulator_equals_reference() -> None:
    sim, eng = _pair(lambda: presets.lsgd(4, 1, compression="powersgd:1"), 8, out=4)
    np.testing.assert_allclose(sim.params.numpy(), eng.state, rtol=0, atol=TOL)
    assert sim._compressed is not None and sim._compressed.factors is not None


def test_a_refresh_is_the_definition() -> None:
    """m = 3, leader 1, pull a = 0.2: s' = s + Q(x_1 − s); x_0 = 0.8 x_0 + 0.2 s', x_1 unchanged, x_2 likewise;
    the copy keeps what was not sent: x_1 − s' = (x_1 − s) − Q(x_1 − s), to rounding (s + (x_1 − s) is not x_1 in
    floating point)."""
    m, w, a, L = 3, 10, 0.2, 1
    S = np.eye(m + 1)
    S[:, m] = 0.0
    S[L, m] = 1.0
    for i in (0, 2):
        S[:, i] = 0.0
        S[i, i], S[L, i] = 1 - a, a
    lead = leader_round_of(S, m, [L], L)
    assert lead is not None and lead.refresh and lead.slots == (m,) and lead.leaders == (L,)
    np.testing.assert_array_equal(lead.pull, [[a, 0.0, a]])
    assert leader_round_of(S, m, [0], 0) is None
    X = np.random.default_rng(0).standard_normal((m + 1, w))
    q = parse_compressor("topk:0.3")
    sent = q.roundtrip(torch.from_numpy(X[L:L + 1] - X[m:m + 1]), round=0, nodes=[m], seed=3).decoded[0].numpy()
    want = X.copy()
    want[m] = X[m] + sent
    want[0], want[2] = (1 - a) * X[0] + a * want[m], (1 - a) * X[2] + a * want[m]

    class Mix:  # what the kernel hands over: the matrix and the schedule's info
        matrix, pattern, info, structure = S, "broadcast", {"leader": L, "local_leaders": [L], "refresh": True}, None
        communicates = True

    rnd = plan_round(S)
    object.__setattr__(rnd, "mix", Mix())
    stage = CompressedRounds(Compression("topk:0.3"), nodes=m + 1, workers=m, width=w, dtype=torch.float64,
                             device=torch.device("cpu"), seed=3, layout=None, start=torch.zeros(w, dtype=torch.float64))
    rows = torch.from_numpy(X.copy())
    stage.communicate(rows, rnd, InProcess())
    np.testing.assert_allclose(rows.numpy(), want, rtol=0, atol=1e-15)
    np.testing.assert_allclose(X[L] - rows[m].numpy(), (X[L] - X[m]) - sent, rtol=0, atol=1e-15)
    ref = ReferenceCompressedRounds(Compression("topk:0.3"), nodes=m + 1, workers=m, width=w, seed=3, layout=None,
                                    start=np.zeros(w))
    np.testing.assert_allclose(ref.communicate(X, rnd), want, rtol=0, atol=1e-15)


def test_bytes_the_election_and_the_leaders_payload() -> None:
    m, steps, tau = 4, 10, 2
    p = parse_compressor("topk:0.4").payload_bytes(D, torch.float64)  # 2 float64 values and int8 indices
    sim = _pair(lambda: presets.lsgd(m, tau, compression="topk:0.4"), steps)[0]
    hops = math.ceil(math.log2(m))
    per_refresh = m * 8 + hops * p  # the m loss floats all-gathered, the payload down a binomial tree
    assert sim.bytes_sent == (steps // tau) * per_refresh
    plain = _pair(lambda: presets.lsgd(m, tau), steps)[0]
    assert plain.bytes_sent == (steps // tau) * (m * 8 + hops * D * 8)


def test_resume_mid_run_is_bit_exact() -> None:
    make = lambda: presets.lsgd(4, 2, compression="randk:0.4")  # noqa: E731
    obj = LeastSquares(4)
    full, counters = _lsgd_sim(make(), obj), [0] * 4
    for _ in range(5):
        _feed(full, obj, counters)
    saved, at = full.state_dict(), list(counters)
    assert saved["payload"]["compression"]["calls"] == 3
    for _ in range(6):
        _feed(full, obj, counters)
    resumed = _lsgd_sim(make(), obj)
    resumed.load_state_dict(saved)
    for _ in range(6):
        _feed(resumed, LeastSquares(4), at)
    assert torch.equal(resumed.params, full.params) and resumed.bytes_sent == full.bytes_sent


MULTI = {
    "groups": lambda c: presets.lsgd(6, 2, lam=0.3, groups=2, lam_global=0.1, compression=c),
    "groups of one": lambda c: presets.lsgd(4, 1, groups=4, compression=c),  # every worker its own local leader
}


@pytest.mark.parametrize("name", list(MULTI))
def test_multi_level_lsgd(name: str) -> None:
    """Each slot's leader sends Q(x_L − s) (the global leader twice: to its group's slot and the global one);
    where S sums the two pulls toward one worker they are split with the weights read elsewhere in S."""
    make = MULTI[name]
    exact_sim, exact_eng = _pair(lambda: make("topk:1"), 10)
    plain_sim, plain_eng = _pair(lambda: make(None), 10)
    np.testing.assert_allclose(exact_eng.state, plain_eng.state, rtol=0, atol=1e-12)
    torch.testing.assert_close(exact_sim.params, plain_sim.params, rtol=0, atol=1e-12)
    sim, eng = _pair(lambda: make("qsgd:4"), 10)
    np.testing.assert_allclose(sim.params.numpy(), eng.state, rtol=0, atol=TOL)
    assert not np.allclose(eng.state, plain_eng.state, rtol=0, atol=1e-12)


def test_rounds_outside_the_layout_are_not_leader_rounds() -> None:
    m = 3
    pull = np.eye(m + 1)
    pull[m, 0], pull[0, 0] = 0.2, 0.8
    assert leader_round_of(pull, m, [1], 1).refresh is False  # type: ignore[union-attr]
    bad = pull.copy()
    bad[2, 0], bad[0, 0] = 0.1, 0.7  # worker 0 also reads worker 2
    assert leader_round_of(bad, m, [1], 1) is None
    assert leader_round_of(pull, m, [1, 2], 1) is None  # two groups of 3 workers: not LSGD's layout
    assert leader_round_of(pull, m, "x", 1) is None
    check_distributed_compression(presets.lsgd(4, groups=2, compression="int8"))  # the distributed engine too
