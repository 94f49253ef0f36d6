"""A real ``torchrun --max-restarts`` restart: a rank fails once, torchrun restarts both, the run resumes exactly.

Two torchrun jobs of 2 processes each (about 5-8 s each on 2 cores): an uninterrupted reference, and the same
run with ``--auto-resume`` in which rank 1 raises once at step 6, after the step-4 checkpoint. torchrun's
agent then restarts both ranks; they must rejoin through the agent's store (which still holds the first
attempt's keys -- see :func:`coopsgd.engines.distributed.launch.init_torchrun_group`), resume from the checkpoint and
end with every rank's state bit-identical to the reference.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("torch.distributed.run", reason="torchrun (torch.distributed.run) is not importable")

from coopsgd.train import load_checkpoint  # noqa: E402

pytestmark = pytest.mark.slow  # every test here starts processes

CONFIG = """\
preset = "local_sgd"
workers = 2
tau = 2
momentum = 0.9
dtype = "float64"
max_steps = 10
batch_size = 16
eval_samples = 100
checkpoint_every = 4
seed = 1
"""
JOB_TIMEOUT_S = 90  # per torchrun job; a healthy one takes 5-12 s on 2 cores, a stuck one is killed


def _torchrun(tmp_path: Path, out: Path, env_extra: dict[str, str], max_restarts: int) -> subprocess.CompletedProcess:
    src = str(Path(__import__("coopsgd").__file__).resolve().parents[1])
    env = dict(os.environ, OMP_NUM_THREADS="1", **env_extra)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH", "")) if p)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "--max-restarts", str(max_restarts), "-m", "coopsgd.torchrun",
           "--config", str(tmp_path / "run.toml"), "--out", str(out), "--timeout-s", "20", "--auto-resume"]
    # a session of its own, so that a job past its time limit is killed with every rank it started
    proc = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        stdout, _ = proc.communicate(timeout=JOB_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, _ = proc.communicate()
        pytest.fail(f"torchrun did not finish in {JOB_TIMEOUT_S} s; output tail:\n{stdout[-4000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, "")


def test_torchrun_restart_resumes_from_the_checkpoint_exactly(tmp_path) -> None:
    (tmp_path / "run.toml").write_text(CONFIG)
    ref = _torchrun(tmp_path, tmp_path / "ref", {}, max_restarts=0)
    assert ref.returncode == 0, ref.stdout[-4000:]

    marker = tmp_path / "failed-once"
    job = _torchrun(tmp_path, tmp_path / "job",
                    {"COOPSGD_INJECT_FAILURE": "1:6:raise", "COOPSGD_INJECT_FAILURE_ONCE": str(marker)},
                    max_restarts=2)
    assert job.returncode == 0, job.stdout[-4000:]
    # the failure did happen (first attempt), and the restarted attempt resumed from the step-4 checkpoint
    assert marker.read_text().startswith("rank 1 step 6 raise"), marker.read_text()
    assert "injected failure on rank 1 at step 6" in job.stdout
    summary = json.loads((tmp_path / "job" / "summary.json").read_text())
    assert summary["resumed_from_step"] == 4
    assert summary["status"] == "ok"

    a = load_checkpoint(tmp_path / "ref" / "checkpoint.pt")
    b = load_checkpoint(tmp_path / "job" / "checkpoint.pt")
    assert a["step"] == b["step"] == 10 and a["world_size"] == b["world_size"] == 2
    for ea, eb in zip(a["ranks"], b["ranks"], strict=True):
        ra, rb = ea["payload"], eb["payload"]
        assert torch.equal(ra["state"], rb["state"]), f"rank {ra['rank']}: max diff {(ra['state'] - rb['state']).abs().max()}"
        assert torch.equal(ra["torch_rng_state"], rb["torch_rng_state"])
        assert ra["comm"]["bytes_sent"] == rb["comm"]["bytes_sent"]
    assert a["loader"] == b["loader"]
