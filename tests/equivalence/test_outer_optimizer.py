"""An outer optimizer on the auxiliary node (issue 16, item 2): DiLoCo and SlowMo.

* outer lr 1 without momentum is local SGD, bit for bit; SlowMo with beta = 0, alpha = 1 is its base
  algorithm (plus an exact average every tau steps for a gossip base);
* the outer step equals torch.optim.SGD (Nesterov) / torch.optim.Adam applied to z with the pseudo-gradient
  as its gradient (DiLoCo), and SlowMo's own recursion u = beta u + Delta / lr, z = z - alpha lr u, also
  when the learning rate changes between rounds;
* the simulator equals the reference engine (float64) for diloco / slowmo with every base;
* resume is exact; `coopsgd theory` reports SlowMo's rate and says when no bound applies.
"""

from __future__ import annotations

import io
import json
from typing import Any

import numpy as np
import pytest
import torch
from test_simulator_vs_reference import BatchLeastSquares, _feed, _simulator  # same directory

from coopsgd.algorithms import presets
from coopsgd.algorithms.outer import OuterOptimizer, OuterSchedule
from coopsgd.algorithms.schedules import PeriodicSchedule
from coopsgd.algorithms.spec import AlgorithmSpec, Policies
from coopsgd.engines.optim import OuterRuntime
from coopsgd.engines.reference import ReferenceEngine, outer_step
from coopsgd.errors import ConfigError
from coopsgd.topology import mixing_schedule

LR = 0.05
K = 14


def _run_sim(spec: AlgorithmSpec, steps: int = K, lr: Any = LR, **kw: Any) -> Any:
    obj = BatchLeastSquares(spec.workers)
    sim = _simulator(spec, obj, "loop", **kw)
    counters = [0] * spec.workers
    for k in range(steps):
        _feed(sim, obj, counters, lr=lr(k) if callable(lr) else lr)
    return sim


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_outer_lr_one_without_momentum_is_local_sgd_exactly(optimizer: str) -> None:
    m, tau = 4, 3
    spec = presets.diloco(m, tau, outer_lr=1.0, outer_momentum=0.0, outer_optimizer="sgd")
    a = _run_sim(spec, steps=4 * tau, optimizer=optimizer)
    b = _run_sim(presets.local_sgd(m, tau), steps=4 * tau, optimizer=optimizer)
    assert torch.equal(a.params[:m], b.params[:m])
    assert torch.equal(a.params[m], a.params[0])  # right after a round z is the workers' model
    assert a.rounds == b.rounds == 4
    a = _run_sim(spec, optimizer=optimizer)  # K = 14: two local steps after the last round
    b = _run_sim(presets.local_sgd(m, tau), optimizer=optimizer)
    assert torch.equal(a.params[:m], b.params[:m])


def test_slowmo_without_momentum_is_its_base_algorithm() -> None:
    m, tau = 4, 3
    # local SGD: bit for bit
    a = _run_sim(presets.slowmo(m, tau, outer_lr=1.0, outer_momentum=0.0))
    b = _run_sim(presets.local_sgd(m, tau))
    assert torch.equal(a.params[:m], b.params[:m])
    # fully synchronous SGD
    a = _run_sim(presets.slowmo(m, tau, base_algorithm="sync", outer_lr=1.0, outer_momentum=0.0))
    b = _run_sim(presets.sync(m))
    np.testing.assert_allclose(a.params[:m].numpy(), b.params[:m].numpy(), rtol=0, atol=1e-13)
    # gossip: D-PSGD plus an exact average every tau steps
    W = mixing_schedule("ring", m, "metropolis")[0].matrix
    J = np.full((m, m), 1.0 / m)
    gossip = AlgorithmSpec(name="custom", workers=m, auxiliaries=0, tau=1,
                           schedule=PeriodicSchedule(1, [W], pattern="neighbor", levels=[(tau, [J], "allreduce")]))
    a = _run_sim(presets.slowmo(m, tau, base_algorithm="dpsgd", outer_lr=1.0, outer_momentum=0.0))
    b = _run_sim(gossip)
    np.testing.assert_allclose(a.params[:m].numpy(), b.params[:m].numpy(), rtol=0, atol=1e-13)
    assert not torch.equal(a.params[0], a.params[1])  # gossip alone does not make the workers equal


@pytest.mark.parametrize("kind", ["nesterov", "adam"])
def test_outer_step_is_torch_optimizer_on_the_pseudo_gradient(kind: str) -> None:
    d, rounds = 7, 6
    g = torch.Generator().manual_seed(0)
    spec = OuterOptimizer("adam", lr=0.3) if kind == "adam" else OuterOptimizer("sgd", lr=0.7, momentum=0.9,
                                                                                  nesterov=True)
    rt = OuterRuntime(spec, d, torch.float64, torch.device("cpu"))
    z = torch.randn(d, generator=g, dtype=torch.float64)
    p = torch.nn.Parameter(z.clone())
    opt = torch.optim.Adam([p], lr=0.3) if kind == "adam" else torch.optim.SGD([p], lr=0.7, momentum=0.9,
                                                                                 nesterov=True)
    for _ in range(rounds):
        a = z + 0.1 * torch.randn(d, generator=g, dtype=torch.float64)  # the workers' average
        z = rt.step(z, a, lr=0.05)
        p.grad = (p.detach() - a).clone()
        opt.step()
        np.testing.assert_allclose(z.numpy(), p.detach().numpy(), rtol=0, atol=1e-12)
    st = rt.state_dict()
    assert st["step"] == rounds


def test_slowmo_step_follows_its_recursion_when_the_lr_changes() -> None:
    d, alpha, beta = 5, 0.8, 0.6
    rng = np.random.default_rng(1)
    spec = OuterOptimizer("sgd", lr=alpha, momentum=beta, lr_scaled=True)
    rt = OuterRuntime(spec, d, torch.float64, torch.device("cpu"))
    np_state: dict[str, Any] = {"step": 0, "last_lr": 0.0, "momentum_buffer": np.zeros(d)}
    z = rng.standard_normal(d)
    u = np.zeros(d)
    for gamma in (0.1, 0.1, 0.05, 0.2, 0.02):
        a = z + 0.1 * rng.standard_normal(d)
        new_t = rt.step(torch.from_numpy(z.copy()), torch.from_numpy(a.copy()), gamma)
        new_np, np_state = outer_step(spec, np_state, z, a, gamma)
        u = beta * u + (z - a) / gamma  # SlowMo: slow momentum in gradient units
        z = z - alpha * gamma * u
        np.testing.assert_allclose(new_t.numpy(), z, rtol=0, atol=1e-12)
        np.testing.assert_allclose(new_np, z, rtol=0, atol=1e-12)


SPECS = {
    "diloco": lambda: presets.diloco(4, 3),
    "diloco_adam": lambda: presets.diloco(3, 2, outer_optimizer="adam", outer_lr=0.1),
    "diloco_heavy_ball": lambda: presets.diloco(3, 4, outer_optimizer="sgd", outer_momentum=0.5),
    "slowmo": lambda: presets.slowmo(4, 3, outer_momentum=0.7, outer_lr=0.9),
    "slowmo_sync": lambda: presets.slowmo(3, 2, base_algorithm="sync"),
    "slowmo_dpsgd": lambda: presets.slowmo(5, 3, base_algorithm="dpsgd", outer_momentum=0.6),
}


@pytest.mark.parametrize("name", list(SPECS))
def test_reference_engine_equals_simulator(name: str) -> None:
    spec_ref, spec_sim = SPECS[name](), SPECS[name]()
    m = spec_ref.workers
    lr = lambda k: LR * (0.5 if k >= 7 else 1.0)  # noqa: E731  (a change between rounds: SlowMo rescales u)
    obj_ref, obj_sim = BatchLeastSquares(m), BatchLeastSquares(m)
    sim = _simulator(spec_sim, obj_sim, "loop", optimizer="sgd")  # the reference engine's workers run SGD
    x0 = sim.params[0].numpy().copy()
    eng = ReferenceEngine(spec_ref, obj_ref, x0)
    counters = [0] * m
    for k in range(K):
        ref_stats = eng.step(None, lr(k))
        stats = _feed(sim, obj_sim, counters, lr=lr(k))
        assert stats.communicated == ref_stats.communicated
        assert stats.info.get("outer") == ref_stats.info.get("outer")
    np.testing.assert_allclose(sim.params.numpy(), eng.state, rtol=0, atol=1e-10)
    np.testing.assert_allclose(sim.center_params().numpy(), eng.center(), rtol=0, atol=1e-10)
    assert sim.center_node() == m  # z is the model to evaluate
    assert not np.allclose(eng.state[m], x0)


def test_resume_is_exact_with_outer_and_inner_state() -> None:
    spec = lambda: presets.diloco(3, 2, outer_lr=0.5)  # noqa: E731
    full = _run_sim(spec(), steps=9, optimizer="adamw")
    obj = BatchLeastSquares(3)
    first = _simulator(spec(), obj, "loop", optimizer="adamw")
    counters = [0] * 3
    for _ in range(5):
        _feed(first, obj, counters)
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)
    buf.seek(0)
    second = _simulator(spec(), obj, "loop", optimizer="adamw")
    second.load_state_dict(torch.load(buf, weights_only=True))
    for _ in range(4):
        _feed(second, obj, counters)
    assert torch.equal(full._state, second._state)
    assert full.outer is not None and second.outer is not None
    assert torch.equal(full.outer.state["momentum_buffer"], second.outer.state["momentum_buffer"])
    # a checkpoint without the outer optimizer's state is refused, naming it
    plain = _simulator(presets.local_sgd(3, 2), obj, "loop", optimizer="adamw")
    with pytest.raises(ConfigError, match="outer_state|shape"):
        second.load_state_dict(plain.state_dict())


def test_reference_engine_resume_keeps_the_outer_state() -> None:
    spec = presets.slowmo(3, 2, outer_momentum=0.5)
    a = ReferenceEngine(spec, BatchLeastSquares(3), np.zeros(5))
    for _ in range(5):
        a.step(None, LR)
    b = ReferenceEngine(presets.slowmo(3, 2, outer_momentum=0.5), BatchLeastSquares(3), np.zeros(5))
    b.load_state_dict(a.state_dict())
    assert b.outer_state is not None and a.outer_state is not None
    np.testing.assert_array_equal(b.outer_state["momentum_buffer"], a.outer_state["momentum_buffer"])


def test_outer_schedule_and_presets() -> None:
    spec = presets.diloco(4, 3)
    assert spec.auxiliaries == 1 and spec.center == "auxiliary" and spec.inner_optimizer == "adamw"
    assert spec.outer == OuterOptimizer("sgd", lr=0.7, momentum=0.9, nesterov=True)
    assert presets.diloco(4).tau == 500
    sched = spec.schedule
    assert isinstance(sched, OuterSchedule)
    assert [k for k in range(9) if sched.mix(k) is not None] == [2, 5, 8]
    mix = sched.mix(2)
    assert mix is not None and mix.info["outer"] and mix.matrix[4, 4] == 1.0
    np.testing.assert_array_equal(mix.matrix[:4, :4], np.full((4, 4), 0.25))
    sm = presets.slowmo(4, 3, base_algorithm="dpsgd")
    assert sm.schedule.mix(0) is not None and not sm.schedule.mix(0).info.get("outer")
    assert sm.outer is not None and sm.outer.lr_scaled and sm.outer.momentum == 0.5
    with pytest.raises(ConfigError, match="base_algorithm"):
        presets.slowmo(4, base_algorithm="easgd")
    with pytest.raises(ConfigError, match="outer_optimizer"):
        presets.diloco(4, outer_optimizer="lamb")
    with pytest.raises(ConfigError, match="outer_momentum"):
        presets.slowmo(4, outer_momentum=1.0)
    with pytest.raises(ConfigError, match="outer"):  # an outer optimizer needs z and the post_mix rule
        AlgorithmSpec(name="custom", workers=2, auxiliaries=0, tau=1, schedule=PeriodicSchedule(1, [np.eye(2)]),
                      outer=OuterOptimizer())


def test_mix_policy_averages_adam_moments_at_outer_rounds() -> None:
    sim = _run_sim(presets.diloco(3, 2, policies=Policies(optimizer_state="mix")), steps=4, optimizer="adam")
    st = sim.optimizer_state
    for name in ("exp_avg", "exp_avg_sq"):
        assert torch.allclose(st[name][0], st[name][1], rtol=0, atol=1e-15)
        assert torch.all(st[name][3] == 0)  # z holds no inner-optimizer state
    assert sim.optimizer_steps.tolist() == [4, 4, 4]  # step counts stay each worker's own


def test_theory_reports_slowmo_rate_and_no_bound_for_diloco(capsys: pytest.CaptureFixture[str]) -> None:
    from coopsgd.cli import main

    assert main(["theory", "--preset", "slowmo", "--workers", "8", "--tau", "4", "--outer-momentum", "0.6",
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["effective_lr_factor"] == pytest.approx(1.0 / 0.4)
    assert "O(1/sqrt(m K))" in out["convergence_rate"]
    assert "bounds" not in out  # no problem constants given
    assert main(["theory", "--preset", "slowmo", "--workers", "8", "--tau", "4", "--L", "1", "--sigma2", "1",
                 "--lr", "0.01", "--steps", "1000", "--f-gap", "1", "--json"]) == 0
    rate = json.loads(capsys.readouterr().out)["bounds"]["slowmo_rate"]
    assert rate["order_1_over_sqrt_mK"] == pytest.approx(1.0 / np.sqrt(8 * 1000))
    assert rate["outer_rounds"] == 250 and rate["effective_lr_factor"] == pytest.approx(2.0)
    assert main(["theory", "--preset", "slowmo", "--workers", "8", "--L", "1", "--sigma2", "1", "--lr", "0.01",
                 "--steps", "1000", "--f-gap", "1"]) == 0
    text = capsys.readouterr().out
    assert "convergence_rate" in text and "1/sqrt(m K) = 0.01118" in text
    assert main(["theory", "--preset", "diloco", "--workers", "4", "--L", "1", "--sigma2", "1", "--lr", "0.01",
                 "--steps", "1000", "--f-gap", "1", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["bounds"]["diloco"].startswith("no convergence bound applies")
    assert "convergence_rate" not in out
    assert any("no convergence bound" in n for n in out["notes"])
