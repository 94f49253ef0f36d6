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

The resumed run's ``metrics.jsonl`` must also equal the uninterrupted run's field by field, measured
wall-clock fields aside (issue 24, class 3: the loop's running loss sums are in the checkpoint), and while
the faulted run's parent holds its run directory a second ``--resume`` of it is refused naming the
parent's PID (class 1: one writer per run directory).

Issue 24 adds the same guarantees for the simulator (a real SIGKILL after a checkpoint, a resume, metrics
equal field by field; resuming a finished run writes nothing; a run extended with ``--max-steps`` has the
uninterrupted run's records), one writer per directory for ``run``, ``--resume`` and ``compare`` against a training process, SIGTERM to a simulator run (exit 143, one line, summary
``"interrupted"``) and ranks under torchrun that read different configurations (exit 2 at once, one line
naming the field).

About 60 s in all on two idle cores for the distributed matrix (4 faulted runs in a subprocess, 4 resumes
and one reference run in-process), plus about 40 s for issue 24's cases.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from coopsgd.cli import main as cli_main
from coopsgd.engines.distributed.launch import free_port
from coopsgd.fileio import LOCK_FILE
from coopsgd.train import RunConfig, load_checkpoint
from coopsgd.train.distributed import FAILURE_ENV, FAILURE_ONCE_ENV
from coopsgd.train.trainer import train

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


def _comparable(rec: dict[str, Any]) -> dict[str, Any]:
    """A metric record without the measured wall-clock fields (``time_s`` too where it is measured)."""
    out = {k: v for k, v in rec.items() if k != "wall_time_s" and not k.startswith("measured_")}
    if rec.get("time_source") == "measured":
        out.pop("time_s", None)
    return out


def _same_metrics(a: Path, b: Path) -> None:
    """``a``'s metrics.jsonl equals ``b``'s, record by record and field by field (measured fields aside)."""
    ra = [_comparable(json.loads(x)) for x in (a / "metrics.jsonl").read_text().splitlines()]
    rb = [_comparable(json.loads(x)) for x in (b / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in ra] == [r["step"] for r in rb]
    for x, y in zip(ra, rb, strict=True):
        assert x == y, {k: (x.get(k), y.get(k)) for k in {*x, *y} if x.get(k) != y.get(k)}


def _one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize("faulted", list(FAULTS), indirect=True)
def test_fault_stops_in_time_leaves_nothing_and_resumes_exactly(faulted, reference, capsys) -> None:
    fault, run, marker = faulted
    hook, sig, status = FAULTS[fault]
    t0 = _wait_fault(run, marker)
    if hook.startswith("0:"):  # rank 0 hangs at step 5: the launcher still holds the run directory
        code = cli_main(["run", "--resume", str(run.out), "--json"])
        line = _one_error_line(capsys.readouterr().err)
        assert code == 2 and f"in use by another coopsgd process (PID {run.proc.pid})" in line, line
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
    _same_metrics(run.out, reference["out"])
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


# ---------------------------------------------------------------------------------------------------------
# issue 24: the simulator's crash and resume, one writer per directory, SIGTERM, ranks that disagree
# ---------------------------------------------------------------------------------------------------------

SIM = {"preset": "local_sgd", "tau": 2, "workers": 2, "momentum": 0.9, "max_steps": 12, "eval_every": 3,
       "checkpoint_every": 4, "eval_samples": 100, "batch_size": 16, "seed": 1, "executor": "loop"}
#: A simulator run that SIGKILLs itself at the start of step ``argv[2]`` (after the step-8 checkpoint).
CRASH = """
import json, os, signal, sys
from coopsgd.engines.simulator import Simulator
from coopsgd.train import RunConfig
from coopsgd.train.trainer import train
step = Simulator.step
def crash(self, *args, **kwargs):
    if self.step_count == int(sys.argv[2]):
        os.kill(os.getpid(), signal.SIGKILL)
    return step(self, *args, **kwargs)
Simulator.step = crash
train(RunConfig(**json.loads(sys.argv[3])), out=sys.argv[1])
"""


def _snapshot(path: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(path)): (p.read_bytes() if p.is_file() else None) for p in sorted(path.rglob("*"))}


def test_simulator_sigkill_resume_equals_an_uninterrupted_run_in_every_file(tmp_path, capsys) -> None:
    ref = tmp_path / "reference"
    train(RunConfig(**SIM), out=ref)
    crashed = tmp_path / "crashed"
    res = subprocess.run([sys.executable, "-c", CRASH, str(crashed), "10", json.dumps(SIM)], capture_output=True,
                         text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert res.returncode == -signal.SIGKILL, res.stderr
    assert load_checkpoint(crashed / "checkpoint.pt")["step"] == 8
    assert [json.loads(x)["step"] for x in (crashed / "metrics.jsonl").read_text().splitlines()] == [0, 3, 6, 9]
    # the killed process's lock died with it; the resume replaces the record at step 9 (its loss sums since
    # step 6 come from the checkpoint) and goes on
    code = cli_main(["run", "--resume", str(crashed), "--json"])
    assert code == 0, capsys.readouterr().err
    capsys.readouterr()
    _same_metrics(crashed, ref)
    assert json.loads((crashed / "summary.json").read_text())["final"] == json.loads((ref / "summary.json").read_text())["final"]
    # resuming a finished run is a no-op: no record, no TensorBoard event file, no file rewritten
    before = _snapshot(crashed)
    assert cli_main(["run", "--resume", str(crashed), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["status"] == "ok"
    assert _snapshot(crashed) == before
    # a run extended with --max-steps has the records of a run that was that long from the start: the first
    # part's last record (step 8, off the grid of 3) is replaced, the loss sums go on from step 6
    part = tmp_path / "part"
    train(RunConfig(**{**SIM, "max_steps": 8}), out=part)
    code = cli_main(["run", "--resume", str(part), "--max-steps", "12", "--json"])
    assert code == 0, capsys.readouterr().err
    _same_metrics(part, ref)


def test_one_writer_per_directory_and_sigterm_interrupts_a_simulator_run(tmp_path, capsys) -> None:
    out = tmp_path / "run"
    args = ["run", "--preset", "local_sgd", "--workers", "2", "--max-steps", "1000000", "--eval-every", "1000000",
            "--checkpoint-every", "50", "--eval-samples", "100", "--batch-size", "16", "--no-tensorboard", "--json",
            "--out", str(out)]
    proc = subprocess.Popen([sys.executable, "-m", "coopsgd.cli", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        lock = out / LOCK_FILE
        while not (lock.is_file() and lock.read_text().strip() == str(proc.pid) and (out / "checkpoint.pt").is_file()):
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.stderr else ""
            time.sleep(0.05)
        before = _snapshot(out)
        # a second writer of any kind is refused at once, naming the training process; nothing is touched
        for argv in (args, ["run", "--resume", str(out), "--json"], ["compare", "--presets", "sync", "--out", str(out)]):
            code = cli_main(argv)
            line = _one_error_line(capsys.readouterr().err)
            assert code == 2 and f"is in use by another coopsgd process (PID {proc.pid})" in line, (argv, line)
        assert set(_snapshot(out)) == set(before)
        t0 = time.monotonic()
        os.kill(proc.pid, signal.SIGTERM)
        status = proc.wait(timeout=30)
        stopped = time.monotonic() - t0
        err = proc.stderr.read() if proc.stderr else ""
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert status == 143, err
    assert _one_error_line(err).startswith("coopsgd: interrupted by SIGTERM"), err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["signal"] == "SIGTERM"
    assert load_checkpoint(out / "checkpoint.pt")["step"] % 50 == 0
    with capsys.disabled():
        print(f"\nsimulator SIGTERM: stopped {stopped:.2f} s after the signal")


def test_torchrun_ranks_with_different_configs_stop_at_once_naming_the_field(tmp_path, capsys) -> None:
    pytest.importorskip("torch.distributed.run", reason="torchrun (torch.distributed.run) is not importable")
    base = ('preset = "local_sgd"\nworkers = 2\ntau = 2\nmax_steps = 4\nbatch_size = 16\neval_samples = 100\n'
            'seed = 1\n')
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop(FAILURE_ENV, None)
    port = free_port()
    agents, logs = [], []
    t0 = time.monotonic()
    for node, lr in enumerate((0.1, 0.2)):
        (tmp_path / f"node{node}.toml").write_text(base + f"lr = {lr}\n")
        logs.append(tmp_path / f"node{node}.log")
        with open(logs[-1], "wb") as f:
            agents.append(subprocess.Popen(
                [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(node),
                 "--nproc-per-node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}",
                 "--rdzv-id", "disagree", "-m", "coopsgd.torchrun", "--config", str(tmp_path / f"node{node}.toml"),
                 "--out", str(tmp_path / "run"), "--timeout-s", "60"],
                env=env, cwd=tmp_path, stdout=f, stderr=subprocess.STDOUT, start_new_session=True))
    try:
        codes = [a.wait(timeout=120) for a in agents]
    finally:
        for a in agents:
            if a.poll() is None:
                os.killpg(a.pid, signal.SIGKILL)
                a.wait()
    took = time.monotonic() - t0
    texts = [lg.read_text(errors="replace") for lg in logs]
    assert all(c != 0 for c in codes), texts
    ours = [ln for t in texts for ln in t.splitlines() if "coopsgd: error" in ln]
    assert len(ours) == 1, texts
    assert "the ranks run different configurations: lr is 0.1 on rank 0 and 0.2 on rank 1" in ours[0], ours
    assert not any(re.search(r'File ".*coopsgd[/\\\\]', t) for t in texts), texts  # no traceback of ours
    assert re.search(r"exitcode\s*:\s*2", "\n".join(texts)), texts  # the ranks' own exit status
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
    # every rank exits with 2, and rank 0 takes the directory's lock only after the ranks agreed: a refused run
    # leaves no directory (before, rank 0 had created it and its lock file before the configurations were compared)
    assert all(re.search(r"exitcode\s*:\s*2", t) for t in texts), texts
    assert not (tmp_path / "run").exists()
    with capsys.disabled():
        print(f"\ntorchrun config mismatch: both agents ended {took:.1f} s after they started")
