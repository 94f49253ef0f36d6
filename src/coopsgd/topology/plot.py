"""Figure of a mixing matrix: the communication graph (nodes on a circle, or on a rows x cols grid for a 2-D
torus) and a heatmap of S.

Uses matplotlib's object API with the Agg canvas (no pyplot, no display, no global backend change);
matplotlib is imported only when a figure is drawn.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from coopsgd.errors import ConfigError
from coopsgd.topology.mixing import MixingMatrix

__all__ = ["plot_mixing_matrix"]

_FORMATS = ("png", "svg", "pdf")
#: Most nodes :func:`plot_mixing_matrix` draws (every edge, and the n x n heatmap).
MAX_PLOT_NODES = 1024


def plot_mixing_matrix(W: MixingMatrix, path: str | Path, *, grid: tuple[int, int] | None = None) -> None:
    """Write a two-panel figure of ``W`` to ``path`` (format from the suffix: png, svg or pdf).

    Left: the graph, an edge i--j wherever ``S[i, j]`` or ``S[j, i]`` is non-zero (arrows when S is not
    symmetric, line width proportional to the weight): nodes on a circle, or with ``grid = (rows, cols)``
    (a 2-D torus, node ``a*cols + b`` at row a, column b) on that grid, each wrap-around edge drawn as a
    dashed stub leaving the grid on both ends, labelled with the node at the other end. Right: heatmap of S
    with a colorbar. The title gives the name and ``zeta = max(|lambda_2|, |lambda_n|)``. Parent folders are
    created.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    out = Path(path)
    fmt = out.suffix.lower().lstrip(".")
    if fmt not in _FORMATS:
        raise ConfigError.invalid(
            "path", str(path), f"suffix must be one of {', '.join('.' + f for f in _FORMATS)}"
        )
    if grid is not None and (len(grid) != 2 or min(grid) < 1 or grid[0] * grid[1] != W.n):
        raise ConfigError.invalid("grid", grid, f"must be (rows, cols) with rows x cols = n = {W.n}")
    if W.n > MAX_PLOT_NODES:
        raise ConfigError.invalid("plot", str(path), f"the figure draws every edge and the n x n heatmap: at most "
                                  f"{MAX_PLOT_NODES} nodes (n = {W.n})")
    from coopsgd.fileio import atomic_write_bytes, check_output_path

    check_output_path(out, "plot")

    fig = Figure(figsize=(11.0, 5.0))
    FigureCanvasAgg(fig)
    ax_g, ax_h = fig.subplots(1, 2)
    if grid is None:
        _draw_graph(ax_g, W)
    else:
        _draw_grid_graph(ax_g, W, grid)
    _draw_heatmap(fig, ax_h, W.matrix)
    fig.suptitle(f"{W.name}   n = {W.n},  \u03b6 = {W.zeta:.4f}")
    import io

    from coopsgd.plots import FIGURE_DPI

    buf = io.BytesIO()
    fig.savefig(buf, format=fmt, dpi=FIGURE_DPI, bbox_inches="tight")
    atomic_write_bytes(out, buf.getvalue())  # a failed write leaves an earlier figure as it was


def _draw_graph(ax: Any, W: MixingMatrix) -> None:
    """Nodes on a circle, an edge i--j wherever ``S[i, j]`` or ``S[j, i]`` is non-zero (arrows i -> j when S is
    not symmetric: node i's model flows into node j), line width proportional to the weight."""
    S, n = W.matrix, W.n
    angles = np.pi / 2 - 2 * np.pi * np.arange(n) / n
    xy = np.stack([np.cos(angles), np.sin(angles)], axis=1)
    wmax = float(np.abs(S - np.diag(np.diag(S))).max()) or 1.0
    symmetric = W.is_symmetric
    for i, j in zip(*np.nonzero(S), strict=True):
        if i == j or (symmetric and j < i):
            continue
        lw = 0.5 + 2.5 * abs(float(S[i, j])) / wmax
        color = "tab:blue" if S[i, j] > 0 else "tab:red"
        if symmetric:
            ax.plot(*xy[[i, j]].T, color=color, lw=lw, alpha=0.7, zorder=1)
        else:
            ax.annotate("", xy=tuple(xy[j]), xytext=tuple(xy[i]),
                        arrowprops={"arrowstyle": "->", "color": color, "lw": lw, "alpha": 0.7}, zorder=1)
    size = 200.0 if n <= 32 else max(10.0, 6400.0 / n)
    ax.scatter(xy[:, 0], xy[:, 1], s=size, c="white", edgecolors="black", zorder=2)
    if n <= 32:
        for k in range(n):
            ax.text(xy[k, 0], xy[k, 1], str(k), ha="center", va="center", fontsize=8, zorder=3)
    ax.set_aspect("equal")
    ax.set_xlim(-1.2, 1.2)
    ax.set_ylim(-1.2, 1.2)
    ax.axis("off")
    ax.set_title("graph (edge where S[i, j] != 0)")


def _draw_grid_graph(ax: Any, W: MixingMatrix, grid: tuple[int, int]) -> None:
    """A torus on its rows x cols grid (node ``a*cols + b`` at row a, column b, row 0 on top): an edge between
    grid neighbours is a line; a wrap-around edge (first and last column of a row, first and last row of a
    column) is a dashed stub leaving the grid at both ends, labelled with the node at the other end (up to 32
    nodes). Any other non-zero entry is a straight line, so a matrix that is not a torus is still drawn whole."""
    S, n = W.matrix, W.n
    rows, cols = grid
    pos = np.array([(k % cols, -(k // cols)) for k in range(n)], dtype=float)
    wmax = float(np.abs(S - np.diag(np.diag(S))).max()) or 1.0
    symmetric = W.is_symmetric
    stub = 0.42
    labels = n <= 32
    for i, j in zip(*np.nonzero(S), strict=True):
        if i == j or (symmetric and j < i):
            continue
        lw = 0.5 + 2.5 * abs(float(S[i, j])) / wmax
        color = "tab:blue" if S[i, j] > 0 else "tab:red"
        (xi, yi), (xj, yj) = pos[i], pos[j]
        wrap_row = yi == yj and abs(xi - xj) == cols - 1 and cols > 2
        wrap_col = xi == xj and abs(yi - yj) == rows - 1 and rows > 2
        if wrap_row or wrap_col:  # one line per edge: its two stubs, split by a NaN
            xs: list[float] = []
            ys: list[float] = []
            for (x, y), (xo, yo), other in (((xi, yi), (xj, yj), j), ((xj, yj), (xi, yi), i)):
                dx = stub * np.sign(x - xo)
                dy = stub * np.sign(y - yo)
                xs += [x, x + dx, np.nan]
                ys += [y, y + dy, np.nan]
                if labels:
                    ax.text(x + 1.45 * dx, y + 1.45 * dy, str(other), ha="center", va="center", fontsize=7,
                            color="dimgray", zorder=3)
            ax.plot(xs[:-1], ys[:-1], color=color, lw=lw, alpha=0.7, ls="--", zorder=1)
        elif symmetric:
            ax.plot([xi, xj], [yi, yj], color=color, lw=lw, alpha=0.7, zorder=1)
        else:
            ax.annotate("", xy=(xj, yj), xytext=(xi, yi),
                        arrowprops={"arrowstyle": "->", "color": color, "lw": lw, "alpha": 0.7}, zorder=1)
    size = 260.0 if n <= 32 else max(10.0, 8000.0 / n)
    ax.scatter(pos[:, 0], pos[:, 1], s=size, c="white", edgecolors="black", zorder=2)
    if labels:
        for k in range(n):
            ax.text(pos[k, 0], pos[k, 1], str(k), ha="center", va="center", fontsize=8, zorder=3)
    ax.set_aspect("equal")
    ax.set_xlim(-0.9, cols - 0.1)
    ax.set_ylim(-rows + 0.1, 0.9)
    ax.axis("off")
    ax.set_title(f"{rows} x {cols} torus (dashed: wrap-around edges, to the node named at the end)", fontsize=9)


def _draw_heatmap(fig: Any, ax: Any, S: np.ndarray) -> None:
    """Heatmap of S with a colorbar (diverging colours when S has negative entries)."""
    if float(S.min()) < 0:
        v = float(np.abs(S).max())
        im = ax.imshow(S, cmap="RdBu_r", vmin=-v, vmax=v, interpolation="nearest")
    else:
        im = ax.imshow(S, cmap="viridis", vmin=0.0, interpolation="nearest")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    ax.set_xlabel("j (column: receiving node)")
    ax.set_ylabel("i (row: sending node)")
    ax.set_title("S[i, j]")
