"""``coopsgd reproduce fl-strategies`` (coopsgd.experiments.fl_strategies): the claims' measures on hand-made
curves, their verdicts by the report's rule, a reduced run that writes its figure and result, its dry run and
its registration."""

from __future__ import annotations

import pytest

from coopsgd.experiments import fl_strategies as fl
from coopsgd.experiments.harness import ExperimentArgs
from coopsgd.experiments.stats import CONTRADICTED, NOT_MEASURED, REPRODUCED, UNRESOLVED, aggregate


def test_variation_is_the_mean_absolute_change_over_the_second_half() -> None:
    # rounds 0..8; the second half is rounds 4..8: changes |1-3|, |3-2|, |2-2|, |2-1| -> mean 1.0
    curve = [[k, v, None] for k, v in enumerate([9.0, 7.0, 5.0, 4.0, 1.0, 3.0, 2.0, 2.0, 1.0])]
    assert fl.variation(curve) == pytest.approx(1.0)
    assert fl.variation([[0, 1.0, None], [1, None, None], [2, 2.0, None]]) is None  # fewer than three values


def test_retained_and_rounds_to() -> None:
    assert fl.retained(0.55, 0.9) == pytest.approx(0.45 / 0.8)
    assert fl.retained(0.5, 0.1) is None and fl.retained(None, 0.9) is None
    curve = [[0, 2.0, 900.0], [2, 1.0, 300.0], [4, 0.9, 150.0], [6, 0.8, 140.0]]
    assert fl.rounds_to(curve, 150.0) == 4.0
    assert fl.rounds_to(curve, 100.0) is None


def _result(*, scaffold: float, prox_wiggle: float, adam_ppl: float, mean_acc: float, adam_mid: float = 118.0
            ) -> dict:
    """A result as run_fl_strategies returns it, with curves made by hand."""
    def mlp(final: float, wiggle: float = 0.0, acc: float = 0.9) -> list:
        return [[k, final + 1.0 / (k + 1) + (wiggle if k % 2 else 0.0), acc] for k in range(10)]

    curves = {"FedAvg": mlp(0.5, 0.2), "SCAFFOLD": mlp(scaffold), "FedNova": mlp(scaffold - 0.05),
              "FedProx mu=1": mlp(0.5, prox_wiggle),
              "mean, no attack": mlp(0.3, acc=0.9), "mean, 20% sign-flip": mlp(0.3, acc=mean_acc),
              "median, 20% sign-flip": mlp(0.3, acc=0.89), "Krum, 20% sign-flip": mlp(0.3, acc=0.88),
              "LSTM FedAvg": [[0, 7.0, 900.0], [10, 5.0, 150.0], [20, 4.8, 120.0]],
              "LSTM FedAdam": [[0, 7.0, 900.0], [10, 5.0, adam_mid], [20, 4.6, adam_ppl]],
              "LSTM FedYogi": [[0, 7.0, 900.0], [10, 5.0, 119.0], [20, 4.6, 110.0]]}
    return {"runs": [{"label": k, "diverged": None} for k in curves], "curves": curves}


def test_verdicts_follow_the_rule() -> None:
    a = fl.fl_assessment()
    seeds = [_result(scaffold=0.3 + 0.01 * s, prox_wiggle=0.01 * s, adam_ppl=105.0 + s, mean_acc=0.2 + 0.05 * s)
             for s in range(3)]
    m = a.metrics(seeds[0])
    assert m["FedAvg: loss variation V (2nd half)"] > m["FedProx mu=1: loss variation V (2nd half)"]
    assert m["LSTM FedAdam: rounds to FedAvg's final perplexity"] == 10.0
    assert m["LSTM FedAvg: rounds to FedAvg's final perplexity"] == 20.0
    assert m["mean under sign-flip: accuracy retained R"] == pytest.approx(0.1 / 0.8)
    good = aggregate([a.metrics(r) for r in seeds], a)
    assert [c["verdict"] for c in good["claims"]] == [REPRODUCED] * 6
    assert any(line.startswith("seed by seed, SCAFFOLD − FedAvg") and "negative on 3 of 3 seeds" in line
               for line in good["notes"])
    # SCAFFOLD above FedAvg, FedAdam that never reaches FedAvg's final perplexity, a mean that keeps accuracy
    worse = [_result(scaffold=0.8, prox_wiggle=0.2 + 0.01 * s, adam_ppl=130.0, mean_acc=0.85,
                     adam_mid=140.0) for s in range(3)]
    agg = aggregate([a.metrics(r) for r in worse], a)
    assert [c["verdict"] for c in agg["claims"]] == [CONTRADICTED, UNRESOLVED, NOT_MEASURED, CONTRADICTED,
                                                     REPRODUCED, CONTRADICTED]
    assert any("FedAdam did not reach" in line for line in agg["notes"])


def test_reduced_run_writes_its_figure_and_result(tmp_path) -> None:
    args = ExperimentArgs(out=tmp_path / "f", quick=True, scale=0.04)  # 2 rounds of each
    res = fl.run_fl_strategies(args, only=("FedNova", "median, 20% sign-flip", "mean, no attack"))
    assert [r["label"] for r in res["runs"]] == ["FedNova", "mean, no attack", "median, 20% sign-flip"]
    assert all(r["diverged"] is None and r["communication_rounds"] == 2 for r in res["runs"])
    assert [row[0] for row in res["curves"]["FedNova"]] == [0, 1, 2]  # evaluated after every round
    assert res["runs"][0]["clients"] == {"workers": 5, "fraction": 1.0, "partition": "dirichlet",
                                         "dirichlet_beta": 0.1, "local_work": "uniform", "min_local_steps": 1}
    assert (tmp_path / "f" / "fl_strategies.png").stat().st_size > 1000
    m = fl.fl_metrics(res)
    assert m["median under sign-flip: accuracy retained R"] is not None and "Krum, 20% sign-flip" not in str(m)


def test_refusals(tmp_path) -> None:
    from coopsgd.errors import ConfigError

    with pytest.raises(ConfigError, match="only='FedNovaX' is invalid"):
        fl.run_fl_strategies(ExperimentArgs(out=tmp_path, quick=True, scale=0.01), only=("FedNovaX",))


def test_dry_run_of_the_full_scale_mlp(tmp_path) -> None:
    res = fl.run_fl_strategies(ExperimentArgs(out=tmp_path, dry_run=True), only=("FedAvg", "Krum, 20% sign-flip"))
    assert len(res["runs"]) == 2 and res["summary"][0].startswith("fl-strategies dry run: 2 steps per setting")
    lines = res["summary"][1:]
    assert all("checkpoint.pt at step 2 reloaded" in line for line in lines)
    assert "20 workers" in lines[0] and "50 workers" in lines[1]
    assert all(r["communication_rounds"] == 1 for r in res["runs"])  # tau 10 cut to 2: one round


def test_registered_for_reproduce_and_its_dry_run() -> None:
    from coopsgd.catalog import REPRODUCTIONS
    from coopsgd.experiments.registry import ASSESSMENTS, DRY_RUNS, EXPERIMENTS
    from coopsgd.experiments.report import REPORT_ORDER

    assert "fl-strategies" in EXPERIMENTS and "fl-strategies" in ASSESSMENTS and "fl-strategies" in REPRODUCTIONS
    assert "fl-strategies" in DRY_RUNS and "fl-strategies" in REPORT_ORDER


def test_reproduce_help_lists_it(capsys) -> None:
    from coopsgd.cli import main

    with pytest.raises(SystemExit):
        main(["reproduce", "--help"])
    assert "fl-strategies" in capsys.readouterr().out
