"""[CSGD] Fig. 6's cost model: per-step prices from the simulated clock's alpha-beta formula, the decomposition
time ratio = per-step ratio x step ratio, and its lines in the generated report."""

from __future__ import annotations

import json

import numpy as np
import pytest

from coopsgd.engines.simulator.clock import SimClock
from coopsgd.experiments.csgd import base_config
from coopsgd.experiments.csgd_fig6 import (
    FIG6_TARGETS,
    comm_ratio_for,
    fig6_cost_model,
    fig6_decomposition,
    fig6_metrics,
    fig6_paper_setting,
    per_step_ratio,
    vgg16_train_flops,
)
from coopsgd.theory.cost import ComputeModel, NetworkModel
from coopsgd.topology import mixing_matrix

RING = mixing_matrix("ring", 8, "best_constant").matrix
#: MLP 784-200-200-10 (quick scale): weights and biases
D_MLP = 784 * 200 + 200 + 200 * 200 + 200 + 200 * 10 + 10


def _quick_cfg(**kw):
    return base_config(True, 0, preset="dpsgd", topology="ring", weights="best_constant", **kw)


def test_per_step_ratio_matches_the_alpha_beta_closed_form() -> None:
    cm = fig6_cost_model(_quick_cfg(), params=D_MLP, ring=RING, compute_s=0.1)
    lat, bps = 2e-3, 100e6 / 8  # quick network: 2 ms, 100 Mbit/s
    ring = 2 * lat + (2 * D_MLP * 2) * 4 / bps  # a ring node: 2 handshakes, 2d floats per neighbour
    allreduce = 8 * lat + (2 * D_MLP) * 4 / bps  # [CSGD] Table 3: m handshakes, 2d floats
    assert cm["ring_round_s"] == pytest.approx(ring, rel=1e-12)
    assert cm["allreduce_round_s"] == pytest.approx(allreduce, rel=1e-12)
    assert cm["per_step_s"] == pytest.approx({"sync": 0.1 + allreduce, "D-PSGD": 0.1 + ring,
                                              "periodic": 0.1 + ring / 10})
    assert cm["per_step_ratio"] == pytest.approx((0.1 + ring) / (0.1 + ring / 10), rel=1e-12)
    assert cm["per_step_ratio"] == pytest.approx(per_step_ratio(ring / 0.1, 10), rel=1e-12)
    assert cm["per_step_ratio"] == pytest.approx(2.8514, abs=1e-4)
    # 4x per step needs r = (4 - 1) / (1 - 4/10) = 5; r and the ratio are inverse maps; tau bounds the ratio
    assert comm_ratio_for(4.0, 10) == pytest.approx(5.0) and cm["comm_compute_for_paper_ratio"] == pytest.approx(5.0)
    for r in (0.0, 0.3, 2.59, 40.0):
        assert comm_ratio_for(per_step_ratio(r, 10), 10) == pytest.approx(r, abs=1e-9)
    assert comm_ratio_for(10.0, 10) is None and per_step_ratio(1e9, 10) < 10
    # the bandwidth it names gives exactly 4x per step on the same clock
    bw = cm["bandwidth_mbps_for_paper_ratio"]
    at_bw = fig6_cost_model(_quick_cfg(net_bandwidth_mbps=bw), params=D_MLP, ring=RING, compute_s=0.1)
    assert at_bw["per_step_ratio"] == pytest.approx(4.0, rel=1e-9)


def test_paper_setting_prices_vgg16_on_40_gbit() -> None:
    # conv multiply-adds of the CIFAR VGG-16 (32x32 input): 313.2M plus the 512x10 head; x2 (FLOPs) x3 (fwd+bwd)
    convs = [(32, 3, 64), (32, 64, 64), (16, 64, 128), (16, 128, 128), (8, 128, 256), (8, 256, 256),
             (8, 256, 256), (4, 256, 512), (4, 512, 512), (4, 512, 512), (2, 512, 512), (2, 512, 512), (2, 512, 512)]
    macs = sum(hw * hw * ci * co * 9 for hw, ci, co in convs) + 512 * 10
    assert vgg16_train_flops() == 6.0 * macs
    p = fig6_paper_setting(RING)
    assert p["params"] == 14_728_266  # the project's VGG-16 (BN, one linear head)
    c = 128 * 6.0 * macs / (p["assumed_tflops"] * 1e12)
    ring = 2 * 1e-4 + 4 * p["params"] * 4 / (40e9 / 8)
    assert p["compute_s"] == pytest.approx(c) and p["ring_round_s"] == pytest.approx(ring)
    assert p["per_step_ratio"] == pytest.approx((c + ring) / (c + ring / 10))
    # the line rate at which the ring round is 5 x the compute (4x per step): 16d bytes in 5c - 2 latencies
    assert p["bandwidth_mbps_for_paper_ratio"] == pytest.approx(16 * p["params"] / (5 * c - 2e-4) * 8 / 1e6)


def test_clock_time_is_steps_times_per_step_seconds_so_the_ratios_multiply() -> None:
    """The identity behind the decomposition, on the clock itself: evaluated at the end of a round, the
    simulated time after k steps is k x the cost model's seconds per step, for D-PSGD and for tau = 10."""
    cfg = _quick_cfg()
    cm = fig6_cost_model(cfg, params=D_MLP, ring=RING, compute_s=0.1)
    net = NetworkModel.from_mbps(cfg.clock.net_latency_ms, cfg.clock.net_bandwidth_mbps)
    elapsed = {}
    for name, tau, steps in (("D-PSGD", 1, 130), ("periodic", 10, 170)):
        clock = SimClock(net, ComputeModel(mean_s=0.1)).bind(8, D_MLP, 4.0)
        for k in range(1, steps + 1):
            clock.add_compute(None)
            if k % tau == 0:
                clock.communicate(clock.round_costs("neighbor", RING))
        elapsed[name] = clock.elapsed
        assert clock.elapsed == pytest.approx(steps * cm["per_step_s"][name], rel=1e-12)
    step_ratio = 130 / 170
    assert elapsed["D-PSGD"] / elapsed["periodic"] == pytest.approx(cm["per_step_ratio"] * step_ratio, rel=1e-12)
    # fig6_decomposition multiplies the same numbers
    runs = [{"steps_to_targets": {f"{t:g}": s for t in FIG6_TARGETS}} for s in (130.0, 170.0)]
    ratios = {f"{t:g}": elapsed["D-PSGD"] / elapsed["periodic"] for t in FIG6_TARGETS}
    dec = fig6_decomposition(runs[0], runs[1], ratios, cm)
    for d in dec.values():
        assert d["step_ratio"] == pytest.approx(step_ratio)
        assert d["per_step_x_step_ratio"] == pytest.approx(d["time_ratio"], rel=1e-12)


def _fig6_result(steps: tuple[float, float], cm: dict, paper: dict) -> dict:
    """A per-seed Fig. 6 result with the keys fig6_metrics reads (times from the cost model)."""
    runs = []
    for nm, s in zip(("sync", "D-PSGD", "periodic"), (steps[0], *steps), strict=True):
        runs.append({"final": {"train_loss": 0.05},
                     "steps_to_targets": {f"{t:g}": s for t in FIG6_TARGETS},
                     "time_to_targets_s": {f"{t:g}": s * cm["per_step_s"][nm] for t in FIG6_TARGETS}})
    ratios = {k: runs[1]["time_to_targets_s"][k] / runs[2]["time_to_targets_s"][k] for k in runs[1]["steps_to_targets"]}
    return {"runs": runs, "time_to_target_ratios": ratios, "cost_model": cm, "paper_cost_model": paper,
            "decomposition": fig6_decomposition(runs[1], runs[2], ratios, cm)}


def test_report_renders_the_cost_model_lines(tmp_path) -> None:
    from coopsgd.experiments.registry import ASSESSMENTS
    from coopsgd.experiments.report import render_report
    from coopsgd.experiments.stats import aggregate

    cm = fig6_cost_model(_quick_cfg(), params=D_MLP, ring=RING, compute_s=0.1)
    paper = fig6_paper_setting(RING)
    per_seed = [fig6_metrics(_fig6_result(s, cm, paper)) for s in ((300.0, 400.0), (310.0, 380.0))]
    agg = aggregate(per_seed, ASSESSMENTS["csgd-fig6"])
    assert agg["paper_table"][0]["quantity"].startswith("D-PSGD / periodic time to training loss 0.1")
    step_mean = np.mean([300 / 400, 310 / 380])
    key = "D-PSGD / periodic time to loss 0.1"
    assert agg["metrics"][key]["mean"] == pytest.approx(cm["per_step_ratio"] * step_mean)
    data = {"experiment": "csgd-fig6", "description": "fixture", "quick": True, "seeds": [0, 1], **agg}
    (tmp_path / "csgd-fig6").mkdir()
    (tmp_path / "csgd-fig6" / "result.json").write_text(json.dumps(data))
    text = render_report(tmp_path, machine="m").read_text()
    per = cm["per_step_ratio"]
    assert (f"- loss 0.1: time ratio = per-step ratio x step ratio = {per:.2f} x {step_mean:.3f} = "
            f"{per * step_mean:.2f} (measured {per * step_mean:.2f}x)") in text
    assert "ring round 259 ms" in text and "D-PSGD / periodic 2.85x per step" in text
    assert f"D-PSGD / periodic {paper['per_step_ratio']:.2f}x per step" in text  # the paper's setting
    assert f"needs an effective {paper['bandwidth_mbps_for_paper_ratio'] / 1e3:.1f} Gbit/s, not 40" in text
    assert "a 4x per-step ratio at tau=10 needs r = (4 - 1) / (1 - 4/10) = 5.00 (our clock: a 51 Mbit/s" in text
    assert "| D-PSGD / periodic time to training loss 0.1 (the paper's target) | about 4x (Fig. 6) |" in text


@pytest.mark.slow
def test_fig6_run_decomposes_its_time_ratio(tmp_path) -> None:
    """A reduced quick run: at every target both runs reach, the measured D-PSGD / periodic time ratio equals
    the cost model's per-step ratio x the measured step ratio (evaluations fall at the ends of rounds)."""
    from coopsgd.experiments.harness import ExperimentArgs
    from coopsgd.experiments.registry import EXPERIMENTS

    res = EXPERIMENTS["csgd-fig6"].run(ExperimentArgs(out=tmp_path, quick=True, scale=0.2))
    cm = res["cost_model"]
    assert cm["params"] == D_MLP and cm["compute_s"] == pytest.approx(0.1)
    assert cm["per_step_ratio"] == pytest.approx(fig6_cost_model(_quick_cfg(), params=D_MLP, ring=RING,
                                                                 compute_s=0.1)["per_step_ratio"])
    reached = [d for d in res["decomposition"].values() if d["time_ratio"] is not None]
    assert reached, res["decomposition"]
    for d in reached:
        assert d["per_step_x_step_ratio"] == pytest.approx(d["time_ratio"], rel=1e-9)
    for r, nm in zip(res["runs"], ("sync", "D-PSGD", "periodic"), strict=True):
        for t, s in r["steps_to_targets"].items():
            if s is not None:
                assert r["time_to_targets_s"][t] == pytest.approx(s * cm["per_step_s"][nm], rel=1e-9)
    assert any(line.startswith("  loss 0.5: time ratio = per-step ratio x step ratio") for line in res["summary"])
    assert res["target_loss"] == 0.1 and res["paper_cost_model"]["tau"] == 10
