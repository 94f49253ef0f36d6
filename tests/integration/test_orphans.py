"""No orphans: whatever ends ``coopsgd run --engine distributed``, its ranks end with it and its temporary
``coopsgd-launch-*`` directory is removed (issue 14).

Each test starts a 2-rank run in a session of its own (TMPDIR points into ``tmp_path``, so the launcher's
directory can be checked precisely), waits until both ranks are training (their heartbeats say so), then
signals the parent: SIGKILL (only the kernel / the ranks' watchdog and the janitor can clean up), SIGTERM
(exit status 143, ``summary.json`` says ``"interrupted"``) and SIGINT to the whole process group, as Ctrl-C
sends it (exit status 130).
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


def _stat(pid: int) -> tuple[str, int] | None:
    """(state, ppid) of a process, or ``None`` when it does not exist."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return fields[0], int(fields[1])


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
        if b"coopsgd.engines.launch\x00--child" in cmd:
            ranks.append(int(d.name))
    return sorted(ranks)


class Run:
    def __init__(self, tmp_path: Path) -> None:
        self.tmp = tmp_path / "tmp"
        self.tmp.mkdir()
        self.out = tmp_path / "run"
        self.stderr_path = tmp_path / "stderr.txt"
        env = dict(os.environ, TMPDIR=str(self.tmp))
        env.pop("COOPSGD_INJECT_FAILURE", None)
        with open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "coopsgd.cli", "run", "--engine", "distributed", "--workers", "2",
                 "--max-steps", "100000", "--out", str(self.out)],
                env=env, stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
        self.ranks: list[int] = []

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
        for p in self.ranks:
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


def test_sigkill_of_the_parent_leaves_no_rank_and_no_directory(run: Run) -> None:
    run.wait_training()
    t0 = time.monotonic()
    os.kill(run.proc.pid, signal.SIGKILL)
    run.proc.wait()
    died = run.wait_ranks_gone(t0)
    cleaned = run.wait_no_launch_dir(t0)
    print(f"SIGKILL: ranks gone after {died:.3f} s, directory after {cleaned:.3f} s")
    summary = run.out / "summary.json"
    assert not summary.is_file() or json.loads(summary.read_text()).get("status") != "ok"


def test_sigterm_stops_the_ranks_and_records_the_interruption(run: Run) -> None:
    run.wait_training()
    t0 = time.monotonic()
    os.kill(run.proc.pid, signal.SIGTERM)  # the parent only, as `kill PID` does
    code = run.proc.wait(timeout=30)
    elapsed = time.monotonic() - t0
    assert code == 143, run.stderr
    assert not any(_alive(p) for p in run.ranks)
    assert run.launch_dirs() == []
    assert json.loads((run.out / "summary.json").read_text())["status"] == "interrupted"
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith("coopsgd: interrupted by SIGTERM"), run.stderr
    assert "Traceback" not in run.stderr
    print(f"SIGTERM: parent exited after {elapsed:.3f} s")


def test_sigint_to_the_group_exits_130(run: Run) -> None:
    run.wait_training()
    t0 = time.monotonic()
    os.killpg(run.proc.pid, signal.SIGINT)  # Ctrl-C: every process of the foreground group
    code = run.proc.wait(timeout=30)
    elapsed = time.monotonic() - t0
    assert code == 130, run.stderr
    assert not any(_alive(p) for p in run.ranks)
    assert run.launch_dirs() == []
    assert json.loads((run.out / "summary.json").read_text())["status"] == "interrupted"
    assert run.stderr.strip().splitlines()[-1].startswith("coopsgd: interrupted by SIGINT"), run.stderr
    assert "Traceback" not in run.stderr
    print(f"SIGINT: parent exited after {elapsed:.3f} s")
