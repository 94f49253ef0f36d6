"""``executor="auto"``: the chosen executor's last calibration call is the first step's computation.

Every calibration call starts from the step's RNG state, so it computes exactly what the step would; the
step takes that result instead of computing it again (issue 15: calibration included, an ``auto`` run
costs about what the better fixed executor costs). These tests pin the numbers: a calibrated run, a run
reading the cache and a run with the fixed executor give bit-identical parameters and leave torch's RNG
in the same state, with dropout drawing masks in every step.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from torch import nn

from coopsgd.algorithms import presets
from coopsgd.engines import executors as ex_mod
from coopsgd.engines.simulator import Simulator
from coopsgd.engines.simulator.calibration import CACHE_FILE, ExecutorCache

M = 4


def model() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 16), nn.Dropout(0.3), nn.ReLU(), nn.Linear(16, 3))


def batches(step: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(100 + step)
    return [(torch.randn(5, 12, generator=g), torch.randint(0, 3, (5,), generator=g)) for _ in range(M)]


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, int]]:
    """Counts executor compute calls; ``calls["slow"]`` names an executor made 0.25 s slower per call (far
    beyond any stall of a loaded machine; one torch thread, so small ops do not wait for a busy core)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    counts: dict[str, Any] = {"loop": 0, "vmap": 0, "slow": None}
    for cls in (ex_mod.LoopExecutor, ex_mod.VmapExecutor):
        orig = cls.compute

        def compute(self: Any, *a: Any, _orig: Any = orig, **k: Any) -> Any:
            counts[self.name] += 1
            if counts["slow"] == self.name:
                time.sleep(0.25)
            return _orig(self, *a, **k)

        monkeypatch.setattr(cls, "compute", compute)
    yield counts
    torch.set_num_threads(threads)


def run(executor: str, cache: ExecutorCache | None, steps: int = 4, prepare: bool = False) -> tuple[Simulator, float]:
    torch.manual_seed(0)
    sim = Simulator(presets.local_sgd(M, 2), model, executor=executor, executor_cache=cache, dtype=torch.float64)
    if prepare:  # as the trainer does: the choice is made before the first step, on equal (not the same) batches
        sim.prepare(batches(0))
    for k in range(steps):
        sim.step(batches(k), 0.1)
    return sim, float(torch.rand(()))  # where torch's RNG stands after the run


@pytest.mark.parametrize("winner", ["loop", "vmap"])
@pytest.mark.parametrize("prepare", [False, True])
def test_calibrated_cached_and_fixed_runs_are_identical(tmp_path, calls, winner: str, prepare: bool) -> None:
    calls["slow"] = "vmap" if winner == "loop" else "loop"
    cache = ExecutorCache(tmp_path / CACHE_FILE)
    first, r_first = run("auto", cache, prepare=prepare)
    assert first.executor_source == "calibrated" and first.executor_name == winner
    second, r_second = run("auto", cache, prepare=prepare)
    assert second.executor_source == "cache" and second.executor_name == winner
    fixed, r_fixed = run(winner, None)
    assert torch.equal(first.params, fixed.params) and torch.equal(second.params, fixed.params)
    assert r_first == r_second == r_fixed  # the same draws were made: dropout masks of later steps agree


def test_the_first_step_reuses_the_winners_last_call(tmp_path, calls) -> None:
    calls["slow"] = "vmap"
    sim, _ = run("auto", ExecutorCache(tmp_path / CACHE_FILE), steps=3)
    # a warm-up and one timed call each (the choice is clear after one round), the first step takes the
    # loop's timed call, then steps 1 and 2 compute: 4 loop calls, not 5
    assert (calls["loop"], calls["vmap"]) == (4, 2)


def test_a_state_changed_between_prepare_and_step_is_computed_again(tmp_path, calls) -> None:
    calls["slow"] = "vmap"
    torch.manual_seed(0)
    sim = Simulator(presets.local_sgd(M, 2), model, executor="auto", dtype=torch.float64,
                    executor_cache=ExecutorCache(tmp_path / CACHE_FILE))
    sim.prepare(batches(0))
    before = calls["loop"]
    with torch.no_grad():
        sim._state.mul_(0.5)  # any in-place write bumps the state's version counter
    ref = Simulator(presets.local_sgd(M, 2), model, executor="loop", dtype=torch.float64)
    with torch.no_grad():
        ref._state.copy_(sim._state)
    rng = torch.get_rng_state()
    sim.step(batches(0), 0.1)
    assert calls["loop"] == before + 1  # computed, not taken from the calibration
    torch.set_rng_state(rng)
    ref.step(batches(0), 0.1)
    assert torch.equal(sim.params, ref.params)


def test_other_batches_or_rng_are_computed_again(tmp_path, calls) -> None:
    calls["slow"] = "vmap"
    for change in ("batches", "rng"):
        torch.manual_seed(0)
        sim = Simulator(presets.local_sgd(M, 2), model, executor="auto", dtype=torch.float64,
                        executor_cache=ExecutorCache(tmp_path / f"{change}.json"))
        sim.prepare(batches(0))
        before = calls["loop"]
        if change == "rng":
            torch.rand(3)
        sim.step(batches(7) if change == "batches" else batches(0), 0.1)
        assert calls["loop"] == before + 1, change
