"""What a rank of the distributed engine shows of the run: the nodes' models, the centre model and the timing.

:class:`RankViews` is the part of :class:`~coopsgd.engines.distributed.engine.DistributedEngine` that reads
the state without advancing it: the auxiliaries a rank holds, every node's rows gathered on every rank
(:meth:`~RankViews.gather_state`), the centre model (:meth:`AlgorithmSpec.center_node`: the workers' average,
an auxiliary, or the leader), the average over all nodes, per-worker losses and the measured time and bytes
(:meth:`~RankViews.timing`, :func:`communication_table`). Most of them are collectives: call them on every
rank. The engine sets the attributes annotated on the class.
"""

from __future__ import annotations

import copy
import math
import time
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from coopsgd.engines.distributed.communicator import Mixer
from coopsgd.engines.distributed.parameter_server import AsyncParameterServer
from coopsgd.engines.executors import LoopExecutor
from coopsgd.engines.kernel import RoundKernel
from coopsgd.engines.reference import consensus_distance
from coopsgd.engines.rows import ModelRows
from coopsgd.errors import ConfigError, check_int

__all__ = ["RankViews", "communication_table"]


class RankViews(ModelRows):
    """A rank's views of the run (see the module docstring); mixed into the distributed engine."""

    rank: int
    asynchronous: bool
    mixer: Mixer
    _kernel: RoundKernel
    _executor: LoopExecutor
    _ps: AsyncParameterServer | None
    _aux_fill: Tensor  # an auxiliary's columns that are not mixed (asynchronous server)
    _hist: np.ndarray
    compute_s: float
    peak_bytes: float
    _round_arrivals: list[float]
    _round_durations: list[float]
    _t_start: float | None
    _t_last: float

    def aux_params(self, j: int = 0) -> Tensor:
        """Auxiliary node ``j``'s parameters on a rank that holds it (completes a pending round first)."""
        j = check_int("j", j, minimum=0, maximum=max(self.v - 1, 0))
        if self.asynchronous:
            raise ConfigError.invalid("j", j, "with an asynchronous server use gather_state() or center_row()")
        if not self.mixer.holds(j):
            raise ConfigError.invalid("j", j, f"auxiliary {j} is held by ranks {self.aux_holders(j)}, "
                                              f"not by rank {self.rank} (gather_state() collects every node)")
        self.mixer.finalize()
        return self._state[1 + j, self.b : self.b + self.d]

    def aux_host(self, j: int) -> int:
        """The designated host rank of auxiliary ``j`` (see :func:`coopsgd.engines.distributed.communicator.aux_placement`)."""
        if self.asynchronous:  # z on rank 0, worker i's last pull on rank i
            return 0 if j == 0 else j - 1
        return self.mixer.host(j)

    def aux_holders(self, j: int) -> list[int]:
        """The ranks that hold (and update) auxiliary ``j``."""
        h = self.mixer.holders
        return list(range(self.m)) if h is None else list(h[j])

    def center_node(self) -> int | None:
        """The centre's node (:meth:`AlgorithmSpec.center_node`); collective before LSGD's first election."""
        return self._center_row()

    def center_model(self) -> nn.Module:
        """The centre model as a new module on every rank (collective)."""
        return self.export(self.center_row())

    def average_model(self) -> nn.Module:
        """u_k over all m+v nodes as a new module on every rank (collective)."""
        return self.export(self.average_row())

    def consensus_distance(self) -> float:
        """||X (I - J)||_F^2 / m over all m+v nodes (collective)."""
        return consensus_distance(self.gather_params().detach().to("cpu", torch.float64).numpy(), self.m)

    def reduce_losses(self, sums: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per-worker loss sums and counts of every rank (collective: each rank holds its worker's entry)."""
        t = torch.tensor(np.stack([sums, counts]), dtype=torch.float64)
        dist.all_reduce(t)
        return t[0].numpy(), t[1].numpy()

    def time_record(self, *, local: bool = False) -> dict[str, Any]:
        """Bytes and time so far in the metric schema's names: measured (no simulated clock here).

        ``bytes_sent`` is summed over the ranks (collective) unless ``local``, and so is
        ``peak_bytes_per_step`` (each rank's most bytes in one step; the ranks of a synchronous round send alike,
        so the sum is the busiest step's bytes over all ranks); the measured compute and communication seconds
        are this rank's."""
        sent, peak = float(self.mixer.stats.bytes_sent), float(self.peak_bytes)
        if not local:
            t = torch.tensor([sent, peak], dtype=torch.float64)
            dist.all_reduce(t)
            sent, peak = float(t[0]), float(t[1])
        return {"bytes_sent": sent, "peak_bytes_per_step": peak, "simulated_time_s": None, "simulated_compute_s": None,
                "simulated_communication_s": None, "simulated_idle_s": None,
                "measured_compute_s": float(self.compute_s), "measured_communication_s": float(self.mixer.stats.comm_s)}

    def _async_aux_rows(self, which: list[int]) -> Tensor:
        """Rows of auxiliaries ``which`` (0: z on rank 0; 1+i: worker i's last pull) on every rank (collective)."""
        assert self._ps is not None
        lo, hi = self._kernel.cols
        buf = torch.zeros((len(which), self._state.shape[1]), dtype=self.dtype, device=self.device)
        for n, a in enumerate(which):
            owner = 0 if a == 0 else a - 1
            if owner == self.rank:
                buf[n].copy_(self._aux_fill)
                buf[n, lo:hi] = self._ps.server_value() if a == 0 else self._ps.pulled
        dist.all_reduce(buf)  # one contributor per row: exact
        return buf

    def finish(self) -> None:
        """Complete any pending non-blocking round (the end of a run waits for the last one)."""
        if self.mixer.pending:
            self.mixer.finalize()
            self._t_last = time.perf_counter()

    def gather_state(self) -> Tensor:
        """(m+v, width) stacked state of every node -- workers then auxiliaries -- on every rank (collective)."""
        self.mixer.finalize()
        row = self._state[0].contiguous()
        out = torch.empty(self.m * row.numel(), dtype=row.dtype, device=row.device)
        fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        fn(out, row)
        if self.asynchronous:
            aux = self._async_aux_rows(list(range(self.v)))
        else:
            aux = self.mixer.collect_aux(self._state[1:])
        return torch.cat([out.view(self.m, -1), aux], dim=0)

    def gather_params(self) -> Tensor:
        """(m+v, d) parameters of every node on every rank (collective)."""
        return self.gather_state()[:, self.b : self.b + self.d]

    def _center_row(self) -> int | None:
        """The centre's node (:meth:`AlgorithmSpec.center_node`); collective before LSGD's first election."""
        estimates = None
        if self.spec.center == "leader" and self.leader is None:
            if self._probe is not None:
                mine = float(self._executor.evaluate(self._probe)[0])
            else:
                vals = self._hist[np.isfinite(self._hist)]
                mine = float(vals.mean()) if vals.size else math.nan
            estimates = self.mixer.gather_floats(mine)[:, 0]
        return self.spec.center_node(self.leader, estimates)

    def center_row(self) -> Tensor:
        """The centre model's ``[buffers | params]`` row: workers' average, auxiliary 0, or the leader (collective)."""
        self.mixer.finalize()
        w = self.b + self.d
        row = self._center_row()
        if row is None:
            t = self._state[0, :w].clone()
            dist.all_reduce(t)
            return t / self.m
        if row >= self.m:
            a = row - self.m
            if self.asynchronous:
                return self._async_aux_rows([a])[0, :w]
            t = self._state[1 + a, :w].clone()
            if self.mixer.placed:
                dist.broadcast(t, src=self.mixer.host(a))
            return t
        t = self._state[0, :w].clone()
        dist.broadcast(t, src=row)
        return t

    def average_row(self) -> Tensor:
        """u_k = mean over all m+v nodes ([CSGD] eq. (13)) as a ``[buffers | params]`` row (collective)."""
        self.mixer.finalize()
        w = self.b + self.d
        t = self._state[0, :w].clone()
        if self.asynchronous:
            aux = self._async_aux_rows(list(range(self.v)))[:, :w].sum(dim=0)  # on every rank: add it once
            if self.rank == 0:
                t += aux
        else:
            for a in range(self.v):  # each auxiliary counted once, by its host
                if self.mixer.host(a) == self.rank:
                    t += self._state[1 + a, :w]
        dist.all_reduce(t)
        return t / (self.m + self.v)

    def export(self, row: Tensor) -> nn.Module:
        """A new module (eval mode) holding the ``[buffers | params]`` row (integer buffers: this worker's)."""
        module = copy.deepcopy(self.template)
        others = {k: v[0] for k, v in self.other_buffers.items()}
        module = self.layout.load_into(module, row[self.b : self.b + self.d], row[: self.b], others).eval()
        return module.to("cpu")

    def timing(self) -> dict[str, Any]:
        """Per-rank compute / communication / idle seconds and bytes, for every rank (collective).

        Idle time is the wait for the slowest rank at each round: ``min(time in the round, latest arrival
        - own arrival)`` (arrivals from the machine clock, so exact on one machine, approximate across
        machines with skewed clocks); communication is the rest of the time spent in collectives.
        """
        self.finish()
        R = len(self._round_arrivals)
        gathered: list[Any] = [None] * self.m
        dist.all_gather_object(gathered, list(self._round_arrivals))
        if len({len(g) for g in gathered}) != 1:
            raise RuntimeError(f"ranks recorded different numbers of rounds: {[len(g) for g in gathered]}")
        A = np.asarray(gathered, dtype=np.float64).reshape(self.m, R)
        dur = np.asarray(self._round_durations)
        idle = float(np.minimum(dur, A.max(axis=0) - A[self.rank]).clip(min=0).sum()) if R else 0.0
        st = self.mixer.stats
        wall = (self._t_last - self._t_start) if self._t_start is not None else 0.0
        mine = {
            "rank": self.rank,
            "wall_s": wall,
            "compute_s": self.compute_s,
            "communication_s": max(st.comm_s - idle, 0.0),
            "idle_s": idle,
            "emulated_delay_s": st.emulated_s,
            "bytes_sent": st.bytes_sent,
            "bytes_model": st.bytes_model,
            "rounds": self.rounds,
            "ops": dict(st.ops),
        }
        table: list[Any] = [None] * self.m
        dist.all_gather_object(table, mine)
        return {"ranks": table, **_aggregate(table)}


def _aggregate(table: list[dict[str, Any]]) -> dict[str, Any]:
    wall = max(t["wall_s"] for t in table)
    mean = {k: float(np.mean([t[k] for t in table])) for k in ("compute_s", "communication_s", "idle_s")}
    return {
        "wall_s": wall,
        **mean,
        "bytes_sent": float(sum(t["bytes_sent"] for t in table)),
        "bytes_model": float(table[0]["bytes_model"]),
        "communication_fraction": mean["communication_s"] / wall if wall > 0 else 0.0,
        "idle_fraction": mean["idle_s"] / wall if wall > 0 else 0.0,
        "compute_fraction": mean["compute_s"] / wall if wall > 0 else 0.0,
    }


def communication_table(rows: dict[str, dict[str, Any]]) -> str:
    """A text table like [LSGD] Table 6: per run, the % of wall-clock spent computing / communicating / idle."""
    lines = [f"{'run':<28} {'compute %':>10} {'comm %':>8} {'idle %':>8} {'wall s':>8} {'MB sent':>9}"]
    for name, t in rows.items():
        lines.append(
            f"{name:<28} {100 * t['compute_fraction']:>10.1f} {100 * t['communication_fraction']:>8.1f} "
            f"{100 * t['idle_fraction']:>8.1f} {t['wall_s']:>8.2f} {t['bytes_sent'] / 1e6:>9.2f}"
        )
    return "\n".join(lines)
