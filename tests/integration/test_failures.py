"""Reliability of the simulator runs: NaN policies, crash-safe writes under injected failures."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from coopsgd.engines.reference import NonFiniteError
from coopsgd.train import RunConfig, load_checkpoint, save_checkpoint
from coopsgd.train import rundir as rundir_mod
from coopsgd.train.trainer import build, iterate


def _poisoned(exp, worker: int, at_step: int, times: int = 1):
    """Make worker ``worker``'s batch NaN at steps at_step .. at_step+times-1 (counted by loader calls)."""
    calls = {"n": 0}
    orig = exp.loader.next_step

    def next_step():
        batches = orig()
        k = calls["n"]
        calls["n"] += 1
        if at_step <= k < at_step + times:
            x, y = batches[worker]
            batches[worker] = (torch.full_like(x, float("nan")), y)
        return batches

    exp.loader.next_step = next_step


def test_nan_stop_names_worker_and_step() -> None:
    exp = build(RunConfig(preset="local_sgd", workers=3, tau=2, max_steps=8, eval_every=4, executor="loop"))
    _poisoned(exp, worker=1, at_step=5)
    with pytest.raises(NonFiniteError, match=r"worker 1 at step 5"):
        list(iterate(exp))


def test_nan_skip_restores_last_good_state_and_continues() -> None:
    cfg = RunConfig(preset="local_sgd", workers=3, tau=2, max_steps=8, eval_every=4, executor="loop", nan_policy="skip")
    exp = build(cfg)
    _poisoned(exp, worker=2, at_step=3)
    checked = []
    orig_step = exp.sim.step

    def spy(batches, lr):
        before = exp.sim.params.clone()
        try:
            return orig_step(batches, lr)
        except NonFiniteError:
            # nothing of the failed step reached the state: the last good state is what remains
            assert torch.equal(before, exp.sim.params)
            checked.append(exp.sim.step_count)
            raise

    exp.sim.step = spy
    records = list(iterate(exp))
    assert checked == [3]
    assert records[-1]["skipped_steps"] == [3]
    assert records[-1]["step"] == 8
    assert torch.isfinite(exp.sim.params).all()
    assert exp.sim.step_count == 7  # one step fewer was applied


def test_nan_skip_gives_up_after_max_skips() -> None:
    cfg = RunConfig(preset="sync", workers=2, max_steps=20, executor="loop", nan_policy="skip", max_skips=3)
    exp = build(cfg)
    _poisoned(exp, worker=0, at_step=2, times=100)
    with pytest.raises(NonFiniteError, match="max_skips=3"):
        list(iterate(exp))


POINTS = ["write", "flush", "fsync", "replace"]


@pytest.mark.parametrize("point", POINTS)
def test_failed_checkpoint_write_keeps_previous_checkpoint(tmp_path, monkeypatch, point) -> None:
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, {"format": "coopsgd-checkpoint-v1", "step": 1, "x": torch.arange(5)})

    class Boom(OSError):
        pass

    def fail(*a, **k):
        raise Boom(f"injected failure at {point}")

    if point == "replace":
        monkeypatch.setattr(rundir_mod.os, "replace", fail)
    elif point == "fsync":
        monkeypatch.setattr(rundir_mod.os, "fsync", fail)
    else:
        real_fdopen = os.fdopen

        def fdopen(fd, mode="r", *a, **k):
            f = real_fdopen(fd, mode, *a, **k)

            class Wrapped:
                def __enter__(self):
                    return self

                def __exit__(self, *exc):
                    f.close()
                    return False

                def write(self, data):
                    if point == "write":
                        f.write(data[: len(data) // 3])  # a torn, partial write
                        raise Boom("injected failure at write")
                    return f.write(data)

                def flush(self):
                    if point == "flush":
                        raise Boom("injected failure at flush")
                    return f.flush()

                def fileno(self):
                    return f.fileno()

            return Wrapped()

        monkeypatch.setattr(rundir_mod.os, "fdopen", fdopen)
    with pytest.raises(Boom):
        save_checkpoint(path, {"format": "coopsgd-checkpoint-v1", "step": 2, "x": torch.arange(7)})
    monkeypatch.undo()
    state = load_checkpoint(path)
    assert state["step"] == 1 and torch.equal(state["x"], torch.arange(5))
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"], "temporary files must be cleaned up"


def test_sigkill_during_checkpoint_writes_never_leaves_an_unreadable_checkpoint(tmp_path) -> None:
    """A writer killed at random moments: the checkpoint on disk is always a complete one."""
    script = tmp_path / "writer.py"
    script.write_text(textwrap.dedent(f"""
        import torch
        from coopsgd.train import save_checkpoint
        step = 0
        while True:
            step += 1
            save_checkpoint({str(tmp_path / 'ck.pt')!r}, {{"format": "coopsgd-checkpoint-v1", "step": step,
                                                          "x": torch.full((200_000,), float(step))}})
    """))
    for delay in (0.8, 1.1, 1.37, 1.6):
        proc = subprocess.Popen([sys.executable, str(script)])
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if not (tmp_path / "ck.pt").exists():
            continue
        state = load_checkpoint(tmp_path / "ck.pt")
        assert torch.all(state["x"] == float(state["step"]))
