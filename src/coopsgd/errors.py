"""Exceptions raised by coopsgd.

Every error raised for bad user input is a :class:`ConfigError` (a ``ValueError``) whose message names
the offending field, the value that was given and what is allowed, so that the CLI can print it as one
line instead of a traceback.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

__all__ = [
    "CoopSGDError",
    "ConfigError",
    "MixingMatrixError",
    "write_failure",
    "describe_os_error",
    "Interrupted",
    "TheoryWarning",
    "DivergenceWarning",
    "check_int",
    "check_float",
    "check_choice",
    "INT64_MAX",
]

#: The largest integer :func:`check_int` accepts unless told otherwise: counts, sizes and seeds end up in
#: torch / numpy int64 (step counters, generators), where a larger value overflows.
INT64_MAX = 2**63 - 1


class CoopSGDError(Exception):
    """Base class of all coopsgd errors."""


class ConfigError(CoopSGDError, ValueError):
    """Invalid user input: a bad argument, flag, config key or value.

    Use :meth:`invalid` to build the standard message ``"<field>=<value!r> is invalid: <allowed>"``.
    """

    def __init__(self, message: str, *, field: str | None = None, value: Any = None) -> None:
        super().__init__(message)
        self.field = field
        self.value = value

    @classmethod
    def invalid(cls, field: str, value: Any, allowed: str) -> ConfigError:
        return cls(f"{field}={value!r} is invalid: {allowed}", field=field, value=value)


class MixingMatrixError(ConfigError):
    """A mixing matrix that breaks a required property (shape, sign, stochasticity, symmetry, connectivity)."""


def write_failure(exc: OSError, path: Any, kept: str = "") -> OSError:
    """Name ``path`` (the file or directory coopsgd meant to write) in a failed write's ``OSError`` and say
    what was kept, in place: the caller re-raises it (its type and ``errno`` are unchanged, so callers that
    handle ``OSError`` keep working). :func:`describe_os_error` gives the one-line message."""
    reason = exc.strerror or str(exc) or type(exc).__name__
    exc.filename = str(path)
    exc.coopsgd_message = f"cannot write {str(path)!r}: {reason}" + (f"; {kept}" if kept else "")  # type: ignore[attr-defined]
    return exc


def describe_os_error(exc: OSError) -> str:
    """One line for a failed file operation: :func:`write_failure`'s message, else the reason and the file."""
    message = getattr(exc, "coopsgd_message", None)
    if message:
        return str(message)
    where = f": {exc.filename!r}" if exc.filename else ""
    return f"{exc.strerror or exc}{where}"


class Interrupted(KeyboardInterrupt):
    """A run was stopped by a signal (SIGTERM or SIGINT) and cleaned up after itself.

    Raised by :func:`coopsgd.engines.distributed.launch.launch` after it has stopped every rank and removed its
    temporary directory. ``signum`` is the signal; ``exit_status`` is what a shell reports for it
    (``128 + signum``: 143 for SIGTERM, 130 for SIGINT), which the CLI returns. A ``KeyboardInterrupt``
    (not a :class:`CoopSGDError`), so that no ``except Exception`` on its way out can swallow it and code
    that already stops cleanly on Ctrl-C handles it too.
    """

    def __init__(self, message: str, *, signum: int) -> None:
        super().__init__(message)
        self.signum = int(signum)
        self.exit_status = 128 + self.signum

    @property
    def signal_name(self) -> str:
        import signal

        try:
            return signal.Signals(self.signum).name
        except ValueError:
            return f"signal {self.signum}"


class TheoryWarning(UserWarning):
    """The theorems' assumptions do not hold for this setting; bounds are reported but do not apply."""


class DivergenceWarning(UserWarning):
    """A legal setting that is known to diverge (e.g. EASGD with alpha >= 2/(m+1))."""


def check_int(field: str, value: Any, *, minimum: int | None = None, maximum: int | None = INT64_MAX) -> int:
    """Return ``value`` as an int, or raise a ConfigError naming ``field``.

    ``maximum`` defaults to :data:`INT64_MAX` (every count, size and seed ends up in an int64 somewhere:
    a larger one is an error here, not an overflow deep inside torch); ``None`` accepts any size."""
    if isinstance(value, bool) or not isinstance(value, (int,)) and not (
        hasattr(value, "__index__") and not isinstance(value, float)
    ):
        raise ConfigError.invalid(field, value, "must be an integer" + (", not a string" if isinstance(value, str) else ""))
    value = int(value)
    if minimum is not None and value < minimum:
        raise ConfigError.invalid(field, value, f"must be an integer >= {minimum}")
    if maximum is not None and value > maximum:
        raise ConfigError.invalid(field, value, f"must be an integer <= {maximum}")
    return value


def check_float(
    field: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """Return ``value`` as a finite float inside the given interval, or raise a ConfigError naming ``field``."""
    import math

    if isinstance(value, bool):
        raise ConfigError.invalid(field, value, "must be a number")
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise ConfigError.invalid(field, value, "must be a number") from None
    if not math.isfinite(x):
        raise ConfigError.invalid(field, value, "must be a finite number")
    lo_bad = low is not None and (x <= low if low_open else x < low)
    hi_bad = high is not None and (x >= high if high_open else x > high)
    if lo_bad or hi_bad:
        lb = "-inf" if low is None else f"{low:g}"
        hb = "inf" if high is None else f"{high:g}"
        interval = f"{'(' if low_open or low is None else '['}{lb}, {hb}{')' if high_open or high is None else ']'}"
        raise ConfigError.invalid(field, value, f"must lie in {interval}")
    return x


def check_choice(field: str, value: Any, allowed: Sequence[str], aliases: Mapping[str, str] | None = None) -> str:
    """``value`` as one of ``allowed``, or a ConfigError naming ``field`` and the choices.

    Case, surrounding blanks and ``-`` for ``_`` do not matter (``"Parameter-Server"`` is ``parameter_server``);
    ``aliases`` maps other accepted spellings (after that normalisation) to a choice.
    """
    key = value.strip().lower().replace("-", "_") if isinstance(value, str) else None
    if key is not None and aliases:
        key = aliases.get(key, key)
    if key is None or key not in allowed:
        raise ConfigError.invalid(field, value, f"must be one of {', '.join(allowed)}")
    return key
