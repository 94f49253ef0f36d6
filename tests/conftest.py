"""Test-session settings and figure checks shared by every test."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest


@pytest.fixture(autouse=True, scope="session")
def _private_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Keep the executor-calibration cache of the tests out of the user's ~/.cache (one per test session;
    tests that need their own set COOPSGD_CACHE_DIR themselves)."""
    if "COOPSGD_CACHE_DIR" not in os.environ:
        os.environ["COOPSGD_CACHE_DIR"] = str(tmp_path_factory.mktemp("coopsgd-cache"))


@pytest.fixture(autouse=True)
def _run_in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A run without --out writes to runs/<preset>-<time>/ under the current directory: every test runs in
    its own temporary directory, so nothing lands in the checkout."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def saved_figures(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Every matplotlib ``Figure`` saved while the test runs, in order (``Figure.savefig`` is spied on, the file
    is still written): a plot test reads the lines, labels and axes that were drawn, not just the file size."""
    from matplotlib.figure import Figure

    figures: list[Any] = []
    savefig = Figure.savefig

    def spy(self: Figure, *args: Any, **kwargs: Any) -> Any:
        figures.append(self)
        return savefig(self, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", spy)
    return figures


def _check_png(path: str | Path, size: tuple[int, int] | None = None) -> Any:
    """The pixels of the PNG at ``path`` (read back with matplotlib); it has the expected ``(width, height)`` in
    pixels (when given) and is not blank: more than 20 colours, none of them (the background) on 99% of it."""
    import matplotlib.image
    import numpy as np

    img = matplotlib.image.imread(str(path))
    assert img.ndim == 3 and img.shape[2] in (3, 4), img.shape
    if size is not None:
        assert (img.shape[1], img.shape[0]) == size, (img.shape, size)
    _, counts = np.unique(img.reshape(-1, img.shape[2]), axis=0, return_counts=True)
    assert len(counts) > 20 and counts.max() < 0.99 * counts.sum(), f"{path} is (nearly) blank"
    return img


@pytest.fixture
def check_png() -> Callable[..., Any]:
    """``check_png(path, size=None)``: read a PNG back and assert its size in pixels and that it is not blank."""
    return _check_png


def _check_runs_figure(fig: Any, run_dirs: Sequence[str | Path], labels: Sequence[str], *,
                       metric: str = "test_accuracy", clock: str = "simulated wall-clock (s)") -> None:
    """``fig`` is :func:`coopsgd.plots.plot_runs`' 2x2 figure of ``run_dirs``: each panel holds one line per run,
    labelled ``labels``, whose points are the run's ``metrics.jsonl`` records (read here with ``json``)."""
    import numpy as np

    loss_step, loss_time, metric_time, consensus = fig.axes
    assert (loss_step.get_xlabel(), loss_step.get_ylabel()) == ("step", "training loss (averaged model)")
    assert (loss_time.get_xlabel(), loss_time.get_ylabel()) == (clock, "training loss (averaged model)")
    assert metric_time.get_xlabel() == clock and metric.replace("_", " ") in metric_time.get_ylabel()
    assert consensus.get_xlabel() == "step" and consensus.get_ylabel().startswith("consensus distance")
    for ax in fig.axes[:3]:
        assert [line.get_label() for line in ax.lines] == list(labels)
    assert [t.get_text() for t in loss_step.get_legend().get_texts()] == list(labels)
    # the consensus panel: a run at exactly 0 in every record (full consensus) has no line, it is named in a
    # note; the others' records of exactly 0 are gaps (NaN) on the log axis
    drawn = []
    for d, lab in zip(run_dirs, labels, strict=True):
        recs = [json.loads(line) for line in (Path(d) / "metrics.jsonl").read_text().splitlines()]
        if any((r.get("consensus_distance") or 0.0) > 0 for r in recs):
            drawn.append(lab)
    assert [line.get_label() for line in consensus.lines] == drawn
    note = " ".join(t.get_text() for t in consensus.texts)
    assert all(lab in note for lab in labels if lab not in drawn)
    for k, d in enumerate(run_dirs):
        recs = [json.loads(line) for line in (Path(d) / "metrics.jsonl").read_text().splitlines()]
        assert recs, d

        def points(key: str, x: str, recs: list[dict[str, Any]] = recs) -> tuple[list[Any], list[Any]]:
            kept = [r for r in recs if r.get(key) is not None]
            return [r[x] for r in kept], [r[key] for r in kept]

        for ax, (key, x) in ((loss_step, ("train_loss", "step")), (loss_time, ("train_loss", "time_s")),
                             (metric_time, (metric, "time_s"))):
            xs, ys = points(key, x)
            np.testing.assert_array_equal(ax.lines[k].get_xdata(), xs, err_msg=f"{d}: {key} vs {x}")
            np.testing.assert_array_equal(ax.lines[k].get_ydata(), ys, err_msg=f"{d}: {key} vs {x}")
        if labels[k] not in drawn:
            continue
        line = consensus.lines[drawn.index(labels[k])]
        xs, ys = points("consensus_distance", "step")
        np.testing.assert_array_equal(line.get_xdata(), xs)
        np.testing.assert_array_equal(line.get_ydata(), [y if y > 0 else np.nan for y in ys])


@pytest.fixture
def check_runs_figure() -> Callable[..., None]:
    """``check_runs_figure(fig, run_dirs, labels, metric=..., clock=...)``: the figure of ``plot_runs`` shows
    exactly the runs' metrics (see :func:`_check_runs_figure`)."""
    return _check_runs_figure
