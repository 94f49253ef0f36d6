"""``coopsgd reproduce lsgd-nets --quick`` at a tiny scale: the real sweep, held-out losses and selection."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from coopsgd.experiments.harness import ExperimentArgs
from coopsgd.experiments.lsgd_nets import EASGD_BETAS, LSGD_LAMBDAS, run_lsgd_nets


@pytest.mark.slow  # ten real 8-step runs of LeNet (~6 s; several times that on a loaded machine)
def test_tiny_sweep_records_holdout_losses_and_reports_the_argmin(tmp_path) -> None:
    res = run_lsgd_nets(ExperimentArgs(out=tmp_path, quick=True, scale=0.02), nets=1)
    assert len(res["sweep"]) == len(EASGD_BETAS) + len(LSGD_LAMBDAS)
    for row in res["sweep"]:
        records = [json.loads(line) for line in open(Path(row["dir"]) / "metrics.jsonl")]
        assert all("holdout_loss" in r and "holdout_accuracy" in r for r in records)
        assert row["final_holdout_loss"] == records[-1]["holdout_loss"]
        assert json.loads((Path(row["dir"]) / "config.json").read_text())["holdout_fraction"] == 0.1
    for meth, key in (("LSGD", "lam"), ("EASGD", "beta")):
        rows = [r for r in res["sweep"] if r["method"] == meth]
        best = min(rows, key=lambda r: r["final_holdout_loss"])  # first of the lowest: the rule's tie-break
        assert [r["chosen"] for r in rows] == [r is best for r in rows]
        (tuned,) = [r for r in res["runs"] if r["method"].startswith(meth)]
        assert tuned["setting"] == {key: best["value"]} and tuned["dir"] == best["dir"]
        assert res["chosen"]["LeNet (stand-in for CNN-7)"][meth] == best["value"]
    assert any("<- chosen" in line for line in res["summary"])
