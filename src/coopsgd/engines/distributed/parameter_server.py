"""A real asynchronous parameter server for DOWNPOUR (Dean et al. 2012) over ``torch.distributed`` (gloo).

:class:`~coopsgd.algorithms.schedules.DownpourSchedule` describes DOWNPOUR as linear maps applied in an
order that models asynchrony; the distributed engine only *emulates* that order (a seeded permutation,
one all_gather per round). :class:`AsyncParameterServer` is the real thing: no barrier between workers,
every push is applied the moment it reaches the server, in arrival order.

Placement: worker ``r`` lives on rank ``r`` of a world of ``m`` ranks; the server model ``z`` lives on
rank ``host`` (rank 0 by default). Every rank also keeps ``b_r``, the copy of ``z`` it pulled last.

Protocol (one dedicated process group, created with ``dist.new_group`` when the server is built, so the
parameter-server traffic never mixes with collectives on the default group):

* **push/pull** (``push_pull(row)``, worker ``r != host``): post a receive for the reply, then send ONE
  message of ``W + 1`` floats, ``[PUSH, row - b_r]``, to the host (tag ``_TAG_PUSH``), and wait for the
  reply of ``W`` floats (tag ``_TAG_REPLY``): the value of ``z`` right after the server applied this push.
  Then ``row[:] = b_r[:] = z``. This is exactly DOWNPOUR's map ``z <- z + (x_r - b_r); x_r <- z;
  b_r <- z``.
* **server thread** (on the host only): posts an *any-source* receive (``dist.irecv(buf, src=None)``;
  gloo implements it with ``recvAnysource``), and for a push from rank ``r``, under the lock, adds the
  delta to ``z``, appends ``(r, n)`` to the arrival log (``n``: the index of that push among ``r``'s
  pushes) and copies ``z`` into the reply buffer; outside the lock it sends the reply to ``r``. For a
  DONE message it marks ``r`` finished; it exits when every remote rank is finished.
* **the host's own worker** cannot send to itself: its push is applied directly to ``z`` under the same
  lock (and logged the same way), so the log is the true order in which pushes changed ``z``.
* **close()** (collective in the sense that every rank must call it): a remote rank sends ONE DONE
  message (same width as a push, same tag, so it arrives after that rank's last push); the host waits
  until every remote rank has sent DONE, then joins the server thread. After ``close`` the host's
  :meth:`server_value` is the final ``z``; :meth:`broadcast_server_value` hands it to every rank.

Threading: on the host two threads touch ``z``: the server thread and the caller's thread (its own
pushes, :meth:`server_value`). A single ``threading.Condition`` guards ``z``, the log, the finished set
and the server's error. The server thread uses ONLY the parameter-server group, and the caller's thread
uses that group only after the server thread has ended (:meth:`broadcast_server_value`), so the caller's
thread may run collectives on the default group at any time (gloo process groups are independent). No
network operation happens while the lock is held. The server thread is a daemon: a process whose server
thread is still blocked in a receive (a peer died) can still exit.

Why the result is non-deterministic: the order in which pushes reach the server depends on the workers'
speed, the OS scheduler and the network. Each push is applied atomically, so a run is always *some*
sequential DOWNPOUR execution -- the one given by :attr:`AsyncParameterServer.arrival_log` -- and
replaying the log with the same local computations reproduces ``z`` and every worker's model (the
integration test does exactly that), but two runs generally produce different logs and different models.

Failures: every failing operation raises :class:`~coopsgd.engines.distributed.communicator.CommunicationError` naming the
peer rank. A dead worker is noticed by the host when it tries to reply to it, or at :meth:`close`, which
raises naming the ranks that never finished if no message arrived for ``timeout_s`` (close may be
called again). A dead host is noticed by every worker at its next push (gloo: "Connection closed by
peer"). The server's any-source receive times out after ``timeout_s`` without ANY message (gloo then
tears the whole group down): ``timeout_s`` must exceed the longest gap between two messages reaching the
server, just as a collective's timeout must exceed the slowest worker's compute time between rounds.

Network emulation (:class:`~coopsgd.engines.distributed.communicator.NetEmulation`): each message takes at least its
alpha-beta time (``latency + bytes / bandwidth``). The worker sleeps the push's time *before* sending
(so the emulated delay moves its arrival, and hence the order), and after the reply arrives sleeps what
the round trip still owes. The host's own pushes are local and never delayed.
"""

from __future__ import annotations

import datetime
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from coopsgd.engines.distributed.communicator import CommunicationError, NetEmulation
from coopsgd.engines.distributed.launch import no_heartbeat
from coopsgd.errors import ConfigError, check_float, check_int
from coopsgd.theory.cost import RoundCost

__all__ = ["AsyncParameterServer", "PSStats", "ServerStats"]

_TAG_PUSH = 41  # worker -> host: pushes and DONE (one channel, so DONE follows the last push)
_TAG_REPLY = 42  # host -> worker: z after the push
_KIND_PUSH = 0.0
_KIND_DONE = 1.0
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass
class PSStats:
    """Accounting of one rank's worker side.

    Attributes:
        pushes: number of :meth:`AsyncParameterServer.push_pull` calls completed.
        bytes_sent: payload bytes this worker sent (``(W + 1) * itemsize`` per push and for DONE; the
            host's own worker sends nothing).
        bytes_received: payload bytes received (``W * itemsize`` per reply).
        wait_s: seconds inside ``push_pull`` from the send to the end of the pull (waiting for the reply,
            emulated delays included; the host's own pushes count the time they waited for the lock).
        emulated_s: the part of ``wait_s`` that was emulated network delay.
        close_s: seconds spent in :meth:`AsyncParameterServer.close`.
    """

    pushes: int = 0
    bytes_sent: float = 0.0
    bytes_received: float = 0.0
    wait_s: float = 0.0
    emulated_s: float = 0.0
    close_s: float = 0.0


@dataclass
class ServerStats:
    """Accounting of the server (host rank only).

    Attributes:
        pushes: pushes applied to ``z`` (the host's own included).
        remote_pushes: pushes received over the network.
        pushes_by_rank: per rank, pushes applied.
        bytes_received: payload bytes received (pushes and DONE messages).
        bytes_sent: payload bytes of the replies.
        reply_s: seconds the server thread spent sending replies.
    """

    pushes: int = 0
    remote_pushes: int = 0
    pushes_by_rank: dict[int, int] = field(default_factory=dict)
    bytes_received: float = 0.0
    bytes_sent: float = 0.0
    reply_s: float = 0.0


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:300]


def _add(z: Tensor, push: Tensor, rank: int) -> None:
    """DOWNPOUR's server rule: ``z += push``."""
    z.add_(push)


def _world_timeout_s() -> float:
    """The default group's timeout in seconds (private torch API; 30 minutes if it cannot be read)."""
    try:
        backend = dist.group.WORLD._get_backend(torch.device("cpu"))  # type: ignore[union-attr]
        return float(backend.options._timeout.total_seconds())
    except Exception:  # noqa: BLE001 -- older/newer torch: fall back to torch's default
        return 1800.0


class AsyncParameterServer:
    """Asynchronous DOWNPOUR parameter server; build it on every rank of an initialised process group.

    Args:
        row: the initial flat model, a 1-D floating-point CPU tensor, the same on every rank (checked: the
            host's copy is broadcast and every rank compares; a mismatch of width, dtype or values raises
            :class:`~coopsgd.errors.ConfigError` on every rank). It becomes ``z`` (on the host) and ``b_r``.
            ``row`` itself is not kept: pass the same tensor (or any tensor of that width and dtype) to
            :meth:`push_pull`.
        host: the rank hosting ``z`` (default 0).
        timeout_s: timeout of the parameter-server group (every receive and send; the server's idle
            limit) and the default of :meth:`close`. Default: the default group's timeout.
        net: network emulation (``None``: none).
        heartbeat: ``heartbeat(step, phase)`` callback (the rank's :class:`~coopsgd.engines.distributed.launch.Heartbeat`,
            injected by whoever runs the rank; default: none);
            called with ``"comm"`` while waiting for the server and ``"compute"`` after.
        rule: how a push changes z on the host: ``rule(z, push, rank)`` changes ``z`` in place from the push
            ``row - b`` of ``rank`` (called under the server's lock, in arrival order; it must not keep ``push``).
            Default: DOWNPOUR's ``z += push``. An asynchronous server's buffer and staleness weights
            (:meth:`coopsgd.engines.asynchronous.AsyncServer.on_push`) come in this way.

    Construction is collective (it creates a process group and runs three small collectives on it): every
    rank must build its server at the same point of the program, in the same order as its other groups.

    Attributes (read-only use): ``rank``, ``world``, ``host``, ``width``, ``dtype``, ``stats``
    (:class:`PSStats`), ``server_stats`` (:class:`ServerStats` on the host, else ``None``).
    """

    def __init__(
        self,
        row: Tensor,
        *,
        host: int = 0,
        timeout_s: float | None = None,
        net: NetEmulation | None = None,
        heartbeat: Callable[[int, str], None] | None = None,
        rule: Callable[[Tensor, Tensor, int], None] | None = None,
    ) -> None:
        if not dist.is_available() or not dist.is_initialized():
            raise ConfigError.invalid("process group", None, "call torch.distributed.init_process_group first")
        if not isinstance(row, Tensor) or row.dim() != 1 or row.dtype not in _DTYPES or row.device.type != "cpu":
            raise ConfigError.invalid(
                "row", getattr(row, "shape", row), "must be a 1-D floating-point CPU tensor (the flat model)")
        if row.numel() == 0:
            raise ConfigError.invalid("row", tuple(row.shape), "must not be empty")
        self.rank = dist.get_rank()
        self.world = dist.get_world_size()
        self.host = check_int("host", host, minimum=0, maximum=self.world - 1)
        self.timeout_s = _world_timeout_s() if timeout_s is None else check_float(
            "timeout_s", timeout_s, low=0.0, low_open=True)
        self.net = net or NetEmulation()
        self.heartbeat = heartbeat or no_heartbeat
        self._rule = rule or _add
        self.width = int(row.numel())
        self.dtype = row.dtype
        self._itemsize = row.element_size()
        self.stats = PSStats()
        self.server_stats: ServerStats | None = ServerStats() if self.rank == self.host else None
        self._closed = False

        self._group = dist.new_group(
            list(range(self.world)), backend="gloo", timeout=datetime.timedelta(seconds=self.timeout_s))
        self._check_same_row(row)

        # worker state
        self._b = row.detach().clone()
        self._msg = torch.empty(self.width + 1, dtype=self.dtype)
        self._reply = torch.empty(self.width, dtype=self.dtype)
        # server state (host only)
        self._cv = threading.Condition()
        self._log: list[tuple[int, int]] = []
        self._finished: set[int] = set()
        self._server_error: CommunicationError | None = None
        self._last_message = time.monotonic()
        self._thread: threading.Thread | None = None
        self._z: Tensor | None = None
        if self.rank == self.host:
            self._z = row.detach().clone()
            self.server_stats.pushes_by_rank = {r: 0 for r in range(self.world)}  # type: ignore[union-attr]
            if self.world > 1:
                self._thread = threading.Thread(
                    target=self._serve, name=f"coopsgd-parameter-server-{self.rank}", daemon=True)
                self._thread.start()

    # -- construction ----------------------------------------------------------------------------------
    def _check_same_row(self, row: Tensor) -> None:
        """Every rank must start from the host's row (same width, dtype and values): checked collectively."""
        m, r = self.world, self.rank
        desc = torch.zeros(m, 2, dtype=torch.float64)
        desc[r, 0] = float(self.width)
        desc[r, 1] = float(_DTYPES.index(self.dtype))
        try:
            dist.all_reduce(desc, group=self._group)
        except Exception as exc:
            raise CommunicationError(f"rank {r}: parameter-server set-up failed: {_first_line(exc)}") from exc
        ref = desc[self.host]
        bad = [i for i in range(m) if not torch.equal(desc[i], ref)]
        if bad:
            rows = ", ".join(f"rank {i}: width {int(desc[i, 0])} {_DTYPES[int(desc[i, 1])]}" for i in range(m))
            raise ConfigError.invalid("row", tuple(row.shape), f"must have the same width and dtype on every rank ({rows})")
        host_row = row.detach().clone().contiguous()
        differs = torch.zeros(m, dtype=torch.float64)
        try:
            dist.broadcast(host_row, src=self.host, group=self._group)
            differs[r] = 0.0 if torch.equal(host_row, row.detach()) else 1.0
            dist.all_reduce(differs, group=self._group)
        except Exception as exc:
            raise CommunicationError(f"rank {r}: parameter-server set-up failed: {_first_line(exc)}") from exc
        bad = [i for i in range(m) if differs[i] != 0]
        if bad:
            raise ConfigError.invalid(
                "row", tuple(row.shape), f"must be the same on every rank; ranks {bad} differ from host rank {self.host}")

    # -- emulation -------------------------------------------------------------------------------------
    def _delay(self, floats: int) -> float:
        if not self.net.enabled:
            return 0.0
        return self.net.model.round_time(RoundCost("parameter_server", 1, float(floats), float(floats * self._itemsize)))

    # -- server thread (host only) ---------------------------------------------------------------------
    def _active(self) -> list[int]:
        return [i for i in range(self.world) if i != self.host and i not in self._finished]

    def _serve(self) -> None:
        assert self._z is not None and self.server_stats is not None
        st = self.server_stats
        buf = torch.empty(self.width + 1, dtype=self.dtype)
        reply = torch.empty(self.width, dtype=self.dtype)
        nbytes_in = (self.width + 1) * self._itemsize
        try:
            while True:
                with self._cv:
                    if not self._active():
                        return
                try:
                    work = dist.irecv(buf, group=self._group, tag=_TAG_PUSH)  # any source
                    assert work is not None  # this rank is in the group
                    work.wait()
                    src = dist.get_global_rank(self._group, int(work._source_rank()))
                except Exception as exc:
                    with self._cv:
                        waiting = self._active()
                    raise CommunicationError(
                        f"parameter server on rank {self.host}: receive from ranks {waiting} failed (one of them "
                        f"died, or none sent anything for {self.timeout_s:g} s): {_first_line(exc)}") from exc
                kind = float(buf[0])
                with self._cv:
                    self._last_message = time.monotonic()
                    st.bytes_received += nbytes_in
                    if src == self.host or src in self._finished or kind not in (_KIND_PUSH, _KIND_DONE):
                        raise CommunicationError(
                            f"parameter server on rank {self.host}: unexpected message (kind {kind!r}) from rank {src}"
                            + (" after it closed" if src in self._finished else ""))
                    if kind == _KIND_DONE:
                        self._finished.add(src)
                        self._cv.notify_all()
                        continue
                    self._rule(self._z, buf[1:], src)
                    n = st.pushes_by_rank[src]
                    st.pushes_by_rank[src] = n + 1
                    st.pushes += 1
                    st.remote_pushes += 1
                    self._log.append((src, n))
                    reply.copy_(self._z)
                t0 = time.perf_counter()
                try:
                    dist.send(reply, dst=src, group=self._group, tag=_TAG_REPLY)
                except Exception as exc:
                    raise CommunicationError(
                        f"parameter server on rank {self.host}: reply to rank {src} failed (rank {src} died?): "
                        f"{_first_line(exc)}") from exc
                with self._cv:
                    st.reply_s += time.perf_counter() - t0
                    st.bytes_sent += self.width * self._itemsize
        except BaseException as exc:  # noqa: BLE001 -- handed to the caller's thread
            err = exc if isinstance(exc, CommunicationError) else CommunicationError(
                f"parameter server on rank {self.host} failed: {type(exc).__name__}: {_first_line(exc)}")
            if err is not exc:
                err.__cause__ = exc
            with self._cv:
                self._server_error = err
                self._cv.notify_all()

    def locked(self, fn: Callable[[], Any]) -> Any:
        """``fn()`` under the server's lock (reads of the server rule's state while pushes may arrive)."""
        with self._cv:
            return fn()

    def _raise_server_error(self) -> None:
        if self._server_error is not None:
            raise CommunicationError(str(self._server_error)) from self._server_error

    # -- the worker API --------------------------------------------------------------------------------
    def push_pull(self, row: Tensor) -> None:
        """Push ``row - b`` to the server and pull ``z`` into ``row`` (in place) and into ``b``.

        On a remote rank this blocks until the server's reply arrives (the server's other clients are
        not waited for). Raises :class:`CommunicationError` naming the host when it cannot be reached.
        """
        if self._closed:
            raise ConfigError.invalid("push_pull", "after close()", "the parameter server was closed")
        if not isinstance(row, Tensor) or row.dtype != self.dtype or row.dim() != 1 or row.numel() != self.width:
            raise ConfigError.invalid(
                "row", getattr(row, "shape", row), f"must be a 1-D {self.dtype} tensor of width {self.width}")
        n = self.stats.pushes
        if self.rank == self.host:
            t0 = time.perf_counter()
            delta = row.detach() - self._b
            assert self._z is not None and self.server_stats is not None
            with self._cv:
                self._raise_server_error()
                self._rule(self._z, delta, self.rank)
                self._log.append((self.rank, n))
                self.server_stats.pushes += 1
                self.server_stats.pushes_by_rank[self.rank] += 1
                self._b.copy_(self._z)
            with torch.no_grad():
                row.copy_(self._b)
            self.stats.pushes += 1
            self.stats.wait_s += time.perf_counter() - t0
            return
        self.heartbeat(n, "comm")
        self._msg[0] = _KIND_PUSH
        torch.sub(row.detach(), self._b, out=self._msg[1:])
        d_push = self._delay(self.width + 1)
        d_total = d_push + self._delay(self.width)
        t0 = time.perf_counter()
        try:
            rwork = dist.irecv(self._reply, src=self.host, group=self._group, tag=_TAG_REPLY)  # before the push
            assert rwork is not None  # this rank is in the group
            if d_push > 0:
                time.sleep(d_push)  # the push is on the wire
            dist.send(self._msg, dst=self.host, group=self._group, tag=_TAG_PUSH)
            rwork.wait()
        except Exception as exc:
            raise CommunicationError(
                f"rank {self.rank}: push/pull with the parameter server on rank {self.host} failed "
                f"(rank {self.host} died or hung?): {_first_line(exc)}") from exc
        left = d_total - (time.perf_counter() - t0)
        if left > 0:
            time.sleep(left)
        emulated = d_push + max(left, 0.0)
        self._b.copy_(self._reply)
        with torch.no_grad():
            row.copy_(self._reply)
        st = self.stats
        st.pushes += 1
        st.bytes_sent += (self.width + 1) * self._itemsize
        st.bytes_received += self.width * self._itemsize
        st.wait_s += time.perf_counter() - t0
        st.emulated_s += emulated
        self.heartbeat(n + 1, "compute")

    def close(self, timeout_s: float | None = None) -> None:
        """End of the run; every rank must call it once its last :meth:`push_pull` is done.

        A remote rank sends DONE (it returns once the server has received it). The host waits until every
        remote rank has sent DONE and joins the server thread. It raises :class:`CommunicationError`
        naming the ranks that never finished when no message reached the server for ``timeout_s``
        (default: the group's timeout) -- the server keeps running, so ``close`` may be called again --
        or when the server thread failed. Calling ``close`` again after it succeeded does nothing.
        """
        if self._closed:
            return
        limit = self.timeout_s if timeout_s is None else check_float("timeout_s", timeout_s, low=0.0, low_open=True)
        t0 = time.perf_counter()
        n = self.stats.pushes
        self.heartbeat(n, "comm")
        try:
            if self.rank != self.host:
                self._msg.zero_()
                self._msg[0] = _KIND_DONE
                try:
                    dist.send(self._msg, dst=self.host, group=self._group, tag=_TAG_PUSH)
                except Exception as exc:
                    raise CommunicationError(
                        f"rank {self.rank}: closing the parameter server on rank {self.host} failed "
                        f"(rank {self.host} died or hung?): {_first_line(exc)}") from exc
                self.stats.bytes_sent += (self.width + 1) * self._itemsize
                self._closed = True
                return
            with self._cv:
                start = time.monotonic()  # the idle clock starts at close() at the earliest
                while self._active() and self._server_error is None:
                    quiet_since = max(self._last_message, start)
                    left = quiet_since + limit - time.monotonic()
                    if left <= 0:
                        missing = self._active()
                        raise CommunicationError(
                            f"parameter server on rank {self.host}: ranks {missing} never finished (no message "
                            f"for {limit:g} s; finished: {sorted(self._finished)})")
                    self._cv.wait(timeout=min(left, 1.0))
                self._raise_server_error()
            if self._thread is not None:
                self._thread.join(timeout=limit)
                if self._thread.is_alive():
                    raise CommunicationError(
                        f"parameter server on rank {self.host}: the server thread did not stop within {limit:g} s")
                self._raise_server_error()
            self._closed = True
        finally:
            self.stats.close_s += time.perf_counter() - t0
            self.heartbeat(n, "compute")

    # -- results ---------------------------------------------------------------------------------------
    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def arrival_log(self) -> list[tuple[int, int]]:
        """(rank, that rank's push index) in the order the pushes were applied to ``z`` (host only; a copy)."""
        self._require_host("arrival_log")
        with self._cv:
            return list(self._log)

    def server_value(self) -> Tensor:
        """A copy of ``z`` (host only). Final once :meth:`close` returned; a consistent snapshot before."""
        self._require_host("server_value")
        assert self._z is not None
        with self._cv:
            return self._z.clone()

    @property
    def pulled(self) -> Tensor:
        """This rank's ``b_r``: the copy of ``z`` it pulled last (a view; do not modify)."""
        return self._b

    def load_state(self, z: Tensor | None, pulled: Tensor) -> None:
        """Restore ``z`` (host: required, others: ignored) and ``b_r`` from a checkpoint.

        Call it at a point where no push is in flight (e.g. right after construction, before training).
        """
        if pulled.numel() != self.width or (self.rank == self.host and (z is None or z.numel() != self.width)):
            raise ConfigError.invalid("checkpoint.parameter_server", tuple(pulled.shape), f"width must be {self.width}")
        with self._cv:
            self._b.copy_(pulled.reshape(-1))
            if self.rank == self.host:
                assert self._z is not None and z is not None
                self._z.copy_(z.reshape(-1))

    def broadcast_server_value(self) -> Tensor:
        """Collective, after :meth:`close` on every rank: every rank gets a copy of the final ``z``."""
        if not self._closed:
            raise ConfigError.invalid("broadcast_server_value", "before close()", "call close() on every rank first")
        out = self._z.clone() if self._z is not None else torch.empty(self.width, dtype=self.dtype)
        try:
            dist.broadcast(out, src=self.host, group=self._group)
        except Exception as exc:
            raise CommunicationError(
                f"rank {self.rank}: broadcast of the server model from rank {self.host} failed: {_first_line(exc)}"
            ) from exc
        return out

    def summary(self) -> dict[str, Any]:
        """Plain-Python accounting of this rank (and of the server on the host), e.g. for a result file."""
        out: dict[str, Any] = {"rank": self.rank, "host": self.host, "width": self.width,
                               "dtype": str(self.dtype).replace("torch.", ""), **vars(self.stats)}
        if self.server_stats is not None:
            with self._cv:
                s = self.server_stats
                out["server"] = {**vars(s), "pushes_by_rank": dict(s.pushes_by_rank), "arrival_log": list(self._log)}
        return out

    def _require_host(self, what: str) -> None:
        if self.rank != self.host:
            raise ConfigError.invalid(what, f"rank {self.rank}", f"is only available on the host rank {self.host}")
