"""The README's torchrun recipe, run as written (2 processes): the command is read from README.md, so this
test breaks when the README changes.

Only launcher options are added to the README's command: ``--standalone`` (a free rendezvous port) and
``--log-dir``/``--tee 3`` (torchrun prefixes each rank's lines with ``[default<local rank>]:``, which shows
who printed what). The config is a copy of the README's example with a short ``max_steps``, and ``--out``
points into the test's directory.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch.distributed.run", reason="torchrun (torch.distributed.run) is not importable")

from coopsgd.train.config import load_config  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
JOB_TIMEOUT_S = 120  # a healthy job takes about 5-10 s on 2 cores


def readme_torchrun_command() -> list[str]:
    """The README's single-machine torchrun command (its first ``torchrun --nproc-per-node`` line)."""
    lines = [ln.strip() for ln in (ROOT / "README.md").read_text().splitlines()]
    found = [ln for ln in lines if ln.startswith("torchrun --nproc-per-node")]
    assert found, "README.md has no `torchrun --nproc-per-node ...` command"
    return shlex.split(found[0].split("#")[0])


def _option(argv: list[str], name: str) -> str:
    assert name in argv, f"the README's torchrun command has no {name}: {argv}"
    return argv[argv.index(name) + 1]


def _with(argv: list[str], name: str, value: str) -> list[str]:
    out = list(argv)
    out[out.index(name) + 1] = value
    return out


def _run(argv: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    assert argv[0] == "torchrun"
    src = str(ROOT / "src")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH", "")) if p)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--log-dir", str(tmp_path / "logs"),
           "--tee", "3", *argv[1:]]
    # a session of its own, so that a job past its time limit is killed with every rank it started
    proc = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=JOB_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail(f"torchrun did not finish in {JOB_TIMEOUT_S} s; stderr tail:\n{stderr[-4000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def _config_copy(argv: list[str], tmp_path: Path, **changes: object) -> Path:
    """The README's example config, with ``changes`` appended (later TOML keys cannot repeat: rewrite); a
    ``max_steps`` replaces the file's ``epochs`` (a run refuses both)."""
    src = ROOT / _option(argv, "--config")
    assert src.is_file(), f"the README's torchrun config {src} does not exist"
    drop = {*changes, *(("epochs",) if "max_steps" in changes else ())}
    text = "\n".join(ln for ln in src.read_text().splitlines()
                     if not any(re.match(rf"\s*{k}\s*=", ln) for k in drop))
    text += "\n" + "\n".join(f"{k} = {json.dumps(v)}" for k, v in changes.items()) + "\n"
    dst = tmp_path / src.name
    dst.write_text(text)
    return dst


def test_readme_recipe_matches_its_config() -> None:
    argv = readme_torchrun_command()
    assert _option(argv, "-m") == "coopsgd.torchrun"
    config = load_config(ROOT / _option(argv, "--config"))
    assert int(_option(argv, "--nproc-per-node")) == config["workers"], \
        "the README's --nproc-per-node must equal the example config's workers"
    assert "--nnodes" not in argv


@pytest.mark.slow
def test_readme_torchrun_recipe_runs_with_two_processes(tmp_path) -> None:
    argv = readme_torchrun_command()
    assert _option(argv, "--nproc-per-node") == "2"
    config = _config_copy(argv, tmp_path, max_steps=8, eval_samples=200)
    out = tmp_path / "run"
    res = _run(_with(_with(argv, "--config", str(config)), "--out", str(out)), tmp_path)
    assert res.returncode == 0, res.stderr[-4000:]
    json_lines = [ln for ln in res.stdout.splitlines() if ln.split(":", 1)[-1].startswith("{")]
    assert len(json_lines) == 1, res.stdout  # one rank printed the summary ...
    prefix, line = json_lines[0].split(":", 1)
    assert prefix == "[default0]", json_lines  # ... rank 0
    head = json.loads(line)
    assert head["status"] == "ok" and head["workers"] == 2 and head["steps"] == 8
    assert head["out"] == str(out)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "ok" and summary["engine"] == "distributed" and summary["workers"] == 2
    assert summary["final"] == head["final"] and summary["final"]["test_accuracy"] > 0.2
    assert (out / "checkpoint.pt").is_file() and (out / "metrics.jsonl").is_file()
    assert "Traceback" not in res.stderr


@pytest.mark.slow
def test_workers_mismatch_is_one_line_from_rank_0(tmp_path) -> None:
    argv = readme_torchrun_command()
    config = _config_copy(argv, tmp_path, workers=3, max_steps=2)
    out = tmp_path / "run"
    res = _run(_with(_with(argv, "--config", str(config)), "--out", str(out)), tmp_path)
    assert res.returncode != 0
    ours = [ln for ln in (res.stdout + res.stderr).splitlines() if "coopsgd" in ln and "error" in ln
            and "torch/distributed" not in ln]
    assert len(ours) == 1, res.stderr[-4000:]
    assert ours[0].startswith("[default0]:coopsgd: error: workers=3 is invalid"), ours
    assert "torchrun started 2 processes" in ours[0]
    assert "[coopsgd rank" not in res.stderr
    # torchrun's agent prints its own report (ChildFailedError), but no rank printed a traceback of ours
    assert not re.search(r'File ".*coopsgd[/\\]', res.stderr), res.stderr[-4000:]
    assert not out.exists()


@pytest.mark.slow
def test_a_check_that_fails_on_rank_0_only_is_one_line_and_no_hang(tmp_path) -> None:
    """Rank 0 alone checks the run directory: the ranks agree on the outcome before their first collective,
    so rank 0 prints the one line and every rank exits at once (before, rank 1 waited in a collective)."""
    argv = readme_torchrun_command()
    config = _config_copy(argv, tmp_path, max_steps=2)
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("not coopsgd's\n")
    res = _run(_with(_with(argv, "--config", str(config)), "--out", str(out)), tmp_path)
    assert res.returncode != 0
    ours = [ln for ln in (res.stdout + res.stderr).splitlines() if "coopsgd" in ln and "error" in ln
            and "torch/distributed" not in ln]
    assert len(ours) == 1, res.stderr[-4000:]
    assert ours[0].startswith("[default0]:coopsgd: error: ") and "notes.txt" in ours[0], ours
    assert "[coopsgd rank" not in res.stderr
    assert not re.search(r'File ".*coopsgd[/\\]', res.stderr), res.stderr[-4000:]
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_ranks_agree_on_the_lowest_failing_rank(monkeypatch) -> None:
    """agree_on_checks with the all_gather faked: what each rank raises for given per-rank outcomes."""
    import torch.distributed as dist

    from coopsgd.errors import ConfigError
    from coopsgd.train.distributed import RankCheckError, agree_on_checks, check_outcome

    def outcome(rank: int, errors: dict[int, BaseException]) -> BaseException | None:
        def gather(found: list, mine: object) -> None:
            found[:] = [check_outcome(errors.get(r)) for r in range(3)]  # what each rank sends
            assert found[rank] == mine

        monkeypatch.setattr(dist, "all_gather_object", gather)
        try:
            agree_on_checks(rank, 3, errors.get(rank))
        except BaseException as exc:  # noqa: BLE001 -- the outcome under test
            return exc
        return None

    assert all(outcome(r, {}) is None for r in range(3))
    # rank 0's check alone failed (it checks the run directory): every rank raises it, unprefixed
    err = ConfigError.invalid("out", "d", "holds another run")
    for r in range(3):
        exc = outcome(r, {0: err})
        assert isinstance(exc, RankCheckError) and exc.rank == 0 and exc.field == "out"
        assert str(exc) == "out='d' is invalid: holds another run"
    # ranks 1 and 2 failed (a missing local GPU): the lowest one is named
    gpu = {1: ConfigError.invalid("device", "cuda", "local rank 1 needs\nits own GPU"),
           2: ConfigError.invalid("device", "cuda", "local rank 0 needs its own GPU")}
    for r in range(3):
        exc = outcome(r, gpu)
        assert isinstance(exc, RankCheckError) and exc.rank == 1
        assert str(exc) == "rank 1: device='cuda' is invalid: local rank 1 needs its own GPU"  # one line
    # a bug on rank 2: rank 2 keeps its own exception (and traceback), the others name it
    bug = {2: KeyError("x")}
    assert isinstance(outcome(2, bug), KeyError)
    exc = outcome(0, bug)
    assert isinstance(exc, RankCheckError) and str(exc) == "rank 2: KeyError: 'x'"
