"""Figure of a mixing matrix: the communication graph on a circle and a heatmap of S.

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


def plot_mixing_matrix(W: MixingMatrix, path: str | Path) -> None:
    """Write a two-panel figure of ``W`` to ``path`` (format from the suffix: png, svg or pdf).

    Left: nodes on a circle, an edge i--j wherever ``S[i, j]`` or ``S[j, i]`` is non-zero (arrows when S
    is not symmetric, line width proportional to the weight). Right: heatmap of S with a colorbar.
    The title gives the name and ``zeta = max(|lambda_2|, |lambda_n|)``. Parent folders are created.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    out = Path(path)
    fmt = out.suffix.lower().lstrip(".")
    if fmt not in _FORMATS:
        raise ConfigError.invalid(
            "path", str(path), f"suffix must be one of {', '.join('.' + f for f in _FORMATS)}"
        )
    if W.n > MAX_PLOT_NODES:
        raise ConfigError.invalid("plot", str(path), f"the figure draws every edge and the n x n heatmap: at most "
                                  f"{MAX_PLOT_NODES} nodes (n = {W.n})")
    from coopsgd.fileio import atomic_write_bytes, check_output_path

    check_output_path(out, "plot")

    fig = Figure(figsize=(11.0, 5.0))
    FigureCanvasAgg(fig)
    ax_g, ax_h = fig.subplots(1, 2)
    _draw_graph(ax_g, W)
    _draw_heatmap(fig, ax_h, W.matrix)
    fig.suptitle(f"{W.name}   n = {W.n},  \u03b6 = {W.zeta:.4f}")
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format=fmt, dpi=100, bbox_inches="tight")
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
