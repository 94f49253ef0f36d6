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
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from coopsgd.errors import ConfigError, write_failure

__all__ = ["atomic_write_bytes", "append_line", "check_output_path", "read_text", "read_json"]


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


def read_text(path: str | Path, what: str = "file", *, allow_empty: bool = False) -> str:
    """The UTF-8 text of ``path``; a missing file, a directory, an empty file (unless ``allow_empty``) or
    bytes that are not UTF-8 are a :class:`ConfigError` naming ``what`` and the file."""
    p = Path(path)
    if not p.exists():
        raise ConfigError.invalid(what, str(path), "no such file")
    if not p.is_file():
        raise ConfigError.invalid(what, str(path), "is not a regular file")
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
