"""No orphans: whatever ends ``coopsgd run --engine distributed``, its ranks end with it and its temporary
``coopsgd-launch-*`` directory is removed (issue 14).

The test here starts a 2-rank run in a session of its own (TMPDIR points into ``tmp_path``, so the
launcher's directory can be checked precisely), waits until both ranks are training (their heartbeats say
so), then sends SIGINT to the whole process group, as Ctrl-C does (exit status 130, ``summary.json`` says
``"interrupted"``). SIGKILL and SIGTERM of the parent alone, and a rank killed or stopped, are the fault
matrix in ``test_fault_matrix.py``, which uses the helpers of this module (:class:`Run`, :func:`leftovers`)
and also resumes every faulted run.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="finds the ranks through /proc"),
]

START_TIMEOUT_S = 90.0  # the first rank start takes several seconds on a loaded 2-core machine
DIE_WITHIN_S = 5.0


def _fields(pid: int) -> list[str] | None:
    """The fields of ``/proc/PID/stat`` after the command name (state, ppid, pgrp, session, ...)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _stat(pid: int) -> tuple[str, int] | None:
    """(state, ppid) of a process, or ``None`` when it does not exist."""
    fields = _fields(pid)
    return None if fields is None else (fields[0], int(fields[1]))


def _alive(pid: int) -> bool:
    st = _stat(pid)
    return st is not None and st[0] != "Z"


def _ranks_of(parent: int) -> list[int]:
    ranks = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        st = _stat(int(d.name))
        if st is None or st[1] != parent:
            continue
        try:
            cmd = (d / "cmdline").read_bytes()
        except OSError:
            continue
        if b"coopsgd.engines.distributed.launch\x00--child" in cmd:
            ranks.append(int(d.name))
    return sorted(ranks)


def leftovers(session: int, marker: str) -> list[int]:
    """Live processes (zombies excluded) in session ``session`` or whose command line contains ``marker``
    (the ranks and the janitor name the launcher's directory, which lies under the run's own TMPDIR)."""
    found = []
    needle = marker.encode()
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        fields = _fields(int(d.name))
        if fields is None or fields[0] == "Z":
            continue
        if int(fields[3]) == session:
            found.append(int(d.name))
            continue
        try:
            if needle in (d / "cmdline").read_bytes():
                found.append(int(d.name))
        except OSError:
            continue
    return sorted(found)


class Run:
    """``coopsgd run --engine distributed --workers 2 ARGS --out RUN`` in a session of its own, with TMPDIR
    (where the launcher makes its directory) inside the test's directory."""

    def __init__(self, tmp_path: Path, args: tuple[str, ...] = ("--max-steps", "100000"),
                 env: dict[str, str] | None = None) -> None:
        self.tmp = tmp_path / "tmp"
        self.tmp.mkdir()
        self.out = tmp_path / "run"
        self.stderr_path = tmp_path / "stderr.txt"
        run_env = dict(os.environ, TMPDIR=str(self.tmp))
        run_env.pop("COOPSGD_INJECT_FAILURE", None)
        run_env.update(env or {})
        with open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "coopsgd.cli", "run", "--engine", "distributed", "--workers", "2",
                 *args, "--out", str(self.out)],
                env=run_env, stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
        self.ranks: list[int] = []

    def leftovers(self) -> list[int]:
        """Processes of this run still alive: its session (parent and ranks), anything naming its TMPDIR."""
        return leftovers(self.proc.pid, str(self.tmp))

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def launch_dirs(self) -> list[Path]:
        return sorted(self.tmp.glob("coopsgd-launch-*"))

    def wait_training(self) -> None:
        """Until both ranks exist and have beaten in a training phase."""
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"the run ended early ({self.proc.returncode}): {self.stderr}"
            ranks = _ranks_of(self.proc.pid)
            dirs = self.launch_dirs()
            if len(ranks) == 2 and len(dirs) == 1:
                try:
                    table = np.fromfile(dirs[0] / "heartbeat.bin", dtype=np.float64)
                except OSError:
                    table = np.zeros(0)
                if table.size == 6 and bool((table.reshape(2, 3)[:, 2] >= 1.0).all()):
                    self.ranks = ranks
                    return
            time.sleep(0.1)
        pytest.fail(f"the ranks did not start training within {START_TIMEOUT_S:g} s: {self.stderr}")

    def wait_ranks_gone(self, since: float) -> float:
        while time.monotonic() - since < DIE_WITHIN_S:
            if not any(_alive(p) for p in self.ranks):
                return time.monotonic() - since
            time.sleep(0.01)
        alive = [p for p in self.ranks if _alive(p)]
        pytest.fail(f"ranks {alive} still alive {DIE_WITHIN_S:g} s after the parent")

    def wait_no_launch_dir(self, since: float) -> float:
        while time.monotonic() - since < DIE_WITHIN_S:
            if not self.launch_dirs():
                return time.monotonic() - since
            time.sleep(0.01)
        pytest.fail(f"left behind: {self.launch_dirs()}")

    def cleanup(self) -> None:
        """Whatever a failing test left running (only the processes this test started)."""
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except OSError:
                pass
            self.proc.wait()
        for p in {*self.ranks, *self.leftovers()}:
            if _alive(p):
                try:
                    os.kill(p, signal.SIGKILL)
                except OSError:
                    pass


@pytest.fixture
def run(tmp_path: Path) -> Iterator[Run]:
    r = Run(tmp_path)
    try:
        yield r
    finally:
        r.cleanup()


def test_sigint_to_the_group_exits_130(run: Run) -> None:
    run.wait_training()
    t0 = time.monotonic()
    os.killpg(run.proc.pid, signal.SIGINT)  # Ctrl-C: every process of the foreground group
    code = run.proc.wait(timeout=30)
    elapsed = time.monotonic() - t0
    assert code == 130, run.stderr
    assert not any(_alive(p) for p in run.ranks)
    assert run.leftovers() == []
    assert run.launch_dirs() == []
    assert json.loads((run.out / "summary.json").read_text())["status"] == "interrupted"
    assert run.stderr.strip().splitlines()[-1].startswith("coopsgd: interrupted by SIGINT"), run.stderr
    assert "Traceback" not in run.stderr
    print(f"SIGINT: parent exited after {elapsed:.3f} s")
