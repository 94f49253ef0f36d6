"""The fault matrix of ``coopsgd run --engine distributed`` (issue 14, item 7): a rank SIGKILLed, a rank
SIGSTOPped, the parent SIGTERMed, the parent SIGKILLed, with 2 gloo processes.

Every run is the same small job (local SGD, τ = 2, momentum, float64, MLP on the bundled MNIST, 8 steps, a
checkpoint every 2 steps, ``--timeout-s 5``). The fault comes at the start of step 5 through the test hook
(``COOPSGD_INJECT_FAILURE`` with a once-marker, whose writing times the fault): rank 1 SIGKILLs or
SIGSTOPs itself; for the parent faults rank 0 stops at step 5 (after writing the step-4 checkpoint) and
the test signals the parent. Each case then checks

* the run stopped within the timeout + 5 s of the fault: the parent exited, no process of its session
  and none naming its TMPDIR (ranks, janitor) is alive, no ``coopsgd-launch-*`` directory is left;
* the exit status and what the parent said (one line naming the failed rank; ``interrupted`` and 143 for
  SIGTERM; nothing for SIGKILL, and no ``"ok"`` summary);
* ``coopsgd run --resume`` from the run directory ends with every rank's state equal (``torch.equal``) to
  an uninterrupted run's (computed once for the module).

About 60 s in all on two idle cores (4 faulted runs in a subprocess, 4 resumes and one reference run
in-process).
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from coopsgd.cli import main as cli_main
from coopsgd.train import load_checkpoint
from coopsgd.train.distributed import FAILURE_ENV, FAILURE_ONCE_ENV

# the process helpers of the orphan test (same directory: pytest puts it on sys.path)
from test_orphans import START_TIMEOUT_S, Run  # noqa: E402  # isort: skip

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="finds the processes through /proc"),
]

TIMEOUT_S = 5.0
STEPS = 8
FAULT_STEP = 5
JOB = ("--preset", "local_sgd", "--tau", "2", "--momentum", "0.9", "--dtype", "float64", "--batch-size", "16",
       "--eval-samples", "100", "--eval-every", "4", "--seed", "1", "--max-steps", str(STEPS),
       "--checkpoint-every", "2", "--timeout-s", f"{TIMEOUT_S:g}", "--json")  # --json: no progress lines

#: fault -> (hook of the faulted run, signal the test sends to the parent or None, exit status)
FAULTS: dict[str, tuple[str, signal.Signals | None, int]] = {
    "sigkill-rank": (f"1:{FAULT_STEP}:kill", None, 1),
    "sigstop-rank": (f"1:{FAULT_STEP}:stop", None, 1),
    "sigterm-parent": (f"0:{FAULT_STEP}:hang", signal.SIGTERM, 143),
    "sigkill-parent": (f"0:{FAULT_STEP}:hang", signal.SIGKILL, -signal.SIGKILL),
}


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The uninterrupted run's final checkpoint and summary."""
    out = tmp_path_factory.mktemp("fault-matrix") / "reference"
    assert cli_main(["run", "--engine", "distributed", "--workers", "2", *JOB, "--out", str(out)]) == 0
    return {"out": out, "checkpoint": load_checkpoint(out / "checkpoint.pt"),
            "summary": json.loads((out / "summary.json").read_text())}


@pytest.fixture
def faulted(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[tuple[str, Run, Path]]:
    """(fault, the run it is injected into, the hook's marker file)."""
    hook = FAULTS[request.param][0]
    marker = tmp_path / "fault-marker"
    run = Run(tmp_path, JOB, {FAILURE_ENV: hook, FAILURE_ONCE_ENV: str(marker)})
    try:
        yield request.param, run, marker
    finally:
        run.cleanup()


def _wait_fault(run: Run, marker: Path) -> float:
    """Until the hook wrote its marker (the fault is happening); its time (``time.time``)."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if marker.is_file():
            return marker.stat().st_mtime
        if run.proc.poll() is not None:
            pytest.fail(f"the run ended ({run.proc.returncode}) before the fault: {run.stderr}")
        time.sleep(0.02)
    pytest.fail(f"no fault within {START_TIMEOUT_S:g} s: {run.stderr}")


def _wait_stopped(run: Run, t0: float) -> float:
    """Until the parent exited, no process of the run is left and the launcher's directory is gone;
    seconds since ``t0`` (``time.time``). Fails past the timeout + 5 s."""
    limit = TIMEOUT_S + 5.0
    while True:
        done = run.proc.poll() is not None and not run.launch_dirs() and not run.leftovers()
        now = time.time()
        if done:
            return now - t0
        if now - t0 > limit:
            pytest.fail(f"{now - t0:.1f} s after the fault: parent exit status {run.proc.poll()}, processes "
                        f"{run.leftovers()}, directories {run.launch_dirs()}; stderr: {run.stderr}")
        time.sleep(0.02)


def _same_final_state(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert a["step"] == b["step"] == STEPS and a["world_size"] == b["world_size"] == 2
    for ea, eb in zip(a["ranks"], b["ranks"], strict=True):
        ra, rb = ea["payload"], eb["payload"]
        assert torch.equal(ra["state"], rb["state"]), f"rank {ra['rank']}: max diff {(ra['state'] - rb['state']).abs().max()}"
        assert torch.equal(ra["momentum_initialized"], rb["momentum_initialized"])
        assert torch.equal(ra["torch_rng_state"], rb["torch_rng_state"])
        for key in ("step", "rounds", "leader", "schedule_state"):
            assert ra[key] == rb[key], key
        assert ra["comm"]["bytes_sent"] == rb["comm"]["bytes_sent"]
    assert a["loader"] == b["loader"]


@pytest.mark.parametrize("faulted", list(FAULTS), indirect=True)
def test_fault_stops_in_time_leaves_nothing_and_resumes_exactly(faulted, reference, capsys) -> None:
    fault, run, marker = faulted
    hook, sig, status = FAULTS[fault]
    t0 = _wait_fault(run, marker)
    if sig is not None:
        t0 = time.time()
        os.kill(run.proc.pid, sig)  # the parent alone, as `kill PID` does
    stopped = _wait_stopped(run, t0)
    exit_status = run.proc.wait()
    assert exit_status == status, run.stderr

    lines = [ln for ln in run.stderr.splitlines() if "injected failure" not in ln]  # the hook's own log line
    assert "Traceback" not in run.stderr and "[coopsgd rank" not in run.stderr, run.stderr
    summary = run.out / "summary.json"
    if sig is None:  # a rank failed: one line, by the launcher, naming it
        assert len(lines) == 1, run.stderr
        why = "was killed by SIGKILL" if hook.endswith("kill") else "stopped responding"
        assert lines[0].startswith(f"coopsgd: error: rank 1 {why}"), lines
        assert not summary.is_file()
    elif sig == signal.SIGTERM:
        assert lines == ["coopsgd: interrupted by SIGTERM: the 2 rank(s) were stopped"], run.stderr
        assert json.loads(summary.read_text())["status"] == "interrupted"
    else:
        assert lines == [], run.stderr
        assert not summary.is_file()

    step = load_checkpoint(run.out / "checkpoint.pt")["step"]
    # rank 0 writes the step-4 checkpoint before starting step 5; when rank 1 fails at step 5 the launcher may
    # stop rank 0 while it writes it, and the atomic write leaves the step-2 checkpoint in place
    assert step == 4 if hook.startswith("0:") else step in (2, 4)
    code = cli_main(["run", "--resume", str(run.out), "--json"])
    err = capsys.readouterr().err
    assert code == 0, f"{err}\n{sorted(p.name for p in run.out.iterdir())}"
    resumed = json.loads(summary.read_text())
    assert resumed["status"] == "ok" and resumed["resumed_from_step"] == step
    assert resumed["final"] == reference["summary"]["final"]
    _same_final_state(load_checkpoint(run.out / "checkpoint.pt"), reference["checkpoint"])
    with capsys.disabled():
        print(f"\n{fault}: stopped {stopped:.2f} s after the fault, exit status {exit_status}, resumed from step {step}")


def test_bad_input_only_a_rank_can_see_is_one_line_and_exit_2(reference, tmp_path, capfd) -> None:
    """A checkpoint whose per-rank states are swapped passes the parent's checks (format, world size, one
    state per rank); each rank refuses the other's state. Reported once, naming the rank, exit status 2,
    nothing in the run directory changed."""
    import shutil

    from coopsgd.train import save_checkpoint

    run = tmp_path / "run"
    shutil.copytree(reference["out"], run)
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    state["ranks"] = state["ranks"][::-1]
    save_checkpoint(run / "checkpoint.pt", state)
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    capfd.readouterr()
    assert cli_main(["run", "--resume", str(run), "--max-steps", str(STEPS + 2), "--json"]) == 2
    err = capfd.readouterr().err.splitlines()
    assert err == ["coopsgd: error: rank 0: checkpoint.ranks.rank=1 is invalid: this is rank 0"], err
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before
