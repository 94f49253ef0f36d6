"""A clean run says nothing it need not say on stderr (issue 25): no Python warning from any rank of a distributed
run, no "writing the run to" line before a refusal."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

SMALL = ["--workers", "2", "--tau", "2", "--max-steps", "4", "--batch-size", "8", "--eval-samples", "50",
         "--no-tensorboard"]


@pytest.mark.slow  # starts two processes
def test_a_clean_distributed_run_prints_no_warning(tmp_path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "default"}
    # easgd: the round reads a column of the read-only mixing matrix for the elastic centre
    proc = subprocess.run([sys.executable, "-m", "coopsgd.cli", "run", "--engine", "distributed", "--preset", "easgd",
                           *SMALL,
                           "--out", str(tmp_path / "d"), "--json"], capture_output=True, text=True, env=env,
                          timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["communication_rounds"] == 2
    assert "Warning" not in proc.stderr and "warning" not in proc.stderr, proc.stderr


def test_no_run_directory_is_announced_before_a_refusal(capsys, tmp_path, monkeypatch) -> None:
    from coopsgd.cli import main

    monkeypatch.chdir(tmp_path)
    # a model that does not exist is refused while the run is built, after its directory was chosen
    assert main(["run", "--preset", "local_sgd", *SMALL, "--model", "no_such_model"]) == 2
    err = capsys.readouterr().err
    assert "writing the run" not in err and err.count("\n") == 1
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())
