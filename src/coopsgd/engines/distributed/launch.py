"""Local launcher: N processes on this machine, one per rank, with a monitor that never lets a run hang.

:func:`launch` starts ``nprocs`` fresh Python processes (``python -m coopsgd.engines.distributed.launch --child DIR``;
no fork, no re-import of the caller's ``__main__``), each of which

1. joins a ``torch.distributed`` process group over TCP on ``127.0.0.1`` (loopback only) at a free port,
   with the configured ``timeout_s`` for every collective (``gloo`` on CPU, ``nccl`` for CUDA runs);
2. calls ``fn(rank, world_size, *args)`` (``fn`` must be importable, e.g. a module-level function; the
   child gets the parent's ``sys.path``);
3. writes its return value, or its error (type, message, traceback, and whether it was a communication
   failure), into the job directory, and exits -- after a return, only once every rank has returned (or one
   failed): a rank that tore its group down earlier could break a peer still connecting.

The parent monitors the children and a heartbeat table (a small memory-mapped file: per rank the time of
its last beat, its step and its phase -- computing or communicating). It stops the run, terminates every
surviving child and raises :class:`RankFailure` naming the responsible rank when a rank exits with an error
it raised itself (its message and traceback are included), exits without reporting (``os._exit``, a crash),
is killed by a signal, stops beating for ``timeout_s`` while it is *not* waiting in a communication (a hang
in its own code), or when every rank is stuck for ``timeout_s + 5`` s.

No rank outlives the launcher, however the launcher ends (see :func:`launch`): while ranks run, SIGTERM
and SIGINT make it stop them, remove its temporary directory and raise :class:`~coopsgd.errors.Interrupted`;
if it is killed outright (SIGKILL), every rank dies at once (``PR_SET_PDEATHSIG`` on Linux, a watchdog
thread everywhere) and a small janitor process removes the temporary directory.

Ranks that fail only because a peer went away (a communicator's ``CommunicationError``, e.g. gloo's
"Connection closed by peer" or a collective timeout) are not blamed when a better culprit is known. The
error is raised within ``timeout_s`` + about one second of the failure. The ranks print nothing about a
failure: the :class:`RankFailure` (one line, naming the rank that caused it) is its only report.

Under ``torchrun`` the launcher is not used: torchrun's agent watches the ranks, and the engine reports
every exception with its rank before re-raising; :func:`init_torchrun_group` joins the process group there
(one key space per restart attempt, so ``torchrun --max-restarts`` can restart the ranks).
"""

from __future__ import annotations

import argparse
import datetime
import inspect
import json
import os
import pickle
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from coopsgd.errors import ConfigError, CoopSGDError, Interrupted, check_float, check_int

__all__ = ["launch", "RankFailure", "Heartbeat", "no_heartbeat", "free_port", "PHASES", "init_torchrun_group",
           "torchrun_store_prefix"]

#: Heartbeat phases.
PHASES = {"start": 0.0, "compute": 1.0, "comm": 2.0, "done": 3.0}
_PHASE_NAMES = {v: k for k, v in PHASES.items()}
_DOING = {"start": "starting up", "compute": "computing", "comm": "communicating", "done": "finishing"}
_STARTUP_GRACE_S = 120.0
#: Environment of a rank: the pid of the launcher that started it (the rank dies when that process is gone).
PARENT_ENV = "COOPSGD_LAUNCH_PARENT"
#: Environment of a rank: ``"1"`` when the launcher handles SIGINT for it (the rank then ignores Ctrl-C).
_PARENT_HANDLES_SIGINT_ENV = "COOPSGD_LAUNCH_PARENT_HANDLES_SIGINT"
#: How often a rank's watchdog thread checks that its launcher is still alive (seconds).
WATCHDOG_S = 0.5
#: Grace period between SIGTERM and SIGKILL when the launcher stops its ranks (seconds).
TERMINATE_GRACE_S = 2.0


class RankFailure(CoopSGDError, RuntimeError):
    """A rank of a distributed run died, raised, was killed or hung. ``rank`` names it; ``kind`` says how."""

    def __init__(self, message: str, *, rank: int, kind: str, details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.rank = rank
        self.kind = kind
        self.details = details or {}


class Heartbeat:
    """One row per rank in a memory-mapped float64 file: (time.time() of the last beat, step, phase)."""

    def __init__(self, path: str | Path, world: int, rank: int | None = None, *, create: bool = False) -> None:
        self.table = np.memmap(str(path), dtype=np.float64, mode="w+" if create else "r+", shape=(world, 3))
        if create:
            self.table[:] = 0.0
            self.table[:, 0] = time.time()
            self.table.flush()
        self.rank = rank

    def __call__(self, step: int, phase: str) -> None:
        if self.rank is None:
            return
        row = self.table[self.rank]
        row[1] = float(step)
        row[2] = PHASES[phase]
        row[0] = time.time()


def no_heartbeat(step: int, phase: str) -> None:
    """The heartbeat of a process nobody watches (the default of every component that beats)."""


def _accepts_heartbeat(fn: Callable[..., Any]) -> bool:
    """Whether ``fn`` takes a ``heartbeat`` keyword argument (then :func:`launch` passes the rank's own)."""
    try:
        return "heartbeat" in inspect.signature(fn).parameters
    except (TypeError, ValueError):  # a callable without a signature: none passed
        return False


def _loopback_interface() -> str:
    """Name of the loopback interface (``lo`` on Linux, ``lo0`` on macOS) for gloo to bind to."""
    try:  # socket is imported at module level
        return next((name for _, name in socket.if_nameindex() if name in ("lo", "lo0")), "lo")
    except (OSError, AttributeError):
        return "lo"


def _is_loopback(host: str | None) -> bool:
    """Whether every address ``host`` resolves to is a loopback address (``False`` when it does not resolve)."""
    import ipaddress

    if not host:
        return False
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except (OSError, UnicodeError):
        return False
    addrs = {str(info[4][0]) for info in infos}
    return bool(addrs) and all(ipaddress.ip_address(a.split("%", 1)[0]).is_loopback for a in addrs)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago on ``host``."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _comm_error_text(exc: BaseException) -> bool:
    from coopsgd.engines.distributed.communicator import CommunicationError

    text = str(exc)
    return isinstance(exc, CommunicationError) or any(
        s in text for s in ("Connection closed by peer", "Timed out waiting", "Connection reset", "Broken pipe"))


# ---------------------------------------------------------------------------------------------------------
# child side
# ---------------------------------------------------------------------------------------------------------


def _set_parent_death_signal() -> bool:
    """Linux: ask the kernel to SIGKILL this process when its parent dies (``prctl(PR_SET_PDEATHSIG)``)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        return int(libc.prctl(pr_set_pdeathsig, ctypes.c_ulong(int(signal.SIGKILL)), ctypes.c_ulong(0),
                              ctypes.c_ulong(0), ctypes.c_ulong(0))) == 0
    except (OSError, AttributeError, TypeError):
        return False


def _watch_parent(parent: int) -> None:
    while True:
        time.sleep(WATCHDOG_S)
        if os.getppid() != parent:
            os._exit(1)


def _die_with_parent(parent: int | None) -> None:
    """Make this rank die when the launcher that started it dies, however it died.

    On Linux the kernel SIGKILLs us the moment the parent exits (``PR_SET_PDEATHSIG``); everywhere a daemon
    thread polls the parent pid every :data:`WATCHDOG_S` seconds and calls ``os._exit`` once we were reparented.
    The parent may die before the ``prctl`` takes effect: checking the parent pid *after* setting it closes
    that race.
    """
    if parent is None:
        return
    _set_parent_death_signal()
    if os.getppid() != parent:
        os._exit(1)
    threading.Thread(target=_watch_parent, args=(parent,), name="coopsgd-parent-watchdog", daemon=True).start()


def _wait_for_peers(job_dir: Path, world: int, poll_s: float = 0.01) -> None:
    """Return once every rank has written its result or one has reported an error: only then may a rank tear
    its group down. ``init_process_group`` can return here while a peer is still in gloo's ``connectFullMesh``,
    and a rank whose function returns at once closed its sockets under it ("Connection closed by peer")."""
    while True:
        names = set(os.listdir(job_dir))
        if all(f"result_{r}.pkl" in names for r in range(world)) or any(
                n.startswith("error_") and n.endswith(".json") for n in names):
            return
        time.sleep(poll_s)


def _child(job_dir: Path) -> int:
    parent = os.environ.get(PARENT_ENV)
    _die_with_parent(int(parent) if parent else None)
    if os.environ.get(_PARENT_HANDLES_SIGINT_ENV) == "1":
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the launcher, which stops us
    rank = int(os.environ["RANK"])
    world = int(os.environ["WORLD_SIZE"])
    hb = Heartbeat(job_dir / "heartbeat.bin", world, rank)
    hb(0, "start")
    try:
        import torch
        import torch.distributed as dist

        with open(job_dir / "job.pkl", "rb") as f:  # written by our own parent process (trusted)
            job = pickle.load(f)
        threads = job.get("threads")
        if threads:
            torch.set_num_threads(int(threads))
        dist.init_process_group(
            backend=process_group_backend(job["backend"]),
            # a file store in the launcher's private directory: unlike a TCPStore (whose server listens on
            # every interface), nothing but the loopback gloo pairs is opened for a local run
            init_method=f"file://{job_dir / 'store'}",
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(seconds=float(job["timeout_s"])),
        )
        try:
            fn = job["fn"]
            extra = {"heartbeat": hb} if _accepts_heartbeat(fn) else {}  # injected: no process-wide state
            result = fn(rank, world, *job["args"], **extra)
        finally:
            hb(-1, "done")
        with open(job_dir / f"result_{rank}.pkl.tmp", "wb") as f:
            pickle.dump(result, f)
        os.replace(job_dir / f"result_{rank}.pkl.tmp", job_dir / f"result_{rank}.pkl")
        _wait_for_peers(job_dir, world)
        try:
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001 -- peers may already be gone; the result is written
            pass
        # skip interpreter teardown: gloo's background threads can abort it ("terminate called without
        # an active exception") after the work is done
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
        return 0  # not reached
    except BaseException as exc:  # report every failure with the rank, then exit non-zero
        info = {
            "rank": rank,
            "kind": "communication" if _comm_error_text(exc) else "exception",
            "type": type(exc).__name__,
            "config_error": isinstance(exc, ConfigError),  # bad input found by a rank (exit status 2)
            "message": str(exc),
            "traceback": traceback.format_exc(),
        }
        tmp = job_dir / f"error_{rank}.json.tmp"
        tmp.write_text(json.dumps(info))
        os.replace(tmp, job_dir / f"error_{rank}.json")
        # nothing printed here: the launcher reports the failure once, naming the rank that caused it (a
        # peer's "connection closed" that follows it would only repeat the story on another line)
        return 1


# ---------------------------------------------------------------------------------------------------------
# parent side
# ---------------------------------------------------------------------------------------------------------


def _terminate(procs: Sequence[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            try:
                p.terminate()
                if hasattr(signal, "SIGCONT"):  # a stopped rank (SIGSTOP) acts on SIGTERM only once continued
                    os.kill(p.pid, signal.SIGCONT)
            except OSError:
                pass
    deadline = time.time() + TERMINATE_GRACE_S
    for p in procs:
        try:
            p.wait(timeout=max(0.05, deadline - time.time()))
        except subprocess.TimeoutExpired:
            try:
                p.kill()
                p.wait(timeout=2.0)
            except OSError:
                pass


def _one_line(text: str) -> str:
    """``text`` on one line (gloo's and other libraries' messages may span several)."""
    return " ".join(text.split())


def _read_error(job_dir: Path, rank: int) -> dict[str, Any] | None:
    try:
        data = json.loads((job_dir / f"error_{rank}.json").read_text())
    except (OSError, ValueError):  # none (written atomically: never torn)
        return None
    return data if isinstance(data, dict) else None


def _blame(
    job_dir: Path, procs: Sequence[subprocess.Popen], hb: Heartbeat, timeout_s: float, now: float
) -> RankFailure | None:
    """The failure to report, or ``None`` while every rank is healthy."""
    codes = [0 if p.poll() is not None and (job_dir / f"result_{r}.pkl").is_file() else p.poll()
             for r, p in enumerate(procs)]
    errors = {r: _read_error(job_dir, r) for r in range(len(procs))}
    table = np.array(hb.table)

    def fmt_err(r: int, e: dict[str, Any]) -> RankFailure:
        tb = e.get("traceback", "").strip().splitlines()
        where = tb[-3].strip() if len(tb) >= 3 else ""
        msg = f"rank {r} failed: {e.get('type')}: {_one_line(str(e.get('message')))}"
        if where:
            msg += f" (at {where})"
        return RankFailure(msg, rank=r, kind=e.get("kind", "exception"), details=e)

    # 1. killed by a signal or exited without reporting
    for r, c in enumerate(codes):
        if c is not None and c != 0 and errors[r] is None:
            if c < 0:
                try:
                    name = signal.Signals(-c).name
                except ValueError:
                    name = f"signal {-c}"
                why = f"was killed by {name}"
            else:
                why = f"exited with code {c} without reporting an error"
            step = int(table[r, 1])
            return RankFailure(f"rank {r} {why} (last heartbeat at step {step}); the other ranks were stopped",
                               rank=r, kind="died")
    # 2. a rank's own exception
    for r, e in errors.items():
        if e is not None and e.get("kind") != "communication":
            return fmt_err(r, e)
    # 3. hangs: no heartbeat for timeout_s while not communicating (or nobody progressing at all)
    alive = [r for r, c in enumerate(codes) if c is None]
    started = table[:, 2] >= PHASES["compute"]
    stale = [r for r in alive if now - table[r, 0] > timeout_s and (started[r] or now - table[r, 0] > _STARTUP_GRACE_S)]
    busy = [r for r in stale if _PHASE_NAMES.get(float(table[r, 2])) in ("compute", "start")]
    if busy:
        r = min(busy, key=lambda i: (table[i, 1], table[i, 0]))
        return RankFailure(
            f"rank {r} stopped responding: no heartbeat for {now - table[r, 0]:.1f} s (timeout {timeout_s:g} s) "
            f"while {_DOING.get(_PHASE_NAMES.get(float(table[r, 2]), ''), 'running')} at step {int(table[r, 1])}; "
            "the other ranks were stopped",
            rank=r, kind="hang")
    # 4. only communication failures: a peer of theirs is the culprit -- prefer a stale/slowest rank
    comm = [r for r, e in errors.items() if e is not None]
    if comm:
        suspects = [r for r in alive if r not in comm]
        if suspects and any(now - table[r, 0] > timeout_s for r in suspects):
            r = min(suspects, key=lambda i: table[i, 0])
            return RankFailure(
                f"rank {r} stopped responding (no heartbeat for {now - table[r, 0]:.1f} s, step {int(table[r, 1])}); "
                f"its peers timed out: {_one_line(str(errors[comm[0]].get('message', '')))[:200]}",  # type: ignore[union-attr]
                rank=r, kind="hang")
        if not suspects:
            return fmt_err(comm[0], errors[comm[0]])  # type: ignore[arg-type]
        return None  # give the others a moment: a real culprit usually shows up
    if alive and len(stale) == len(alive) and all(now - table[r, 0] > timeout_s + 5.0 for r in alive):
        r = min(alive, key=lambda i: (table[i, 1], table[i, 0]))
        return RankFailure(f"no rank made progress for {timeout_s + 5:g} s; rank {r} is the furthest behind "
                           f"(step {int(table[r, 1])})", rank=r, kind="hang")
    return None


# The janitor: ``python -I -S -c _JANITOR JOB_DIR``, started by the launcher in a session of its own with the
# read end of a pipe as stdin. The launcher writes each rank's pid to the pipe, and ``done`` once it has
# removed the directory itself. End of file without ``done`` means the launcher died (SIGKILL, a crash):
# the janitor waits up to 10 s for the ranks to go (they die with their parent) and removes the directory.
_JANITOR = r"""# coopsgd launch janitor: removes the launcher's directory if the launcher dies without doing it
import os, shutil, signal, sys, time
for s in (signal.SIGINT, signal.SIGHUP):
    signal.signal(s, signal.SIG_IGN)
data = b""
while True:
    try:
        chunk = os.read(0, 4096)
    except InterruptedError:
        continue
    except OSError:
        break
    if not chunk:
        break
    data += chunk
words = data.decode("ascii", "replace").split()
if "done" not in words:
    def alive(pid):
        try:
            os.kill(pid, 0)
        except (ProcessLookupError, PermissionError):
            return False
        except OSError:
            return True
        try:
            with open("/proc/%d/stat" % pid) as f:
                return f.read().rsplit(")", 1)[1].split()[0] != "Z"
        except (OSError, IndexError):
            return True
    pids = [int(w) for w in words if w.isdigit()]
    deadline = time.time() + 10.0
    while time.time() < deadline:
        pids = [p for p in pids if alive(p)]
        if not pids:
            break
        time.sleep(0.05)
    shutil.rmtree(sys.argv[1], ignore_errors=True)
"""


class _Janitor:
    """Removes the launcher's temporary directory if the launcher dies without doing it (see ``_JANITOR``)."""

    def __init__(self, job_dir: Path) -> None:
        self.proc: subprocess.Popen | None = None
        self.fd: int | None = None
        try:
            r, w = os.pipe()
        except OSError:
            return
        try:
            self.proc = subprocess.Popen([sys.executable, "-I", "-S", "-c", _JANITOR, str(job_dir)], stdin=r,
                                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                         start_new_session=True)
            self.fd = w
        except OSError:
            os.close(w)
        finally:
            os.close(r)

    def watch(self, pid: int) -> None:
        if self.fd is not None:
            try:
                os.write(self.fd, f"{pid}\n".encode())
            except OSError:
                pass

    def dismiss(self) -> None:
        """The directory is gone: tell the janitor to exit without doing anything."""
        if self.fd is not None:
            try:
                os.write(self.fd, b"done\n")
            except OSError:
                pass
            os.close(self.fd)
            self.fd = None
        if self.proc is not None:
            try:
                self.proc.wait(timeout=5.0)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class _SignalGuard:
    """While ranks run: SIGTERM and SIGINT are noted (main thread only; signal handlers cannot be set
    elsewhere) and the launcher stops its ranks, cleans up and raises :class:`~coopsgd.errors.Interrupted`."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.signum: int | None = None
        self.saved: dict[int, Any] = {}

    def __enter__(self) -> _SignalGuard:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                try:
                    self.saved[sig] = signal.signal(sig, self._note)
                except (ValueError, OSError):
                    pass
        return self

    def _note(self, signum: int, frame: Any) -> None:
        if self.signum is None:
            self.signum = signum

    @property
    def handles_sigint(self) -> bool:
        return signal.SIGINT in self.saved

    def interrupted(self, nprocs: int) -> Interrupted:
        assert self.signum is not None
        exc = Interrupted("", signum=self.signum)
        exc.args = (f"interrupted by {exc.signal_name}: the {nprocs} rank(s) were stopped",)
        return exc

    def check(self, nprocs: int) -> None:
        if self.signum is not None:
            raise self.interrupted(nprocs)

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self.saved.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        self.saved.clear()


def launch(
    fn: Callable[..., Any],
    nprocs: int,
    args: Sequence[Any] = (),
    *,
    timeout_s: float = 60.0,
    backend: str | None = None,
    threads: int | None = None,
    env: dict[str, str] | None = None,
    poll_s: float = 0.05,
) -> list[Any]:
    """Run ``fn(rank, nprocs, *args)`` in ``nprocs`` local processes; return the per-rank results.

    Args:
        fn: an importable callable (module-level function); ``args`` must be picklable. When ``fn`` takes a
            ``heartbeat`` keyword argument it receives the rank's :class:`Heartbeat` there (pass it on to
            the engine and the parameter server: the hang detector reads it); nothing else sees it.
        nprocs: number of processes (ranks).
        timeout_s: communication timeout passed to ``init_process_group`` and the hang detector.
        backend: ``"gloo"`` (default) or ``"nccl"``.
        threads: torch intra-op threads per process (default: cores // nprocs, at least 1).
        env: extra environment variables for the children (e.g. a failure-injection hook).

    No rank outlives this call. Called from the main thread, it handles SIGTERM and SIGINT while the ranks
    run: it stops them (SIGTERM, then SIGKILL after :data:`TERMINATE_GRACE_S` s), removes its temporary
    directory and raises :class:`~coopsgd.errors.Interrupted` (``exit_status`` 143 or 130); a signal after
    every rank returned is delivered again, to the previous handlers, once this call is done. Killed outright,
    its ranks die with it (``PR_SET_PDEATHSIG``, else a watchdog thread within :data:`WATCHDOG_S` s) and a
    janitor process (``python -I -S``, a session of its own) removes the temporary directory.

    Raises:
        RankFailure: naming the rank that died, raised, was killed or hung; the others are terminated.
        Interrupted: SIGTERM or SIGINT arrived while the ranks ran; they were stopped.
    """
    nprocs = check_int("nprocs", nprocs, minimum=1)
    timeout_s = check_float("timeout_s", timeout_s, low=0.0, low_open=True)
    backend = backend or "gloo"
    if backend not in ("gloo", "nccl"):
        raise ConfigError.invalid("backend", backend, "choose gloo or nccl")
    if threads is None:
        threads = max(1, (os.cpu_count() or 1) // nprocs)
    with _SignalGuard() as guard:
        try:
            for attempt in range(3):
                try:
                    results = _launch_once(_Job(fn, nprocs, args, timeout_s, backend, threads, env, poll_s), guard)
                    break
                except RankFailure as exc:  # the free port was taken between choosing and binding it: retry
                    text = (str(exc) + str(exc.details.get("message", ""))).lower()
                    if attempt == 2 or not ("address already in use" in text or "eaddrinuse" in text):
                        raise
        except Interrupted:
            raise
        except BaseException as exc:
            if guard.signum is not None:  # the signal came first; the failure it caused is not the story
                raise guard.interrupted(nprocs) from exc
            raise
    if guard.signum is not None:  # the run had finished: let the caller's own handlers see the signal
        signal.raise_signal(guard.signum)
    return results


class _Job(NamedTuple):
    """One :func:`launch` call's arguments, checked."""

    fn: Callable[..., Any]
    nprocs: int
    args: Sequence[Any]
    timeout_s: float
    backend: str
    threads: int
    env: dict[str, str] | None
    poll_s: float


def _launch_once(job: _Job, guard: _SignalGuard) -> list[Any]:
    guard.check(job.nprocs)
    job_dir = Path(tempfile.mkdtemp(prefix="coopsgd-launch-"))
    janitor = _Janitor(job_dir)
    try:
        return _run_ranks(job_dir, janitor, job, guard)
    finally:
        shutil.rmtree(job_dir, ignore_errors=True)
        janitor.dismiss()


def _child_env(job: _Job, port: int, guard: _SignalGuard) -> dict[str, str]:
    """The ranks' common environment (each adds its RANK and LOCAL_RANK)."""
    child_env = dict(os.environ)
    child_env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    child_env["WORLD_SIZE"] = str(job.nprocs)
    child_env["MASTER_ADDR"] = "127.0.0.1"
    child_env["MASTER_PORT"] = str(port)
    child_env.setdefault("GLOO_SOCKET_IFNAME", _loopback_interface())
    child_env.setdefault("OMP_NUM_THREADS", str(job.threads))
    if job.env:
        child_env.update(job.env)
    child_env[PARENT_ENV] = str(os.getpid())
    child_env[_PARENT_HANDLES_SIGINT_ENV] = "1" if guard.handles_sigint else "0"
    return child_env


def _run_ranks(job_dir: Path, janitor: _Janitor, job: _Job, guard: _SignalGuard) -> list[Any]:
    port = free_port()
    spec = {"fn": job.fn, "args": tuple(job.args), "backend": job.backend, "timeout_s": job.timeout_s,
            "port": port, "threads": job.threads}
    try:
        with open(job_dir / "job.pkl", "wb") as f:
            pickle.dump(spec, f)
    except (pickle.PicklingError, AttributeError, TypeError) as exc:
        raise ConfigError.invalid("fn", job.fn, f"must be picklable (a module-level function): {exc}") from None
    hb = Heartbeat(job_dir / "heartbeat.bin", job.nprocs, create=True)
    child_env = _child_env(job, port, guard)
    procs: list[subprocess.Popen] = []
    try:
        for r in range(job.nprocs):
            guard.check(job.nprocs)
            e = dict(child_env, RANK=str(r), LOCAL_RANK=str(r))
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "coopsgd.engines.distributed.launch", "--child", str(job_dir)], env=e))
            janitor.watch(procs[-1].pid)
        failure = _wait_for_ranks(job_dir, procs, hb, job, guard)
        if failure is not None:
            failure.details.setdefault("detected_after_s", time.time() - float(hb.table[failure.rank, 0]))
            _terminate(procs)
            raise failure
        results = []
        for r in range(job.nprocs):
            with open(job_dir / f"result_{r}.pkl", "rb") as f:  # written by our own child (trusted)
                results.append(pickle.load(f))
        return results
    finally:
        _terminate(procs)


def _wait_for_ranks(job_dir: Path, procs: list[subprocess.Popen], hb: Heartbeat, job: _Job,
                    guard: _SignalGuard) -> RankFailure | None:
    """Poll the ranks until every one has written its result (``None``) or one failed (the failure)."""
    first_bad: float | None = None
    while True:
        guard.check(job.nprocs)
        codes = [p.poll() for p in procs]
        # a rank that wrote its result has finished, whatever its teardown did
        codes = [0 if c is not None and (job_dir / f"result_{r}.pkl").is_file() else c
                 for r, c in enumerate(codes)]
        if all(c == 0 for c in codes):
            return None
        now = time.time()
        bad = any(c not in (None, 0) for c in codes)
        if bad and first_bad is None:
            first_bad = now
        verdict = _blame(job_dir, procs, hb, job.timeout_s, now)
        if verdict is not None:
            # a comm error alone: wait briefly for the real culprit to show up
            if verdict.kind == "communication" and first_bad is not None and now - first_bad < 1.0:
                time.sleep(job.poll_s)
                continue
            return verdict
        if first_bad is not None and now - first_bad > job.timeout_s + 2.0:
            bad_rank = next(r for r, c in enumerate(codes) if c not in (None, 0))
            return RankFailure(f"rank {bad_rank} exited with code {codes[bad_rank]}", rank=bad_rank, kind="died")
        time.sleep(job.poll_s)


# ---------------------------------------------------------------------------------------------------------
# torchrun side
# ---------------------------------------------------------------------------------------------------------


def torchrun_store_prefix() -> str:
    """The key prefix this attempt's process group uses in the rendezvous store (see :func:`init_torchrun_group`).

    Under torchrun's agent store (``TORCHELASTIC_USE_AGENT_STORE=True``) it names the run and the restart
    attempt, ``coopsgd/<TORCHELASTIC_RUN_ID>/attempt<TORCHELASTIC_RESTART_COUNT>/``; otherwise the store is
    new for every start and the prefix is just ``coopsgd/``.
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == str(True):
        run_id = os.environ.get("TORCHELASTIC_RUN_ID", "none")
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        return f"coopsgd/{run_id}/attempt{attempt}/"
    return "coopsgd/"


def process_group_backend(backend: str) -> str:
    """The ``init_process_group`` backend string: with ``"nccl"`` (CUDA tensors) the engines still exchange
    a few small CPU tensors and Python objects (loss estimates, health flags, byte counts), which NCCL refuses,
    so CPU tensors go through gloo: ``"cpu:gloo,cuda:nccl"``. Untested here: no GPU was available."""
    return "cpu:gloo,cuda:nccl" if backend == "nccl" else backend


def init_torchrun_group(backend: str, timeout_s: float) -> tuple[int, int]:
    """Join the default process group of a rank started by ``torchrun``; return ``(rank, world_size)``.

    Replaces ``dist.init_process_group(backend, init_method="env://")``, which breaks restarts under
    ``torchrun --max-restarts``: torchrun's agent hosts the TCPStore the workers rendezvous through
    (``MASTER_ADDR:MASTER_PORT``, exported with ``TORCHELASTIC_USE_AGENT_STORE=True``) and keeps the same
    store server for every restart attempt, while ``init_process_group`` always writes its keys under the
    same ``default_pg/`` prefix. A restarted rank then finds the previous attempt's keys -- gloo reads a
    dead peer's address (``connectFullMesh ... Connection refused``) and NCCL a stale unique id -- and the
    restart hangs or fails, depending on which rank gets there first. Here the store from the ``env://``
    rendezvous is wrapped in a :class:`torch.distributed.PrefixStore` whose prefix names the attempt
    (:func:`torchrun_store_prefix`), so every attempt starts with an empty key space.

    When every rank runs on this machine and ``GLOO_SOCKET_IFNAME`` is not set, gloo is bound to the loopback
    interface (as for :func:`launch`), so its pairs neither depend on what the host name resolves to nor
    listen on other interfaces. Every rank is here when ``LOCAL_WORLD_SIZE == WORLD_SIZE`` (e.g. ``torchrun
    --standalone``) or when the rendezvous store's address (``MASTER_ADDR``) is a loopback address: then
    no other machine can have joined (several agents on loopback, ``--rdzv-endpoint 127.0.0.1:PORT``).
    Jobs across machines keep gloo's default (the host name's address).

    Limitation: ``TORCHELASTIC_RESTART_COUNT`` is counted by each node's agent. On one node it is the same
    for every rank; in a multi-node job the agents' counts can differ after a failure (PyTorch issue
    #135712), so multi-node jobs with ``--max-restarts`` should run torchrun with
    ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1`` (a fresh store, hosted by rank 0, for every attempt; no
    attempt prefix is then used).

    Args:
        backend: ``"gloo"`` or ``"nccl"``.
        timeout_s: timeout of the store and of every collective, in seconds.
    """
    import torch.distributed as dist

    timeout = datetime.timedelta(seconds=float(timeout_s))
    world_env = int(os.environ["WORLD_SIZE"])
    if backend == "gloo" and "GLOO_SOCKET_IFNAME" not in os.environ and (
            int(os.environ.get("LOCAL_WORLD_SIZE", "-1")) == world_env or _is_loopback(os.environ.get("MASTER_ADDR"))):
        os.environ["GLOO_SOCKET_IFNAME"] = _loopback_interface()
    # RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT and TORCHELASTIC_USE_AGENT_STORE as set by torchrun
    store, rank, world = next(dist.rendezvous("env://", timeout=timeout))
    store.set_timeout(timeout)
    dist.init_process_group(backend=process_group_backend(backend),
                            store=dist.PrefixStore(torchrun_store_prefix(), store),
                            rank=rank, world_size=world, timeout=timeout)
    return rank, world


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m coopsgd.engines.distributed.launch")
    parser.add_argument("--child", required=True, help="job directory written by launch() (internal)")
    ns = parser.parse_args(argv)
    return _child(Path(ns.child))


if __name__ == "__main__":
    # run inside the importable module (not __main__) so that the engine sees this process's heartbeat
    from coopsgd.engines.distributed.launch import main as _main

    sys.exit(_main())


def listening_addresses(rank: int = 0, world: int = 1) -> list[str]:
    """Local addresses (``"IP:port"``) of the TCP sockets this process listens on (Linux ``/proc``).

    Used to check that a local run opens nothing but loopback listeners; the signature lets
    :func:`launch` run it inside every rank after the process group is up. Empty where ``/proc`` is absent.
    """
    import ipaddress

    inodes = set()
    fd_dir = Path("/proc/self/fd")
    if not fd_dir.is_dir():
        return []
    for fd in fd_dir.iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    out = []
    for table, width in (("/proc/net/tcp", 4), ("/proc/net/tcp6", 16)):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            cols = line.split()
            if len(cols) < 10 or cols[3] != "0A" or cols[9] not in inodes:  # 0A = LISTEN
                continue
            hex_ip, hex_port = cols[1].split(":")
            raw = bytes.fromhex(hex_ip)
            # /proc prints the address as 32-bit little-endian words
            ip_bytes = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
            ip = ipaddress.ip_address(ip_bytes[:width])
            out.append(f"{ip}:{int(hex_port, 16)}")
    return out
