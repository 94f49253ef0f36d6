"""``RunConfig.device``: its format, which engines take what, and a clear error for a device this machine lacks.

The GPU paths cannot run here (no GPU): CUDA's presence is faked with monkeypatch to test the checks.
"""

from __future__ import annotations

import pytest
import torch

from coopsgd.errors import ConfigError
from coopsgd.train.config import RunConfig, check_device


def _no_cuda(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)


def _fake_cuda(monkeypatch, count: int) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)


def test_default_is_cpu_and_cpu_is_accepted_everywhere() -> None:
    assert RunConfig().execution.device == "cpu"
    for engine in ("reference", "simulate", "distributed"):
        assert RunConfig(engine=engine, device="cpu").execution.device == "cpu"
    assert RunConfig(device=" CPU ").execution.device == "cpu"
    assert check_device("cpu", engine="reference", dtype="float64") == "cpu"


@pytest.mark.parametrize("bad", ["gpu", "cuda:", "cuda:x", "cuda:-1", "tpu", "", 0, None])
def test_bad_format_names_the_field(bad) -> None:
    with pytest.raises(ConfigError, match=r"device=.*cpu, cuda, cuda:N .* or mps") as info:
        RunConfig(device=bad)
    assert info.value.field == "device"


def test_cuda_without_cuda_says_no_cuda_device_is_visible(monkeypatch) -> None:
    _no_cuda(monkeypatch)
    for dev in ("cuda", "cuda:0", "cuda:3"):
        with pytest.raises(ConfigError, match="no CUDA device is visible") as info:
            RunConfig(device=dev)
        assert info.value.field == "device"
    with pytest.raises(ConfigError, match="no CUDA device is visible"):
        RunConfig(engine="distributed", device="cuda")


def test_cuda_index_beyond_the_visible_devices(monkeypatch) -> None:
    _fake_cuda(monkeypatch, 2)
    assert RunConfig(device="cuda").execution.device == "cuda"
    assert RunConfig(device="CUDA:1").execution.device == "cuda:1"
    with pytest.raises(ConfigError, match="2 visible CUDA device"):
        RunConfig(device="cuda:2")


def test_mps_unavailable_or_float64(monkeypatch) -> None:
    if not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        with pytest.raises(ConfigError, match="no MPS device"):
            RunConfig(device="mps")
    with pytest.raises(ConfigError, match="MPS has no float64"):
        RunConfig(device="mps", dtype="float64")


def test_reference_engine_is_cpu_only(monkeypatch) -> None:
    _fake_cuda(monkeypatch, 1)  # even with a GPU: the reference engine is numpy
    for dev in ("cuda", "cuda:0", "mps"):
        with pytest.raises(ConfigError, match="reference engine computes with numpy"):
            RunConfig(engine="reference", device=dev)


def test_distributed_engine_takes_cpu_or_cuda(monkeypatch) -> None:
    _fake_cuda(monkeypatch, 4)
    assert RunConfig(engine="distributed", device="cuda").execution.device == "cuda"
    for dev in ("cuda:1", "mps"):
        with pytest.raises(ConfigError, match="cuda:LOCAL_RANK"):
            RunConfig(engine="distributed", device=dev)


@pytest.mark.slow
def test_check_device_imports_torch_only_for_an_accelerator() -> None:
    import subprocess
    import sys

    code = ("import sys; from coopsgd.train.config import check_device, RunConfig; check_device('cpu'); "
            "RunConfig(device='cpu'); print('torch' in sys.modules)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "False"


def test_rank_device_one_gpu_per_local_rank(monkeypatch) -> None:
    from coopsgd.train.distributed import rank_device

    assert rank_device("cpu", 3) == "cpu"
    _fake_cuda(monkeypatch, 2)
    current: list[int] = []
    monkeypatch.setattr(torch.cuda, "set_device", lambda i: current.append(i))
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert rank_device("cuda", 5) == "cuda:1" and current == [1]
    monkeypatch.setenv("LOCAL_RANK", "2")
    with pytest.raises(ConfigError, match="local rank 2 needs its own GPU"):
        rank_device("cuda", 2)


def test_run_distributed_on_cuda_needs_a_gpu_per_worker(monkeypatch) -> None:
    from coopsgd.train import distributed

    _fake_cuda(monkeypatch, 1)
    launched: list[object] = []
    monkeypatch.setattr(distributed, "launch", lambda *a, **k: launched.append(k) or [{}])
    cfg = RunConfig(engine="distributed", workers=2, device="cuda", max_steps=1)
    with pytest.raises(ConfigError, match="each of the 2 workers on its own GPU"):
        distributed.run_distributed(cfg)
    assert launched == []
    _fake_cuda(monkeypatch, 2)
    distributed.run_distributed(cfg)
    assert launched and launched[0]["backend"] == "nccl"  # type: ignore[index]
    launched.clear()
    distributed.run_distributed(RunConfig(engine="distributed", workers=2, max_steps=1))
    assert launched[0]["backend"] is None  # type: ignore[index]  # launch's default: gloo
