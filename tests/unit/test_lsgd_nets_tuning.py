"""``lsgd-nets``' sweep: the selection by held-out loss, the seed-independent labels, the claims' rule.

The runs are replaced by made-up results (no training) so that the orchestration -- which setting wins, what
is reported, what the multi-seed runner bands -- is checked exactly and in a second.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from coopsgd.experiments import lsgd_nets
from coopsgd.experiments.harness import ExperimentArgs
from coopsgd.experiments.lsgd_nets import (
    EASGD_BETAS,
    LSGD_LAMBDAS,
    NET_METHODS,
    final_holdout_loss,
    select_by_holdout,
)


def _run(holdout: list[float | None], *, diverged: bool = False) -> dict[str, Any]:
    return {"diverged": {"step": 3, "error": "x"} if diverged else None,
            "_metrics": [{"step": i, "holdout_loss": h} for i, h in enumerate(holdout)]}


def test_selection_is_the_argmin_of_the_final_holdout_loss() -> None:
    runs = [_run([2.0, 0.9]), _run([2.0, 0.5, 0.7]), _run([2.0, 0.6]), _run([0.1, 0.4], diverged=True)]
    # the last evaluation counts (run 1 was lower earlier), a diverged run never wins
    assert [final_holdout_loss(r) for r in runs] == [0.9, 0.7, 0.6, None]
    assert select_by_holdout(runs) == 2
    assert select_by_holdout([_run([0.5]), _run([0.5])]) == 0  # ties: the earlier setting
    assert select_by_holdout([_run([None]), _run([1.0], diverged=True)]) is None
    assert select_by_holdout([_run([1.0, float("nan")]), _run([3.0])]) == 1


#: The made-up winners: seed s -> LSGD's lambda, EASGD's beta of lowest held-out loss.
def _best(seed: int) -> dict[str, float]:
    return {"lam": LSGD_LAMBDAS[seed % len(LSGD_LAMBDAS)], "beta": EASGD_BETAS[seed % len(EASGD_BETAS)]}


def _fake_run_config() -> Any:
    """A stand-in of :func:`coopsgd.experiments.harness.run_config`: LSGD's curve lies far below the others',
    the held-out loss is lowest at :func:`_best`'s settings."""

    def run_config(cfg: Any, out: Path, label: str, *, progress: bool = False,
                   extra: dict[str, Any] | None = None) -> dict[str, Any]:
        extra = dict(extra or {})
        key = "lam" if cfg.algorithm.preset == "lsgd" else "beta" if cfg.algorithm.preset == "easgd" else None
        level = {"sync": 1.0, "downpour": 1.1, "easgd": 0.9, "lsgd": 0.3}[cfg.algorithm.preset] + 0.01 * cfg.execution.seed
        hold = level + (0.0 if key is None or getattr(cfg.algorithm, key) == _best(cfg.execution.seed)[key] else 0.2)
        comm = {"sync": 0.3, "downpour": 0.4, "easgd": 0.05, "lsgd": 0.04}[cfg.algorithm.preset]
        recs = [{"step": k, "time_s": 10.0 * k, "test_loss": level + 1.0 / (k + 1), "test_accuracy": 0.5,
                 "holdout_loss": hold + 1.0 / (k + 1)} for k in range(4)]
        return {"label": label, "dir": str(out), "wall_s": 0.0, "diverged": None, **extra,
                "final": {"test_loss": recs[-1]["test_loss"], "test_accuracy": 0.5, "train_loss": 0.1},
                "time_s": 30.0, "time_source": "simulated", "simulated_time_s": 30.0,
                "simulated_split_s": {"compute_s": 30.0 * (1 - comm), "communication_s": 30.0 * comm, "idle_s": 0.0},
                "measured_split_s": None, "communication_rounds": 3, "zeta": None, "_metrics": recs}

    return run_config


def test_the_sweep_reports_tuned_curves_with_the_same_labels_on_every_seed(monkeypatch, tmp_path) -> None:
    from coopsgd.experiments.multiseed import run_seeds
    from coopsgd.experiments.stats import REPRODUCED, verdict

    monkeypatch.setattr(lsgd_nets, "run_config", _fake_run_config())
    ms = run_seeds("lsgd-nets", ExperimentArgs(out=tmp_path, quick=True), [0, 1], nets=1)
    per = ms["per_seed"]
    nets = [lsgd_nets.NETS_QUICK[0]["name"]]
    for res in per:
        s = res["seed"]
        # 2 fixed methods + 3 betas + 5 lambdas per net; the reported runs are the four methods' labels
        assert len(res["sweep"]) == len(nets) * (len(EASGD_BETAS) + len(LSGD_LAMBDAS))
        assert [r["method"] for r in res["runs"]] == [lab for lab, *_ in NET_METHODS] * len(nets)
        assert res["chosen"] == {n: {"EASGD": _best(s)["beta"], "LSGD": _best(s)["lam"]} for n in nets}
        tuned = [r for r in res["runs"] if r["preset"] == "lsgd"]
        assert all(r["setting"] == {"lam": _best(s)["lam"]} for r in tuned)
        assert all(r["chosen_from"] == f"LSGD (lambda={_best(s)['lam']:g}, tau=4)" for r in tuned)
        assert sum(row["chosen"] for row in res["sweep"]) == 2 * len(nets)
    # the winners differ between the seeds, the figures' curves do not
    assert per[0]["chosen"] != per[1]["chosen"]
    assert [r["label"] for r in per[0]["runs"]] == [r["label"] for r in per[1]["runs"]]
    assert [Path(p).name for p in per[0]["plots"]] == [Path(p).name for p in per[1]["plots"]] == [
        "lsgd_nets_lenet.png", "lsgd_nets_sweep.png"]
    assert sorted(p.name for p in tmp_path.glob("*.png")) == ["lsgd_nets_lenet.png", "lsgd_nets_sweep.png"]
    # the sweep's numbers are metrics with bands; the tuned settings too
    m = ms["metrics"]
    role = lsgd_nets.ROLE_NAMES[0]  # "CNN-7 (quick: LeNet)": the LeNet ran
    assert m[f"{role}: LSGD tuned lambda"]["min"] == 0.25 and m[f"{role}: LSGD tuned lambda"]["max"] == 0.5
    assert m[f"{role}: EASGD held-out loss, beta=0.43"]["n"] == 2
    assert len([k for k in m if "held-out loss" in k]) == len(EASGD_BETAS) + len(LSGD_LAMBDAS)
    # every claim is judged by the report's rule on those bands
    for c in ms["claims"]:
        for p in c["pairs"]:
            assert p["verdict"] == verdict(m.get(p["lower"], {"n": 0}), m.get(p["higher"], {"n": 0}))
    best = [c for c in ms["claims"] if c["paper"].startswith("LSGD reaches the lowest test loss")]
    assert [c["verdict"] for c in best] == [REPRODUCED, "not measured"]  # CNN-7 ran, ResNet-20 did not


@pytest.mark.slow  # no training, but two seeds' figures (a few seconds)
def test_dry_run_runs_one_setting_per_method(monkeypatch, tmp_path) -> None:
    monkeypatch.setattr(lsgd_nets, "run_config", _fake_run_config())
    seen: list[str] = []
    real = lsgd_nets.RunConfig

    def spy(**kw: Any) -> Any:
        seen.append(kw["preset"])
        return real(**kw)

    monkeypatch.setattr(lsgd_nets, "RunConfig", spy)
    monkeypatch.setattr(lsgd_nets, "dry_run_summary", lambda *a, **k: [])
    res = lsgd_nets.run_lsgd_nets(ExperimentArgs(out=tmp_path, dry_run=True))
    assert seen == ["sync", "downpour", "easgd", "lsgd"] * 2
    assert len(res["runs"]) == 8 and res["chosen"]["CNN-7"] == {"EASGD": EASGD_BETAS[0], "LSGD": LSGD_LAMBDAS[0]}
    seen.clear()
    res = lsgd_nets.run_lsgd_nets(ExperimentArgs(out=tmp_path / "all", dry_run=True, all_settings=True))
    assert len(seen) == 2 * (2 + len(EASGD_BETAS) + len(LSGD_LAMBDAS)) and len(res["sweep"]) == 16


def test_every_net_run_holds_out_training_data() -> None:
    fraction = lsgd_nets.HOLDOUT_FRACTION
    assert lsgd_nets._NET_TRAIN_QUICK["holdout_fraction"] == lsgd_nets._NET_TRAIN_FULL["holdout_fraction"] == fraction
    assert 0 < fraction < 1


def test_equal_time_values_are_read_off_the_curve_linearly() -> None:
    from coopsgd.experiments.lsgd_nets import loss_at_time

    run = {"_metrics": [{"time_s": 0.0, "test_loss": 2.0}, {"time_s": 10.0, "test_loss": 1.0},
                        {"time_s": 20.0, "test_loss": 0.4}]}
    assert loss_at_time(run, 10.0) == 1.0
    assert loss_at_time(run, 19.0) == pytest.approx(0.46)  # not the 10-s evaluation's 1.0
    assert loss_at_time(run, 20.0) == 0.4
    assert loss_at_time({"_metrics": []}, 5.0) is None
