"""Streaming DiLoCo (issue 27, item 2): fragments at staggered steps, a delayed application, the merge alpha.

* one fragment, no delay, alpha = 0 is DiLoCo bit for bit (simulator and reference engine);
* the reference engine follows a hand-written oracle on a tiny quadratic (P = 2, delay 1, alpha 0.5; outer SGD
  lr 1, then Nesterov);
* the simulator equals the reference engine with fragments, a delay and a merge factor;
* resume is bit-exact mid-fragment with an update in flight;
* the peak bytes of one step are 1/P of DiLoCo's; a delay hides the communication behind compute;
* bad settings are refused (exit 2, one line).
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import pytest
import torch
from test_simulator_vs_reference import BatchLeastSquares, _feed, _simulator  # same directory
from torch import nn

from coopsgd.algorithms import presets
from coopsgd.algorithms.spec import AlgorithmSpec, Policies
from coopsgd.algorithms.streaming import StreamingSchedule, fragment_bounds
from coopsgd.engines.reference import ReferenceEngine
from coopsgd.engines.simulator import Simulator
from coopsgd.engines.simulator.clock import SimClock
from coopsgd.errors import ConfigError
from coopsgd.theory.cost import ComputeModel

LR = 0.05


def _run_sim(spec: AlgorithmSpec, steps: int, optimizer: str = "adamw", **kw: Any) -> tuple[Simulator, list[Any]]:
    obj = BatchLeastSquares(spec.workers)
    sim = _simulator(spec, obj, "loop", optimizer=optimizer, **kw)
    counters = [0] * spec.workers
    return sim, [_feed(sim, obj, counters) for _ in range(steps)]


def _run_ref(spec: AlgorithmSpec, steps: int, x0: np.ndarray) -> tuple[ReferenceEngine, list[Any]]:
    eng = ReferenceEngine(spec, BatchLeastSquares(spec.workers), x0)
    return eng, [eng.step(None, LR) for _ in range(steps)]


@pytest.mark.parametrize("compression", [None, "int4:2", "qsgd:4"])
def test_one_fragment_without_delay_is_diloco_bit_for_bit(compression: str | None) -> None:
    m, tau, steps = 3, 4, 14  # two local steps after the last round
    a, sa = _run_sim(presets.diloco(m, tau, outer_lr=0.5, compression=compression), steps)
    b, sb = _run_sim(presets.streaming_diloco(m, tau, fragments=1, outer_lr=0.5, compression=compression), steps)
    assert torch.equal(a._state, b._state)
    assert a.outer is not None and b.outer is not None
    assert torch.equal(a.outer.state["momentum_buffer"], b.outer.state["momentum_buffer"])
    for x, y in zip(sa, sb, strict=True):
        assert np.array_equal(x.losses, y.losses) and x.bytes_sent == y.bytes_sent and x.sim_time == y.sim_time
        assert x.round == y.round and x.communicated == y.communicated
    assert a.time_record() == b.time_record()
    assert a.rounds == b.rounds == 3
    x0 = np.linspace(-1.0, 1.0, 5)
    r1, s1 = _run_ref(presets.diloco(m, tau, outer_lr=0.5, compression=compression), steps, x0)
    r2, s2 = _run_ref(presets.streaming_diloco(m, tau, fragments=1, outer_lr=0.5, compression=compression), steps, x0)
    assert np.array_equal(r1.state, r2.state)
    assert r1.outer_state is not None and r2.outer_state is not None
    assert np.array_equal(r1.outer_state["momentum_buffer"], r2.outer_state["momentum_buffer"])
    assert all(np.array_equal(x.losses, y.losses) for x, y in zip(s1, s2, strict=True))


class _Pull:
    """``f_i(x) = 1/2 ||x - c_i||^2``: worker i's gradient is ``x - c_i`` exactly (no noise)."""

    def __init__(self, centers: np.ndarray) -> None:
        self.c = np.asarray(centers, dtype=np.float64)
        self.dim = self.c.shape[1]

    def value(self, x: np.ndarray) -> np.ndarray | float:
        x = np.asarray(x, dtype=np.float64)
        v = np.mean([0.5 * np.sum((np.atleast_2d(x) - c) ** 2, axis=1) for c in self.c], axis=0)
        return float(v[0]) if x.ndim == 1 else v

    def gradient(self, x: np.ndarray, worker: int, rng: np.random.Generator) -> np.ndarray:
        return x - self.c[worker]

    def initial_point(self, rng: np.random.Generator) -> np.ndarray:
        return np.zeros(self.dim)


@pytest.mark.parametrize("outer", ["averaging", "nesterov"])
def test_reference_engine_follows_a_hand_written_oracle(outer: str) -> None:
    m, d, H, delay, alpha, lr, steps = 2, 4, 4, 1, 0.5, 0.3, 13
    olr, mu = (1.0, 0.0) if outer == "averaging" else (0.7, 0.9)
    centers = np.array([[1.0, -2.0, 0.5, 3.0], [-1.0, 4.0, 2.5, -3.0]])
    x0 = np.array([0.2, -0.1, 0.4, 1.0])
    spec = presets.streaming_diloco(m, H, fragments=2, fragment_delay=delay, merge_alpha=alpha, outer_lr=olr,
                                    outer_momentum=mu, outer_optimizer="sgd" if outer == "averaging" else "nesterov")
    eng = ReferenceEngine(spec, _Pull(centers), x0)
    # the oracle: fragments {0, 1} and {2, 3}; fragment 0 sends after steps 3, 7, 11, fragment 1 after 1, 5, 9
    frag = {0: slice(0, 2), 2: slice(2, 4)}  # by the offset (k + 1) mod H of its round
    x = np.tile(x0, (m, 1))
    z, buf = x0.copy(), np.zeros(d)
    for k in range(steps):
        x = x - lr * (x - centers)
        sent = frag.get((k + 1) % H)
        if sent is not None:
            a = x[:, sent].mean(axis=0)
            delta = z[sent] - a
            buf[sent] = mu * buf[sent] + delta
            step = delta + mu * buf[sent]  # Nesterov (mu = 0: the pseudo-gradient itself)
            z[sent] = z[sent] - olr * step
        applied = frag.get(k % H) if k >= 1 else None  # the round after step k - 1, one step later
        if applied is not None:
            x[:, applied] = alpha * x[:, applied] + (1 - alpha) * z[applied]
        eng.step(None, lr)
        np.testing.assert_allclose(eng.state[:m], x, rtol=0, atol=1e-12, err_msg=f"step {k}")
        np.testing.assert_allclose(eng.state[m], z, rtol=0, atol=1e-12, err_msg=f"step {k}")
    if outer == "averaging":  # outer lr 1 without momentum: z's fragment is the workers' average at its round
        assert eng.outer_state is not None and "momentum_buffer" not in eng.outer_state
    assert eng.rounds == 6


SPECS = {
    "p2_delay1_alpha": lambda: presets.streaming_diloco(3, 8, fragments=2, fragment_delay=1, merge_alpha=0.3,
                                                        outer_lr=0.5),
    "p3_delay1": lambda: presets.streaming_diloco(3, 8, fragments=3, fragment_delay=1, outer_lr=0.6),
    "p2_heavy_ball": lambda: presets.streaming_diloco(2, 4, fragments=2, outer_optimizer="sgd", outer_momentum=0.5),
    "p2_delay1_int4": lambda: presets.streaming_diloco(3, 8, fragments=2, fragment_delay=1, merge_alpha=0.3,
                                                       outer_lr=0.5, compression="int4:2"),
    "p3_qsgd": lambda: presets.streaming_diloco(3, 6, fragments=3, fragment_delay=1, compression="qsgd:4"),
}


@pytest.mark.parametrize("name", list(SPECS))
def test_simulator_equals_reference_engine(name: str) -> None:
    m, steps = SPECS[name]().workers, 21
    obj_sim = BatchLeastSquares(m)
    sim = _simulator(SPECS[name](), obj_sim, "loop", optimizer="sgd")
    x0 = sim.params[0].numpy().copy()
    eng = ReferenceEngine(SPECS[name](), BatchLeastSquares(m), x0, seed=4)  # the simulator's seed (draws)
    counters = [0] * m
    for _ in range(steps):
        ref = eng.step(None, LR)
        st = _feed(sim, obj_sim, counters, lr=LR)
        assert st.communicated == ref.communicated and st.info == ref.info
    np.testing.assert_allclose(sim.params.numpy(), eng.state, rtol=0, atol=1e-10)
    assert sim.rounds == eng.rounds
    assert not np.allclose(sim.params[0].numpy(), sim.params[1].numpy())  # workers differ between rounds


@pytest.mark.parametrize("compression", [None, "int4:2"])
def test_resume_mid_fragment_with_an_update_in_flight_is_bit_exact(compression: str | None) -> None:
    # H = 8, P = 2, delay 2: fragment 1 sends after step 3 and is applied after step 5; stop after step 4
    spec = lambda: presets.streaming_diloco(3, 8, fragments=2, fragment_delay=2, merge_alpha=0.25,  # noqa: E731
                                            outer_lr=0.5, compression=compression)
    clock = lambda: SimClock(compute=ComputeModel(mean_s=1e-3, distribution="constant"))  # noqa: E731
    full, _ = _run_sim(spec(), 13, clock=clock())
    obj = BatchLeastSquares(3)
    first = _simulator(spec(), obj, "loop", optimizer="adamw", clock=clock())
    counters = [0] * 3
    for _ in range(5):
        _feed(first, obj, counters)
    assert first.clock.pending_until > float(first.clock.t.max())  # the round's communication still runs
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)
    buf.seek(0)
    second = _simulator(spec(), obj, "loop", optimizer="adamw", clock=clock())
    second.load_state_dict(torch.load(buf, weights_only=True))
    for _ in range(8):
        _feed(second, obj, counters)
    assert torch.equal(full._state, second._state)
    assert full.outer is not None and second.outer is not None
    assert torch.equal(full.outer.state["momentum_buffer"], second.outer.state["momentum_buffer"])
    assert full.time_record() == second.time_record()
    # the reference engine too
    x0 = np.linspace(-1.0, 1.0, 5)
    a, _ = _run_ref(spec(), 13, x0)
    b, _ = _run_ref(spec(), 5, x0)
    c = ReferenceEngine(spec(), BatchLeastSquares(3), x0)
    c.load_state_dict(b.state_dict())
    c.objective.calls = list(b.objective.calls)  # type: ignore[attr-defined]  (the objective's batch counters)
    for _ in range(8):
        c.step(None, LR)
    assert np.array_equal(a.state, c.state) and a.units_sent == c.units_sent


class _Blocks(nn.Module):
    """Four equal parameter tensors (a model whose fragments can be equal): ``y = x (w1 + w2 + w3 + w4)``."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.ParameterList([nn.Parameter(torch.full((5, 1), 0.1 * (j + 1))) for j in range(4)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ (self.w[0] + self.w[1] + self.w[2] + self.w[3])


def _blocks_sim(spec: AlgorithmSpec, steps: int, clock: SimClock | None = None) -> Simulator:
    obj = BatchLeastSquares(spec.workers)
    sim = Simulator(spec, _Blocks, loss_fn=torch.nn.functional.mse_loss, dtype=torch.float64, executor="loop",
                    seed=4, clock=clock)
    counters = [0] * spec.workers
    for _ in range(steps):
        _feed(sim, obj, counters)
    return sim


def test_peak_bytes_are_one_over_p_of_diloco() -> None:
    m, H, steps = 4, 8, 16
    dil = _blocks_sim(presets.diloco(m, H), steps).time_record()
    for P in (2, 4):
        st = _blocks_sim(presets.streaming_diloco(m, H, fragments=P), steps).time_record()
        assert st["peak_bytes_per_step"] == pytest.approx(dil["peak_bytes_per_step"] / P, rel=1e-12)
        assert st["bytes_sent"] == pytest.approx(dil["bytes_sent"], rel=1e-12)  # the same bytes, spread out
    assert dil["peak_bytes_per_step"] > 0
    # 4-bit fragments: a fragment's payload is int4's (5 levels in 3 bytes plus one float64 scale), all-gathered
    # (int4 payloads do not add up on the wire: m - 1 of them per node); DiLoCo's whole-model payload is 4 times
    # the levels and scales
    q = _blocks_sim(presets.streaming_diloco(m, H, fragments=4, compression="int4:5"), steps).time_record()
    qd = _blocks_sim(presets.diloco(m, H, compression="int4:5"), steps).time_record()
    assert q["peak_bytes_per_step"] == (m - 1) * (3 + 8)
    assert qd["peak_bytes_per_step"] == (m - 1) * (10 + 4 * 8)
    assert q["peak_bytes_per_step"] < dil["peak_bytes_per_step"] / 4


def test_coordinate_fragments_reach_one_over_p_when_a_tensor_dominates() -> None:
    m, H, steps = 4, 8, 16

    def peak(spec: AlgorithmSpec) -> float:
        obj = BatchLeastSquares(m)
        sim = Simulator(spec, lambda: nn.Linear(5, 1), loss_fn=torch.nn.functional.mse_loss, dtype=torch.float64,
                        executor="loop", seed=4)
        counters = [0] * m
        for _ in range(steps):
            _feed(sim, obj, counters)
        return float(sim.time_record()["peak_bytes_per_step"])

    dil = peak(presets.diloco(m, H))
    assert peak(presets.streaming_diloco(m, H, fragments=2)) == pytest.approx(dil * 5 / 6, rel=1e-12)  # weight | bias
    assert peak(presets.streaming_diloco(m, H, fragments=2, fragment_split="coordinates")) == pytest.approx(dil / 2)


def test_a_delay_hides_the_fragment_communication_behind_compute() -> None:
    m, H, steps = 4, 8, 16

    def run(delay: int) -> dict[str, Any]:
        clock = SimClock(compute=ComputeModel(mean_s=0.01, distribution="constant"))
        return _blocks_sim(presets.streaming_diloco(m, H, fragments=4, fragment_delay=delay), steps, clock).time_record()

    blocking, overlapped = run(0), run(1)
    # 8 equal fragment rounds; with the delay only the last one, still in flight when the run ends, is exposed
    assert overlapped["simulated_communication_s"] == pytest.approx(blocking["simulated_communication_s"] / 8,
                                                                    rel=1e-9)
    for t in (blocking, overlapped):
        total = t["simulated_compute_s"] + t["simulated_idle_s"] + t["simulated_communication_s"]
        assert t["simulated_time_s"] == pytest.approx(total, rel=1e-12)
    # a round whose communication outlasts the delay is waited for at the application
    slow = SimClock(compute=ComputeModel(mean_s=1e-5, distribution="constant"))
    t = _blocks_sim(presets.streaming_diloco(m, H, fragments=4, fragment_delay=1), steps, slow).time_record()
    assert t["simulated_communication_s"] > 0.5 * blocking["simulated_communication_s"]
    assert t["simulated_time_s"] == pytest.approx(t["simulated_compute_s"] + t["simulated_idle_s"]
                                                  + t["simulated_communication_s"], rel=1e-12)


def test_fragments_schedule_and_bounds() -> None:
    assert fragment_bounds([5], 2) == [(0, 2), (2, 5)]  # fewer tensors than fragments: equal chunks
    assert fragment_bounds([4, 4, 4, 4], 2) == [(0, 8), (8, 16)]
    assert fragment_bounds([10, 1, 1, 1, 1], 2) == [(0, 10), (10, 14)]  # whole tensors, the nearest boundary
    assert fragment_bounds([1, 1, 10], 3) == [(0, 1), (1, 2), (2, 12)]  # every fragment keeps a tensor
    assert fragment_bounds([10, 1, 1, 1, 1], 2, "coordinates") == [(0, 7), (7, 14)]
    with pytest.raises(ConfigError, match="fragment_split"):
        fragment_bounds([4], 2, "layers")
    sched = StreamingSchedule(2, 10, fragments=3, delay=2)
    assert sched.offsets == [0, 3, 6]
    events = {k: sched.mix(k) for k in range(20)}
    sends = {k: mx.info["fragment"] for k, mx in events.items() if mx is not None and mx.info.get("outer")}
    applies = {k: mx.info["fragment"] for k, mx in events.items() if mx is not None and mx.info.get("apply")}
    assert sends == {2: 1, 5: 2, 9: 0, 12: 1, 15: 2, 19: 0}
    assert applies == {4: 1, 7: 2, 11: 0, 14: 1, 17: 2}
    assert [events[k].round for k in sorted(sends)] == list(range(6))  # type: ignore[union-attr]
    assert all(not events[k].communicates for k in applies)  # type: ignore[union-attr]


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"fragments": 9}, "fragments"),
    ({"fragments": 4, "fragment_delay": 2}, "fragment_delay"),
    ({"merge_alpha": 1.0}, "merge_alpha"),
    ({"fragments": 0}, "fragments"),
    ({"outer_optimizer": "adam"}, "outer_optimizer"),
    ({"policies": Policies(optimizer_state="mix")}, "optimizer_state"),
])
def test_bad_settings_are_refused(kwargs: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        presets.streaming_diloco(4, 8, **kwargs)


def test_cli_refuses_bad_settings_in_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    from coopsgd.cli import main

    for args, field in ((["--fragments", "4", "--fragment-delay", "2"], "fragment_delay"),
                        (["--merge-alpha", "1.5"], "merge_alpha"), (["--fragments", "9"], "fragments")):
        assert main(["run", "--preset", "streaming_diloco", "--tau", "8", "--max-steps", "1", *args]) == 2
        err = capsys.readouterr().err.strip()
        assert field in err and len(err.splitlines()) == 1 and "Traceback" not in err


def test_theory_says_no_bound_applies(capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from coopsgd.cli import main

    assert main(["theory", "--preset", "streaming_diloco", "--workers", "4", "--tau", "8", "--L", "1", "--sigma2",
                 "1", "--lr", "0.01", "--steps", "1000", "--f-gap", "1", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["bounds"]["diloco"].startswith("no convergence bound applies")
    assert "convergence_rate" not in out and out["params"]["fragments"] == 4
