"""Progress on stderr: plain lines when it is not a terminal (every ~10 s or 10%), a tqdm bar when it is.

Time is a fake clock advanced by the test: nothing sleeps.
"""

from __future__ import annotations

import io
import re

import pytest

from coopsgd.train.progress import Progress, format_duration


class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def _run(total: int, seconds_per_step: float, *, initial: int = 0, loss: float = 0.5) -> list[str]:
    clock, buf = FakeClock(), io.StringIO()
    bar = Progress(total, initial=initial, desc="local_sgd x8", stream=buf, tty=False, clock=clock)
    for done in range(initial + 1, total + 1):
        clock.t += seconds_per_step
        bar.update(done, loss=loss)
    bar.close()
    return buf.getvalue().splitlines()


def _steps(lines: list[str]) -> list[int]:
    return [int(re.search(r"step (\d+)/", line).group(1)) for line in lines]  # type: ignore[union-attr]


def test_a_line_every_ten_seconds_on_a_long_run() -> None:
    # 0.5 s per step: a tenth of the run (100 steps) takes 50 s, so the 10 s lines come first
    lines = _run(1000, 0.5)
    assert _steps(lines) == list(range(20, 1001, 20))
    assert lines[0] == "local_sgd x8: step 20/1000 (2%), loss 0.5, 2 steps/s, ETA 8m10s"
    assert lines[-1] == "local_sgd x8: step 1000/1000 (100%), loss 0.5, done in 8m20s"


def test_a_line_every_tenth_of_a_short_run() -> None:
    # 1.5 s per step, 50 steps: a tenth (5 steps, 7.5 s) comes before 10 s
    lines = _run(50, 1.5)
    assert _steps(lines) == [5, 10, 15, 20, 25, 30, 35, 40, 45, 50]
    assert lines[0].startswith("local_sgd x8: step 5/50 (10%), loss 0.5, ")
    assert "ETA 1m08s" in lines[0]


def test_a_fast_run_prints_its_last_line_only() -> None:
    # tenths closer than a second apart are not printed; the end always is
    lines = _run(100, 0.001)
    assert lines == ["local_sgd x8: step 100/100 (100%), loss 0.5, done in 0s"]


def test_a_resumed_run_counts_from_its_checkpoint() -> None:
    lines = _run(100, 2.0, initial=40)
    assert _steps(lines) == [45, 50, 55, 60, 65, 70, 75, 80, 85, 90, 95, 100]  # tenths at 50, 60...: every 10 s
    assert lines[0].startswith("local_sgd x8: step 45/100 (45%)")
    assert "0.5 steps/s, ETA 1m50s" in lines[0]  # the rate of this process's steps, not of the checkpoint's


def test_loss_is_shown_lazily_and_only_when_finite() -> None:
    clock, buf = FakeClock(), io.StringIO()
    bar = Progress(20, stream=buf, tty=False, clock=clock)
    calls = []

    def loss() -> float:
        calls.append(1)
        return float("nan") if len(calls) > 1 else 0.25

    for done in range(1, 21):
        clock.t += 1.5
        bar.update(done, loss=loss)
    lines = buf.getvalue().splitlines()
    assert len(calls) == len(lines) == 10  # evaluated only for the lines printed
    assert all("loss 0.25" in line for line in lines)  # a NaN keeps the last finite loss
    assert lines[0].startswith("step 2/20 (10%)")  # no description: no prefix


def test_eta_unknown_before_the_first_step_and_no_loss_yet() -> None:
    clock, buf = FakeClock(), io.StringIO()
    bar = Progress(10, stream=buf, tty=False, clock=clock)
    assert bar.line() == "step 0/10 (0%), ETA ?"


def test_on_a_terminal_a_tqdm_bar_and_no_plain_lines() -> None:
    buf = io.StringIO()
    with Progress(30, desc="sync x2", stream=buf, tty=True) as bar:
        for done in range(1, 31):
            bar.update(done, loss=0.125)
        assert bar._bar is not None and bar._bar.n == 30
    text = buf.getvalue()
    assert "sync x2" in text and "\r" in text and "ETA" not in text
    assert bar._bar is None  # closed


def test_the_tty_is_asked_of_the_stream() -> None:
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    assert Progress(5, stream=Tty()).tty is True
    assert Progress(5, stream=io.StringIO()).tty is False
    broken = io.StringIO()
    broken.close()
    assert Progress(5, stream=broken).tty is False


class BrokenPipe(io.StringIO):
    """A stderr whose reader went away: every write raises, as ``print`` to a closed pipe does."""

    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def write(self, text: str) -> int:
        self.writes += 1
        raise BrokenPipeError(32, "Broken pipe")


def test_a_broken_stderr_does_not_stop_the_progress() -> None:
    clock, pipe = FakeClock(), BrokenPipe()
    bar = Progress(2, stream=pipe, tty=False, clock=clock)
    clock.t += 20.0
    bar.update(1, loss=0.75)  # 10 s passed: a line is due, and its write fails
    assert pipe.writes == 1 and bar.n == 1 and bar.loss == 0.75
    clock.t += 20.0
    bar.update(2, loss=0.5)  # the last line cannot be written either: ignored, the state still moves on
    assert pipe.writes == 2 and bar.n == 2 and bar.loss == 0.5
    assert bar.line() == "step 2/2 (100%), loss 0.5, done in 40s"
    closed = io.StringIO()
    closed.close()  # a closed stream raises ValueError instead
    bar = Progress(2, stream=closed, tty=False, clock=clock)
    bar.update(2, loss=0.25)
    assert bar.n == 2 and bar.loss == 0.25


@pytest.mark.parametrize("engine", [
    dict(engine="reference", objective="quadratic", max_steps=20),
    dict(engine="simulate", executor="loop", max_steps=8, batch_size=16, eval_samples=100, eval_every=4),
], ids=["reference", "simulate"])
def test_a_broken_stderr_does_not_stop_the_run(monkeypatch, engine) -> None:
    """A whole run with progress on and a stderr that cannot be written gives the run of progress off."""
    from coopsgd.train import RunConfig
    from coopsgd.train.trainer import run

    cfg = dict(preset="local_sgd", tau=4, workers=2, lr=0.1, **engine)
    quiet = run(RunConfig(**cfg))  # type: ignore[arg-type]
    pipe = BrokenPipe()
    with pytest.raises(BrokenPipeError):  # the stream really is broken
        print("x", file=pipe)
    pipe.writes = 0
    monkeypatch.setattr("sys.stderr", pipe)
    loud = run(RunConfig(**cfg), progress=True)  # type: ignore[arg-type]
    monkeypatch.undo()
    assert pipe.writes >= 1  # at least the last progress line was attempted, and its failure swallowed
    assert loud["status"] == quiet["status"] == "ok" and loud["steps"] == cfg["max_steps"]
    rounds = cfg["max_steps"] // 4
    assert loud["final"] == quiet["final"] and loud["communication_rounds"] == quiet["communication_rounds"] == rounds


@pytest.mark.parametrize("seconds,text", [(0, "0s"), (42.4, "42s"), (187, "3m07s"), (7500, "2h05m")])
def test_format_duration(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text
