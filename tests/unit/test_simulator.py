"""Simulator unit tests: executors agree, policies, non-finite handling, checkpoints, calibration, clock."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from torch import nn

from coopsgd.algorithms import presets
from coopsgd.algorithms.spec import AlgorithmSpec, Policies
from coopsgd.engines.reference import NonFiniteError
from coopsgd.engines.simulator import Simulator
from coopsgd.engines.simulator.clock import SimClock
from coopsgd.errors import ConfigError
from coopsgd.theory.cost import ComputeModel, NetworkModel, expected_runtime, round_cost


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 3))


def cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Flatten(), nn.Linear(4 * 4 * 4, 3),
    )


def batches(m: int, step: int, shape: tuple[int, ...], n: int = 8, seed: int = 0):
    out = []
    for i in range(m):
        g = torch.Generator().manual_seed(seed * 100_003 + step * 101 + i)
        out.append((torch.randn(n, *shape, generator=g), torch.randint(0, 3, (n,), generator=g)))
    return out


def run(sim: Simulator, steps: int, shape: tuple[int, ...], start: int = 0, lr: float = 0.1, seed: int = 0):
    stats = []
    for k in range(start, start + steps):
        mask = sim.spec.schedule.active(k)
        bs = batches(sim.m, k, shape, seed=seed)
        if mask is not None:
            bs = [b if mask[i] else None for i, b in enumerate(bs)]
        stats.append(sim.step(bs, lr))
    return stats


# -------------------------------------------------------------------------------------------------
# executors
# -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make_spec",
    [
        lambda: presets.easgd(4, 2),
        lambda: presets.fedavg(4, 2, fraction=0.5, seed=1),
        lambda: presets.lsgd(4, 2, lam=0.2),
    ],
    ids=["easgd", "fedavg_partial", "lsgd"],
)
@pytest.mark.parametrize("model,shape", [(mlp, (6,)), (cnn, (1, 8, 8))], ids=["mlp", "cnn_bn"])
def test_loop_and_vmap_give_the_same_trajectory(make_spec, model, shape) -> None:
    states = {}
    for ex in ("loop", "vmap"):
        sim = Simulator(make_spec(), model, executor=ex, dtype=torch.float64, momentum=0.9, weight_decay=1e-3)
        assert sim.executor_name == ex
        run(sim, 7, shape)
        states[ex] = (sim._state.clone(), {k: v.clone() for k, v in sim.other_buffers.items()})
    (a, ao), (b, bo) = states["loop"], states["vmap"]
    torch.testing.assert_close(a, b, rtol=0, atol=1e-10)
    for k in ao:
        assert torch.equal(ao[k], bo[k])
    if model is cnn:  # BatchNorm running statistics were updated (and agree)
        sim_b = a[:, : Simulator(presets.sync(1), cnn).b]
        assert not torch.allclose(sim_b[:, :4], torch.zeros_like(sim_b[:, :4]))
        assert int(ao["1.num_batches_tracked"].max()) > 0


def test_loop_replicas_hold_views_into_the_stacked_rows() -> None:
    sim = Simulator(presets.local_sgd(3, 2), mlp, executor="loop")
    run(sim, 1, (6,))
    ex = sim.executor
    rep = ex.replicas[1]  # type: ignore[union-attr]
    first = next(rep.parameters())
    assert first.data_ptr() == sim.params[1].data_ptr()
    assert first.grad is not None and first.grad.data_ptr() == ex.grads[1].data_ptr()  # type: ignore[union-attr]
    with torch.no_grad():
        sim.params[1, 0] = 123.0
    assert float(first.detach().reshape(-1)[0]) == 123.0


def test_auto_executor_calibrates_without_advancing_state() -> None:
    spec_a, spec_b = presets.local_sgd(3, 2), presets.local_sgd(3, 2)
    auto = Simulator(spec_a, mlp, dtype=torch.float64)
    loop = Simulator(spec_b, mlp, dtype=torch.float64, executor="loop")
    assert auto.executor_name == "auto"
    s1, s2 = run(auto, 3, (6,)), run(loop, 3, (6,))
    assert auto.executor_name in ("loop", "vmap")
    assert set(auto.calibration) == {"loop", "vmap"}
    assert all(t > 0 for t in auto.calibration.values())
    assert auto.executor is not None and auto.executor.name == auto.executor_name
    torch.testing.assert_close(auto.params, loop.params, rtol=0, atol=1e-12)
    assert s1[-1].step == s2[-1].step == 2 and auto.step_count == 3


# -------------------------------------------------------------------------------------------------
# policies
# -------------------------------------------------------------------------------------------------


def test_buffer_policies_mix_and_local() -> None:
    out = {}
    for pol in ("mix", "local"):
        spec = presets.local_sgd(3, 2, policies=Policies(buffers=pol))  # type: ignore[arg-type]
        sim = Simulator(spec, cnn, executor="loop", dtype=torch.float64)
        run(sim, 2, (1, 8, 8))  # one round at the end of step 1
        out[pol] = sim
    mix, local = out["mix"], out["local"]
    # BatchNorm in train mode normalises with batch statistics: parameters do not depend on the policy
    torch.testing.assert_close(mix.params, local.params, rtol=0, atol=1e-12)
    # "mix": every worker holds the average of the workers' buffers; "local": each keeps its own
    torch.testing.assert_close(mix.buffers, local.buffers.mean(0, keepdim=True).expand_as(mix.buffers), rtol=0, atol=1e-12)
    assert not torch.allclose(local.buffers[0], local.buffers[1])
    # integer buffers are never mixed
    assert torch.equal(mix.other_buffers["1.num_batches_tracked"], torch.tensor([2, 2, 2]))


def test_inactive_workers_keep_their_momentum() -> None:
    spec = presets.fedavg(4, 3, fraction=0.5, seed=3)
    sim = Simulator(spec, mlp, executor="loop", momentum=0.9, dtype=torch.float64)
    run(sim, 3, (6,))
    mom = sim.momentum
    assert mom is not None
    before = mom.clone()
    active = spec.schedule.active(3)
    assert active is not None and not active.all()
    run(sim, 1, (6,), start=3)
    for i in range(4):
        assert torch.equal(mom[i], before[i]) == (not active[i])


def test_mixing_is_one_matrix_product_per_round(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    from coopsgd.engines import kernel as kernel_module

    real = kernel_module.apply_mixing

    def counting(state, S):
        calls.append(tuple(state.shape))
        return real(state, S)

    monkeypatch.setattr(kernel_module, "apply_mixing", counting)
    spec = presets.easgd(4, 2, policies=Policies(buffers="mix", optimizer_state="mix"))
    sim = Simulator(spec, cnn, executor="loop", momentum=0.9)
    stats = run(sim, 6, (1, 8, 8))
    rounds = sum(s.communicated for s in stats)
    assert rounds == 3 and len(calls) == rounds
    # params, buffers and momentum of all 5 nodes in one product
    assert calls[0] == (5, sim.b + 2 * sim.d)


# -------------------------------------------------------------------------------------------------
# non-finite values
# -------------------------------------------------------------------------------------------------


def test_nan_loss_on_one_worker_raises_and_leaves_state_unchanged() -> None:
    sim = Simulator(presets.easgd(4, 2), cnn, executor="loop", momentum=0.9)
    run(sim, 3, (1, 8, 8))
    snapshot = sim.state_dict()["payload"]
    bs = batches(4, 3, (1, 8, 8))
    bs[2][0][0, 0, 0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match=r"worker 2 at step 3"):
        sim.step(bs, 0.1)
    assert torch.equal(sim._state, snapshot["state"])
    assert torch.equal(sim.other_buffers["1.num_batches_tracked"], snapshot["other_buffers"]["1.num_batches_tracked"])
    assert sim.step_count == 3 and sim.clock.state_dict() == snapshot["clock"]


class _SqrtNet(nn.Module):
    """|x w|^(1/2): finite loss but an infinite gradient at w = 0."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(6, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x @ self.w).abs().sqrt()


@pytest.mark.parametrize("executor", ["loop", "vmap"])
def test_infinite_gradient_with_finite_loss_raises(executor: str) -> None:
    sim = Simulator(presets.local_sgd(2, 2), _SqrtNet, executor=executor)
    with pytest.raises(NonFiniteError, match=r"non-finite gradient on worker 0 at step 0"):
        run(sim, 1, (6,))
    assert torch.all(sim.params == 0) and sim.step_count == 0


def test_overflowing_update_raises_before_modifying_state() -> None:
    sim = Simulator(presets.local_sgd(3, 2), mlp, executor="vmap", dtype=torch.float64)
    run(sim, 1, (6,))
    before = sim._state.clone()
    big = [(50 * x, y) for x, y in batches(3, 1, (6,))]  # gradients >> 1: lr * g overflows
    with pytest.raises(NonFiniteError, match=r"non-finite model on worker \d at step 1"):
        sim.step(big, 1e308)
    assert torch.equal(sim._state, before)
    run(sim, 1, (6,), start=1)  # the simulator is still usable
    assert sim.step_count == 2


# -------------------------------------------------------------------------------------------------
# checkpoints
# -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make_spec,kw",
    [
        (lambda: presets.lsgd(4, 2, lam=0.2), {"loss_estimate": "running_mean", "window": 3}),
        (lambda: presets.easgd(4, 2, nonblocking=True), {"momentum": 0.9, "nesterov": True}),
    ],
    ids=["lsgd", "easgd"],
)
def test_state_dict_round_trip_resumes_bit_identically(make_spec, kw) -> None:
    def make() -> Simulator:
        clock = SimClock(NetworkModel(), ComputeModel(0.01, "lognormal", 0.5), seed=3)
        return Simulator(make_spec(), cnn, executor="auto", clock=clock, **kw)

    a = make()
    run(a, 5, (1, 8, 8))
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    run(a, 5, (1, 8, 8), start=5)

    b = make()
    buf.seek(0)
    b.load_state_dict(torch.load(buf, weights_only=True))
    assert b.executor_name == a.executor_name
    run(b, 5, (1, 8, 8), start=5)
    assert torch.equal(a._state, b._state)
    for k in a.other_buffers:
        assert torch.equal(a.other_buffers[k], b.other_buffers[k])
    assert a.leader == b.leader and a.rounds == b.rounds and a.step_count == b.step_count == 10
    assert a.clock.elapsed == b.clock.elapsed


def _saved(sim: Simulator) -> dict:
    buf = io.BytesIO()
    torch.save(sim.state_dict(), buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def test_checkpoint_records_the_optimizer_settings_and_resumes_under_the_same() -> None:
    a = Simulator(presets.local_sgd(2, 2), mlp, executor="loop", optimizer="adam", betas=(0.9, 0.99), weight_decay=0.1)
    run(a, 3, (6,))
    state = _saved(a)
    recorded = state["payload"]["optimizer_settings"]
    assert recorded == a.optimizer_settings.to_dict()
    assert (recorded["name"], recorded["beta2"], recorded["weight_decay"]) == ("adam", 0.99, 0.1)
    # the same settings, given another way (one value instead of one by one): it resumes bit-identically
    b = Simulator(presets.local_sgd(2, 2), mlp, executor="loop", optimizer=a.optimizer_settings)
    b.load_state_dict(state)
    run(a, 2, (6,), start=3)
    run(b, 2, (6,), start=3)
    assert torch.equal(a._state, b._state) and torch.equal(a.optimizer_steps, b.optimizer_steps)
    # a setting that does not change the arithmetic is not a difference: SGD ignores Adam's betas, and
    # weight_decay=None is torch's default 0
    s = Simulator(presets.local_sgd(2, 2), mlp, executor="loop", optimizer="sgd", momentum=0.9)
    saved = _saved(s)
    Simulator(presets.local_sgd(2, 2), mlp, executor="loop", optimizer="sgd", momentum=0.9, betas=(0.5, 0.999),
              weight_decay=0.0).load_state_dict(saved)


@pytest.mark.parametrize(
    "saved_kw,resume_kw,setting",
    [
        ({"optimizer": "adam"}, {"optimizer": "sgd"}, "name"),
        ({"optimizer": "sgd", "momentum": 0.9}, {"optimizer": "sgd", "momentum": 0.5}, "momentum"),
        ({"optimizer": "adamw"}, {"optimizer": "adamw", "eps": 1e-6}, "eps"),
    ],
    ids=["adam_under_sgd", "sgd_momentum", "adamw_eps"],
)
def test_checkpoint_under_other_optimizer_settings_names_the_setting(saved_kw, resume_kw, setting) -> None:
    a = Simulator(presets.local_sgd(2, 2), mlp, executor="loop", **saved_kw)
    run(a, 2, (6,))
    state = _saved(a)
    b = Simulator(presets.local_sgd(2, 2), mlp, executor="loop", **resume_kw)
    before = b._state.clone()
    with pytest.raises(ConfigError, match=rf"optimizer_settings\.{setting}="):
        b.load_state_dict(state)
    assert torch.equal(b._state, before) and b.step_count == 0  # nothing was restored


def test_checkpoint_without_optimizer_settings_still_loads() -> None:
    """Checkpoints written before the settings were recorded (tests/fixtures/v0_1) load unchecked."""
    a = Simulator(presets.local_sgd(2, 2), mlp, executor="loop", optimizer="sgd", momentum=0.9)
    run(a, 2, (6,))
    state = _saved(a)
    del state["payload"]["optimizer_settings"]
    b = Simulator(presets.local_sgd(2, 2), mlp, executor="loop", optimizer="sgd", momentum=0.9)
    b.load_state_dict(state)
    assert torch.equal(a._state, b._state) and b.step_count == 2


# -------------------------------------------------------------------------------------------------
# LSGD estimates, centre model, errors
# -------------------------------------------------------------------------------------------------


def test_lsgd_loss_estimates() -> None:
    sim = Simulator(presets.lsgd(3, 1, lam=0.1), mlp, executor="loop", loss_estimate="batch")
    for s in run(sim, 3, (6,)):
        np.testing.assert_array_equal(s.estimates, s.losses)
        assert s.info["leader"] == int(np.argmin(s.losses))
    sim = Simulator(presets.lsgd(3, 1, lam=0.1), mlp, executor="loop", window=2)
    stats = run(sim, 4, (6,))
    hist = np.stack([s.losses for s in stats])
    np.testing.assert_allclose(stats[-1].estimates, hist[-2:].mean(0))
    np.testing.assert_allclose(stats[0].estimates, hist[0])
    probe = batches(1, 99, (6,))[0]
    sim = Simulator(presets.lsgd(3, 1, lam=0.1), mlp, executor="vmap", loss_estimate="probe", probe_batch=probe)
    s = run(sim, 1, (6,))[0]
    assert s.estimates is not None and s.estimates.shape == (3,)
    # centre model = the leader's parameters
    center = sim.center_model()
    torch.testing.assert_close(
        torch.cat([p.detach().reshape(-1) for p in center.parameters()]), sim.params[sim.leader], rtol=0, atol=0
    )


def test_center_and_worker_models() -> None:
    sim = Simulator(presets.local_sgd(3, 5), cnn, executor="loop")
    run(sim, 2, (1, 8, 8))
    x = torch.randn(2, 1, 8, 8)
    w1 = sim.worker_model(1)
    assert not w1.training
    torch.testing.assert_close(torch.cat([p.reshape(-1) for p in w1.parameters()]), sim.params[1])
    c = sim.center_model()
    torch.testing.assert_close(torch.cat([p.reshape(-1) for p in c.parameters()]), sim.params.mean(0))
    assert c(x).shape == (2, 3)
    assert sim.consensus_distance() > 0


def test_invalid_arguments_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="executor"):
        Simulator(presets.sync(2), mlp, executor="gpu")
    with pytest.raises(ConfigError, match="probe_batch"):
        Simulator(presets.lsgd(2), mlp, loss_estimate="probe")
    with pytest.raises(ConfigError, match="nesterov"):
        Simulator(presets.sync(2), mlp, nesterov=True)
    with pytest.raises(ConfigError, match="downpour_order"):
        Simulator(presets.sync(2), mlp, downpour_order="clock")
    sim = Simulator(presets.sync(2), mlp)
    with pytest.raises(ConfigError, match="batches"):
        sim.step(batches(3, 0, (6,)), 0.1)
    with pytest.raises(ConfigError, match=r"batches\[1\]"):
        sim.step([batches(1, 0, (6,))[0], None], 0.1)


# -------------------------------------------------------------------------------------------------
# simulated clock
# -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make_spec,latency",
    [
        (lambda: presets.local_sgd(4, 3), 0.02),
        (lambda: presets.easgd(4, 3, nonblocking=True), 0.02),  # communication longer than tau steps
        (lambda: presets.easgd(4, 3, nonblocking=True), 0.001),  # fully hidden
    ],
    ids=["local_sgd", "easgd_overlap_exposed", "easgd_overlap_hidden"],
)
def test_clock_with_constant_compute_equals_expected_runtime(make_spec, latency) -> None:
    spec: AlgorithmSpec = make_spec()
    network = NetworkModel(latency_s=latency, bandwidth_Bps=1e6)
    compute = ComputeModel(mean_s=0.01)
    sim = Simulator(spec, mlp, executor="loop", dtype=torch.float64, clock=SimClock(network, compute))
    steps = 11  # three rounds and a partial one
    run(sim, steps, (6,))
    cost = round_cost("allreduce", workers=spec.workers, params=sim.d, bytes_per_param=8)
    want = expected_runtime(
        steps=steps, tau=spec.tau, workers=spec.workers, cost=cost, network=network, compute=compute,
        overlap=spec.overlap, trials=1,
    )
    clock = sim.clock
    assert clock.elapsed == pytest.approx(want["total_s"], rel=1e-12)
    assert clock.compute_s == pytest.approx(want["compute_s"], rel=1e-12)
    assert clock.idle_s == pytest.approx(want["idle_s"], abs=1e-12)
    assert clock.communication_s == pytest.approx(want["communication_s"], rel=1e-9, abs=1e-12)


def test_clock_with_stragglers_accounts_for_every_second_and_orders_downpour() -> None:
    clock = SimClock(NetworkModel(1e-3, 1e7), ComputeModel(0.01, "pareto", 0.8), seed=1)
    sim = Simulator(presets.downpour(4, 2), mlp, executor="loop", clock=clock, downpour_order="clock")
    stats = run(sim, 6, (6,))
    total = clock.compute_s + clock.idle_s + clock.communication_s
    assert clock.elapsed == pytest.approx(total, rel=1e-12)
    assert clock.idle_s > 0
    assert sum(s.compute_s + s.idle_s + s.communication_s for s in stats) == pytest.approx(total, rel=1e-9)
    comm = [s for s in stats if s.communicated]
    assert len(comm) == 3 and all(s.info["order_source"] == "clock" for s in comm)
    assert all(s.bytes_sent == pytest.approx(2 * sim.d * 4 * 4) for s in comm)  # parameter server, float32
    assert stats[-1].sim_time == clock.elapsed


def test_lsgd_refresh_costs_gather_plus_broadcast_and_pull_is_free() -> None:
    clock = SimClock(NetworkModel(1e-3, 1e9), ComputeModel(0.01))
    sim = Simulator(presets.lsgd(4, 2), mlp, executor="loop", clock=clock)
    stats = run(sim, 4, (6,))
    assert [s.communicated for s in stats] == [True, False, True, False]
    assert [s.pattern for s in stats] == ["broadcast", "local", "broadcast", "local"]
    assert stats[0].bytes_sent == pytest.approx(4 * 4 + sim.d * 2 * 4)  # m floats + d floats * log2(4) hops
    assert stats[1].communication_s == 0.0
