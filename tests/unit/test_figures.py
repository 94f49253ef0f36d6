"""What the figures show: no invented values on a log axis, one colour per run, readable log-axis labels, a
torus on its grid, the resolution.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("matplotlib")

from coopsgd import plots  # noqa: E402
from coopsgd.topology import mixing_matrix  # noqa: E402
from coopsgd.topology import plot as topo_plot  # noqa: E402


def _run(path: Path, preset: str, consensus: list[float]) -> Path:
    path.mkdir(parents=True)
    recs = [{"step": 2 * k, "train_loss": 2.0 - 0.1 * k, "test_loss": 2.1 - 0.1 * k, "test_accuracy": 0.1 * k, "consensus_distance": c,
             "time_s": 0.5 * k, "time_source": "simulated", "bytes_sent": 1e6 * k} for k, c in enumerate(consensus)]
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    (path / "config.json").write_text(json.dumps({"preset": preset, "engine": "simulate"}))
    return path


@pytest.fixture
def figures(monkeypatch) -> list:
    drawn: list = []
    monkeypatch.setattr(plots, "_save_figure", lambda fig, out, dpi=plots.FIGURE_DPI: drawn.append(fig) or out)
    return drawn


def test_exact_consensus_is_a_gap_not_a_floor(tmp_path, figures) -> None:
    dirs = [_run(tmp_path / "sync", "sync", [0.0] * 4),
            _run(tmp_path / "local", "local_sgd", [0.0, 0.02, 0.0, 0.03]),
            _run(tmp_path / "gossip", "dpsgd", [0.0, 0.004, 0.003, 0.005])]
    plots.plot_runs(dirs, tmp_path / "c.png")
    [fig] = figures
    cons = fig.axes[3]
    assert cons.get_yscale() == "log"
    ys = [np.asarray(line.get_ydata(), dtype=float) for line in cons.lines]
    assert len(ys) == 2  # sync (0 at every record) has nothing to draw
    assert not any(np.nanmin(y) < 1e-6 for y in ys)  # no point at an invented floor (1e-12 before)
    assert np.isnan(ys[0][[0, 2]]).all() and ys[0][1] == pytest.approx(0.02)
    assert "not drawn" in cons.get_legend().get_title().get_text()
    assert any("sync" in t.get_text() and "not drawn" in t.get_text() for t in cons.texts)
    # each run keeps its colour in every panel although sync is missing from this one
    colours = {line.get_label(): line.get_color() for line in fig.axes[0].lines}
    assert {line.get_label(): line.get_color() for line in cons.lines} == {
        k: v for k, v in colours.items() if k != "sync"}


def test_positive_or_gap() -> None:
    out = plots.positive_or_gap([0.0, 1e-3, -1.0, 2.0])
    assert math.isnan(out[0]) and math.isnan(out[2]) and out[1] == 1e-3 and out[3] == 2.0


def _png_size(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", head[16:24])


def test_figures_are_written_at_the_raised_resolution(tmp_path) -> None:
    dirs = [_run(tmp_path / "a", "local_sgd", [0.0, 0.1, 0.2])]
    out = plots.plot_runs(dirs, tmp_path / "c.png")
    width, height = _png_size(out)
    assert plots.FIGURE_DPI >= 150
    assert width >= 1800 and height >= 1200  # 12 x 8 inches (was 1320 x 880 at 110 dpi)
    cost = plots.plot_runs(dirs, tmp_path / "cost.png", against=("time", "bytes"))
    assert _png_size(cost)[0] >= 1500


def test_log_axis_labels_are_plain_numbers(tmp_path, figures) -> None:
    dirs = [_run(tmp_path / "a", "local_sgd", [0.0, 0.1, 0.2, 0.3]), _run(tmp_path / "b", "sync", [0.0] * 4)]
    plots.plot_runs(dirs, tmp_path / "c.png", against=("time", "bytes"))
    [fig] = figures
    fig.canvas.draw()
    ax_bytes = fig.axes[1]
    assert ax_bytes.get_xscale() == "log"
    labels = [t.get_text() for t in ax_bytes.get_xticklabels() if t.get_text()]
    # bytes span 1 to 3 MB: less than a decade, labelled 1, 2 (and no 10^x minor labels running into each other)
    assert "2" in labels and not any("times" in t or "^" in t for t in labels)


def test_a_torus_is_drawn_on_its_grid(tmp_path, monkeypatch) -> None:
    saved: list = []
    from matplotlib.figure import Figure

    monkeypatch.setattr(Figure, "savefig", lambda self, *a, **k: saved.append(self))
    W = mixing_matrix("torus", 12, rows=3)
    topo_plot.plot_mixing_matrix(W, tmp_path / "t.png", grid=(3, 4))
    [fig] = saved
    ax = fig.axes[0]
    nodes = ax.collections[0].get_offsets()
    assert sorted({float(x) for x, _ in nodes}) == [0, 1, 2, 3] and sorted({float(y) for _, y in nodes}) == [-2, -1, 0]
    dashed = [ln for ln in ax.lines if ln.get_linestyle() == "--"]
    solid = [ln for ln in ax.lines if ln.get_linestyle() == "-"]
    assert len(ax.lines) == 24  # one line per edge: 12 nodes x 4 neighbours / 2
    assert len(dashed) == 3 + 4  # the wrap-around edge of every row and of every column
    assert len(solid) == 3 * 3 + 2 * 4  # grid neighbours: 3 per row, 2 per column
    for ln in solid:  # a grid edge joins neighbours: length 1
        (x0, x1), (y0, y1) = ln.get_xdata(), ln.get_ydata()
        assert abs(x0 - x1) + abs(y0 - y1) == pytest.approx(1.0)
    # the stub of a row's wrap-around edge is labelled with the node at the other end
    assert {t.get_text() for t in ax.texts} >= {str(k) for k in range(12)}
    with pytest.raises(Exception, match="rows x cols"):
        topo_plot.plot_mixing_matrix(W, tmp_path / "t.png", grid=(5, 3))


def test_the_cli_draws_a_torus_on_its_grid(tmp_path, capsys, monkeypatch) -> None:
    from coopsgd.cli import main

    grids: list = []
    real = topo_plot.plot_mixing_matrix
    monkeypatch.setattr("coopsgd.topology.plot_mixing_matrix",
                        lambda W, path, grid=None: grids.append(grid) or real(W, path, grid=grid))
    assert main(["topology", "torus", "--workers", "8", "--rows", "2", "--plot", str(tmp_path / "t.png")]) == 0
    assert main(["topology", "ring", "--workers", "8", "--plot", str(tmp_path / "r.png")]) == 0
    capsys.readouterr()
    assert grids == [(2, 4), None]
    assert _png_size(tmp_path / "t.png")[0] >= 1500


def test_the_zoom_window_shows_a_one_percent_difference_at_the_end() -> None:
    from coopsgd.experiments.figure_axes import zoom_window

    def run(end: float, diverged: bool = False) -> dict:
        ys = np.concatenate([np.linspace(600.0, end + 5.0, 12), [end + 2.0, end + 1.0, end]])
        return {"diverged": {"step": 3} if diverged else None,
                "_metrics": [{"step": 10 * k, "test_perplexity": float(y)} for k, y in enumerate(ys)]}

    lo, hi = zoom_window([run(111.9), run(113.3), run(116.3), run(139.8), run(5000.0, diverged=True)],
                         "test_perplexity")
    assert lo < 111.9 and 116.3 < hi < 139.8  # the ends within 10% of the best; a run far above leaves at the top
    assert hi - lo < 12.0  # a full-range log axis (100-600) could not show 1.4 perplexity apart; this window does
    assert zoom_window([run(1.0, diverged=True)], "test_perplexity") is None


def test_time_axes_name_their_clock() -> None:
    from coopsgd.experiments.figure_axes import clock_x
    from coopsgd.experiments.harness import ENGINE

    assert clock_x("step") == {}
    assert clock_x("time_s") == {"xlabel": "simulated wall-clock (s)"}
    token = ENGINE.set("distributed")
    try:
        assert clock_x("time_s") == {"xlabel": "measured wall-clock (s)"}
    finally:
        ENGINE.reset(token)
