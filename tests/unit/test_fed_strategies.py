"""Federated strategies (issue 26, items 1-3): FedProx, the server optimizers FedAvgM, FedAdam, FedYogi,
FedAdagrad, and SCAFFOLD.

* hand-written oracles in numpy (FedAvg's sampled, weighted rounds with the proximal term, the server
  rules of Reddi et al., ICLR 2021, Algorithm 2, and SCAFFOLD's option II) against the reference engine;
* the simulator equals the reference engine (float64, sampled clients, both executors);
* mu = 0 is FedAvg bit for bit, FedAvgM with lr 1 and no momentum too;
* a round touches only the sampled clients' rows (the broadcast of the server model stays deferred);
* resume is bit-exact, the NaN rollback restores the server model (the proximal anchor) and its optimizer;
* bad settings are one-line errors naming the setting; `coopsgd theory` says that no bound applies.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from coopsgd.algorithms import presets
from coopsgd.algorithms.outer import OuterOptimizer
from coopsgd.algorithms.spec import AlgorithmSpec
from coopsgd.engines.base import NonFiniteError
from coopsgd.engines.optim import OuterRuntime
from coopsgd.engines.reference import ReferenceEngine, outer_step
from coopsgd.engines.simulator import Simulator
from coopsgd.errors import ConfigError

D, N, B = 4, 30, 5
LR = 0.05
COUNTS = [10.0, 20.0, 30.0, 40.0, 50.0, 60.0]


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


def _linear() -> nn.Module:
    return nn.Linear(D, 1, bias=False)


def _sim(spec: AlgorithmSpec, executor: str = "loop", **kw: Any) -> Simulator:
    return Simulator(spec, _linear, loss_fn=F.mse_loss, dtype=torch.float64, executor=executor, seed=4,
                     optimizer="sgd", **kw)


def _feed(sim: Simulator, obj: LeastSquares, counters: list[int], lr: float = LR) -> Any:
    mask = sim.spec.schedule.active(sim.step_count)
    batches: list[Any] = []
    for i in range(sim.m):
        if mask is None or mask[i]:
            idx = obj.batch(i, counters[i])
            batches.append((torch.from_numpy(obj.A[idx]), torch.from_numpy(obj.y[idx, None])))
            counters[i] += 1
        else:
            batches.append(None)
    return sim.step(batches, lr)


def _run_sim(spec: AlgorithmSpec, steps: int, executor: str = "loop", **kw: Any) -> Simulator:
    obj = LeastSquares(spec.workers)
    sim = _sim(spec, executor, **kw)
    counters = [0] * spec.workers
    for _ in range(steps):
        _feed(sim, obj, counters)
    return sim


def _both(spec: Callable[[], AlgorithmSpec], steps: int, executor: str = "loop") -> tuple[Simulator, ReferenceEngine]:
    """The simulator and the reference engine after ``steps`` steps of the same spec from the same start."""
    s = spec()
    sim = _sim(s, executor)
    eng = ReferenceEngine(spec(), LeastSquares(s.workers), sim.params[0].numpy().copy())
    obj = LeastSquares(s.workers)
    counters = [0] * s.workers
    for _ in range(steps):
        _feed(sim, obj, counters)
        eng.step(None, LR)
    return sim, eng


def _server_step(kind: str, st: dict[str, Any], x: np.ndarray, avg: np.ndarray, *, eta: float, b1: float,
                 b2: float, eps: float) -> np.ndarray:
    """Reddi et al. (ICLR 2021), Algorithm 2 (and Algorithm 1 with server momentum for FedAvgM), written in
    their sign: Delta_t = mean_S(y_i) - x_t, x_{t+1} = x_t + eta m_t / (sqrt(v_t) + tau)."""
    delta = avg - x
    if kind == "avgm":  # v <- beta v + (x - avg); x <- x - eta v  (heavy ball on the pseudo-gradient)
        st["v"] = b1 * st["v"] - delta
        return x - eta * st["v"]
    st["m"] = b1 * st["m"] + (1 - b1) * delta
    if kind == "adam":
        st["v"] = b2 * st["v"] + (1 - b2) * delta**2
    elif kind == "yogi":
        st["v"] = st["v"] - (1 - b2) * delta**2 * np.sign(st["v"] - delta**2)
    else:
        st["v"] = st["v"] + delta**2
    return x + eta * st["m"] / (np.sqrt(st["v"]) + eps)


def _oracle(m: int, tau: int, rounds: int, *, fraction: float, seed: int, mu: float, x0: np.ndarray,
            server: tuple[str, float, float, float, float] | None = None) -> np.ndarray:
    """FedAvg by hand: each round, the clients drawn from default_rng([seed, r]) run tau local SGD steps from
    the server model x on g + mu (y - x); the server takes their sample-count-weighted average (then, with
    ``server``, its optimizer's step) and every client receives it. Returns the server model."""
    obj = LeastSquares(m)
    counts = np.asarray(COUNTS[:m])
    k = max(1, int(round(fraction * m)))
    x = x0.copy()
    calls = [0] * m
    st = {"m": np.zeros(D), "v": np.zeros(D)}
    for r in range(rounds):
        chosen = np.arange(m) if k == m else np.sort(np.random.default_rng([seed, r]).choice(m, k, replace=False))
        ys = []
        for i in chosen:
            y = x.copy()
            for _ in range(tau):
                g = obj.grad_at(y, int(i), calls[i]) + mu * (y - x)
                calls[i] += 1
                y = y - LR * g
            ys.append(y)
        w = counts[chosen] / counts[chosen].sum()
        avg = np.sum(w[:, None] * np.asarray(ys), axis=0)
        if server is None:
            x = avg
        else:
            kind, eta, b1, b2, eps = server
            x = _server_step(kind, st, x, avg, eta=eta, b1=b1, b2=b2, eps=eps)
    return x


# ---------------------------------------------------------------------------------------------------------
# FedProx
# ---------------------------------------------------------------------------------------------------------


def test_fedprox_reference_engine_equals_the_hand_written_rounds() -> None:
    m, tau, rounds = 6, 3, 4
    x0 = np.linspace(-1.0, 1.0, D)
    spec = presets.fedprox(m, tau, mu=0.7, fraction=0.5, sample_counts=COUNTS, seed=5)
    eng = ReferenceEngine(spec, LeastSquares(m), x0)
    for _ in range(tau * rounds):
        eng.step(None, LR)
    want = _oracle(m, tau, rounds, fraction=0.5, seed=5, mu=0.7, x0=x0)
    np.testing.assert_allclose(eng.state[m], want, rtol=0, atol=1e-12)
    np.testing.assert_allclose(eng.state[:m], np.tile(want, (m, 1)), rtol=0, atol=1e-12)
    # the proximal term matters: plain FedAvg ends elsewhere
    assert np.abs(_oracle(m, tau, rounds, fraction=0.5, seed=5, mu=0.0, x0=x0) - want).max() > 1e-4


@pytest.mark.parametrize("executor", ["loop", "vmap"])
def test_fedprox_simulator_equals_reference_mid_round(executor: str) -> None:
    m, tau, steps = 6, 3, 13  # 4 rounds and one local step: the anchor is read between rounds
    sim, eng = _both(lambda: presets.fedprox(m, tau, mu=0.4, fraction=0.5, sample_counts=COUNTS, seed=2),
                     steps, executor)
    assert np.abs(eng.state[:m] - eng.state[m]).max() > 1e-6  # mid-round: the clients that worked moved
    np.testing.assert_allclose(sim.params.numpy(), eng.state, rtol=0, atol=1e-10)


def test_mu_zero_is_fedavg_bit_for_bit() -> None:
    m, tau = 6, 2
    kw: dict[str, Any] = {"fraction": 0.5, "sample_counts": COUNTS, "seed": 3}
    a = _run_sim(presets.fedprox(m, tau, mu=0.0, **kw), 9)
    b = _run_sim(presets.fedavg(m, tau, **kw), 9)
    assert torch.equal(a.params, b.params)
    c = _run_sim(presets.fedavg(m, tau, mu=0.2, **kw), 9)  # mu is accepted on fedavg, and it changes the run
    assert not torch.equal(c.params, b.params)
    assert torch.equal(c.params, _run_sim(presets.fedprox(m, tau, mu=0.2, **kw), 9).params)
    # the reference engine too
    x0 = np.zeros(D)
    e1 = ReferenceEngine(presets.fedprox(m, tau, mu=0.0, **kw), LeastSquares(m), x0)
    e2 = ReferenceEngine(presets.fedavg(m, tau, **kw), LeastSquares(m), x0)
    for _ in range(9):
        e1.step(None, LR)
        e2.step(None, LR)
    np.testing.assert_array_equal(e1.state, e2.state)


def test_fedprox_with_momentum_and_adam_inner_optimizers_equals_the_term_added_by_hand() -> None:
    """The proximal term is added to the gradient before the inner optimizer reads it (torch.optim on one
    client, full participation: the anchor is the server model of the last round)."""
    m, tau, mu = 2, 3, 0.5
    spec = presets.fedprox(m, tau, mu=mu)
    obj = LeastSquares(m)
    sim = Simulator(spec, _linear, loss_fn=F.mse_loss, dtype=torch.float64, executor="loop", seed=4,
                    optimizer="adam")
    x0 = sim.params[0].clone()
    models = [nn.Parameter(x0.clone()) for _ in range(m)]
    opts = [torch.optim.Adam([p], lr=LR) for p in models]
    anchor = x0.clone()
    counters = [0] * m
    for k in range(2 * tau):
        _feed(sim, obj, counters)
        for i in range(m):
            g = obj.grad_at(models[i].detach().numpy(), i, k)
            models[i].grad = torch.from_numpy(g) + mu * (models[i].detach() - anchor)
            opts[i].step()
        if (k + 1) % tau == 0:
            anchor = torch.stack([p.detach() for p in models]).mean(dim=0)
            with torch.no_grad():
                for p in models:
                    p.copy_(anchor)
    np.testing.assert_allclose(sim.params[m].numpy(), anchor.numpy(), rtol=0, atol=1e-12)
    np.testing.assert_allclose(sim.params[:m].numpy(), np.tile(anchor.numpy(), (m, 1)), rtol=0, atol=1e-12)


# ---------------------------------------------------------------------------------------------------------
# server optimizers
# ---------------------------------------------------------------------------------------------------------

SERVERS: dict[str, tuple[Callable[..., AlgorithmSpec], tuple[str, float, float, float, float]]] = {
    "fedavgm": (lambda m, tau, **kw: presets.fedavgm(m, tau, outer_lr=0.8, outer_momentum=0.6, **kw),
                ("avgm", 0.8, 0.6, 0.0, 0.0)),
    "fedadam": (lambda m, tau, **kw: presets.fedadam(m, tau, outer_lr=0.05, outer_beta1=0.8, outer_beta2=0.95,
                                                     outer_eps=1e-3, **kw), ("adam", 0.05, 0.8, 0.95, 1e-3)),
    "fedyogi": (lambda m, tau, **kw: presets.fedyogi(m, tau, outer_lr=0.05, outer_eps=1e-2, **kw),
                ("yogi", 0.05, 0.9, 0.99, 1e-2)),
    "fedadagrad": (lambda m, tau, **kw: presets.fedadagrad(m, tau, outer_lr=0.05, outer_beta1=0.5,
                                                           outer_eps=1e-3, **kw), ("adagrad", 0.05, 0.5, 0.0, 1e-3)),
}


@pytest.mark.parametrize("name", list(SERVERS))
def test_server_optimizer_reference_equals_the_hand_written_rounds(name: str) -> None:
    m, tau, rounds, mu = 6, 2, 5, 0.3
    build, server = SERVERS[name]
    x0 = np.linspace(1.0, -0.5, D)
    spec = build(m, tau, fraction=0.5, sample_counts=COUNTS, seed=7, mu=mu)
    assert spec.name == name and spec.center_node() == m
    eng = ReferenceEngine(spec, LeastSquares(m), x0)
    for _ in range(tau * rounds):
        eng.step(None, LR)
    want = _oracle(m, tau, rounds, fraction=0.5, seed=7, mu=mu, x0=x0, server=server)
    np.testing.assert_allclose(eng.center(), want, rtol=0, atol=1e-12)
    np.testing.assert_allclose(eng.state[:m], np.tile(want, (m, 1)), rtol=0, atol=1e-12)
    assert np.abs(want - _oracle(m, tau, rounds, fraction=0.5, seed=7, mu=mu, x0=x0)).max() > 1e-4


@pytest.mark.parametrize("name", list(SERVERS))
@pytest.mark.parametrize("executor", ["loop", "vmap"])
def test_server_optimizer_simulator_equals_reference(name: str, executor: str) -> None:
    m, tau, steps = 6, 3, 14
    build = SERVERS[name][0]
    sim, eng = _both(lambda: build(m, tau, fraction=0.34, sample_counts=COUNTS, seed=1, mu=0.1), steps, executor)
    assert eng.rounds == 4 and sim.rounds == 4  # and two local steps after the last round
    np.testing.assert_allclose(sim.params.numpy(), eng.state, rtol=0, atol=1e-10)
    np.testing.assert_allclose(sim.center_params().numpy(), eng.center(), rtol=0, atol=1e-10)
    assert sim.outer is not None and eng.outer_state is not None
    for key, val in sim.outer.state.items():
        np.testing.assert_allclose(np.asarray(val), np.asarray(eng.outer_state[key]), rtol=0, atol=1e-10)


@pytest.mark.parametrize("compress", ["topk:0.5", "int8"])
def test_compressed_rounds_compose_with_fedprox_and_a_server_optimizer(compress: str) -> None:
    m, tau, steps = 6, 3, 12
    sim, eng = _both(lambda: presets.fedadam(m, tau, fraction=0.5, seed=5, mu=0.2, compression=compress), steps)
    np.testing.assert_allclose(sim.params.numpy(), eng.state, rtol=0, atol=1e-10)
    plain, _ = _both(lambda: presets.fedadam(m, tau, fraction=0.5, seed=5, mu=0.2), steps)
    assert not torch.equal(plain.params, sim.params)  # the payloads were compressed


@pytest.mark.parametrize("kind", ["adam", "yogi", "adagrad"])
def test_outer_runtime_equals_the_numpy_rule(kind: str) -> None:
    d = 6
    rng = np.random.default_rng(0)
    spec = OuterOptimizer(kind, lr=0.3, betas=(0.7, 0.9), eps=1e-4, bias_correction=False)
    rt = OuterRuntime(spec, d, torch.float64, torch.device("cpu"))
    np_state: dict[str, Any] = {"step": 0, "exp_avg": np.zeros(d), "exp_avg_sq": np.zeros(d)}
    hand = {"m": np.zeros(d), "v": np.zeros(d)}
    z = rng.standard_normal(d)
    for _ in range(5):
        a = z + 0.2 * rng.standard_normal(d)
        new_t = rt.step(torch.from_numpy(z.copy()), torch.from_numpy(a.copy()), 0.05)
        new_np, np_state = outer_step(spec, np_state, z, a, 0.05)
        z = _server_step(kind, hand, z, a, eta=0.3, b1=0.7, b2=0.9, eps=1e-4)
        np.testing.assert_allclose(new_t.numpy(), z, rtol=0, atol=1e-12)
        np.testing.assert_allclose(new_np, z, rtol=0, atol=1e-12)
    assert rt.state["step"] == 5


def test_fedavgm_without_momentum_is_fedavg_bit_for_bit() -> None:
    kw: dict[str, Any] = {"fraction": 0.5, "sample_counts": COUNTS, "seed": 3}
    a = _run_sim(presets.fedavgm(6, 2, outer_lr=1.0, outer_momentum=0.0, **kw), 9)
    b = _run_sim(presets.fedavg(6, 2, **kw), 9)
    assert torch.equal(a.params, b.params)


def test_fedprox_round_touches_only_the_sampled_rows() -> None:
    """FedProx's anchor is the server row: after a round of 2 of 8 clients no client row is written until it is
    read (the broadcast stays deferred) and the next round's clients step from the server model."""
    m, tau = 8, 2
    spec = presets.fedprox(m, tau, mu=0.5, fraction=0.25, seed=0)
    obj = LeastSquares(m)
    sim = _sim(spec)
    counters = [0] * m
    for _ in range(tau):
        _feed(sim, obj, counters)
    pend = sim._comm.deferred
    assert pend is not None and pend[:m].all()  # every client's row waits for its next read
    worked = np.flatnonzero(spec.schedule.active(0))
    z = sim._state[m, sim.b : sim.b + sim.d].clone()
    assert not torch.equal(sim._state[worked[0], sim.b : sim.b + sim.d], z)  # not written yet
    assert torch.equal(sim.params[worked[0]], z) and torch.equal(sim.params[0], z)  # written when read


def test_server_optimizer_round_touches_only_the_sampled_rows() -> None:
    """A FedAdam round over 2 of 8 clients is applied in place: the new server model reaches the other clients
    through the deferred broadcast (no copy of the whole state), and every client reads it."""
    m, tau = 8, 2
    spec = presets.fedadam(m, tau, fraction=0.25, seed=0)
    obj = LeastSquares(m)
    sim = _sim(spec)
    counters = [0] * m
    for _ in range(tau):
        _feed(sim, obj, counters)
    assert sim.outer is not None and sim.outer.state["step"] == 1
    pend = sim._comm.deferred
    assert pend is not None and pend[:m].all()
    z = sim._state[m, sim.b : sim.b + sim.d].clone()
    value = sim._comm.deferred_value()
    assert value is not None and torch.equal(value[0, sim.b : sim.b + sim.d], z)  # the new server model
    np.testing.assert_array_equal(sim.params.numpy(), np.tile(z.numpy(), (m + 1, 1)))


def test_a_non_finite_server_step_leaves_the_state_unchanged() -> None:
    m, tau = 4, 2
    spec = presets.fedadam(m, tau, fraction=0.5, seed=0, outer_lr=1e308, outer_beta1=0.0)  # the step overflows
    obj = LeastSquares(m)
    sim = _sim(spec)
    counters = [0] * m
    _feed(sim, obj, counters)
    before = sim.params.clone()
    steps_before = sim.outer.state["step"] if sim.outer is not None else None
    with pytest.raises(NonFiniteError, match="model"):
        _feed(sim, obj, counters)
    assert torch.equal(sim.params, before)
    assert sim.outer is not None and sim.outer.state["step"] == steps_before == 0


@pytest.mark.parametrize("name", ["fedprox", "fedadam", "fedyogi"])
def test_resume_is_bit_exact(name: str) -> None:
    m, tau = 4, 2
    spec = lambda: presets.make_preset(name, m, tau=tau, fraction=0.5, seed=1, mu=0.2)  # noqa: E731
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
    if full.outer is not None:
        assert second.outer is not None
        for key, val in full.outer.state.items():
            assert torch.equal(val, second.outer.state[key]) if isinstance(val, torch.Tensor) else \
                val == second.outer.state[key]
    # a checkpoint without the server optimizer's state is refused, naming it
    if full.outer is not None:
        plain = _sim(presets.fedavg(m, tau, fraction=0.5, seed=1))
        with pytest.raises(ConfigError, match="outer_state"):
            second.load_state_dict(plain.state_dict())


def test_nan_rollback_restores_the_server_model_and_its_optimizer() -> None:
    m, tau = 4, 2
    spec = presets.fedadam(m, tau, fraction=0.5, seed=1, mu=0.3)
    obj = LeastSquares(m)
    sim = _sim(spec, nan_policy="skip")
    counters = [0] * m
    for _ in range(2 * tau):
        _feed(sim, obj, counters)
        assert sim.check_health() is None
    good = sim.params.clone()
    assert sim.outer is not None
    good_outer = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in sim.outer.state.items()}
    mask = spec.schedule.active(sim.step_count)
    assert mask is not None
    i = int(np.flatnonzero(mask)[0])
    batches: list[Any] = [None] * m
    for j in np.flatnonzero(mask):
        idx = obj.batch(int(j), 0)
        batches[j] = (torch.from_numpy(obj.A[idx]), torch.from_numpy(obj.y[idx, None]))
    batches[i] = (batches[i][0] * float("nan"), batches[i][1])
    sim.step(batches, LR)
    sim.step(batches, LR)  # the round: dropped
    dropped = sim.check_health()
    assert dropped is not None and i in dropped.workers
    assert torch.equal(sim.params, good)
    for k, v in good_outer.items():
        assert torch.equal(v, sim.outer.state[k]) if isinstance(v, torch.Tensor) else v == sim.outer.state[k]


# ---------------------------------------------------------------------------------------------------------
# SCAFFOLD
# ---------------------------------------------------------------------------------------------------------


def _scaffold_oracle(m: int, tau: int, rounds: int, *, fraction: float, seed: int, eta_g: float,
                     x0: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """SCAFFOLD (Karimireddy et al. 2020, Algorithm 1, option II) by hand, with FedAvg's sampling and weights:
    returns the server model and the control variates (rows: the clients, then the server's c)."""
    obj = LeastSquares(m)
    counts = np.asarray(COUNTS[:m])
    k = max(1, int(round(fraction * m)))
    x = x0.copy()
    c = np.zeros((m + 1, D))
    calls = [0] * m
    for r in range(rounds):
        chosen = np.arange(m) if k == m else np.sort(np.random.default_rng([seed, r]).choice(m, k, replace=False))
        ys, dcs = [], []
        for i in chosen:
            y = x.copy()
            for _ in range(tau):
                y = y - LR * (obj.grad_at(y, int(i), calls[i]) - c[i] + c[m])
                calls[i] += 1
            c_new = c[i] - c[m] + (x - y) / (tau * LR)
            ys.append(y)
            dcs.append(c_new - c[i])
        w = counts[chosen] / counts[chosen].sum()
        avg = np.sum(w[:, None] * np.asarray(ys), axis=0)
        for i, dc in zip(chosen, dcs, strict=True):
            c[i] = c[i] + dc
        c[m] = c[m] + np.sum(dcs, axis=0) / m
        x = x + eta_g * (avg - x)
    return x, c


@pytest.mark.parametrize("eta_g", [1.0, 0.6])
def test_scaffold_reference_engine_equals_the_hand_written_rounds(eta_g: float) -> None:
    m, tau, rounds = 6, 3, 4
    x0 = np.linspace(-1.0, 0.5, D)
    spec = presets.scaffold(m, tau, outer_lr=eta_g, fraction=0.5, sample_counts=COUNTS, seed=5)
    eng = ReferenceEngine(spec, LeastSquares(m), x0)
    for _ in range(tau * rounds):
        eng.step(None, LR)
    x, c = _scaffold_oracle(m, tau, rounds, fraction=0.5, seed=5, eta_g=eta_g, x0=x0)
    np.testing.assert_allclose(eng.center(), x, rtol=0, atol=1e-12)
    assert eng.control is not None
    np.testing.assert_allclose(eng.control, c, rtol=0, atol=1e-11)
    np.testing.assert_allclose(c[m], c[:m].mean(axis=0), rtol=0, atol=1e-12)  # c stays the mean of the c_i
    assert np.abs(x - _oracle(m, tau, rounds, fraction=0.5, seed=5, mu=0.0, x0=x0)).max() > 1e-4


@pytest.mark.parametrize(("executor", "fraction"), [("loop", 0.5), ("vmap", 0.5), ("loop", 1.0), ("loop", 0.1)])
def test_scaffold_simulator_equals_reference(executor: str, fraction: float) -> None:
    m, tau, steps = 6, 3, 14  # fraction 1: the round is checked on a copy; 0.1: one client (weight 1)
    sim, eng = _both(lambda: presets.scaffold(m, tau, fraction=fraction, sample_counts=COUNTS, seed=2, mu=0.1),
                     steps, executor)
    np.testing.assert_allclose(sim.params.numpy(), eng.state, rtol=0, atol=1e-10)
    assert sim.control is not None and eng.control is not None
    np.testing.assert_allclose(sim.control.numpy(), eng.control, rtol=0, atol=1e-10)


def test_scaffold_touches_only_the_sampled_clients_and_sends_twice_fedavgs_bytes() -> None:
    m, tau = 8, 2
    kw: dict[str, Any] = {"fraction": 0.25, "seed": 0}
    spec = presets.scaffold(m, tau, **kw)
    obj = LeastSquares(m)
    sim = _sim(spec)
    assert sim._state.shape == (m + 1, 2 * D)  # one more d-vector per node: the control variate
    counters = [0] * m
    for _ in range(tau):
        _feed(sim, obj, counters)
    worked = np.flatnonzero(spec.schedule.active(0))
    assert sim.control is not None
    changed = np.flatnonzero(sim.control[:m].abs().sum(dim=1).numpy() > 0)
    np.testing.assert_array_equal(changed, worked)  # the other clients' c_i were not touched
    pend = sim._comm.deferred
    assert pend is not None and pend[:m].all()  # the models' broadcast stays deferred
    fedavg = _run_sim(presets.fedavg(m, tau, **kw), tau)
    assert sim.bytes_sent == pytest.approx(2 * fedavg.bytes_sent) and fedavg.bytes_sent > 0


def test_scaffold_nan_rollback_restores_the_control_variates() -> None:
    m, tau = 4, 2
    spec = presets.scaffold(m, tau, fraction=0.5, seed=1)
    obj = LeastSquares(m)
    sim = _sim(spec, nan_policy="skip")
    counters = [0] * m
    for _ in range(2 * tau):
        _feed(sim, obj, counters)
        assert sim.check_health() is None
    assert sim.control is not None
    good, good_c = sim.params.clone(), sim.control.clone()
    mask = spec.schedule.active(sim.step_count)
    assert mask is not None
    batches: list[Any] = [None] * m
    for j in np.flatnonzero(mask):
        idx = obj.batch(int(j), 0)
        batches[j] = (torch.from_numpy(obj.A[idx]) * float("nan"), torch.from_numpy(obj.y[idx, None]))
    sim.step(batches, LR)
    sim.step(batches, LR)
    assert sim.check_health() is not None
    assert torch.equal(sim.params, good) and torch.equal(sim.control, good_c)


def test_scaffold_resume_is_bit_exact_and_refuses_compression() -> None:
    m, tau = 4, 2
    spec = lambda: presets.scaffold(m, tau, fraction=0.5, seed=1, outer_lr=0.8)  # noqa: E731
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
    assert full.control is not None and second.control is not None
    assert torch.equal(full.control, second.control)
    a = ReferenceEngine(spec(), LeastSquares(m), np.zeros(D))
    for _ in range(5):
        a.step(None, LR)
    b = ReferenceEngine(spec(), LeastSquares(m), np.zeros(D))
    b.load_state_dict(a.state_dict())
    assert a.control is not None and b.control is not None
    np.testing.assert_array_equal(a.control, b.control)
    with pytest.raises(ConfigError, match="compress"):
        presets.scaffold(m, compression="topk:0.1")


# ---------------------------------------------------------------------------------------------------------
# settings, declarations, theory
# ---------------------------------------------------------------------------------------------------------


def test_defaults_and_declarations() -> None:
    from coopsgd.algorithms.registry import declaration

    assert presets.fedprox(4).prox == 0.01 and presets.fedavg(4).prox == 0.0
    adam = presets.fedadam(4).outer
    assert adam == OuterOptimizer("adam", lr=0.01, betas=(0.9, 0.99), eps=1e-3, bias_correction=False)
    yogi = presets.fedyogi(4).outer
    assert yogi is not None and yogi.kind == "yogi" and yogi.lr == 0.01 and yogi.eps == 1e-3
    ada = presets.fedadagrad(4).outer
    assert ada is not None and ada.kind == "adagrad" and ada.betas[0] == 0.0 and ada.eps == 1e-2
    assert presets.fedavgm(4).outer == OuterOptimizer("sgd", lr=1.0, momentum=0.9)
    for name in ("fedprox", "scaffold", "fedavgm", "fedadam", "fedyogi", "fedadagrad", "fedavg"):
        decl = declaration(name)
        names = [a.name for a in decl.args]
        assert "mu" in names and "fraction" in names and "local_epochs" in names, name
        assert [i.argument for i in decl.inputs] == ["sample_counts", "client_speeds", "tau"]
    assert "outer_beta2" not in [a.name for a in declaration("fedadagrad").args]


@pytest.mark.parametrize(("name", "kwargs", "field"), [
    ("fedprox", {"mu": -0.1}, "mu"),
    ("fedavg", {"mu": float("nan")}, "mu"),
    ("fedadam", {"outer_beta1": 1.0}, "outer_beta1"),
    ("fedyogi", {"outer_beta2": -0.5}, "outer_beta2"),
    ("fedadagrad", {"outer_eps": 0.0}, "outer_eps"),
    ("fedavgm", {"outer_momentum": 1.2}, "outer_momentum"),
    ("fedadam", {"outer_lr": 0.0}, "outer_lr"),
    ("fedadagrad", {"outer_beta2": 0.9}, "outer_beta2"),
])
def test_bad_settings_name_the_setting(name: str, kwargs: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigError, match=field) as info:
        presets.make_preset(name, 4, **kwargs)
    assert "\n" not in str(info.value)


def test_mu_is_refused_where_the_server_model_is_not_the_anchor() -> None:
    spec = presets.local_sgd(4, 2)
    import dataclasses

    with pytest.raises(ConfigError, match="mu"):
        dataclasses.replace(spec, prox=0.1)


@pytest.mark.parametrize("name", ["fedprox", "scaffold", "fedavgm", "fedadam", "fedyogi", "fedadagrad"])
def test_theory_says_no_bound_applies(name: str) -> None:
    from coopsgd.analysis import analyze
    from coopsgd.theory.bounds import ProblemConstants

    c = ProblemConstants(L=1.0, sigma2=1.0, f_gap=1.0, lr=0.01, steps=1000)
    text = repr(analyze(presets.make_preset(name, 8), c))
    assert "no bound applies" in text
    assert "corollary2_with_sampled_clients" not in text
    plain = repr(analyze(presets.fedavg(8), c))
    assert "corollary2_with_sampled_clients" in plain and "no bound applies" not in plain
