"""Failure injection for tests of the distributed engine: a hook called at the start of every step.

:func:`fault_hook` builds one that makes a rank fail at a step in one of :data:`FAILURE_MODES`; the engine
takes it as ``fault=`` (:class:`~coopsgd.engines.distributed.engine.DistributedEngine`), and the runner builds
it from ``COOPSGD_INJECT_FAILURE`` (``coopsgd.train.distributed``).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

from coopsgd.errors import ConfigError

__all__ = ["FAILURE_MODES", "FaultHook", "fault_hook"]

log = logging.getLogger(__name__)

#: What an injected fault does (tests): ``raise`` (an exception), ``exit`` (``os._exit(3)``), ``kill``
#: (SIGKILL itself), ``term`` (SIGTERM itself), ``stop`` (SIGSTOP itself: frozen until SIGCONT), ``hang``
#: (sleep forever) or ``nan`` (that step's loss and gradient become NaN on that rank).
FAILURE_MODES = ("raise", "exit", "kill", "hang", "term", "stop", "nan")

#: ``fault(rank, step) -> None | "nan"``: called at the start of every step (tests inject failures with it).
FaultHook = Callable[[int, int], "str | None"]


def fault_hook(rank: int, step: int, mode: str, *, once_file: str | Path | None = None) -> FaultHook:
    """A :data:`FaultHook` that makes ``rank`` fail at the start of ``step`` in one of :data:`FAILURE_MODES`.

    With ``once_file`` the fault happens once: the file marks it as done (a restarted run gets past it).
    """
    if mode not in FAILURE_MODES:
        raise ConfigError.invalid("mode", mode, f"choose one of {', '.join(FAILURE_MODES)}")

    def hook(r: int, k: int) -> str | None:
        if r != rank or k != step:
            return None
        if once_file is not None:
            marker = Path(once_file)
            if marker.exists():
                return None
            marker.write_text(f"rank {r} step {k} {mode}\n")
        log.warning("rank %d: injected failure %r at step %d", r, mode, k)
        if mode == "nan":
            return "nan"
        if mode == "raise":
            raise RuntimeError(f"injected failure on rank {r} at step {k}")
        if mode == "exit":
            sys.stderr.flush()
            os._exit(3)
        if mode == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if mode == "term":
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(60)  # the default SIGTERM action ends the process before this returns
        if mode == "stop" and hasattr(signal, "SIGSTOP"):
            os.kill(os.getpid(), signal.SIGSTOP)  # continued (SIGCONT) only to be terminated
        while True:  # hang
            time.sleep(3600)

    return hook
