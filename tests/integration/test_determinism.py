"""Issue 13, item 1: the same command with the same seed on the same machine gives the same files.

Two runs may differ only in fields whose names say they are measured wall-clock (``wall_time_s``,
``measured_*``), whatever the machine's load: the simulated clock's default compute model counts FLOPs
(it does not time anything) and ``executor="auto"`` reads its choice from a cache after the first run.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from coopsgd.algorithms import presets
from coopsgd.cli import main
from coopsgd.engines.simulator import Simulator
from coopsgd.engines.simulator.calibration import (
    CACHE_ENV,
    CACHE_FILE,
    CACHE_FORMAT,
    CacheWarning,
    ExecutorCache,
    cache_dir,
)
from coopsgd.engines.simulator.clock import DEFAULT_GFLOPS, FlopCompute, SimClock
from coopsgd.theory.cost import ComputeModel, NetworkModel
from coopsgd.train.config import RunConfig
from coopsgd.train.trainer import train


# -------------------------------------------------------------------------------------------------
# helpers
# -------------------------------------------------------------------------------------------------
def _measured(key: str) -> bool:
    """A field whose value is measured wall-clock (the only fields allowed to differ between runs)."""
    return key == "wall_time_s" or key.startswith("measured_")


def _drop_measured(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _drop_measured(v) for k, v in obj.items() if not _measured(k)}
    if isinstance(obj, list):
        return [_drop_measured(v) for v in obj]
    return obj


def _canonical_lines(path: Path, replace: tuple[str, str] | None = None) -> list[str]:
    """Each JSON document of a file (a JSONL line, or the whole file) with the measured fields dropped,
    written back in its own key order (so equal strings mean equal values, bit for bit)."""
    text = path.read_text()
    if replace is not None:
        text = text.replace(*replace)
    docs = [json.loads(line) for line in text.splitlines() if line.strip()] if path.suffix == ".jsonl" \
        else [json.loads(text)]
    return [json.dumps(_drop_measured(d)) for d in docs]


@contextlib.contextmanager
def cpu_load() -> Iterator[None]:
    """Busy loops on every core (at most 4) while the body runs; killed afterwards."""
    n = max(1, min(4, os.cpu_count() or 1))
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]
    try:
        time.sleep(0.2)
        assert all(p.poll() is None for p in procs)
        yield
        assert all(p.poll() is None for p in procs), "the load stopped before the run did"
    finally:
        for p in procs:
            p.kill()
        for p in procs:
            p.wait()


@pytest.fixture
def cache_env(tmp_path, monkeypatch) -> Path:
    d = tmp_path / "cache"
    monkeypatch.setenv(CACHE_ENV, str(d))
    return d


def _no_timing(monkeypatch) -> None:
    """Make any executor timing fail: a run that reads its executor from the cache times nothing."""

    def boom(self, batches, rows):  # pragma: no cover - only called on a regression
        raise AssertionError("the executors were timed although the cache holds the choice")

    monkeypatch.setattr(Simulator, "_time_executors", boom)


# -------------------------------------------------------------------------------------------------
# (a) two train() runs, the second under load
# -------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_train_twice_identical_under_load(tmp_path, cache_env, monkeypatch) -> None:
    common = dict(preset="easgd", workers=4, tau=2, max_steps=30, model="mlp", model_args={"hidden": [32]},
                  eval_every=10, eval_samples=200, batch_size=16, lr=0.05, seed=3, executor="auto")
    assert RunConfig().clock.compute == "flops"  # the default compute model counts FLOPs
    a, b = tmp_path / "a", tmp_path / "b"
    train(RunConfig(**common, out=str(a)))
    env_a = json.loads((a / "environment.json").read_text())
    assert env_a["executor_from_cache"] is False and env_a["executor_calibration"]["source"] == "calibrated"
    assert (cache_env / CACHE_FILE).is_file()

    _no_timing(monkeypatch)
    with cpu_load():
        train(RunConfig(**common, out=str(b)))
    env_b = json.loads((b / "environment.json").read_text())
    assert env_b["executor_from_cache"] is True and env_b["executor_calibration"]["source"] == "cache"
    assert env_b["executor"] == env_a["executor"]
    assert env_b["executor_calibration"]["cache_key"] == env_a["executor_calibration"]["cache_key"]
    assert env_b["executor_calibration"]["medians_s"] == env_a["executor_calibration"]["medians_s"]
    cm = env_b["compute_model"]
    assert cm == env_a["compute_model"]
    assert cm["kind"] == "flops" and cm["gflops"] == DEFAULT_GFLOPS and cm["flops_per_worker_step"] > 0
    assert cm["fallback"] is None

    for name in ("metrics.jsonl", "summary.json"):
        assert _canonical_lines(a / name) == _canonical_lines(b / name), name
    # only measured fields were dropped, and the measured ones are named so
    rec = json.loads((a / "metrics.jsonl").read_text().splitlines()[-1])
    assert "measured_samples_per_s" in rec and "samples_per_s" not in rec
    assert rec["simulated_compute_s"] == pytest.approx(30 * cm["seconds_per_worker_step"], rel=1e-12)


def test_requested_executor_overrides_the_cache(tmp_path, cache_env, monkeypatch) -> None:
    _no_timing(monkeypatch)
    train(RunConfig(preset="local_sgd", workers=2, tau=2, max_steps=2, model="mlp", model_args={"hidden": [8]},
                    eval_samples=50, executor="vmap", out=str(tmp_path / "r")))
    env = json.loads((tmp_path / "r" / "environment.json").read_text())
    assert env["executor"] == "vmap" and env["executor_calibration"]["source"] == "requested"
    assert env["executor_from_cache"] is False and not (cache_env / CACHE_FILE).exists()


# -------------------------------------------------------------------------------------------------
# (b) coopsgd compare twice through the CLI, the second under load
# -------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_cli_compare_twice_identical_under_load(tmp_path, cache_env, monkeypatch, capsys) -> None:
    def compare(out: Path) -> None:
        code = main(["compare", "--presets", "local_sgd,dpsgd", "--workers", "4", "--tau", "2", "--model", "mlp",
                     "--max-steps", "24", "--eval-every", "8", "--eval-samples", "200", "--batch-size", "16",
                     "--seed", "5", "--out", str(out), "--json"])
        capsys.readouterr()
        assert code == 0

    a, b = tmp_path / "a", tmp_path / "b"
    compare(a)
    _no_timing(monkeypatch)
    with cpu_load():
        compare(b)
    for preset in ("local_sgd", "dpsgd"):
        env = json.loads((b / preset / "environment.json").read_text())
        assert env["executor_from_cache"] is True, preset
        for name in ("metrics.jsonl", "summary.json"):
            assert _canonical_lines(a / preset / name) == _canonical_lines(b / preset / name), (preset, name)
    # compare.json names its own directory: the same after putting one directory's name for the other's
    assert _canonical_lines(a / "compare.json") == _canonical_lines(b / "compare.json", (str(b), str(a)))


# -------------------------------------------------------------------------------------------------
# (c) the FLOP compute model
# -------------------------------------------------------------------------------------------------
def test_flop_model_charges_counted_flops_over_throughput() -> None:
    n_in, n_out, batch, m = 7, 3, 5, 2

    def linear() -> nn.Module:
        return nn.Linear(n_in, n_out)

    x = torch.randn(batch, n_in)
    y = torch.randint(0, n_out, (batch,))
    # by hand: forward x W^T is 2*in*out*batch; backward computes the weight gradient (the same count) and
    # no input gradient (the input is data, it does not require one); the bias and the loss are not
    # matrix products and are not counted
    hand = 2 * n_in * n_out * batch + 2 * n_in * n_out * batch
    counter = FlopCounterMode(display=False)
    with counter:
        F.cross_entropy(linear()(x), y).backward()
    assert counter.get_total_flops() == hand

    gflops = 1e-6  # 1000 FLOP/s: the step's time is visible
    clock = SimClock(NetworkModel(), FlopCompute(gflops))
    sim = Simulator(presets.local_sgd(m, 4), linear, executor="loop", clock=clock)
    stats = sim.step([(x, y)] * m, 0.1)
    assert sim.compute_model_info()["flops_per_worker_step"] == hand
    assert stats.compute_s == pytest.approx(hand / (gflops * 1e9), rel=1e-12)
    assert clock.t.tolist() == pytest.approx([hand / (gflops * 1e9)] * m, rel=1e-12)
    # a batch of another shape is counted once more, at its own size
    stats = sim.step([(x[:2], y[:2])] * m, 0.1)
    assert stats.compute_s == pytest.approx(2 * n_in * n_out * 2 * 2 / (gflops * 1e9), rel=1e-12)


def test_default_simulator_clock_counts_flops_and_config_sets_the_throughput(tmp_path, cache_env) -> None:
    sim = Simulator(presets.sync(2), lambda: nn.Linear(4, 2), executor="loop")
    assert isinstance(sim.clock.compute, FlopCompute) and sim.clock.compute.gflops == DEFAULT_GFLOPS
    train(RunConfig(preset="local_sgd", workers=2, tau=2, max_steps=2, model="mlp", model_args={"hidden": [8]},
                    eval_samples=50, executor="loop", compute_gflops=2.5, out=str(tmp_path / "r")))
    cm = json.loads((tmp_path / "r" / "environment.json").read_text())["compute_model"]
    flops = cm["flops_per_worker_step"]
    assert cm["gflops"] == 2.5 and cm["seconds_per_worker_step"] == pytest.approx(flops / 2.5e9, rel=1e-12)
    last = json.loads((tmp_path / "r" / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["simulated_compute_s"] == pytest.approx(2 * flops / 2.5e9, rel=1e-12)
    with pytest.raises(Exception, match="compute_gflops"):
        RunConfig(compute_gflops=0)
    # the other compute models still work
    for kind in ("measured", "constant", "lognormal"):
        RunConfig(compute=kind, compute_spread=0.5 if kind == "lognormal" else 0.0)


class _Elementwise(nn.Module):
    """A model FlopCounterMode counts no FLOPs for (element-wise operations only)."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.w


def test_uncountable_model_falls_back_with_a_warning() -> None:
    clock = SimClock(NetworkModel(), FlopCompute(fallback=ComputeModel(0.004)))
    sim = Simulator(presets.local_sgd(2, 4), _Elementwise, executor="loop", clock=clock)
    x, y = torch.randn(4, 3), torch.randint(0, 3, (4,))
    with pytest.warns(RuntimeWarning, match=r"cannot count the FLOPs of _Elementwise.*constant 4 ms"):
        stats = sim.step([(x, y)] * 2, 0.1)
    assert stats.compute_s == pytest.approx(0.004)
    info = sim.compute_model_info()
    assert info["kind"] == "flops" and info["flops_per_worker_step"] is None
    assert "no FLOPs" in info["fallback"]["reason"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once, not at every step
        assert sim.step([(x, y)] * 2, 0.1).compute_s == pytest.approx(0.004)


# -------------------------------------------------------------------------------------------------
# (d) the cache file
# -------------------------------------------------------------------------------------------------
def _auto_sim(cache: ExecutorCache) -> Simulator:
    return Simulator(presets.local_sgd(2, 2), lambda: nn.Linear(4, 3), executor="auto", executor_cache=cache,
                     calibration_steps=1)


def _batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(6, 4, generator=g), torch.randint(0, 3, (6,), generator=g)) for _ in range(2)]


@pytest.mark.parametrize("content", ["{not json", '{"format": "something else"}', "[]",
                                     json.dumps({"format": CACHE_FORMAT, "entries": []})])
def test_damaged_cache_is_ignored_with_a_warning_and_rewritten(tmp_path, content) -> None:
    path = tmp_path / "c" / CACHE_FILE
    path.parent.mkdir()
    path.write_text(content)
    sim = _auto_sim(ExecutorCache(path))
    with pytest.warns(CacheWarning, match="damaged"):
        sim.prepare(_batches())
    assert sim.executor_source == "calibrated" and sim.executor_name in ("loop", "vmap")
    data = json.loads(path.read_text())
    assert data["format"] == CACHE_FORMAT and data["entries"][sim.calibration_key]["executor"] == sim.executor_name
    again = _auto_sim(ExecutorCache(path))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again.prepare(_batches())
    assert again.executor_source == "cache" and again.executor_name == sim.executor_name
    assert again.calibration == sim.calibration


def test_damaged_entry_is_timed_again(tmp_path) -> None:
    path = tmp_path / CACHE_FILE
    sim = _auto_sim(ExecutorCache(path))
    sim.prepare(_batches())
    data = json.loads(path.read_text())
    data["entries"][sim.calibration_key]["executor"] = "abacus"
    path.write_text(json.dumps(data))
    again = _auto_sim(ExecutorCache(path))
    with pytest.warns(CacheWarning, match="damaged entry"):
        again.prepare(_batches())
    assert again.executor_source == "calibrated"
    assert json.loads(path.read_text())["entries"][again.calibration_key]["executor"] in ("loop", "vmap")


def test_cache_key_follows_the_workload(tmp_path) -> None:
    cache = ExecutorCache(tmp_path / CACHE_FILE)
    a, b = _auto_sim(cache), _auto_sim(cache)
    a.prepare(_batches())
    b.prepare([(x[:3], y[:3]) for x, y in _batches()])  # another batch shape: another key, timed again
    assert a.calibration_key != b.calibration_key and b.executor_source == "calibrated"
    c = Simulator(presets.local_sgd(2, 2), lambda: nn.Linear(4, 3), executor="auto", executor_cache=cache,
                  dtype=torch.float64, calibration_steps=1)
    c.prepare(_batches())
    assert c.calibration_key not in (a.calibration_key, b.calibration_key)
    assert len(json.loads(cache.path.read_text())["entries"]) == 3
    # the run's state is not advanced by the choice and both runs compute the same step
    d = _auto_sim(cache)
    d.prepare(_batches())
    assert d.executor_source == "cache"
    assert np.array_equal(a.step(_batches(), 0.1).losses, d.step(_batches(), 0.1).losses)


def test_cache_location(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "own"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "own" and ExecutorCache().path == tmp_path / "own" / CACHE_FILE
    monkeypatch.delenv(CACHE_ENV)
    assert cache_dir() == tmp_path / "xdg" / "coopsgd"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "coopsgd"


def test_unwritable_cache_only_costs_the_cache(tmp_path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    sim = _auto_sim(ExecutorCache(blocker / "sub" / CACHE_FILE))  # a directory under a file: cannot be made
    with pytest.warns(CacheWarning) as caught:
        sim.prepare(_batches())
    assert any("cannot write" in str(w.message) for w in caught)
    assert sim.executor_name in ("loop", "vmap") and sim.step(_batches(), 0.1).step == 0
