"""Issue 24's torchrun edge cases, with the README's recipe (2 processes, ``--standalone``).

* Resuming a finished run is a no-op under torchrun as with ``coopsgd run``: the ranks learn from rank 0 that
  the run ended well at its last step, nothing is evaluated again, and every file of the run directory is
  byte-for-byte what it was (before, the final state was evaluated once more and its record replaced the
  last one).
* Rank 0 takes the run directory's lock only after the ranks agreed on their checks and their configuration
  (:func:`coopsgd.train.distributed._agree_to_start`): a run refused before that leaves no directory behind
  (``test_fault_matrix.py`` checks it for ranks that read different configurations); a directory another
  process holds stops every rank with one line naming that process.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

pytest.importorskip("torch.distributed.run", reason="torchrun (torch.distributed.run) is not importable")

# the recipe's helpers (same directory: pytest puts it on sys.path)
from test_torchrun_recipe import _config_copy, _run, _with, readme_torchrun_command  # noqa: E402  # isort: skip

pytestmark = pytest.mark.slow  # two torchrun jobs: about 20 s on 2 cores


def _files(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def test_resuming_a_finished_run_under_torchrun_writes_nothing(tmp_path: Path) -> None:
    argv = readme_torchrun_command()
    config = _config_copy(argv, tmp_path, max_steps=4, eval_samples=100)
    out = tmp_path / "run"
    job = _with(_with(argv, "--config", str(config)), "--out", str(out))
    first = _run(job, tmp_path)
    assert first.returncode == 0, first.stderr[-4000:]
    before = _files(out)
    assert json.loads(before["summary.json"])["status"] == "ok"
    again = _run([*job, "--resume", str(out)], tmp_path)
    assert again.returncode == 0, again.stderr[-4000:]
    head = [ln.split(":", 1)[1] for ln in again.stdout.splitlines() if ln.split(":", 1)[-1].startswith("{")]
    assert len(head) == 1 and json.loads(head[0])["steps"] == 4, again.stdout
    after = _files(out)
    assert sorted(after) == sorted(before)
    changed = [name for name in before if after[name] != before[name]]
    assert changed == [], changed  # metrics.jsonl included: no record was evaluated again


def test_a_run_directory_another_process_holds_stops_every_rank_with_one_line(tmp_path: Path) -> None:
    from coopsgd.fileio import LOCK_FILE, lock_directory

    argv = readme_torchrun_command()
    config = _config_copy(argv, tmp_path, max_steps=2, eval_samples=100)
    out = tmp_path / "run"
    held = lock_directory(out, "run directory")  # this test's process is the other writer
    try:
        res = _run(_with(_with(argv, "--config", str(config)), "--out", str(out)), tmp_path)
    finally:
        held.release()
    assert res.returncode != 0
    ours = [ln for ln in (res.stdout + res.stderr).splitlines() if "coopsgd" in ln and "error" in ln
            and "torch/distributed" not in ln]
    assert len(ours) == 1, res.stderr[-4000:]
    assert ours[0].startswith("[default0]:coopsgd: error: ") and "in use by another coopsgd process" in ours[0], ours
    assert f"(PID {os.getpid()})" in ours[0]
    assert len(re.findall(r"exitcode\s*:\s*2", res.stderr)) >= 1, res.stderr[-4000:]
    assert [p.name for p in out.iterdir()] == [LOCK_FILE]  # nothing written beside the holder's lock file
