"""Asynchronous server aggregation (FedBuff, asynchronous local SGD): the timeline from the speed classes, a
hand-computed oracle, the server's rule, staleness statistics, determinism, resume, the clock and refusals."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from coopsgd.algorithms import make_preset
from coopsgd.algorithms.asynchronous import AsyncAggregation, AsyncSchedule, async_local_sgd, fedbuff
from coopsgd.engines.asynchronous import AsyncServer
from coopsgd.engines.reference import ReferenceEngine
from coopsgd.engines.simulator import Simulator
from coopsgd.engines.simulator.clock import SimClock
from coopsgd.errors import ConfigError
from coopsgd.theory.cost import ComputeModel
from coopsgd.train import RunConfig

D = 2
LR = 0.1


class Quadratic:
    """Worker i's objective 0.5 ||x - c_i||^2 (deterministic): gradient x - c_i."""

    dim = D
    centers = np.array([[1.0, -2.0], [3.0, 0.5], [-1.0, 4.0]])

    def gradient(self, x: np.ndarray, worker: int, rng: np.random.Generator) -> np.ndarray:
        return x - self.centers[worker]

    def value(self, x: np.ndarray) -> np.ndarray | float:
        x2 = np.atleast_2d(x)
        v = 0.5 * np.sum((x2 - self.centers.mean(axis=0)) ** 2, axis=1)
        return float(v[0]) if np.ndim(x) == 1 else v

    def initial_point(self, rng: np.random.Generator) -> np.ndarray:
        return np.zeros(D)


X0 = np.array([0.5, -0.5])


def _spec():  # 3 workers, speeds 1, 1, 0.5, K = 2, tau = 2, sqrt staleness weights, eta = 0.5
    return fedbuff(3, 2, buffer_size=2, outer_lr=0.5, staleness="sqrt", speeds=(1.0, 1.0, 0.5))


def _oracle() -> tuple[list[np.ndarray], list[int]]:
    """The server model after each of the first 4 steps and the arrivals' staleness, by hand.

    Worker i's local step: x <- x - lr (x - c_i). Speeds 1, 1, 0.5 and tau = 2: workers 0 and 1 step at t = 1,
    2, 3, 4, worker 2 at t = 2, 4; workers 0 and 1 arrive at t = 2 and 4, worker 2 at t = 4 (worker order)."""
    c = Quadratic.centers
    w = lambda s: 1.0 / np.sqrt(1.0 + s)  # noqa: E731
    x = [X0.copy() for _ in range(3)]
    y = [X0.copy() for _ in range(3)]
    v = [0, 0, 0]
    z, version, buf, count = X0.copy(), 0, np.zeros(D), 0
    zs, stale = [], []

    def local(i: int) -> None:
        x[i] = x[i] - LR * (x[i] - c[i])

    def arrive(i: int) -> None:
        nonlocal z, version, buf, count
        s = version - v[i]
        stale.append(s)
        buf = buf + w(s) * (y[i] - x[i])
        count += 1
        if count == 2:
            z = z - 0.5 * (buf / 2)
            buf, count, version = np.zeros(D), 0, version + 1
        x[i], y[i], v[i] = z.copy(), z.copy(), version

    local(0), local(1)  # step 0, t = 1
    zs.append(z.copy())
    local(0), local(1), local(2)  # step 1, t = 2
    arrive(0), arrive(1)
    zs.append(z.copy())
    local(0), local(1)  # step 2, t = 3
    zs.append(z.copy())
    local(0), local(1), local(2)  # step 3, t = 4
    arrive(0), arrive(1), arrive(2)
    zs.append(z.copy())
    return zs, stale


def test_the_timeline_follows_the_speed_classes() -> None:
    s = AsyncSchedule(3, 2, speeds=(1.0, 1.0, 0.5))
    got = [(e.workers, [w for _, w, _ in e.arrivals]) for e in (s.step_events(k) for k in range(4))]
    assert got == [((0, 1), []), ((0, 1, 2), [0, 1]), ((0, 1), []), ((0, 1, 2), [0, 1, 2])]
    np.testing.assert_array_equal(s.active(0), [True, True, False])
    assert s.active(1) is None
    # dynamic local updates: H_i = max(1, round(H s_i / max s)): the slow worker arrives as often as the others
    dyn = AsyncSchedule(3, 4, speeds=(1.0, 1.0, 0.5), dynamic_local_updates=True)
    assert dyn.local_steps.tolist() == [4, 4, 2]
    assert [w for _, w, _ in dyn.step_events(3).arrivals] == [0, 1, 2]
    # a pure function of the step: asking out of order gives the same events
    late = AsyncSchedule(10, 3, concurrency=3, seed=5)
    early = AsyncSchedule(10, 3, concurrency=3, seed=5)
    assert late.step_events(40) == early.step_events(40) and [late.step_events(k) for k in range(41)] == \
        [early.step_events(k) for k in range(41)]


def test_an_arrival_delays_the_next_start_by_the_arrival_time() -> None:
    # speeds 1, 0.5, tau 2, arrival 0.5: worker 0 steps at t = 1, 2 (arrives), 3.5, 4.5 (arrives), 6, 7, ...; worker 1
    # at t = 2, 4 (arrives), 6.5, 8.5 (arrives)
    s = AsyncSchedule(2, 2, speeds=(1.0, 0.5), arrival_time=0.5)
    ev = [s.step_events(k) for k in range(7)]
    assert [float(e.time) for e in ev] == [1.0, 2.0, 3.5, 4.0, 4.5, 6.0, 6.5]
    assert [e.workers for e in ev] == [(0,), (0, 1), (0,), (1,), (0,), (0,), (1,)]
    assert [[w for _, w, _ in e.arrivals] for e in ev] == [[], [0], [], [1], [0], [], []]
    # the simulator binds it from its clock: one worker's push and pull over a speed-1 step's mean compute time
    clock = SimClock(compute=ComputeModel(mean_s=0.01), speeds=(1.0, 0.5))
    sim = Simulator(fedbuff(2, 2), lambda: nn.Linear(4, 3), clock=clock, executor="loop")
    push_pull = sum(clock.network.round_time(c) for c in clock.arrival_costs())
    assert sim.spec.schedule.arrival_time == pytest.approx(push_pull / 0.01)
    for k in range(12):  # the workers' clocks are the timeline in seconds: each step ends at its event's time
        sim.step(_batches(2, k), 0.1)
        e = sim.spec.schedule.step_events(k)
        for w in e.workers:
            arrived = any(a[1] == w for a in e.arrivals)
            assert sim.clock.t[w] == pytest.approx(0.01 * float(e.time) + (push_pull if arrived else 0.0), rel=1e-12)


def test_fedbuff_matches_a_hand_computed_oracle_on_both_engines() -> None:
    zs, stale = _oracle()
    eng = ReferenceEngine(_spec(), Quadratic(), X0)
    infos = []
    for k in range(4):
        infos.append(eng.step(None, LR).info)
        np.testing.assert_allclose(eng.state[3], zs[k], rtol=0, atol=1e-14)
    assert [s for i in infos for s in i["staleness"]] == stale == [0, 0, 1, 0, 2]
    # the simulator: a linear model with loss 0.5 ||x - c_i||^2 on worker i's one "batch"
    sim = Simulator(_spec(), lambda: nn.Linear(D, 1, bias=False), loss_fn=lambda out, tgt: 0.5 * ((out - tgt) ** 2).sum(),
                    dtype=torch.float64, executor="loop", init_params=torch.from_numpy(X0), clock=SimClock())
    eye = torch.eye(D, dtype=torch.float64)
    for k in range(4):
        batches = [(eye, torch.from_numpy(Quadratic.centers[i][:, None].copy())) for i in range(3)]
        st = sim.step(batches, LR)
        np.testing.assert_allclose(sim.params[3].numpy(), zs[k], rtol=0, atol=1e-14)
    assert st.info["staleness"] == [1, 0, 2] and st.communicated
    assert sim.async_record() == {"arrivals": 5, "server_updates": 2, "staleness_mean": pytest.approx(0.6),
                                  "staleness_max": 2}


def test_the_server_rule_is_torch_nesterov_and_delays_its_momentum() -> None:
    rng = np.random.default_rng(0)
    deltas = rng.standard_normal((6, 3))
    # N = 1: torch.optim.SGD(nesterov=True) on z with the pseudo-gradients as gradients
    srv = AsyncServer(AsyncAggregation(lr=0.7, momentum=0.9), np.zeros((1, 3)), lambda: np.zeros(3))
    z = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.SGD([z], lr=0.7, momentum=0.9, nesterov=True)
    mine = np.zeros(3)
    for g in deltas:
        srv.buffer[:] = g
        srv._server_step(mine)
        z.grad = torch.from_numpy(g.copy())
        opt.step()
    np.testing.assert_allclose(mine, z.detach().numpy(), rtol=1e-13)
    # N = 2, beta 0.9, lr 1, g = 1 at every arrival, by hand: t = 1: z moves g/2 = 0.5; t = 2: u = 0.9*0 + 1 = 1,
    # z moves 0.5 + 0.9*1 = 1.4; t = 3: 0.5; t = 4: u = 0.9*1 + 1 = 1.9, z moves 0.5 + 0.9*1.9 = 2.21
    srv = AsyncServer(AsyncAggregation(lr=1.0, momentum=0.9, delayed_nesterov=2), np.zeros((1, 1)), lambda: np.zeros(1))
    z1, moves = np.zeros(1), []
    for _ in range(4):
        before = float(z1[0])
        srv.buffer[:] = 1.0
        srv._server_step(z1)
        moves.append(before - float(z1[0]))
    np.testing.assert_allclose(moves, [0.5, 1.4, 0.5, 2.21], rtol=1e-14)
    # N = 2 on varying pseudo-gradients: g/2 at t = 1, 3, 5; momentum on the mean of the last two at t = 2, 4, 6
    srv = AsyncServer(AsyncAggregation(lr=0.7, momentum=0.9, delayed_nesterov=2), np.zeros((1, 3)), lambda: np.zeros(3))
    mine, ref, u, acc = np.zeros(3), np.zeros(3), np.zeros(3), np.zeros(3)
    for t, g in enumerate(deltas, start=1):
        srv.buffer[:] = g
        srv._server_step(mine)
        acc = acc + g
        if t % 2 == 0:
            u = 0.9 * u + acc / 2
            ref = ref - 0.7 * (g / 2 + 0.9 * u)
            acc = np.zeros(3)
        else:
            ref = ref - 0.7 * g / 2
        np.testing.assert_allclose(mine, ref, rtol=1e-13)


def _sim(spec, seed: int = 3) -> Simulator:
    torch.manual_seed(0)
    return Simulator(spec, lambda: nn.Linear(4, 3), loss_fn=F.cross_entropy, dtype=torch.float64, executor="loop",
                     seed=seed, clock=SimClock(compute=ComputeModel(mean_s=0.01), speeds=(1.0, 0.5)))


def _batches(m: int, k: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1000 + k)
    return [(torch.randn(5, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (5,), generator=g))
            for _ in range(m)]


def _run(sim: Simulator, steps: range) -> list[dict]:
    out = []
    for k in steps:
        out.append(sim.step(_batches(sim.m, k), 0.2).info)
    return out


def test_fedbuff_is_deterministic_for_a_seed_and_the_draws_follow_it() -> None:
    spec = lambda seed: fedbuff(6, 2, buffer_size=2, concurrency=3, seed=seed)  # noqa: E731
    a, b, c = _sim(spec(1)), _sim(spec(1)), _sim(spec(2))
    ia, ib, ic = _run(a, range(12)), _run(b, range(12)), _run(c, range(12))
    assert torch.equal(a.params, b.params) and ia == ib
    assert a.clock.t.tolist() == b.clock.t.tolist()
    assert ia != ic  # another seed draws other clients
    # the slots run at the clock's speed classes: workers 3-5 (speed 0.5) step half as often
    assert a.spec.schedule.speeds == (1.0, 0.5)


def test_staleness_statistics_reach_the_records_and_the_summary(tmp_path) -> None:
    from coopsgd.train.trainer import train

    cfg = RunConfig(preset="fedbuff", workers=4, tau=2, buffer_size=2, max_steps=8, batch_size=8, eval_every=8,
                    eval_samples=32, compute="constant", out=str(tmp_path / "r"))
    summary = train(cfg)
    # 4 workers of one speed, tau 2: all four arrive together, in worker order, every 2 steps (16 arrivals, 8 server
    # steps). Staleness: round 1: 0 0 1 1; rounds 2-4: 2 1 2 1 (w0 pulled before the step its neighbour triggered)
    assert summary["arrivals"] == 16 and summary["server_updates"] == 8
    assert summary["staleness_mean"] == pytest.approx(20 / 16) and summary["staleness_max"] == 2
    last = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()][-1]
    assert last["arrivals"] == 16 and last["staleness_max"] == 2


def test_resume_mid_buffer_is_bit_exact() -> None:
    spec = lambda: async_local_sgd(4, 3, outer_lr=0.5, delayed_nesterov=2)  # noqa: E731
    full = _sim(spec())
    _run(full, range(9))
    first = _sim(spec())
    _run(first, range(4))
    saved = first.state_dict()
    fb = lambda: fedbuff(4, 2, buffer_size=3, concurrency=3, staleness="poly", staleness_exponent=0.7)  # noqa: E731
    a = _sim(fb())
    _run(a, range(3))
    assert a._async is not None and a._async.ledger["buffered"] > 0  # a partly filled buffer
    mid = a.state_dict()
    resumed = _sim(spec())
    resumed.load_state_dict(saved)
    _run(resumed, range(4, 9))
    assert torch.equal(resumed.params, full.params)
    assert resumed.async_record() == full.async_record()
    b = _sim(fb())
    b.load_state_dict(mid)
    _run(a, range(3, 10))
    _run(b, range(3, 10))
    assert torch.equal(a.params, b.params) and a._async.ledger == b._async.ledger
    assert a.clock.t.tolist() == b.clock.t.tolist()


def test_an_arrival_charges_the_arriving_worker_alone() -> None:
    clock = SimClock(compute=ComputeModel(mean_s=0.01)).bind(4, 1000, 4.0)
    clock.add_compute(None)
    before = clock.t.copy()
    c = clock.arrive(1, 3, clock.arrival_costs())
    assert c > 0.0
    assert clock.t[1] == pytest.approx(before[1] + c) and clock.t[3] == clock.t[1]
    assert clock.t[0] == before[0] and clock.t[2] == before[2]
    assert clock.waited[3] == pytest.approx(c) and clock.waited[0] == 0.0
    assert clock.elapsed == pytest.approx(clock.compute_s + clock.idle_s + clock.communication_s)


def test_bad_settings_are_refused() -> None:
    for kwargs, field in (({"buffer_size": 0}, "buffer_size"), ({"staleness": "linear"}, "staleness"),
                          ({"concurrency": 9}, "concurrency"), ({"concurrency": 2, "fraction": 0.5}, "concurrency"),
                          ({"compression": "topk:0.1"}, "compress")):
        with pytest.raises(ConfigError, match=field):
            fedbuff(8, **kwargs)
    with pytest.raises(ConfigError, match="delayed_nesterov"):
        async_local_sgd(4, delayed_nesterov=0)
    with pytest.raises(ConfigError, match="concurrency"):  # one rank per client, every one training
        RunConfig(preset="fedbuff", engine="distributed", workers=4, concurrency=2)
    with pytest.raises(ConfigError, match="fraction"):
        RunConfig(preset="fedbuff", engine="distributed", workers=4, fraction=0.5)
    with pytest.raises(ConfigError, match="worker_speeds"):
        Simulator(fedbuff(2, speeds=(1.0, 0.5)), lambda: nn.Linear(2, 1), clock=SimClock(speeds=(1.0,)))
    assert make_preset("async_local_sgd", 4).inner_optimizer == "adamw"


def test_cli_refuses_a_zero_buffer_in_one_line(capsys) -> None:
    from coopsgd.cli import main

    assert main(["run", "--preset", "fedbuff", "--buffer-size", "0"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "buffer_size" in lines[0] and ">= 1" in lines[0]


@pytest.mark.parametrize("extra", [[], ["--worker-speeds", "1"], ["--engine", "distributed", "--worker-speeds", "1,0.5"]])
def test_cli_refuses_dynamic_local_updates_where_they_change_nothing(capsys, extra) -> None:
    from coopsgd.cli import main

    assert main(["run", "--preset", "async_local_sgd", "--workers", "4", "--dynamic-local-updates", *extra]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "dynamic_local_updates=True" in lines[0]
    assert ("distributed" if "--engine" in extra else "speed classes") in lines[0]
    RunConfig(preset="async_local_sgd", workers=4, dynamic_local_updates=True, worker_speeds=[1.0, 0.5])  # accepted


def test_theory_says_no_bound_applies(capsys) -> None:
    from coopsgd.cli import main

    assert main(["theory", "--preset", "fedbuff", "--workers", "4", "--L", "1", "--sigma2", "1", "--lr", "0.01",
                 "--steps", "100", "--f-gap", "1", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["bounds"]["asynchronous"].startswith("no convergence bound applies")
    assert out["asynchronous_server"]["buffer_size"] == 4
    assert any("no convergence bound" in n for n in out["notes"])


def test_a_dropped_round_restores_the_server_state() -> None:
    sim = Simulator(fedbuff(3, 2, buffer_size=2), lambda: nn.Linear(4, 3), loss_fn=F.cross_entropy,
                    dtype=torch.float64, executor="loop", nan_policy="skip", clock=SimClock())
    sim.step(_batches(3, 0), 0.2)
    assert sim.check_health() is None  # the state after step 0 is the last good one
    good, ledger = sim.params.clone(), dict(sim._async.ledger)  # type: ignore[union-attr]
    bad = _batches(3, 1)
    bad[0] = (torch.full_like(bad[0][0], float("nan")), bad[0][1])
    st = sim.step(bad, 0.2)
    assert st.skipped and st.communicated and st.info["arrivals"] == []  # the slots' rounds end, nothing applied
    dropped = sim.check_health()
    assert dropped is not None and dropped.workers == [0]
    arrivals = sim.spec.schedule.step_events(1).arrivals  # type: ignore[attr-defined]
    pulled = {n for _, _, n in arrivals}
    z = good[3]
    for i in range(4):  # z and the other rows as before; the slots' next workers pulled z
        assert torch.equal(sim.params[i], z if i in pulled else good[i])
    after = sim._async.ledger  # type: ignore[union-attr]
    assert {k: v for k, v in after.items() if k != "pulled_version"} == \
        {k: v for k, v in ledger.items() if k != "pulled_version"}
    assert all(after["pulled_version"][j] == ledger["version"] for j, _, _ in arrivals)
    for k in range(2, 6):
        sim.step(_batches(3, k), 0.2)
    assert sim.async_record()["arrivals"] == 6 and bool(torch.isfinite(sim.params).all())


def test_the_reset_policy_restarts_a_pulling_workers_optimizer() -> None:
    from coopsgd.algorithms.spec import Policies

    spec = async_local_sgd(2, 2, speeds=(1.0, 0.5), policies=Policies(optimizer_state="reset"))
    sim = Simulator(spec, lambda: nn.Linear(4, 3), dtype=torch.float64, executor="loop", clock=SimClock())
    sim.step(_batches(2, 0), 0.01)  # worker 0 steps
    st = sim.step(_batches(2, 1), 0.01)  # both step; worker 0 arrives and pulls
    assert st.info["arrivals"] == [0]
    state = sim.optimizer_state
    assert all(bool((v[0] == 0).all()) and bool((v[1] != 0).any()) for v in state.values())
    assert sim.optimizer_steps.tolist() == [0, 1]
    with pytest.raises(ConfigError, match="optimizer_state"):
        async_local_sgd(2, policies=Policies(optimizer_state="mix"))


def test_the_timeline_cache_is_bounded_and_an_old_step_is_recomputed() -> None:
    s = AsyncSchedule(5, 3, concurrency=2, speeds=(1.0, 0.3), seed=1, arrival_time=0.25)
    late = s.step_events(2000)
    assert len(s._events) <= 512
    early = s.step_events(3)  # older than the cache: computed again from the start
    fresh = AsyncSchedule(5, 3, concurrency=2, speeds=(1.0, 0.3), seed=1, arrival_time=0.25)
    assert early == fresh.step_events(3) and s.step_events(2000) == late == fresh.step_events(2000)


class _Poisoned:
    """Worker i's objective 0.5 ||x - c_i||^2 over 6 workers; the worker ``poison`` returns a NaN gradient."""

    dim = D
    centers = np.array([[1.0, -2.0], [3.0, 0.5], [-1.0, 4.0], [2.0, 2.0], [-3.0, 1.0], [0.5, -1.5]])

    def __init__(self) -> None:
        self.poison: int | None = None

    def gradient(self, x: np.ndarray, worker: int, rng: np.random.Generator) -> np.ndarray:
        return np.full(D, np.nan) if worker == self.poison else x - self.centers[worker]

    def value(self, x: np.ndarray) -> np.ndarray | float:
        v = 0.5 * np.sum((np.atleast_2d(x) - self.centers.mean(axis=0)) ** 2, axis=1)
        return float(v[0]) if np.ndim(x) == 1 else v

    def initial_point(self, rng: np.random.Generator) -> np.ndarray:
        return np.zeros(D)


def _pulls_by_hand(rows, server, ledger: dict, pulled, event) -> None:
    """The oracle's pulls of a step whose updates are not applied: x_next <- z, y_j <- z, v_j <- version."""
    for j, _, nxt in event.arrivals:
        rows[nxt] = rows[server]
        pulled[j] = rows[server]
        ledger["pulled_version"][j] = ledger["version"]


BAD = 7  # an arrival step of fedbuff(6, 2, K = 1, C = 2, seed 3): slot 1 passes from worker 0 to 1, slot 0 5 -> 0


def test_a_dropped_arrival_step_still_hands_its_slots_on_reference() -> None:
    spec = lambda: fedbuff(6, 2, buffer_size=1, concurrency=2, outer_lr=0.5, seed=3)  # noqa: E731
    a = ReferenceEngine(spec(), _Poisoned(), X0, nan_policy="skip")
    b = ReferenceEngine(spec(), _Poisoned(), X0, nan_policy="skip")
    for _ in range(BAD):
        a.step(None, LR), b.step(None, LR)
        assert a.check_health() is None and b.check_health() is None
    event = a.spec.schedule.step_events(BAD)  # type: ignore[attr-defined]
    assert len(event.arrivals) == 2 and len({w for _, w, _ in event.arrivals}) == 2
    a.objective.poison = event.arrivals[0][1]  # type: ignore[attr-defined]
    assert a.step(None, LR).skipped
    a.objective.poison = None  # type: ignore[attr-defined]
    assert a.check_health() is not None
    assert a._async is not None and b._async is not None
    for j, _, nxt in event.arrivals:  # the invariant: each slot's new worker starts from the copy it pulled
        assert np.array_equal(a.state[nxt], a._async.pulled[j]) and np.array_equal(a.state[nxt], a.state[6])
    # the oracle: the same run where step BAD's updates are simply not applied (its pulls are)
    _pulls_by_hand(b.state, 6, b._async.ledger, b._async.pulled, event)
    b.step_count += 1
    np.testing.assert_array_equal(a.state, b.state)
    assert a._async.ledger == b._async.ledger
    for _ in range(BAD + 1, BAD + 12):
        a.step(None, LR), b.step(None, LR)
        a.check_health()
        np.testing.assert_array_equal(a.state, b.state)
    assert a._async.ledger == b._async.ledger and a._async.ledger["arrivals"] > 8


def test_a_dropped_arrival_step_still_hands_its_slots_on_simulator() -> None:
    def make() -> Simulator:
        torch.manual_seed(0)
        return Simulator(fedbuff(6, 2, buffer_size=1, concurrency=2, seed=3), lambda: nn.Linear(4, 3),
                         loss_fn=F.cross_entropy, dtype=torch.float64, executor="loop", nan_policy="skip",
                         clock=SimClock())

    a, b = make(), make()
    for k in range(BAD):
        a.step(_batches(6, k), 0.2), b.step(_batches(6, k), 0.2)
        assert a.check_health() is None and b.check_health() is None
    event = a.spec.schedule.step_events(BAD)  # type: ignore[attr-defined]
    bad = _batches(6, BAD)
    bad[event.arrivals[0][1]] = (torch.full_like(bad[0][0], float("nan")), bad[0][1])
    assert a.step(bad, 0.2).skipped and a.check_health() is not None
    assert a._async is not None and b._async is not None
    for j, _, nxt in event.arrivals:
        assert torch.equal(a.rows_params[nxt], a._async.pulled[j]) and torch.equal(a.rows_params[nxt], a.rows_params[6])
    _pulls_by_hand(b.rows_params, 6, b._async.ledger, b._async.pulled, event)
    b.step_count += 1
    assert torch.equal(a.params, b.params) and a._async.ledger == b._async.ledger
    for k in range(BAD + 1, BAD + 10):
        a.step(_batches(6, k), 0.2), b.step(_batches(6, k), 0.2)
        assert a.check_health() is None
        assert torch.equal(a.params, b.params)
    assert a._async.ledger == b._async.ledger and a._async.ledger["arrivals"] > 8
