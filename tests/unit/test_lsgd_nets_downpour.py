"""``lsgd-nets``' DOWNPOUR baseline: its own learning rate (lr / m) and, on the quick scale's constant simulated
clock, the schedule's seeded push order; the finding is printed in the report; the nets are named by what ran.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from coopsgd.experiments import lsgd_nets
from coopsgd.experiments.harness import ENGINE, ExperimentArgs, time_fields
from coopsgd.experiments.registry import ASSESSMENTS


def _configs(monkeypatch, tmp_path: Path, *, quick: bool, engine: str = "simulate") -> dict[str, Any]:
    """The RunConfig of every method of the first net (no training: run_config is replaced)."""
    seen: dict[str, Any] = {}

    def fake(cfg: Any, out: Path, label: str, **kw: Any) -> dict[str, Any]:
        seen[cfg.algorithm.preset] = cfg
        return {"label": label}

    monkeypatch.setattr(lsgd_nets, "run_config", fake)
    args = ExperimentArgs(out=tmp_path, quick=quick)
    base = dict(lsgd_nets._NET_TRAIN_QUICK if quick else lsgd_nets._NET_TRAIN_FULL)
    net = (lsgd_nets.NETS_QUICK if quick else lsgd_nets.NETS_FULL)[0]
    token = ENGINE.set(engine)
    try:
        for _, preset, kw, _key, _grid in lsgd_nets.NET_METHODS:
            lsgd_nets._run_net(args, tmp_path, net, base, [], preset, dict(kw), {}, preset, preset)
    finally:
        ENGINE.reset(token)
    return seen


def test_downpour_runs_at_lr_over_m_in_the_seeded_order_on_a_constant_clock(monkeypatch, tmp_path) -> None:
    assert time_fields(True)["compute"] == "constant"
    cfgs = _configs(monkeypatch, tmp_path, quick=True)
    quick = lsgd_nets._NET_TRAIN_QUICK
    assert cfgs["downpour"].schedule.lr == quick["lr"] / quick["workers"] == 0.025
    assert cfgs["downpour"].algorithm.downpour_order == "schedule"
    assert cfgs["downpour"].algorithm.tau == 4
    for preset in ("sync", "easgd", "lsgd"):  # the other methods keep the experiment's learning rate
        assert cfgs[preset].schedule.lr == quick["lr"]


def test_measured_clocks_and_the_distributed_engine_keep_the_arrival_order(monkeypatch, tmp_path) -> None:
    full = _configs(monkeypatch, tmp_path / "full", quick=False)
    assert full["downpour"].schedule.lr == lsgd_nets._NET_TRAIN_FULL["lr"] / lsgd_nets._NET_TRAIN_FULL["workers"]
    assert full["downpour"].algorithm.downpour_order == "clock"  # measured compute: the clock's order is real
    dist = lsgd_nets.downpour_settings(lsgd_nets._NET_TRAIN_QUICK, constant_clock=False)
    assert dist == {"lr": 0.025}


def test_the_finding_is_in_the_report_and_the_nets_are_named_by_what_ran() -> None:
    assessment = ASSESSMENTS["lsgd-nets"]
    notes = assessment.notes({})
    assert notes == [lsgd_nets.DOWNPOUR_FINDING] and "lr / m" in notes[0] and "lowest index" in notes[0]
    assert lsgd_nets.ROLE_NAMES == ["CNN-7 (quick: LeNet)", "ResNet-20 (quick: MLP)"]
    assert [n["name"] for n in lsgd_nets.NETS_QUICK] == ["LeNet (stand-in for CNN-7)", "MLP (stand-in for ResNet-20)"]
    rows = [row.quantity for row in assessment.paper]
    assert rows and all(r.startswith(tuple(lsgd_nets.ROLE_NAMES)) for r in rows)
    # a quick result's metrics carry the role names (the LeNet's numbers are not called CNN-7's alone)
    res = {"communication_table": [{"net": "LeNet (stand-in for CNN-7)", "method": "DOWNPOUR (lr/m, tau=4)",
                                    "communication_fraction": 0.3}],
           "runs": [{"net": "LeNet (stand-in for CNN-7)", "method": "DOWNPOUR (lr/m, tau=4)", "diverged": None,
                     "final": {"test_loss": 0.4}}],
           "test_loss_at_equal_time": {"LeNet (stand-in for CNN-7)": {"DOWNPOUR (lr/m, tau=4)": 0.5}}}
    m = lsgd_nets.nets_metrics(res)
    assert m == {"CNN-7 (quick: LeNet): DOWNPOUR test loss at equal time": 0.5,
                 "CNN-7 (quick: LeNet): DOWNPOUR final test loss": 0.4,
                 "CNN-7 (quick: LeNet): DOWNPOUR communication fraction": 0.3}
