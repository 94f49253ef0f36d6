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
    """Make worker ``worker``'s batch NaN at steps at_step .. at_step+times-1."""
    orig = exp.loader.batch
    spe = exp.loader.steps_per_epoch

    def batch(epoch, w, index):
        x, y = orig(epoch, w, index)
        if w == worker and at_step <= epoch * spe + index < at_step + times:
            x = torch.full_like(x, float("nan"))
        return x, y

    exp.loader.batch = batch


def test_nan_stop_names_worker_and_step() -> None:
    exp = build(RunConfig(preset="local_sgd", workers=3, tau=2, max_steps=8, eval_every=4, executor="loop"))
    _poisoned(exp, worker=1, at_step=5)
    with pytest.raises(NonFiniteError, match=r"worker 1 at step 5"):
        list(iterate(exp))


def test_nan_skip_drops_the_round_and_restores_its_start() -> None:
    """nan_policy=skip (the same meaning on every engine): the round in which a worker went non-finite is
    dropped on every worker -- the state after the last good round is restored -- and the run goes on."""
    cfg = RunConfig(preset="local_sgd", workers=3, tau=2, max_steps=8, eval_every=4, executor="loop", nan_policy="skip")
    exp = build(cfg)
    _poisoned(exp, worker=2, at_step=3)
    seen = {}
    orig_step = exp.sim.step

    def spy(batches, lr):
        k = exp.sim.step_count
        stats = orig_step(batches, lr)
        seen[k] = (stats.skipped, exp.sim.params.clone())
        return stats

    exp.sim.step = spy
    records = list(iterate(exp))
    assert records[-1]["dropped_rounds"] == [{"step": 3, "workers": [2], "first_steps": {"2": 3}, "restored_to_step": 2}]
    assert [k for k, (skipped, _) in seen.items() if skipped] == [3]
    assert records[-1]["step"] == 8 and exp.sim.step_count == 8
    assert torch.isfinite(exp.sim.params).all()


def test_nan_skip_restored_state_equals_the_last_good_round() -> None:
    cfg = RunConfig(preset="local_sgd", workers=3, tau=2, max_steps=4, eval_every=4, executor="loop", nan_policy="skip")
    clean = build(cfg)
    for _ in range(2):  # steps 0-1: one good round
        clean.sim.step(clean.loader.next_step(), 0.1)
    after_good_round = clean.sim.params.clone()
    exp = build(cfg)
    _poisoned(exp, worker=2, at_step=3)
    gen = iterate(exp)
    next(gen)  # step 0's record
    rec = next(gen)  # step 4: the round of steps 2-3 was dropped
    assert rec["dropped_rounds"][0]["restored_to_step"] == 2
    assert torch.equal(exp.sim.params, after_good_round)


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


@pytest.mark.slow
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
