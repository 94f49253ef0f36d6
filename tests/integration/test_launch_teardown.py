"""Issue 24, class 9: a rank of a local launch tears its process group down only once every rank has returned.

``init_process_group`` can return on one rank while a peer is still inside gloo's ``connectFullMesh``; a rank
whose function returned at once and that then closed its sockets and exited broke that peer ("Connection
closed by peer": the flaky ``test_local_launch_listens_on_loopback_only``). The race itself depends on the
scheduler; the rule that closes it does not, and is checked here: rank 0 returns at once, rank 1 looks a
second later whether rank 0's process is still there.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from coopsgd.engines.distributed.launch import launch

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")


def _alive(pid: int) -> bool:
    """Whether process ``pid`` exists and has not exited (a zombie has exited)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _first_returns_at_once(rank: int, world: int, pid_file: str) -> dict[str, object]:
    """Rank 0 notes its pid and returns; rank 1 waits a second and reports whether rank 0 is still alive."""
    path = Path(pid_file)
    if rank == 0:  # written whole, then renamed: rank 1 never reads a created but still empty file
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(str(os.getpid()))
        os.replace(tmp, path)
        return {"rank": 0}
    deadline = time.time() + 20.0
    while not path.is_file() and time.time() < deadline:
        time.sleep(0.01)
    pid = int(path.read_text())
    time.sleep(1.0)  # far longer than a rank's teardown (destroy the group, os._exit) takes
    return {"rank": 1, "peer_alive": _alive(pid)}


def test_a_rank_that_returns_first_waits_for_its_peers(tmp_path: Path) -> None:
    results = launch(_first_returns_at_once, 2, args=(str(tmp_path / "pid0"),), timeout_s=30)
    assert results[0] == {"rank": 0}
    assert results[1] == {"rank": 1, "peer_alive": True}
