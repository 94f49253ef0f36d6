"""The CLI contract: JSON fields, numbers that match closed forms, and one-line errors for bad flags."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys

import numpy as np
import pytest

from coopsgd.cli import main


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def run_json(capsys, *argv: str) -> dict:
    code, out, err = run_cli(capsys, *argv)
    assert code == 0, err
    return json.loads(out)


def test_topology_ring_json_matches_closed_form(capsys) -> None:
    data = run_json(capsys, "topology", "ring", "--workers", "8", "--weights", "metropolis", "--json")
    assert data["zeta"] == pytest.approx(1 / 3 + 2 / 3 * math.cos(2 * math.pi / 8))
    assert data["spectral_gap"] == pytest.approx(1 - data["zeta"])
    expected = sorted((1 / 3 + 2 / 3 * math.cos(2 * math.pi * j / 8) for j in range(8)), reverse=True)
    assert data["eigenvalues"] == pytest.approx(expected)


def test_topology_plot_and_time_varying(capsys, tmp_path, saved_figures, check_png) -> None:
    from coopsgd.topology import mixing_matrix

    plot = tmp_path / "ring.png"
    code, out, _ = run_cli(capsys, "topology", "torus", "--workers", "9", "--plot", str(plot))
    assert code == 0 and "zeta" in out
    check_png(plot)
    # the figure draws the 3 x 3 torus: its matrix as the heatmap, 18 edges (4 neighbours per node), its zeta
    W = mixing_matrix("torus", 9)
    [fig] = saved_figures
    np.testing.assert_array_equal(fig.axes[1].images[0].get_array(), W.matrix)
    assert len(fig.axes[0].lines) == 18 and f"\u03b6 = {W.zeta:.4f}" in fig._suptitle.get_text()
    data = run_json(capsys, "topology", "one_peer_exponential", "--workers", "8", "--json")
    assert data["time_varying"] and len(data["rounds"]) == 3
    assert data["zeta_of_product"] == pytest.approx(0.0, abs=1e-12)


def test_topology_custom_matrix_file(capsys, tmp_path) -> None:
    f = tmp_path / "w.csv"
    f.write_text("0.5,0.5\n0.5,0.5\n")
    data = run_json(capsys, "topology", "custom", "--matrix", str(f), "--json")
    assert data["zeta"] == pytest.approx(0.0, abs=1e-12)


def test_theory_easgd_best_alpha(capsys) -> None:
    data = run_json(capsys, "theory", "--preset", "easgd", "--workers", "8", "--json")
    assert data["best_alpha"] == pytest.approx(2 / 10)
    assert data["zeta"] == pytest.approx(8 / 10)
    assert data["alpha_limit"] == pytest.approx(2 / 9)
    data = run_json(capsys, "theory", "--preset", "easgd", "--workers", "8", "--alpha", "0.1125", "--json")
    assert data["zeta"] == pytest.approx(max(abs(1 - 0.1125), abs(1 - 9 * 0.1125)))


def test_theory_bounds_and_step_size_condition(capsys) -> None:
    base = ["theory", "--preset", "local_sgd", "--workers", "4", "--tau", "4", "--L", "1", "--sigma2", "1",
            "--steps", "1000", "--f-gap", "1", "--json"]
    ok = run_json(capsys, *base, "--lr", "0.01")
    t1 = ok["bounds"]["theorem1"]
    assert t1["condition_holds"] is True
    # W = J, v = 0: network term = lr^2 L^2 sigma^2 (tau - 1)
    assert t1["terms"]["network_error"] == pytest.approx(0.01**2 * 3)
    assert t1["total"] == pytest.approx(ok["bounds"]["corollary2"]["total"])
    bad = run_json(capsys, *base, "--lr", "1.0")
    assert bad["bounds"]["theorem1"]["condition_holds"] is False


def test_theory_dpsgd_ring_and_elastic_generalised(capsys) -> None:
    data = run_json(capsys, "theory", "--preset", "dpsgd", "--workers", "8", "--topology", "ring",
                    "--weights", "metropolis", "--json")
    z = 1 / 3 + 2 / 3 * math.cos(2 * math.pi / 8)
    assert data["zeta"] == pytest.approx(z)
    data = run_json(capsys, "theory", "--preset", "generalized_elastic", "--workers", "8", "--topology", "ring", "--json")
    assert data["best_alpha"] == pytest.approx((1 + z) / (9 + z))
    assert data["zeta"] == pytest.approx(8 * z / (9 + z))


def test_theory_heatmap(capsys, tmp_path, saved_figures, check_png) -> None:
    out = tmp_path / "heat.png"
    code, printed, err = run_cli(capsys, "theory", "heatmap", "--out", str(out), "--max-tau", "6", "--circle", "4:0.5",
                                 "--circle", "1:0", "--json")
    assert code == 0, err
    assert json.loads(printed) == {"plot": str(out)}
    check_png(out, size=(1024, 768))  # 6.4 x 4.8 in at 160 dpi
    [fig] = saved_figures
    ax = fig.axes[0]
    assert "tau" in ax.get_xlabel() and "zeta" in ax.get_ylabel()
    # the colour grid is the closed form (1 + zeta^2) / (1 - zeta^2) tau - 1 over tau = 1..6, zeta = 0..0.95
    [mesh] = ax.collections
    taus, zetas = np.arange(1, 7), np.linspace(0.0, 0.95, 20)
    expected = (1 + zetas[:, None] ** 2) / (1 - zetas[:, None] ** 2) * taus[None, :] - 1
    np.testing.assert_allclose(np.asarray(mesh.get_array()).reshape(20, 6), expected, rtol=1e-12, atol=1e-12)
    # each --circle is one red ring at (tau, zeta), labelled with its coordinates, in the order given
    rings = [line for line in ax.lines if line.get_marker() == "o"]
    assert [(list(r.get_xdata()), list(r.get_ydata())) for r in rings] == [([4.0], [0.5]), ([1.0], [0.0])]
    assert all(r.get_markeredgecolor() == "red" and r.get_markerfacecolor() == "none" for r in rings)
    labels = [(t.get_text(), tuple(t.xy)) for t in ax.texts]
    assert labels == [("\u03c4=4, \u03b6=0.5", (4.0, 0.5)), ("\u03c4=1, \u03b6=0", (1.0, 0.0))]
    # without --circle: no ring, no label
    assert run_cli(capsys, "theory", "heatmap", "--out", str(tmp_path / "plain.png"))[0] == 0
    assert not saved_figures[1].axes[0].lines and not saved_figures[1].axes[0].texts


def test_reproduce_lsgd_toy(capsys, tmp_path, check_png) -> None:
    data = run_json(capsys, "reproduce", "lsgd-toy", "--out", str(tmp_path), "--json")
    assert set(data) >= {"easgd", "lsgd"}
    assert len(data["easgd"]["workers"]) == 4 and len(data["lsgd"]["workers"]) == 4
    # the leader reaches the global minimum of sin(pi r)/(pi r) (about -0.2172); EASGD's z does not
    assert data["lsgd"]["final_objective"] == pytest.approx(-0.2172, abs=1e-3)
    assert data["lsgd"]["final_objective"] < data["easgd"]["final_objective"]
    assert data["settings"]["easgd_alpha"] == pytest.approx(0.43 / 4)
    assert data["plots"]
    for p in data["plots"]:
        check_png(tmp_path / p.split("/")[-1])  # a readable PNG, not blank


def test_reproduce_matrix_completion_small(capsys, tmp_path, check_png) -> None:
    data = run_json(capsys, "reproduce", "matrix-completion", "--quick", "--ranks", "1,3", "--trials", "2",
                    "--steps", "80", "--d", "40", "--out", str(tmp_path), "--json")
    for r in ("1", "3"):
        assert len(data["lsgd"][r]["values"]) == 2
        assert data["lsgd"][r]["mean"] < data["easgd"][r]["mean"]
    check_png(tmp_path / "matrix_completion.png")


def test_run_reference_and_compare(capsys, tmp_path, saved_figures, check_runs_figure) -> None:
    data = run_json(capsys, "run", "--engine", "reference", "--preset", "easgd", "--workers", "4", "--objective", "quadratic",
                    "--steps", "40", "--lr", "0.1", "--out", str(tmp_path / "r"), "--json")
    assert data["communication_rounds"] == 40
    assert data["simulated_time_s"] > 0
    lines = (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()
    assert json.loads(lines[0])["step"] == 0
    data = run_json(capsys, "compare", "--engine", "reference", "--presets", "sync,local_sgd,dpsgd", "--workers", "4", "--tau", "4",
                    "--objective", "logistic", "--steps", "60", "--out", str(tmp_path / "c"), "--json")
    res = data["results"]
    assert res["local_sgd"]["communication_rounds"] == 15 and res["sync"]["communication_rounds"] == 60
    # fewer rounds, less simulated time on the same network
    assert res["local_sgd"]["simulated_time_s"] < res["sync"]["simulated_time_s"]
    assert (tmp_path / "c" / "compare.png").exists()
    names = ["sync", "local_sgd", "dpsgd"]
    check_runs_figure(saved_figures[-1], [tmp_path / "c" / n for n in names], names)  # logistic: test accuracy


BAD_FLAGS = [
    (["topology", "hypercube", "--workers", "6"], "workers"),
    (["topology", "moebius"], "topology"),
    (["topology", "ring", "--weights", "magic"], "weights"),
    (["topology", "custom"], "--matrix"),
    (["topology", "custom", "--matrix", "/nonexistent/w.npy"], "w.npy"),
    (["topology", "ring", "--workers", "0"], "workers"),
    (["theory", "--preset", "gossip"], "preset"),
    (["theory", "--preset", "local_sgd", "--tau", "0"], "tau"),
    (["theory", "--preset", "local_sgd", "--alpha", "0.1"], "--alpha"),
    (["theory", "--preset", "easgd", "--alpha", "0.3", "--strict"], "alpha"),
    (["theory", "--preset", "local_sgd", "--L", "1"], "--sigma2"),
    (["theory", "--preset", "local_sgd", "--L", "-1", "--sigma2", "1", "--lr", "0.1", "--steps", "10",
      "--f-gap", "1"], "L"),
    (["theory", "heatmap"], "--out"),
    (["theory", "heatmap", "--out", "x.gif"], "path"),
    (["theory", "heatmap", "--out", "x.png", "--circle", "bad"], "--circle"),
    (["theory"], "--preset"),
    (["reproduce", "cifar-everything"], "invalid choice"),
    (["reproduce", "matrix-completion", "--ranks", "1,x"], "ranks"),
    (["run", "--engine", "warp"], "engine"),
    (["run", "--steps", "0"], "steps"),
    (["run", "--lr", "-1"], "lr"),
    (["run", "--preset", "fedavg", "--fraction", "2"], "fraction"),
    (["compare", "--presets", "sync,nope"], "--presets"),
    (["run", "--no-such-flag"], "unrecognized"),
]


@pytest.mark.parametrize("argv,needle", BAD_FLAGS, ids=[" ".join(a) for a, _ in BAD_FLAGS])
def test_bad_flags_give_one_line_error(capsys, argv, needle) -> None:
    code, out, err = run_cli(capsys, *argv)
    assert code == 2
    assert needle in err
    assert "Traceback" not in err
    assert err.strip().count("\n") == 0, err


@pytest.mark.slow
def test_console_script_entry_point() -> None:
    exe = shutil.which("coopsgd")
    cmd = [exe] if exe else [sys.executable, "-m", "coopsgd.cli"]
    res = subprocess.run([*cmd, "theory", "--preset", "easgd", "--workers", "4", "--json"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["best_alpha"] == pytest.approx(2 / 6)
