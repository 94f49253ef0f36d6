"""Robust aggregation and simulated Byzantine clients (issue 26, item 6).

* each rule (median, trimmed mean, Krum, multi-Krum) against a hand computation on small arrays, ties and
  even / odd counts included, in numpy and in torch;
* the attacks' definitions (sign flip, Gaussian noise seeded per (round, client), scaling) and the seeded
  Byzantine set;
* ``aggregation="mean"`` without attackers is FedAvg bit for bit;
* the simulator equals the reference engine to 1e-10 (float64) with median and Krum under attack, with a
  server optimizer too; the reference engine equals rounds written out by hand;
* resume is bit-exact with attackers; bad settings and unsupported combinations are one-line refusals.
"""

from __future__ import annotations

import io
from typing import Any, cast

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from coopsgd.algorithms import presets
from coopsgd.algorithms.robust import RobustAggregation, aggregate_np, attack_np
from coopsgd.algorithms.spec import AlgorithmSpec
from coopsgd.engines.aggregation import aggregate, attack_
from coopsgd.engines.base import NonFiniteError
from coopsgd.engines.kernel import RoundKernel
from coopsgd.engines.optim import SGDOptions
from coopsgd.engines.reference import ReferenceEngine
from coopsgd.engines.simulator import Simulator
from coopsgd.errors import ConfigError

D, N, B = 4, 30, 5
LR = 0.05
ALL = slice(0, None)


class LeastSquares:
    """``F(x) = mean_n (a_n^T x - y_n)^2``; worker i's k-th gradient uses its k-th deterministic batch."""

    def __init__(self, workers: int, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.dim = D
        self.A = rng.standard_normal((N, D))
        self.y = self.A @ rng.standard_normal(D) + 0.3 * rng.standard_normal(N)
        self.calls = [0] * workers
        self.seed = seed

    def batch(self, worker: int, k: int) -> np.ndarray:
        return np.random.default_rng([self.seed, worker, k]).choice(N, size=B, replace=False)

    def value(self, x: np.ndarray) -> np.ndarray | float:
        r = np.atleast_2d(x) @ self.A.T - self.y
        v = np.mean(r * r, axis=1)
        return float(v[0]) if np.ndim(x) == 1 else v

    def grad_at(self, x: np.ndarray, worker: int, k: int) -> np.ndarray:
        idx = self.batch(worker, k)
        Ab = self.A[idx]
        return 2.0 / B * Ab.T @ (Ab @ x - self.y[idx])

    def gradient(self, x: np.ndarray, worker: int, rng: np.random.Generator) -> np.ndarray:
        g = self.grad_at(x, worker, self.calls[worker])
        self.calls[worker] += 1
        return g

    def initial_point(self, rng: np.random.Generator) -> np.ndarray:
        return rng.standard_normal(D)


def _sim(spec: AlgorithmSpec, executor: str = "loop") -> Simulator:
    return Simulator(spec, lambda: nn.Linear(D, 1, bias=False), loss_fn=F.mse_loss, dtype=torch.float64, seed=4,
                     optimizer="sgd", executor=executor)


def _feed(sim: Simulator, obj: LeastSquares, counters: list[int]) -> None:
    mask = sim.spec.schedule.active(sim.step_count)
    batches: list[Any] = []
    for i in range(sim.m):
        if mask is None or mask[i]:
            idx = obj.batch(i, counters[i])
            batches.append((torch.from_numpy(obj.A[idx]), torch.from_numpy(obj.y[idx, None])))
            counters[i] += 1
        else:
            batches.append(None)
    sim.step(batches, LR)


def _run_sim(spec: AlgorithmSpec, steps: int) -> Simulator:
    obj, sim, counters = LeastSquares(spec.workers), _sim(spec), [0] * spec.workers
    for _ in range(steps):
        _feed(sim, obj, counters)
    return sim


def _rob(rule: str, k: int = 5, **kw: Any) -> RobustAggregation:
    return RobustAggregation(rule=rule, workers=k, clients=k, **kw)


def _both_ways(rob: RobustAggregation, X: np.ndarray, w: np.ndarray | None = None) -> np.ndarray:
    """The numpy and the torch aggregate (asserted equal to 1e-15); returns the numpy one."""
    w = np.full(X.shape[0], 1.0 / X.shape[0]) if w is None else w
    a = aggregate_np(rob, X, w, ALL)
    t = aggregate(rob, torch.from_numpy(X), torch.from_numpy(w), ALL)
    assert t.shape == (1, X.shape[1])
    np.testing.assert_allclose(t[0].numpy(), a, rtol=0, atol=1e-15)
    return a


# -- the rules by hand ---------------------------------------------------------------------------------------

def test_median_odd_even_and_ties() -> None:
    X = np.array([[1.0, 5.0], [3.0, 5.0], [2.0, -1.0], [100.0, 5.0], [-7.0, 0.0]])
    np.testing.assert_array_equal(_both_ways(_rob("median"), X), [2.0, 5.0])  # odd: the middle value, a tie
    X4 = X[:4]
    np.testing.assert_array_equal(_both_ways(_rob("median", 4), X4), [2.5, 5.0])  # even: mean of the middle two
    # the weights do not matter
    np.testing.assert_array_equal(_both_ways(_rob("median", 4), X4, np.array([0.7, 0.1, 0.1, 0.1])), [2.5, 5.0])


def test_trimmed_mean_drops_b_at_each_end() -> None:
    X = np.array([[1.0], [2.0], [3.0], [4.0], [100.0], [-50.0], [5.0], [6.0], [7.0], [8.0]])
    # trim 0.2 of 10: b = 2 -> drop -50, 1 and 8, 100: mean of 2..7
    np.testing.assert_allclose(_both_ways(_rob("trimmed_mean", 10, trim=0.2), X), [4.5], rtol=0, atol=1e-15)
    # trim 0.15 of 10: b = floor(1.5) = 1 -> drop -50 and 100
    np.testing.assert_allclose(_both_ways(_rob("trimmed_mean", 10, trim=0.15), X), [36.0 / 8], rtol=0, atol=1e-15)
    # trim 0: the unweighted mean; ties are dropped one copy at a time
    T = np.array([[1.0], [1.0], [1.0], [9.0]])
    np.testing.assert_allclose(_both_ways(_rob("trimmed_mean", 4, trim=0.0), T), [3.0], rtol=0, atol=1e-15)
    np.testing.assert_allclose(_both_ways(_rob("trimmed_mean", 4, trim=0.25), T), [1.0], rtol=0, atol=1e-15)


def _krum_by_hand(X: np.ndarray, f: int) -> np.ndarray:
    k = len(X)
    scores = []
    for i in range(k):
        d = sorted(float(((X[i] - X[j]) ** 2).sum()) for j in range(k) if j != i)
        scores.append(sum(d[: k - f - 2]))
    return np.array(scores)


def test_krum_and_multi_krum_by_hand() -> None:
    X = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [10.0, 10.0], [-9.0, 4.0]])
    f = 1  # k - f - 2 = 3 neighbours
    s = _krum_by_hand(X, f)
    # row 0: distances 1, 1, 2, 200, 97 -> 1 + 1 + 2 = 4; row 3: 2, 1, 1, 162, 109 -> 4; rows 1, 2: 1 + 1 + 2 = 4
    np.testing.assert_array_equal(s[:4], [4.0, 4.0, 4.0, 4.0])
    # a four-way tie: Krum takes the lowest index
    np.testing.assert_array_equal(_both_ways(_rob("krum", 6, krum_f=f), X), X[0])
    # multi-Krum keeps k - f = 5 by default: the 4 honest ones and the better outlier (row 5: 81+16... < row 4)
    order = np.argsort(s, kind="stable")[:5]
    w = np.array([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    w = w / w.sum()
    keep = np.sort(order)
    expect = (w[keep] / w[keep].sum()) @ X[keep]
    got = _both_ways(_rob("multi_krum", 6, krum_f=f), X, w)
    np.testing.assert_allclose(got, expect, rtol=0, atol=1e-15)
    # keep 4: the mean of the four honest rows with their weights
    got4 = _both_ways(_rob("multi_krum", 6, krum_f=f, multi_krum_keep=4), X, w)
    np.testing.assert_allclose(got4, (w[:4] / w[:4].sum()) @ X[:4], rtol=0, atol=1e-15)
    # keeping all k is the weighted mean
    np.testing.assert_allclose(_both_ways(_rob("multi_krum", 6, krum_f=f, multi_krum_keep=6), X, w), w @ X,
                               rtol=0, atol=1e-14)


def test_krum_f_defaults_to_the_byzantine_share_of_a_round() -> None:
    r = RobustAggregation(rule="krum", workers=20, clients=10, byzantine_fraction=0.2)
    assert r.f == 2 and r.byzantine_count == 4
    assert RobustAggregation(rule="multi_krum", workers=20, clients=10, byzantine_fraction=0.2).keep == 8
    assert RobustAggregation(rule="trimmed_mean", workers=5, clients=5).trimmed(5) == 1  # default trim 0.2


# -- attacks -------------------------------------------------------------------------------------------------

def test_attack_definitions_and_the_byzantine_set() -> None:
    m = 10
    r = RobustAggregation(rule="median", workers=m, clients=m, seed=3, byzantine_fraction=0.3)
    bad = r.byzantine()
    assert bad.size == 3 and np.all(np.diff(bad) > 0)
    np.testing.assert_array_equal(bad, RobustAggregation(rule="krum", workers=m, clients=m, seed=3,
                                                         byzantine_fraction=0.3).byzantine())  # a function of the seed
    assert not np.array_equal(bad, RobustAggregation(rule="median", workers=m, clients=m, seed=4,
                                                     byzantine_fraction=0.3).byzantine())
    rng = np.random.default_rng(0)
    X, z = rng.standard_normal((m, 3)), rng.standard_normal(3)
    src = np.arange(m)
    honest = np.setdiff1d(src, bad)
    for attack, expect in [("sign_flip", lambda i: z - (X[i] - z)),
                           ("scale", lambda i: z + 4.0 * (X[i] - z)),
                           ("gaussian", lambda i: z + 0.5 * np.random.default_rng([3, 0xB12, 7, i]).standard_normal(3))]:
        ra = RobustAggregation(rule="median", workers=m, clients=m, seed=3, byzantine_fraction=0.3, attack=attack,
                               attack_std=0.5, attack_scale=4.0)
        sent = attack_np(ra, X, z, src, 7, ALL)
        np.testing.assert_array_equal(sent[honest], X[honest])  # the honest clients send what they have
        for i in bad.tolist():
            np.testing.assert_allclose(sent[i], expect(i), rtol=0, atol=1e-15)
        T = torch.from_numpy(X.copy())
        attack_(ra, T, torch.from_numpy(z), src, 7, ALL)
        np.testing.assert_allclose(T.numpy(), sent, rtol=0, atol=1e-15)
    # the Gaussian draw depends on the round and the client
    ra = RobustAggregation(rule="median", workers=m, clients=m, seed=3, attack="gaussian")
    assert not np.array_equal(ra.noise(1, 2, 3), ra.noise(2, 2, 3))
    assert not np.array_equal(ra.noise(1, 2, 3), ra.noise(1, 5, 3))


# -- engines -------------------------------------------------------------------------------------------------

def test_mean_without_attackers_is_fedavg_bit_for_bit() -> None:
    m, tau = 6, 2
    kw: dict[str, Any] = {"fraction": 0.5, "seed": 3}
    spec = presets.fedavg(m, tau, aggregation="mean", trim=0.3, attack="gaussian", **kw)
    assert spec.robust is None
    a, b = _run_sim(spec, 9), _run_sim(presets.fedavg(m, tau, **kw), 9)
    assert torch.equal(a.params, b.params)
    # the robust path with keep-all multi-Krum computes the same mean (not bit for bit: another summation)
    c = _run_sim(presets.fedavg(m, tau, aggregation="multi_krum", krum_f=0, multi_krum_keep=3, **kw), 9)
    np.testing.assert_allclose(c.params.numpy(), b.params.numpy(), rtol=0, atol=1e-12)


def _hand_rounds(m: int, tau: int, rounds: int, rob: RobustAggregation, fraction: float, seed: int,
                 x0: np.ndarray) -> np.ndarray:
    """FedAvg with a robust rule, written out: sampled clients, tau local SGD steps, attack, rule."""
    obj = LeastSquares(m)
    k = max(1, int(round(fraction * m)))
    z = x0.copy()
    calls = [0] * m
    for r in range(rounds):
        chosen = np.arange(m) if k == m else np.sort(np.random.default_rng([seed, r]).choice(m, size=k, replace=False))
        Y = []
        for i in chosen.tolist():
            y = z.copy()
            for _ in range(tau):
                y = y - LR * obj.grad_at(y, i, calls[i])
                calls[i] += 1
            Y.append(y)
        sent = attack_np(rob, np.array(Y), z, chosen, r, ALL)
        z = aggregate_np(rob, sent, np.full(k, 1.0 / k), ALL)
    return z


@pytest.mark.parametrize("rule,attack", [("median", "sign_flip"), ("krum", "gaussian"), ("trimmed_mean", "scale"),
                                         ("multi_krum", "sign_flip")])
def test_reference_equals_the_hand_written_rounds(rule: str, attack: str) -> None:
    m, tau, rounds = 8, 2, 4
    kw: dict[str, Any] = {"fraction": 0.75, "seed": 5, "byzantine_fraction": 0.25, "attack": attack}
    spec = presets.fedavg(m, tau, aggregation=rule, **kw)
    assert spec.robust is not None and spec.robust.byzantine().size == 2
    x0 = np.linspace(-1.0, 1.0, D)
    eng = ReferenceEngine(spec, LeastSquares(m), x0)
    for _ in range(rounds * tau):
        eng.step(None, LR)
    z = _hand_rounds(m, tau, rounds, spec.robust, 0.75, 5, x0)
    np.testing.assert_allclose(eng.state[m], z, rtol=0, atol=1e-12)
    np.testing.assert_allclose(eng.state[:m], np.tile(z, (m, 1)), rtol=0, atol=1e-12)


@pytest.mark.parametrize("name,rule,attack,fraction,executor", [
    ("fedavg", "median", "sign_flip", 0.5, "loop"),
    ("fedavg", "median", "gaussian", 0.5, "vmap"),
    ("fedavg", "krum", "gaussian", 1.0, "loop"),
    ("fedavg", "trimmed_mean", "scale", 0.75, "loop"),
    ("fedadam", "median", "gaussian", 0.75, "loop"),
    ("fedavgm", "multi_krum", "sign_flip", 1.0, "vmap"),
])
def test_simulator_equals_reference(name: str, rule: str, attack: str, fraction: float, executor: str) -> None:
    m, tau, steps = 8, 2, 11  # 5 rounds and one local step
    def spec() -> AlgorithmSpec:
        return presets.make_preset(name, m, tau=tau, fraction=fraction, seed=2, aggregation=rule,
                                   byzantine_fraction=0.25, attack=attack, attack_std=0.3)
    s = spec()
    sim = _sim(s, executor)
    eng = ReferenceEngine(spec(), LeastSquares(m), sim.params[0].numpy().copy())
    obj, counters = LeastSquares(m), [0] * m
    for _ in range(steps):
        _feed(sim, obj, counters)
        eng.step(None, LR)
    np.testing.assert_allclose(sim.params.numpy(), eng.state, rtol=0, atol=1e-10)
    # the attack changed the run
    plain = ReferenceEngine(presets.make_preset(name, m, tau=tau, fraction=fraction, seed=2, aggregation=rule),
                            LeastSquares(m), sim.params[0].numpy().copy())
    for _ in range(steps):
        plain.step(None, LR)
    assert np.abs(plain.state[m] - eng.state[m]).max() > 1e-6


def test_median_and_krum_resist_a_reversed_scaled_update_where_the_mean_does_not() -> None:
    m, tau, rounds = 10, 2, 30
    obj = LeastSquares(m)
    x_star = np.linalg.lstsq(obj.A, obj.y, rcond=None)[0]
    out = {}
    for rule in ("mean", "median", "krum"):
        spec = presets.fedavg(m, tau, seed=1, aggregation=rule, byzantine_fraction=0.3, attack="scale",
                              attack_scale=-4.0)
        eng = ReferenceEngine(spec, LeastSquares(m), np.zeros(D))
        for _ in range(rounds * tau):
            eng.step(None, LR)
        out[rule] = float(np.linalg.norm(eng.state[m] - x_star))
    assert out["median"] < 0.5 and out["krum"] < 0.5
    assert out["mean"] > 10 * out["median"]


@pytest.mark.parametrize("attack", ["gaussian", "sign_flip"])
def test_resume_is_bit_exact_with_attackers(attack: str) -> None:
    m, tau = 6, 2
    def spec() -> AlgorithmSpec:
        return presets.fedavg(m, tau, fraction=0.5, seed=1, aggregation="median", byzantine_fraction=0.34,
                              attack=attack)
    full = _run_sim(spec(), 9)
    obj = LeastSquares(m)
    first = _sim(spec())
    counters = [0] * m
    for _ in range(5):
        _feed(first, obj, counters)
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)
    buf.seek(0)
    second = _sim(spec())
    second.load_state_dict(torch.load(buf, weights_only=True))
    for _ in range(4):
        _feed(second, obj, counters)
    assert torch.equal(full.params, second.params)


def test_an_attacked_round_touches_only_the_sampled_rows() -> None:
    """A round of 2 of 8 clients with a Gaussian attacker is applied in place: the aggregate reaches the other
    clients through the deferred broadcast, and every client reads it."""
    m, tau = 8, 2
    spec = presets.fedavg(m, tau, fraction=0.25, seed=0, aggregation="median", byzantine_fraction=0.5,
                          attack="gaussian")
    obj, sim, counters = LeastSquares(m), _sim(spec), [0] * m
    for _ in range(tau):
        _feed(sim, obj, counters)
    pend = sim._comm.deferred
    assert pend is not None and pend[:m].all()
    z = sim._state[m, sim.b : sim.b + sim.d].clone()
    np.testing.assert_array_equal(sim.params.numpy(), np.tile(z.numpy(), (m + 1, 1)))


def test_a_non_finite_attack_leaves_the_state_unchanged() -> None:
    m, tau = 4, 2
    spec = presets.fedavg(m, tau, seed=1, byzantine_fraction=0.5, attack="gaussian", attack_std=1.7e308)
    assert spec.robust is not None and max(np.abs(spec.robust.noise(0, int(c), D)).max() for c in spec.robust.byzantine()) > 1.1
    assert spec.robust.rule == "mean"  # attackers alone make the rounds robust ones (sigma xi overflows)
    obj, sim, counters = LeastSquares(m), _sim(spec), [0] * m
    _feed(sim, obj, counters)
    before = sim.params.clone()
    with pytest.raises(NonFiniteError, match="model"):
        _feed(sim, obj, counters)
    assert torch.equal(sim.params, before)


# -- refusals ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,field", [
    ({"aggregation": "average"}, "aggregation"),
    ({"attack": "flip"}, "attack"),
    ({"trim": 0.5, "aggregation": "trimmed_mean"}, "trim"),
    ({"byzantine_fraction": 1.0}, "byzantine_fraction"),
    ({"attack_std": 0.0}, "attack_std"),
    ({"aggregation": "krum", "krum_f": 2}, "krum_f"),  # 4 clients: k - f - 2 = 0
    ({"aggregation": "krum", "fraction": 0.5}, "aggregation"),  # 2 clients per round: too few for Krum
    ({"aggregation": "median", "multi_krum_keep": 2}, "multi_krum_keep"),
    ({"aggregation": "multi_krum", "multi_krum_keep": 5}, "multi_krum_keep"),
])
def test_bad_settings_name_the_setting(kwargs: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigError) as e:
        presets.fedavg(4, 2, **kwargs)
    assert field in str(e.value) and "\n" not in str(e.value)


def test_unsupported_combinations_are_refused() -> None:
    with pytest.raises(ConfigError, match="compress"):
        presets.fedavg(4, 2, aggregation="median", compression="topk")
    with pytest.raises(ConfigError, match="not an argument of preset 'scaffold'"):  # SCAFFOLD takes none of them
        presets.make_preset("scaffold", 4, aggregation="median")
    # a process that holds some clients and no all-gather cannot see every sampled model: refused, naming the rule
    spec = presets.fedavg(5, 2, aggregation="median")
    with pytest.raises(ConfigError, match="aggregation='median'.*every sampled model"):
        RoundKernel(spec, SGDOptions(), 0, D, 1, cast(Any, object()), worker_ids=(0,))
    # every other FedAvg preset takes them
    for name in ("fedavg", "fedprox", "fedavgm", "fedadam", "fedyogi", "fedadagrad"):
        s = presets.make_preset(name, 5, aggregation="krum", byzantine_fraction=0.2)
        assert s.robust is not None and s.robust.rule == "krum" and s.robust.f == 1


def test_config_files_and_flags_reach_the_spec(capsys: pytest.CaptureFixture[str]) -> None:
    from coopsgd.cli import main
    from coopsgd.train import RunConfig

    cfg = RunConfig.from_dict({"algorithm": {"preset": "fedyogi", "workers": 10, "aggregation": "trimmed_mean",
                                             "trim": 0.1, "byzantine_fraction": 0.2, "attack": "scale",
                                             "attack_scale": -2.0}, "execution": {"seed": 7}})
    spec = cfg.build_spec(shard_sizes=[1.0] * 10, steps_per_epoch=1)
    r = spec.robust
    assert r is not None and (r.rule, r.trim, r.attack, r.attack_scale, r.seed) == ("trimmed_mean", 0.1, "scale",
                                                                                     -2.0, 7)
    assert r.byzantine().size == 2
    # a bad name on the command line: exit 2, one line naming the setting and what is allowed
    assert main(["theory", "--preset", "fedavg", "--aggregation", "average"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "aggregation='average'" in err and "median, trimmed_mean, krum, multi_krum" in err
    # a setting scaffold does not take
    with pytest.raises(ConfigError, match="byzantine_fraction"):
        RunConfig.from_dict({"algorithm": {"preset": "scaffold", "byzantine_fraction": 0.2}}).build_spec(
            shard_sizes=[1.0] * 8, steps_per_epoch=1)
