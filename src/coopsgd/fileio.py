"""Crash-safe file writes and careful reads shared by every layer (run directories, the CLI's result files,
the executor cache, config files).

Kept free of torch and of the other coopsgd packages (only :mod:`coopsgd.errors`) so that ``engines`` and
``train`` can both use it.

* Writes: :func:`atomic_write_bytes` (temporary file, fsync, rename: the old file survives any crash or
  failed write) and :func:`append_line` (one line, and a failed append leaves the file as it was). A failed
  write raises its ``OSError`` naming the path (:func:`~coopsgd.errors.write_failure`); :func:`check_output_path` refuses an
  unusable destination (below a regular file, not writable) before anything is written.
* Reads: :func:`read_text` and :func:`read_json` turn every way a file can be damaged (missing, a
  directory, empty, not UTF-8, not JSON, the wrong type) into a one-line
  :class:`~coopsgd.errors.ConfigError` naming the file and, where there is one, the position.
* Permissions: every file coopsgd creates follows the process's umask (mode ``0o666 & ~umask``), the atomic
  writes' temporary files included (``mkstemp`` alone would make them 0600).
* One writer per directory: :func:`lock_directory` holds an exclusive advisory lock (``fcntl.flock`` on
  :data:`LOCK_FILE` inside the directory, which holds the holder's PID) for as long as a run writes there;
  the kernel releases it when the process ends, however it ends. :func:`check_unlocked` refuses a directory
  another process holds, naming its PID, without writing anything.
"""

from __future__ import annotations

import json
import os
import stat
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from coopsgd.errors import ConfigError, write_failure

try:
    import fcntl
except ImportError:  # Windows: no advisory locks there, so one writer per directory is not enforced
    fcntl = None  # type: ignore[assignment]

__all__ = ["atomic_write_bytes", "append_line", "check_output_path", "read_text", "read_json", "file_mode",
           "LOCK_FILE", "DirLock", "lock_directory", "locked_directory", "check_unlocked", "held_directory",
           "discard_unused", "first_missing", "not_a_file"]

#: The lock file inside a directory that a coopsgd process writes (a run, a comparison, a reproduction).
LOCK_FILE = ".coopsgd.lock"


def _umask() -> int:
    """The process's umask, read without changing it where ``/proc`` tells it (Linux), else set and reset."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode a new regular file gets from ``open()``: ``0o666`` less the umask."""
    return 0o666 & ~_umask()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def check_output_path(path: str | Path, field: str = "out", *, directory: bool = False) -> Path:
    """Refuse a destination that cannot be written, before anything is: an existing directory where a
    file goes (or a file where a directory goes, with ``directory``), an ancestor that is a regular file,
    or a nearest existing ancestor without write permission. A :class:`ConfigError` naming ``field``."""
    p = Path(path)
    if str(path) == "":
        raise ConfigError.invalid(field, str(path), "must be a non-empty path")
    if p.exists():
        if directory and not p.is_dir():
            raise ConfigError.invalid(field, str(path), "exists and is not a directory")
        if not directory and p.is_dir():
            raise ConfigError.invalid(field, str(path), "is a directory; give a file name")
    parent = p if directory else p.parent
    probe = parent
    while not probe.exists():
        if probe.is_symlink():  # a dangling link: mkdir would fail on it
            raise ConfigError.invalid(field, str(path), f"{str(probe)!r} is a broken symbolic link")
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise ConfigError.invalid(field, str(path), f"{str(probe)!r} is a regular file, not a directory")
    if probe.exists() and not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError.invalid(field, str(path), f"the directory {str(probe)!r} is not writable")
    return p


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` via a temporary file + fsync + rename (the old file survives any crash).

    A failed write (a full disk, no permission, a parent that is a regular file) removes the temporary file
    and raises its ``OSError`` naming ``path`` (:func:`~coopsgd.errors.write_failure`); the previous file, if any,
    is left unchanged."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        write_failure(exc, path, "nothing was written")
        raise
    try:
        os.fchmod(fd, file_mode())  # mkstemp creates 0600: follow the umask like every other file
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError):
            kept = "the previous file is unchanged" if path.exists() else "nothing was written"
            write_failure(exc, path, kept)
            raise
        raise
    _fsync_dir(path.parent)
    return path


def append_line(fd: int, path: str | Path, line: str) -> None:
    """Append ``line`` to the file open (``O_APPEND``, unbuffered) as ``fd``, all or nothing: a failed or
    partial write (a full disk) is cut back to the file's previous size, so no torn record is left, and
    raises its ``OSError`` naming ``path`` (:func:`~coopsgd.errors.write_failure`)."""
    data = line.encode("utf-8")
    start = os.fstat(fd).st_size
    try:
        view = memoryview(data)
        while view:
            n = os.write(fd, view)
            view = view[n:]
    except OSError as exc:
        try:
            os.ftruncate(fd, start)
        except OSError:
            pass
        write_failure(exc, path, "the records written before are kept")
        raise


def not_a_file(path: str | Path) -> str:
    """What ``path`` is, when it is not a regular file: ``does not exist``, ``is a directory``, ``is a FIFO
    (named pipe)``, a device, a socket or a broken symbolic link (reading a FIFO would block, a device would
    never end), for a message that says so."""
    p = Path(path)
    try:
        mode = p.stat().st_mode
    except FileNotFoundError:
        return "is a broken symbolic link" if p.is_symlink() else "does not exist"
    except OSError as exc:
        return f"cannot be read ({exc.strerror or exc})"
    kinds = ((stat.S_ISDIR, "is a directory"), (stat.S_ISFIFO, "is a FIFO (named pipe)"),
             (stat.S_ISCHR, "is a character device"), (stat.S_ISBLK, "is a block device"),
             (stat.S_ISSOCK, "is a socket"))
    for test, text in kinds:
        if test(mode):
            return f"{text}, not a regular file"
    return "is not a regular file"


def read_text(path: str | Path, what: str = "file", *, allow_empty: bool = False) -> str:
    """The UTF-8 text of ``path``; a missing file, a directory, an empty file (unless ``allow_empty``) or
    bytes that are not UTF-8 are a :class:`ConfigError` naming ``what`` and the file."""
    p = Path(path)
    if not p.exists():
        raise ConfigError.invalid(what, str(path), "no such file")
    if not p.is_file():
        raise ConfigError.invalid(what, str(path), not_a_file(p))
    try:
        raw = p.read_bytes()
    except OSError as exc:
        raise ConfigError.invalid(what, str(path), f"cannot be read: {exc.strerror or exc}") from None
    if not raw.strip() and not allow_empty:
        raise ConfigError.invalid(what, str(path), f"is empty ({len(raw)} bytes)")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise ConfigError.invalid(what, str(path), f"is not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset "
                                                   f"{exc.start}, line {line}); save it as UTF-8") from None


def read_json(path: str | Path, what: str = "file", *, mapping: bool = True) -> Any:
    """The JSON value in ``path`` (a mapping unless ``mapping=False``), read with :func:`read_text`; a
    syntax error (with its line and column) or another type is a :class:`ConfigError` naming the file."""
    text = read_text(path, what)
    try:
        data = json.loads(text)
    except ValueError as exc:
        where = f" at line {exc.lineno}, column {exc.colno}" if isinstance(exc, json.JSONDecodeError) else ""
        reason = exc.msg if isinstance(exc, json.JSONDecodeError) else str(exc)
        raise ConfigError.invalid(what, str(path), f"is not valid JSON{where} ({reason}; truncated or "
                                                   "damaged?)") from None
    if mapping and not isinstance(data, dict):
        raise ConfigError.invalid(what, str(path), f"must hold a JSON object (a mapping of keys to values), "
                                                   f"not a {type(data).__name__}")
    return data


# ---------------------------------------------------------------------------------------------------------
# one writer per directory
# ---------------------------------------------------------------------------------------------------------

#: The directories this process holds: lock file (real path) -> [file descriptor, holders]. A process may
#: take its own lock again (a comparison's runs inside its directory, a run inside a reproduction).
_HELD: dict[str, list[int]] = {}
_HELD_LOCK = threading.RLock()  # re-entrant: a DirLock collected while it is held releases through it


def _lock_key(directory: Path) -> str:
    return os.path.realpath(directory / LOCK_FILE)


def _holder(path: Path) -> str:
    """The PID written in a lock file, as text (``unknown`` when it cannot be read)."""
    try:
        text = path.read_text(encoding="ascii", errors="replace").strip()
    except OSError:
        return "unknown"
    return text if text.isdigit() else "unknown"


def _busy(what: str, directory: Path, holder: str) -> ConfigError:
    return ConfigError(f"{what} {str(directory)!r} is in use by another coopsgd process (PID {holder}): one "
                       "process writes a directory at a time; wait for it to end or choose another directory",
                       field="out", value=str(directory))


def held_directory(directory: str | Path) -> bool:
    """Whether this process holds the lock of ``directory``."""
    with _HELD_LOCK:
        return _lock_key(Path(directory)) in _HELD


def check_unlocked(directory: str | Path, what: str = "run directory") -> None:
    """Refuse ``directory`` when another process holds its lock (a :class:`ConfigError` naming that process's
    PID); writes nothing. A directory this process holds, or without a lock file, passes."""
    d = Path(directory)
    lock = d / LOCK_FILE
    if fcntl is None or not lock.is_file() or held_directory(d):
        return
    try:
        fd = os.open(lock, os.O_RDONLY)
    except OSError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        raise _busy(what, d, _holder(lock)) from None
    except OSError:
        return
    finally:
        os.close(fd)  # releases the probe's shared lock


class DirLock:
    """This process's hold on a directory (:func:`lock_directory`); :meth:`release` (or dropping the object)
    gives it back (the last holder in the process closes the lock file, which unlocks it). Released at exit
    by the kernel anyway."""

    def __init__(self, directory: Path, key: str) -> None:
        self.directory, self._key, self._held = directory, key, True

    def release(self) -> None:
        with _HELD_LOCK:
            if not self._held:
                return
            self._held = False
            entry = _HELD.get(self._key)
            if entry is None:
                return
            entry[1] -= 1
            if entry[1] <= 0:
                del _HELD[self._key]
                os.close(entry[0])

    def __del__(self) -> None:  # a holder that is dropped gives its hold back
        try:
            self.release()
        except Exception:  # noqa: BLE001 -- at interpreter exit the kernel drops the lock anyway
            pass

    def __enter__(self) -> DirLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def lock_directory(directory: str | Path, what: str = "run directory") -> DirLock:
    """Create ``directory`` if needed and take its exclusive lock for this process (the PID is written into
    :data:`LOCK_FILE`); another process holding it is a :class:`ConfigError` naming its PID. The lock is
    held until :meth:`DirLock.release` (or the process ends: the kernel drops it, so a killed process never
    leaves it held)."""
    d = Path(directory)
    try:
        d.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        write_failure(exc, d, "nothing was written")
        raise
    key = _lock_key(d)
    with _HELD_LOCK:
        entry = _HELD.get(key)
        if entry is not None:
            entry[1] += 1
            return DirLock(d, key)
        fd = _acquire(d, what)
        _HELD[key] = [fd, 1]
    return DirLock(d, key)


def _acquire(d: Path, what: str) -> int:
    """Open and lock ``d``'s lock file; write the PID. Retries when the file was replaced meanwhile."""
    lock = d / LOCK_FILE
    for _ in range(10):
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as exc:
            write_failure(exc, lock, "nothing was written")
            raise
        try:
            if fcntl is not None:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise _busy(what, d, _holder(lock)) from None
        except OSError:  # a file system without advisory locks (some NFS mounts): no lock, as on Windows
            pass
        try:
            same = os.stat(lock).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if not same:  # the file was removed or replaced after we opened it: lock the one in place
            os.close(fd)
            continue
        try:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
        except OSError as exc:
            os.close(fd)
            write_failure(exc, lock, "nothing was written")
            raise
        return fd
    raise _busy(what, d, _holder(lock))


def first_missing(path: str | Path) -> Path | None:
    """The highest ancestor of ``path`` (or ``path`` itself) that does not exist: what creating it creates."""
    p = Path(os.path.abspath(path))
    top = None
    while not p.exists():
        top = p
        if p.parent == p:
            break
        p = p.parent
    return top


def discard_unused(path: str | Path, top: str | Path | None = None) -> None:
    """Remove ``path`` if it holds nothing but its lock file (a directory created for a lock, and the command
    was refused before it wrote anything), and then its empty parents up to ``top`` (what was created for it,
    :func:`first_missing`)."""
    p = Path(os.path.abspath(path))
    stop = Path(os.path.abspath(top)) if top is not None else p
    try:
        if p.is_dir() and not p.is_symlink() and [e.name for e in p.iterdir()] in ([], [LOCK_FILE]):
            (p / LOCK_FILE).unlink(missing_ok=True)
            p.rmdir()
            while p != stop and stop in p.parents and not any(p.parent.iterdir()):
                p = p.parent
                p.rmdir()
    except OSError:
        pass


@contextmanager
def locked_directory(directory: str | Path, what: str = "run directory") -> Iterator[DirLock]:
    """:func:`lock_directory` for a ``with`` block."""
    lock = lock_directory(directory, what)
    try:
        yield lock
    finally:
        lock.release()
