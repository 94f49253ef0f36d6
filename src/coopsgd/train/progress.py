"""Progress of a run on stderr: a tqdm bar on a terminal, plain lines everywhere else.

When stderr is not a terminal (CI, ``nohup``, a log file) a bar would print nothing useful, so
:class:`Progress` writes one plain line instead -- every ``every_s`` seconds (10 s) or at every tenth of the
run (whichever comes first; never more than one line per ``min_gap_s`` second, the last step excepted)::

    local_sgd x8: step 120/1000 (12%), loss 0.4321, 9.8 steps/s, ETA 1m30s

The clock is injectable (``clock=``), so the lines can be tested without sleeping.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

__all__ = ["Progress", "format_duration"]

Loss = float | Callable[[], float] | None


def format_duration(seconds: float) -> str:
    """``42s``, ``3m07s``, ``2h05m``."""
    s = max(0, int(round(seconds)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):  # closed or replaced streams
        return False


class Progress:
    """Progress of ``total`` steps: a tqdm bar when ``stream`` (stderr) is a terminal, plain lines otherwise.

    ``update(done, loss=...)`` after every step (``done``: steps completed, counting from 0 even when the run
    resumed at ``initial``); ``loss`` is a number or a zero-argument callable, only evaluated when shown.
    ``tty`` forces one form (``None``: ask the stream).
    """

    def __init__(
        self,
        total: int,
        *,
        initial: int = 0,
        desc: str = "",
        stream: TextIO | None = None,
        tty: bool | None = None,
        clock: Callable[[], float] = time.monotonic,
        every_s: float = 10.0,
        every_fraction: float = 0.1,
        min_gap_s: float = 1.0,
    ) -> None:
        self.total = max(0, int(total))
        self.desc = desc
        self.stream = stream if stream is not None else sys.stderr
        self.tty = _isatty(self.stream) if tty is None else bool(tty)
        self.clock = clock
        self.every_s = float(every_s)
        self.every_fraction = float(every_fraction)
        self.min_gap_s = float(min_gap_s)
        self.n = int(initial)
        self.loss: float | None = None
        self._n0 = self.n
        self._t0 = clock()
        self._last_t = self._t0
        self._last_n = self.n
        self._bar: Any = None
        self._marks = [m for m in self._tenths() if m > self.n]
        if self.tty:
            from tqdm import tqdm

            self._bar = tqdm(total=self.total, initial=self.n, desc=desc, unit="step", dynamic_ncols=True,
                             leave=False, file=self.stream)

    def _tenths(self) -> list[int]:
        """The steps at which a line is due (every ``every_fraction`` of the run), after the current step."""
        if self.every_fraction <= 0 or self.total <= 0:
            return []
        k = max(1, int(round(1 / self.every_fraction)))
        return sorted({math.ceil(self.total * i / k) for i in range(1, k + 1)} - {0})

    def update(self, done: int, loss: Loss = None, **postfix: Any) -> None:
        """``done`` steps of ``total`` completed; ``loss`` the last mini-batch loss (shown when finite)."""
        done = int(done)
        delta, self.n = done - self.n, done
        if self._bar is not None:
            self._bar.update(delta)
            if done % 10 == 0:
                value = self._loss(loss)
                if value is not None:
                    self._bar.set_postfix(loss=f"{value:.3f}", **postfix)
            return
        now = self.clock()
        gap = now - self._last_t
        mark_due = bool(self._marks) and done >= self._marks[0]
        if done >= self.total or gap >= self.every_s or (mark_due and gap >= self.min_gap_s):
            if done == self._last_n and (done >= self.total or not mark_due):
                return  # nothing new to say (the last line was at this step)
            self._loss(loss)
            self._line(now)
            self._last_t, self._last_n = now, done
            while self._marks and self._marks[0] <= done:
                self._marks.pop(0)

    def _loss(self, loss: Loss) -> float | None:
        value = loss() if callable(loss) else loss
        if value is not None and math.isfinite(float(value)):
            self.loss = float(value)
        return self.loss

    def line(self, now: float | None = None) -> str:
        """The plain progress line of the current state."""
        now = self.clock() if now is None else now
        elapsed = now - self._t0
        head = f"{self.desc}: " if self.desc else ""
        pct = 100.0 * self.n / self.total if self.total else 100.0
        parts = [f"{head}step {self.n}/{self.total} ({pct:.0f}%)"]
        if self.loss is not None:
            parts.append(f"loss {self.loss:.4g}")
        done_here = self.n - self._n0
        if self.n >= self.total:
            parts.append(f"done in {format_duration(elapsed)}")
        elif done_here > 0 and elapsed > 0:
            rate = done_here / elapsed
            parts.append(f"{rate:.3g} steps/s")
            parts.append(f"ETA {format_duration((self.total - self.n) / rate)}")
        else:
            parts.append("ETA ?")
        return ", ".join(parts)

    def _line(self, now: float) -> None:
        try:
            print(self.line(now), file=self.stream, flush=True)
        except (OSError, ValueError):  # a closed or broken stderr must not stop the run
            pass

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
