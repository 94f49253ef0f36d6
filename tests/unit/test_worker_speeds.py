"""Speed classes in the simulated clock (``worker_speeds``): block layout, scaled compute, refusals."""

from __future__ import annotations

import numpy as np
import pytest

from coopsgd.engines.simulator.clock import FlopCompute, SimClock
from coopsgd.errors import ConfigError
from coopsgd.theory.cost import ComputeModel, worker_speeds
from coopsgd.train import RunConfig
from coopsgd.train.trainer import train


def test_blocks_follow_array_split() -> None:
    np.testing.assert_array_equal(worker_speeds([1.0, 0.5], 4), [1.0, 1.0, 0.5, 0.5])
    np.testing.assert_array_equal(worker_speeds([2.0, 1.0, 0.25], 5), [2.0, 2.0, 1.0, 1.0, 0.25])
    np.testing.assert_array_equal(worker_speeds(None, 3), [1.0, 1.0, 1.0])
    with pytest.raises(ConfigError, match="worker_speeds"):
        worker_speeds([1.0, 0.0], 4)
    # interleaved classes repeat a speed: allowed (a milestone list refuses a repeat, a speed list does not)
    assert RunConfig(workers=6, worker_speeds="1,0.5,1").clock.worker_speeds == [1.0, 0.5, 1.0]
    np.testing.assert_array_equal(worker_speeds([1.0, 0.5, 1.0], 6), [1.0, 1.0, 0.5, 0.5, 1.0, 1.0])
    with pytest.raises(ConfigError, match="given twice"):
        RunConfig(lr_decay_epochs="2,2")
    with pytest.raises(ConfigError, match="at most one speed class per worker"):
        worker_speeds([1.0, 1.0, 1.0], 2)


def test_a_slow_class_takes_proportionally_longer_and_the_round_waits_for_it() -> None:
    clock = SimClock(compute=ComputeModel(mean_s=0.01), speeds=(1.0, 0.25)).bind(4, 10, 4.0)
    dt = clock.add_compute(None)
    np.testing.assert_allclose(dt, [0.01, 0.01, 0.04, 0.04])
    clock.add_compute(np.array([True, False, True, False]))
    np.testing.assert_allclose(clock.t, [0.02, 0.01, 0.08, 0.04])
    clock.communicate(clock.round_costs("allreduce"))
    assert np.all(clock.t == clock.t[0]) and clock.t[0] > 0.08
    flops = SimClock(compute=FlopCompute(gflops=1.0), speeds=(0.5,)).bind(2, 10, 4.0)
    np.testing.assert_allclose(flops.add_compute(None, flops=np.array([1e9, 2e9])), [2.0, 4.0])


def test_a_run_with_a_slow_class_is_slower_by_the_slow_factor() -> None:
    base = dict(preset="local_sgd", workers=4, tau=2, max_steps=4, batch_size=8, compute="constant", compute_ms=10.0,
                eval_every=4, eval_samples=64, net_latency_ms=0.0, net_bandwidth_mbps=1e6)
    fast = train(RunConfig(**base))["simulated_time_s"]
    slow = train(RunConfig(**base, worker_speeds=[1.0, 0.5]))["simulated_time_s"]
    assert fast == pytest.approx(0.04, rel=1e-3)
    assert slow == pytest.approx(0.08, rel=1e-3)
