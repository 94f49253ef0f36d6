"""Uneven local work and FedNova (issue 26, item 4), and the clock's charge of a sampled FedAvg round.

* the schedule: K_i drawn per (seed, round, client) or from the clients' speeds; a client works in the first K_i
  steps of its round only; ``"equal"`` is FedAvg as before;
* FedNova's round by hand (the weights of Wang et al. 2020) against the reference engine, the
  simulator against the reference engine, equal work = FedAvg bit for bit;
* the objective inconsistency on quadratics (closed-form fixed points): FedAvg with uneven work converges away
  from the minimizer, FedNova to it (up to its O(lr) term);
* SCAFFOLD divides by K_i lr under uneven work; resume is bit-exact mid-round;
* a sampled round is charged for its k clients (bytes and time by hand).
"""

from __future__ import annotations

import io
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from coopsgd.algorithms import presets
from coopsgd.algorithms.schedules import FedAvgSchedule, MixContext
from coopsgd.analysis import spec_round_cost
from coopsgd.engines.reference import ReferenceEngine
from coopsgd.engines.simulator.clock import SimClock
from coopsgd.errors import ConfigError
from coopsgd.objectives.analytic import Quadratic
from coopsgd.theory.cost import ComputeModel, NetworkModel
from coopsgd.train.config import RunConfig

sys.path.insert(0, str(Path(__file__).parent))
from test_fed_strategies import COUNTS, LR, D, LeastSquares, _both, _feed, _run_sim, _sim  # noqa: E402

# ---------------------------------------------------------------------------------------------------------
# the schedule
# ---------------------------------------------------------------------------------------------------------


def test_uniform_work_is_drawn_per_seed_round_and_client_and_masks_the_first_k_steps() -> None:
    sched = FedAvgSchedule(6, 5, fraction=0.5, seed=3, local_work="uniform", min_local_steps=2)
    for r in range(4):
        chosen, steps = sched.clients(r), sched.local_steps(r)
        expect = [np.random.default_rng([3, r, int(i)]).integers(2, 6) for i in chosen]
        np.testing.assert_array_equal(steps, expect)
        assert steps.min() >= 2 and steps.max() <= 5
        for j in range(5):
            mask = sched.active(5 * r + j)
            assert mask is not None
            np.testing.assert_array_equal(np.flatnonzero(mask), chosen[steps > j])
    # a new schedule object draws the same (every engine builds its own)
    again = FedAvgSchedule(6, 5, fraction=0.5, seed=3, local_work="uniform", min_local_steps=2)
    np.testing.assert_array_equal(again.local_steps(2), sched.local_steps(2))
    mix = sched.mix(4)
    assert mix is not None and mix.info["local_steps"] == sched.local_steps(0).tolist()


def test_budget_work_follows_the_speeds_and_equal_work_is_fedavgs_schedule() -> None:
    sched = FedAvgSchedule(6, 5, local_work="budget", speeds=[1.0, 1.0, 0.5, 0.5, 0.25, 0.2])
    np.testing.assert_array_equal(sched.local_steps(0), [5, 5, 2, 2, 1, 1])  # max(1, floor(5 s / 1))
    mask = sched.active(2)
    assert mask is not None and mask.tolist() == [True, True, False, False, False, False]
    assert FedAvgSchedule(6, 5, local_work="budget").active(3) is not None  # no speeds: tau each
    np.testing.assert_array_equal(FedAvgSchedule(6, 5, local_work="budget").local_steps(0), [5] * 6)
    plain = FedAvgSchedule(6, 5)
    assert plain.active(0) is None and plain.init_state() == {} and "local_steps" not in plain.mix(4).info


def test_the_run_configuration_passes_the_clocks_speeds_to_the_schedule() -> None:
    cfg = RunConfig(preset="fedavg", workers=4, tau=4, local_work="budget", worker_speeds=[1.0, 0.5])
    sched = cfg.build_spec().schedule
    assert isinstance(sched, FedAvgSchedule)
    np.testing.assert_array_equal(sched.local_steps(0), [4, 4, 2, 2])
    assert RunConfig(preset="fednova", local_work="uniform", min_local_steps=2).build_spec().params["local_work"] \
        == "uniform"


@pytest.mark.parametrize(("kwargs", "field"), [({"local_work": "random"}, "local_work"),
                                               ({"local_work": "uniform", "min_local_steps": 6}, "min_local_steps"),
                                               ({"local_work": "uniform", "min_local_steps": 0}, "min_local_steps"),
                                               ({"local_work": "budget", "min_local_steps": 2}, "min_local_steps")])
def test_bad_settings_name_the_setting(kwargs: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigError) as err:
        presets.fednova(4, 5, **kwargs)
    assert field in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("change", [{"momentum": 0.9}, {"optimizer": "adam"}])
def test_fednova_refuses_an_inner_optimizer_that_is_not_plain_sgd(change: dict[str, Any]) -> None:
    with pytest.raises(ConfigError) as err:
        RunConfig(preset="fednova", **change)
    assert next(iter(change)) in str(err.value) and "FedNova" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="FedNova"):
        _sim(presets.fednova(2, 2), momentum=0.9)


# ---------------------------------------------------------------------------------------------------------
# FedNova's round
# ---------------------------------------------------------------------------------------------------------


def test_fednova_round_weights_by_hand() -> None:
    sched = FedAvgSchedule(4, 4, fraction=0.5, seed=1, local_work="uniform", normalized=True)
    mix = sched.mix(3)
    assert mix is not None and mix.structure is not None
    assert mix.info["clients"] == [1, 2] and mix.info["local_steps"] == [4, 3]
    # p = (1/2, 1/2), a = (4, 3): tau_eff = 3.5; clients 3.5 / 2 / a_i; the server 1 - their sum
    np.testing.assert_array_equal(mix.structure.sources, [1, 2, 4])
    np.testing.assert_allclose(mix.structure.weights, [0.4375, 3.5 / 6, 1 - 0.4375 - 3.5 / 6], rtol=0, atol=1e-15)


def _fednova_oracle(m: int, tau: int, rounds: int, *, fraction: float, seed: int, x0: np.ndarray,
                    normalized: bool) -> np.ndarray:
    """FedNova by hand (Wang et al. 2020): each round the sampled clients run K_i ~ U{1..tau} (drawn from
    default_rng([seed, r, i])) local SGD steps from x; d_i = (x - y_i) / K_i; x <- x - tau_eff sum p_i d_i.
    ``normalized=False``: FedAvg's plain average of the y_i (uneven work, no normalization)."""
    obj = LeastSquares(m)
    counts = np.asarray(COUNTS[:m])
    k = max(1, int(round(fraction * m)))
    x = x0.copy()
    calls = [0] * m
    for r in range(rounds):
        chosen = np.arange(m) if k == m else np.sort(np.random.default_rng([seed, r]).choice(m, k, replace=False))
        p = counts[chosen] / counts[chosen].sum()
        a = np.array([np.random.default_rng([seed, r, int(i)]).integers(1, tau + 1) for i in chosen], dtype=float)
        ys = []
        for i, K in zip(chosen, a, strict=True):
            y = x.copy()
            for _ in range(int(K)):
                y = y - LR * obj.grad_at(y, int(i), calls[i])
                calls[i] += 1
            ys.append(y)
        Y = np.asarray(ys)
        if normalized:
            x = x - float(p @ a) * np.sum(p[:, None] * (x - Y) / a[:, None], axis=0)
        else:
            x = np.sum(p[:, None] * Y, axis=0)
    return x


@pytest.mark.parametrize("normalized", [True, False])
def test_reference_engine_equals_the_hand_written_rounds(normalized: bool) -> None:
    m, tau, rounds = 6, 4, 5
    x0 = np.linspace(-1.0, 0.5, D)
    name = "fednova" if normalized else "fedavg"
    spec = presets.make_preset(name, m, tau=tau, fraction=0.5, sample_counts=COUNTS, seed=2, local_work="uniform")
    eng = ReferenceEngine(spec, LeastSquares(m), x0)
    for _ in range(rounds * tau):
        eng.step(None, LR)
    want = _fednova_oracle(m, tau, rounds, fraction=0.5, seed=2, x0=x0, normalized=normalized)
    np.testing.assert_allclose(eng.state[m], want, rtol=0, atol=1e-12)


@pytest.mark.parametrize("executor", ["loop", "vmap"])
@pytest.mark.parametrize(("name", "kw"), [
    ("fednova", {"local_work": "uniform", "fraction": 0.5}),
    ("fednova", {"local_work": "budget", "client_speeds": [0.2, 1.0, 0.5, 0.3, 0.25, 0.6], "fraction": 1.0}),
    ("fedavg", {"local_work": "uniform", "fraction": 1.0}),
    ("scaffold", {"local_work": "uniform", "fraction": 0.5}),
    ("fedadam", {"local_work": "budget", "client_speeds": [1.0, 0.5, 0.5, 0.25, 1.0, 0.75], "fraction": 0.5}),
])
def test_simulator_equals_reference_with_uneven_work(name: str, kw: dict[str, Any], executor: str) -> None:
    m, tau, steps = 6, 4, 14  # mid-round at the end
    spec = lambda: presets.make_preset(name, m, tau=tau, sample_counts=COUNTS, seed=2, **kw)  # noqa: E731
    sim, eng = _both(spec, steps, executor)
    np.testing.assert_allclose(sim.params.numpy(), eng.state, rtol=0, atol=1e-10)
    if eng.control is not None:
        assert sim.control is not None
        np.testing.assert_allclose(sim.control.numpy(), eng.control, rtol=0, atol=1e-10)


def test_a_step_in_which_no_client_works_still_ends_the_round() -> None:
    # budget: client 1 (the fastest) is never sampled with seed 0 in round 0, so nobody works in its last steps
    speeds = [0.5, 1.0, 0.5, 0.25]
    spec = presets.fednova(4, 4, fraction=0.5, seed=0, local_work="budget", client_speeds=speeds)
    sched = spec.schedule
    assert isinstance(sched, FedAvgSchedule) and 1 not in sched.clients(0).tolist()
    mask = sched.active(3)
    assert mask is not None and not mask.any()
    sim, eng = _both(lambda: presets.fednova(4, 4, fraction=0.5, seed=0, local_work="budget",
                                             client_speeds=speeds), 8)
    np.testing.assert_allclose(sim.params.numpy(), eng.state, rtol=0, atol=1e-10)
    assert sim.rounds == eng.rounds == 2


def test_equal_work_fednova_is_fedavg_bit_for_bit() -> None:
    # every a_i equal: tau_eff / a_i = 1 exactly, so the round's weights are FedAvg's p_i (the same floats)
    for kw in ({"fraction": 0.5, "seed": 2}, {"fraction": 1.0}):
        a = _run_sim(presets.fedavg(6, 3, sample_counts=COUNTS, **kw), 10)
        b = _run_sim(presets.fednova(6, 3, sample_counts=COUNTS, **kw), 10)
        assert torch.equal(a.params, b.params)
        assert a.clock.elapsed == b.clock.elapsed and a.bytes_sent == b.bytes_sent
    # budget work at equal speeds is equal work too
    c = _run_sim(presets.fedavg(6, 3, sample_counts=COUNTS, fraction=0.5, seed=2), 10)
    d = _run_sim(presets.fednova(6, 3, sample_counts=COUNTS, fraction=0.5, seed=2, local_work="budget"), 10)
    assert torch.equal(c.params, d.params)


def test_resume_mid_round_is_bit_exact_with_uneven_work() -> None:
    m, tau = 4, 4
    spec = lambda: presets.fednova(m, tau, fraction=0.75, seed=1, local_work="uniform")  # noqa: E731
    full = _run_sim(spec(), 14)
    obj = LeastSquares(m)
    first = _sim(spec())
    counters = [0] * m
    for _ in range(6):
        _feed(first, obj, counters)
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)
    buf.seek(0)
    second = _sim(spec())
    second.load_state_dict(torch.load(buf, weights_only=True))
    for _ in range(8):
        _feed(second, obj, counters)
    assert torch.equal(full.params, second.params)
    assert second.schedule_state == full.schedule_state


def test_a_learning_rate_that_varies_in_a_round_weights_fednova_by_each_clients_lr_sum() -> None:
    sched = FedAvgSchedule(2, 3, local_work="budget", speeds=[1.0, 0.4], normalized=True, track_lrs=True)
    state = sched.init_state()
    mix = None
    for k, lr in enumerate((0.3, 0.2, 0.1)):
        mix, state = sched.advance(k, MixContext(step=k, lr=lr), state)
    assert mix is not None and mix.info["local_steps"] == [3, 1]
    np.testing.assert_allclose(mix.info["lr_sums"], [0.6, 0.3], rtol=0, atol=1e-15)
    a = np.array([0.6, 0.3])
    tau_eff = 0.5 * a.sum()
    assert mix.structure is not None
    np.testing.assert_allclose(mix.structure.weights, [*(tau_eff * 0.5 / a), 1 - (tau_eff * 0.5 / a).sum()],
                               rtol=0, atol=1e-15)


# ---------------------------------------------------------------------------------------------------------
# the objective inconsistency
# ---------------------------------------------------------------------------------------------------------


def _fixed_point(obj: Quadratic, steps: np.ndarray, p: np.ndarray, lr: float, normalized: bool) -> np.ndarray:
    """The closed-form fixed point of FedAvg / FedNova rounds on ``F_i(x) = 1/2 (x - b_i)^T A (x - b_i)``, client
    i running K_i exact gradient steps: ``x - y_i = M_i (x - b_i)``, ``M_i = I - (I - lr A)^{K_i}``; FedAvg's
    ``x+ = sum p_i y_i`` is fixed where ``sum p_i M_i (x - b_i) = 0``, FedNova's where ``sum p_i M_i / K_i
    (x - b_i) = 0``."""
    eye = np.eye(obj.dim)
    Ms = [(eye - np.linalg.matrix_power(eye - lr * obj.A, int(K))) / (K if normalized else 1.0) for K in steps]
    lhs = sum(pi * M for pi, M in zip(p, Ms, strict=True))
    rhs = sum(pi * M @ b for pi, M, b in zip(p, Ms, obj.b, strict=True))
    return np.linalg.solve(lhs, rhs)


def test_fedavg_with_uneven_work_converges_away_from_the_minimizer_and_fednova_to_it() -> None:
    m, tau, lr, rounds = 4, 8, 0.01, 1500
    obj = Quadratic(3, workers=m, L=1.0, mu=0.5, heterogeneity=1.0, seed=5)
    speeds = [1.0, 0.5, 0.25, 0.125]  # K = 8, 4, 2, 1 every round
    p = np.full(m, 1.0 / m)
    found = {}
    for name in ("fedavg", "fednova"):
        spec = presets.make_preset(name, m, tau=tau, local_work="budget", client_speeds=speeds)
        eng = ReferenceEngine(spec, obj, np.zeros(3))
        for _ in range(rounds * tau):
            eng.step(None, lr)
        x = eng.state[m]
        np.testing.assert_allclose(x, _fixed_point(obj, np.array([8, 4, 2, 1]), p, lr, name == "fednova"),
                                   rtol=0, atol=1e-9)
        found[name] = float(np.linalg.norm(x - obj.b_mean))  # b_mean: the minimizer of F = mean_i F_i
    spread = float(np.linalg.norm(obj.b - obj.b_mean, axis=1).mean())
    assert found["fedavg"] > 0.2 * spread  # the K-weighted objective's minimizer
    assert found["fednova"] < 0.05 * spread and found["fednova"] < found["fedavg"] / 10  # seen: 0.78 vs 0.012
    # as lr -> 0 FedAvg's fixed point tends to the K-weighted mean of the b_i (the minimizer of sum_i K_i F_i),
    # FedNova's to the minimizer of F: its gap is O(lr)
    K = np.array([8, 4, 2, 1])
    small = {n: _fixed_point(obj, K, p, 1e-5, n == "fednova") for n in ("fedavg", "fednova")}
    np.testing.assert_allclose(small["fedavg"], K @ obj.b / K.sum(), rtol=0, atol=1e-3)
    np.testing.assert_allclose(small["fednova"], obj.b_mean, rtol=0, atol=1e-3)


# ---------------------------------------------------------------------------------------------------------
# SCAFFOLD under uneven work; the clock's charge of a sampled round
# ---------------------------------------------------------------------------------------------------------


class _Linear:
    """F_i(x) = a . x: every gradient is a, so the exact c_i after a round is a whatever K_i."""

    dim = 2
    a = np.array([1.0, -2.0])

    def gradient(self, x: np.ndarray, i: int, rng: np.random.Generator) -> np.ndarray:
        return self.a.copy()

    def value(self, x: np.ndarray) -> np.ndarray:
        return np.atleast_2d(x) @ self.a

    def initial_point(self, rng: np.random.Generator) -> np.ndarray:
        return np.zeros(2)


def test_scaffold_divides_by_each_clients_own_local_steps() -> None:
    spec = presets.scaffold(3, 4, local_work="budget", client_speeds=[1.0, 0.5, 0.25])  # K = 4, 2, 1
    eng = ReferenceEngine(spec, _Linear(), np.zeros(2))
    for _ in range(4):
        eng.step(None, 0.05)
    assert eng.control is not None
    np.testing.assert_allclose(eng.control[:3], np.tile(_Linear.a, (3, 1)), rtol=0, atol=1e-12)
    np.testing.assert_allclose(eng.control[3], _Linear.a, rtol=0, atol=1e-12)  # c = mean of the c_i


def test_a_sampled_round_is_charged_for_its_k_clients() -> None:
    m, k, d, bpp = 8, 2, 5, 8.0
    clock = SimClock(NetworkModel(latency_s=1e-3, bandwidth_Bps=1e6), ComputeModel(mean_s=0.0)).bind(m, d, bpp)
    (cost,) = clock.round_costs("parameter_server", senders=k)
    # k handshakes; 2 d k floats (k models up, k down) of 8 bytes
    assert (cost.handshakes, cost.floats_sent, cost.bytes_sent) == (2, 20.0, 160.0)
    assert clock.communicate([cost]) == pytest.approx(2 * 1e-3 + 160.0 / 1e6, rel=1e-15)
    # the simulator: FedAvg with c = 0.25 of 8 clients on D = 4 float64 parameters sends 2 x 4 x 2 x 8 = 128 bytes
    sim = _run_sim(presets.fedavg(m, 2, fraction=0.25, seed=0), 4)
    assert sim.rounds == 2 and sim.bytes_sent == 2 * 128.0
    full = _run_sim(presets.fedavg(m, 2), 2)
    assert full.bytes_sent == 2 * D * m * 8.0  # all clients: as before
    # the cost model (theory, the reference engine's records): the same k
    assert spec_round_cost(presets.fedavg(m, 2, fraction=0.25), d, bytes_per_param=8).bytes_sent == 160.0
    assert spec_round_cost(presets.fedavg(m, 2), d, bytes_per_param=8).bytes_sent == 2 * d * m * 8.0
    assert spec_round_cost(presets.scaffold(m, 2, fraction=0.25), d, bytes_per_param=8).bytes_sent == 320.0


def test_a_fednova_round_touches_only_the_sampled_rows() -> None:
    m, tau = 8, 4
    spec = presets.fednova(m, tau, fraction=0.25, seed=1, local_work="uniform")  # clients 3, 4 with K = 4, 1
    sched = spec.schedule
    assert isinstance(sched, FedAvgSchedule)
    mix = sched.mix(3)
    assert mix is not None and mix.structure is not None and m in mix.structure.sources.tolist()  # uneven: z too
    sim = _sim(spec)
    obj = LeastSquares(m)
    counters = [0] * m
    for _ in range(tau):
        _feed(sim, obj, counters)
    pend = sim._comm.deferred
    assert pend is not None and pend[:m].all() and not pend[m]  # the broadcast to the clients stays deferred


def test_theory_says_no_bound_applies_to_uneven_work_and_fednova() -> None:
    from coopsgd.algorithms.hooks import fed_no_bound

    assert fed_no_bound(presets.fedavg(4)) is None
    why = fed_no_bound(presets.fedavg(4, local_work="uniform"))
    assert why is not None and "uneven local work" in why and "Theorem 1" in why
    why = fed_no_bound(presets.fednova(4))
    assert why is not None and "FedNova" in why and "uneven" not in why


def test_every_engine_takes_the_speeds_for_budget_work() -> None:
    cfg = RunConfig(engine="reference", objective="quadratic", preset="fednova", workers=4, tau=4,
                    local_work="budget", worker_speeds=[1.0, 0.5])
    sched = cfg.build_spec().schedule
    assert isinstance(sched, FedAvgSchedule)
    np.testing.assert_array_equal(sched.local_steps(0), [4, 4, 2, 2])
    with pytest.raises(ConfigError, match="worker_speeds"):  # without budget work only the simulator's clock uses it
        RunConfig(engine="reference", objective="quadratic", preset="fednova", workers=4, worker_speeds=[1.0, 0.5])


@pytest.mark.parametrize("compression", ["int8", "topk:0.5"])
def test_compressed_fednova_rounds(compression: str) -> None:
    # the server row is among an uneven round's sources: its change since x_ref is 0, so it sends nothing (and is
    # not charged); the clients' decoded changes get FedNova's weights
    kw: dict[str, Any] = {"local_work": "uniform", "fraction": 0.5, "seed": 3}
    sim, eng = _both(lambda: presets.fednova(4, 4, compression=compression, **kw), 13)
    np.testing.assert_allclose(sim.params.numpy(), eng.state, rtol=0, atol=1e-10)
    a = _run_sim(presets.fedavg(6, 3, sample_counts=COUNTS, fraction=0.5, seed=2, compression=compression), 10)
    b = _run_sim(presets.fednova(6, 3, sample_counts=COUNTS, fraction=0.5, seed=2, compression=compression), 10)
    assert torch.equal(a.params, b.params) and a.bytes_sent == b.bytes_sent  # equal work: FedAvg's rounds


def test_budget_work_fits_the_fastest_clients_time_on_the_clock() -> None:
    from coopsgd.train.trainer import train

    # speeds 1, 1, 0.5, 0.5 and tau 4: the slow clients run 2 steps of 20 ms in the 40 ms of the fast ones' 4 steps
    base = dict(preset="fedavg", workers=4, tau=4, max_steps=8, batch_size=8, compute="constant", compute_ms=10.0,
                eval_every=8, eval_samples=64, net_latency_ms=0.0, net_bandwidth_mbps=1e6, worker_speeds=[1.0, 0.5])
    budget = train(RunConfig(**base, local_work="budget"))
    equal = train(RunConfig(**base))
    comm = equal["simulated_split_s"]["communication_s"]
    assert budget["simulated_time_s"] == pytest.approx(2 * 0.04 + comm, rel=1e-9)
    assert equal["simulated_time_s"] == pytest.approx(2 * 0.08 + comm, rel=1e-9)  # the slow clients' 4 steps
    split = budget["simulated_split_s"]
    assert split["compute_s"] == pytest.approx(2 * 0.04, rel=1e-9)  # every client busy 40 ms a round
    assert split["idle_s"] == pytest.approx(0.0, abs=1e-12)
