"""The asynchronous DOWNPOUR parameter server (gloo, 2-3 local processes).

The key test replays the server's arrival log sequentially: a real asynchronous run must be exactly the
DOWNPOUR linear maps ``z <- z + (x_i - b_i); x_i <- z; b_i <- z`` applied in arrival order.
"""

from __future__ import annotations

import os
import time

import pytest
import torch
import torch.distributed as dist

from coopsgd.engines.distributed.communicator import CommunicationError, NetEmulation
from coopsgd.engines.distributed.launch import RankFailure, launch
from coopsgd.engines.distributed.parameter_server import AsyncParameterServer
from coopsgd.errors import ConfigError

pytestmark = pytest.mark.slow  # every test here starts processes

TOL = 1e-10
W = 6
LR = 0.05
TAU = 3
ROUNDS = 6
SLEEP_S = (0.002, 0.006, 0.010)  # per local step: ranks run at different speeds, so pushes interleave


# ---------------------------------------------------------------------------------------------------------
# the deterministic problem (shared by the ranks and the replay)
# ---------------------------------------------------------------------------------------------------------


def _problem(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Worker ``rank``'s least-squares data (8 x W), float64."""
    g = torch.Generator().manual_seed(100 + rank)
    return torch.randn(8, W, generator=g, dtype=torch.float64), torch.randn(8, generator=g, dtype=torch.float64)


def _x0() -> torch.Tensor:
    return torch.linspace(-1.0, 1.0, W, dtype=torch.float64)


def _local_step(x: torch.Tensor, A: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return x - LR * (A.T @ (A @ x - y)) / A.shape[0]


# ---------------------------------------------------------------------------------------------------------
# rank functions (module level: the launcher imports them in the children)
# ---------------------------------------------------------------------------------------------------------


def _replay_rank(rank: int, world: int) -> dict:
    A, y = _problem(rank)
    row = _x0()
    ps = AsyncParameterServer(row.clone())
    for _ in range(ROUNDS):
        for _ in range(TAU):
            time.sleep(SLEEP_S[rank])
            row.copy_(_local_step(row, A, y))
        ps.push_pull(row)
    ps.close()
    out = {"row": row.clone(), "z": ps.broadcast_server_value(), "summary": ps.summary()}
    if rank == 0:
        out["log"] = ps.arrival_log
        out["server_value"] = ps.server_value()
    return out


LIN_W = 7
LIN_ROUNDS = 5
LIN_LR = 0.25  # dyadic numbers: every float32 operation below is exact, whatever the order


def _lin_c(rank: int) -> torch.Tensor:
    return (torch.arange(LIN_W, dtype=torch.float32) - 3.0) * 0.5 * (rank + 1)


def _lin_z0() -> torch.Tensor:
    return torch.arange(LIN_W, dtype=torch.float32) * 4.0


def _linear_rank(rank: int, world: int) -> dict:
    c = _lin_c(rank)
    tau = rank + 1
    row = _lin_z0()
    ps = AsyncParameterServer(row.clone(), net=NetEmulation(latency_ms=2.0))
    ticks = 0.0
    for _ in range(LIN_ROUNDS):
        for _ in range(tau):
            row -= LIN_LR * c
        ps.push_pull(row)
        # a collective on the default group while rank 0's server thread serves the PS group
        one = torch.ones(1)
        dist.all_reduce(one)
        ticks += float(one)
    ps.close()
    out = {"row": row.clone(), "z": ps.broadcast_server_value(), "summary": ps.summary(), "ticks": ticks}
    if rank == 0:
        out["log"] = ps.arrival_log
    return out


def _dying_rank(rank: int, world: int, dead: int) -> None:
    row = torch.zeros(5, dtype=torch.float64)
    ps = AsyncParameterServer(row.clone())
    for k in range(40):
        time.sleep(0.02)
        row += 1.0
        ps.push_pull(row)
        if rank == dead and k == 1:
            os._exit(7)
    ps.close()


def _close_rank(rank: int, world: int) -> dict:
    out: dict = {}
    row = torch.ones(3, dtype=torch.float32) * (1.0 + (rank == 1))  # differs on rank 1
    try:
        AsyncParameterServer(row)
    except ConfigError as exc:
        out["mismatch"] = str(exc)
    row = torch.ones(3, dtype=torch.float32)
    ps = AsyncParameterServer(row.clone(), timeout_s=20.0)
    row += rank + 1.0
    ps.push_pull(row)
    if rank == 0:
        try:
            ps.close(timeout_s=0.3)
        except CommunicationError as exc:
            out["close_error"] = str(exc)
        ps.close()  # rank 1 finishes later: a second close succeeds
    else:
        time.sleep(1.5)
        ps.close()
    out["z"] = ps.broadcast_server_value()
    return out


# ---------------------------------------------------------------------------------------------------------
# tests
# ---------------------------------------------------------------------------------------------------------


def _replay(log: list[tuple[int, int]], m: int) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """Sequential DOWNPOUR in the given order: each event is tau local steps from the last pull, push, pull."""
    data = [_problem(i) for i in range(m)]
    z = _x0()
    pulled = {i: _x0() for i in range(m)}
    seen = dict.fromkeys(range(m), 0)
    for i, n in log:
        assert n == seen[i], f"rank {i}'s pushes out of order in the log: {log}"
        seen[i] += 1
        x = pulled[i].clone()
        for _ in range(TAU):
            x = _local_step(x, *data[i])
        z = z + (x - pulled[i])
        pulled[i] = z.clone()
    return z, pulled


def test_real_run_equals_sequential_replay_of_arrival_log() -> None:
    m = 3
    res = launch(_replay_rank, m, timeout_s=60)
    log = res[0]["log"]
    assert sorted(log) == [(i, n) for i in range(m) for n in range(ROUNDS)]
    switches = sum(a[0] != b[0] for a, b in zip(log, log[1:], strict=False))
    assert switches >= m, f"pushes did not interleave: {log}"
    z, pulled = _replay(log, m)
    assert float((res[0]["server_value"] - z).abs().max()) <= TOL
    for r in range(m):
        assert float((res[r]["z"] - z).abs().max()) <= TOL, f"rank {r}: broadcast z differs from the replay"
        diff = float((res[r]["row"] - pulled[r]).abs().max())
        assert diff <= TOL, f"rank {r}: final row differs from the replay by {diff:.3e}"
    # the test discriminates orders: replaying rank by rank gives another model (unless that was the order)
    blocked = sorted(log)
    if blocked != log:
        assert float((_replay(blocked, m)[0] - z).abs().max()) > 1e-8
    # accounting
    nb = 8  # float64
    for r in range(m):
        s = res[r]["summary"]
        assert s["pushes"] == ROUNDS
        if r == 0:
            assert s["bytes_sent"] == 0
            server = s["server"]
            assert server["pushes"] == m * ROUNDS and server["remote_pushes"] == (m - 1) * ROUNDS
            assert server["pushes_by_rank"] == dict.fromkeys(range(m), ROUNDS)
            assert server["bytes_received"] == ((m - 1) * (ROUNDS + 1)) * (W + 1) * nb
            assert server["bytes_sent"] == (m - 1) * ROUNDS * W * nb
        else:
            assert s["bytes_sent"] == (ROUNDS + 1) * (W + 1) * nb  # pushes + DONE
            assert s["bytes_received"] == ROUNDS * W * nb
            assert s["wait_s"] > 0 and "server" not in s


def test_linear_objective_invariant_float32_with_default_group_collectives() -> None:
    m = 3
    res = launch(_linear_rank, m, timeout_s=60)
    expected = _lin_z0().clone()
    for r in range(m):
        expected -= LIN_LR * (LIN_ROUNDS * (r + 1)) * _lin_c(r)
    for r in range(m):
        assert res[r]["z"].dtype == torch.float32
        assert torch.equal(res[r]["z"], expected), f"rank {r}: {res[r]['z']} != {expected}"
        assert res[r]["ticks"] == m * LIN_ROUNDS
    last = res[0]["log"][-1][0]
    assert torch.equal(res[last]["row"], expected)  # the last pusher pulled the final z
    for r in range(1, m):
        s = res[r]["summary"]
        assert s["bytes_sent"] == (LIN_ROUNDS + 1) * (LIN_W + 1) * 4
        assert s["emulated_s"] > 0 and s["wait_s"] >= LIN_ROUNDS * 2 * 0.002 * 0.99


@pytest.mark.parametrize("dead", [2, 0])
def test_dead_peer_is_named_within_the_timeout(dead: int) -> None:
    timeout = 20.0
    t0 = time.time()
    with pytest.raises(RankFailure) as info:
        launch(_dying_rank, 3, (dead,), timeout_s=timeout)
    assert info.value.rank == dead
    assert f"rank {dead}" in str(info.value)
    assert time.time() - t0 < timeout


def test_close_names_unfinished_ranks_and_can_be_retried() -> None:
    res = launch(_close_rank, 2, timeout_s=30)
    for r in range(2):
        assert "ranks [1] differ from host rank 0" in res[r]["mismatch"]
    assert "ranks [1] never finished" in res[0]["close_error"]
    assert "close_error" not in res[1]
    # z = 1 + (1 + 1) + (1 + 2) - 1 - 1 in whatever order: both pushes applied once
    for r in range(2):
        assert torch.equal(res[r]["z"], torch.full((3,), 4.0))
