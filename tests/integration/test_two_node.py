"""Multi-node torchrun, tried on one machine (issue 15, item 5).

Two torchrun agents on loopback form a 2-node job (``--nnodes 2 --node-rank 0|1 --nproc-per-node 2``, c10d
rendezvous at 127.0.0.1): the ranks' global and local ranks differ, the run directory is shared, and the
result must equal the 4-process single-node job bit for bit. The unit tests below check the pieces that a
one-machine job cannot tell apart (gloo's binding when the store is on loopback; the GPU of a local rank).
"""

from __future__ import annotations

import ipaddress
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("torch.distributed.run", reason="torchrun (torch.distributed.run) is not importable")

from coopsgd.engines.distributed import launch as launch_mod  # noqa: E402
from coopsgd.engines.distributed.launch import free_port  # noqa: E402
from coopsgd.errors import ConfigError  # noqa: E402
from coopsgd.train import load_checkpoint  # noqa: E402
from coopsgd.train.distributed import rank_device  # noqa: E402

CONFIG = """\
preset = "local_sgd"
workers = 4
tau = 2
momentum = 0.9
dtype = "float64"
max_steps = 6
batch_size = 16
eval_samples = 100
eval_every = 3
checkpoint_every = 4
seed = 1
"""
JOB_TIMEOUT_S = 150  # a healthy job of 4 processes takes 10-20 s on 2 cores


def _env() -> dict[str, str]:
    src = str(Path(__import__("coopsgd").__file__).resolve().parents[1])
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH", "")) if p)
    for key in ("GLOO_SOCKET_IFNAME", "COOPSGD_INJECT_FAILURE", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE"):
        env.pop(key, None)  # the binding must come from coopsgd's own rule
    return env


def _start(launcher: list[str], tmp_path: Path, out: Path, log: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", *launcher, "-m", "coopsgd.torchrun",
           "--config", str(tmp_path / "run.toml"), "--out", str(out), "--timeout-s", "60"]
    with open(log, "wb") as f:  # a session of its own: a job past its time limit is killed with its ranks
        return subprocess.Popen(cmd, env=_env(), cwd=tmp_path, stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)


def _finish(procs: list[subprocess.Popen], logs: list[Path]) -> list[str]:
    try:
        for p in procs:
            p.wait(timeout=JOB_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"torchrun did not finish in {JOB_TIMEOUT_S} s: " + " | ".join(lg.read_text()[-2000:] for lg in logs))
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    texts = [lg.read_text(errors="replace") for lg in logs]
    for p, text in zip(procs, texts, strict=True):
        assert p.returncode == 0, text[-4000:]
    return texts


def _summary_lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(ln) for ln in text.splitlines() if ln.startswith('{"status"')]


@pytest.mark.slow
def test_two_agents_on_loopback_equal_one_node_bit_for_bit(tmp_path: Path) -> None:
    (tmp_path / "run.toml").write_text(CONFIG)
    one = _start(["--standalone", "--nproc-per-node", "4"], tmp_path, tmp_path / "one", tmp_path / "one.log")
    (one_log,) = _finish([one], [tmp_path / "one.log"])

    port = free_port()
    agents = [_start(["--nnodes", "2", "--node-rank", str(n), "--nproc-per-node", "2", "--rdzv-backend", "c10d",
                      "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "two-node-test"],
                     tmp_path, tmp_path / "two", tmp_path / f"node{n}.log") for n in range(2)]
    texts = _finish(agents, [tmp_path / "node0.log", tmp_path / "node1.log"])

    # global rank 0 alone printed the summary line, wrote the directory (one writer: each step once)
    heads = [h for t in texts for h in _summary_lines(t)]
    assert len(heads) == 1 and heads[0]["workers"] == 4 and heads[0]["steps"] == 6, texts
    assert len(_summary_lines(one_log)) == 1
    two = tmp_path / "two"
    steps = [json.loads(ln)["step"] for ln in (two / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)) and steps[-1] == 6, steps
    summary = json.loads((two / "summary.json").read_text())
    assert summary["status"] == "ok" and summary["workers"] == 4

    # global vs local rank, node, device, loopback binding, as every rank saw them
    ranks = json.loads((two / "environment.json").read_text())["ranks"]
    assert [r["rank"] for r in ranks] == [0, 1, 2, 3]
    assert [(r["node"], r["local_rank"]) for r in ranks] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert {r["device"] for r in ranks} == {"cpu"}
    for r in ranks:
        assert r["listening"], r  # gloo's listener, read from /proc
        for addr in r["listening"]:
            host = addr.rsplit(":", 1)[0]
            assert ipaddress.ip_address(host).is_loopback, f"rank {r['rank']} listens on {addr}"

    # the same run as 4 processes on one node, bit for bit
    a = load_checkpoint(tmp_path / "one" / "checkpoint.pt")
    b = load_checkpoint(two / "checkpoint.pt")
    assert a["step"] == b["step"] == 6 and a["world_size"] == b["world_size"] == 4
    for ea, eb in zip(a["ranks"], b["ranks"], strict=True):
        ra, rb = ea["payload"], eb["payload"]
        assert ra["rank"] == rb["rank"]
        assert torch.equal(ra["state"], rb["state"]), f"rank {ra['rank']}: max diff {(ra['state'] - rb['state']).abs().max()}"
        assert torch.equal(ra["torch_rng_state"], rb["torch_rng_state"])
        assert ra["comm"]["bytes_sent"] == rb["comm"]["bytes_sent"]
    assert a["loader"] == b["loader"]
    assert summary["final"] == json.loads((tmp_path / "one" / "summary.json").read_text())["final"]


# ---------------------------------------------------------------------------------------------------------
# the pieces a one-machine job cannot tell apart
# ---------------------------------------------------------------------------------------------------------


def _joined_with(monkeypatch: pytest.MonkeyPatch, **env: str) -> str | None:
    """GLOO_SOCKET_IFNAME as init_torchrun_group leaves it for a rank with this environment (the process
    group itself is faked)."""
    import torch.distributed as dist

    monkeypatch.delenv("GLOO_SOCKET_IFNAME", raising=False)
    monkeypatch.delenv("TORCHELASTIC_USE_AGENT_STORE", raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)

    class Store:
        def set_timeout(self, timeout: Any) -> None:
            pass

    monkeypatch.setattr(dist, "rendezvous", lambda *a, **k: iter([(Store(), 2, 4)]))
    monkeypatch.setattr(dist, "PrefixStore", lambda prefix, store: store)
    monkeypatch.setattr(dist, "init_process_group", lambda *a, **k: None)
    assert launch_mod.init_torchrun_group("gloo", 10.0) == (2, 4)
    value = os.environ.get("GLOO_SOCKET_IFNAME")
    monkeypatch.delenv("GLOO_SOCKET_IFNAME", raising=False)
    return value


def test_gloo_binds_to_loopback_when_every_node_is_on_this_machine(monkeypatch) -> None:
    lo = launch_mod._loopback_interface()
    multi = {"RANK": "2", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2"}
    # several agents whose store is on loopback: no other machine can have joined
    assert _joined_with(monkeypatch, **multi, MASTER_ADDR="127.0.0.1") == lo
    assert _joined_with(monkeypatch, **multi, MASTER_ADDR="localhost") == lo
    # a store on another address: a real multi-machine job keeps gloo's default
    assert _joined_with(monkeypatch, **multi, MASTER_ADDR="192.0.2.7") is None
    # one node (torchrun --standalone): loopback, whatever the store's address
    assert _joined_with(monkeypatch, RANK="2", WORLD_SIZE="4", LOCAL_WORLD_SIZE="4", MASTER_ADDR="192.0.2.7") == lo


def test_a_rank_takes_the_gpu_of_its_local_rank(monkeypatch) -> None:
    chosen: list[int] = []
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert rank_device("cuda", rank=3) == "cuda:1"  # global rank 3 = local rank 1 of the second node
    assert chosen == [1]
    monkeypatch.setenv("LOCAL_RANK", "2")
    with pytest.raises(ConfigError, match=r"local rank 2 needs its own GPU \(cuda:2\).* 2 visible CUDA device"):
        rank_device("cuda", rank=2)
    assert rank_device("cpu", rank=3) == "cpu"
