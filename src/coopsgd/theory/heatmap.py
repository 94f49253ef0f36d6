"""Heat map of the additional network error bound over (tau, zeta) ([CSGD] Fig. 3a).

The plotted quantity is the factor ((1+zeta^2)/(1-zeta^2) * tau - 1) of the network-error term of
[CSGD] Theorem 1, eq. (17), with m = 1, v = 0 (multiply by eta_eff^2 L^2 sigma^2 (1+v/m)^2 for the term
itself). It is 0 at (tau=1, zeta=0) (fully synchronous SGD) and grows monotonically in both tau and zeta.

The colour scale is symmetric-log by default (linear on [0, 1], logarithmic above), so the zero at
(1, 0) is drawn without masking and the colour bar shows the actual values. matplotlib is imported
lazily with the Agg backend; this module never imports torch.
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from coopsgd.errors import ConfigError
from coopsgd.fileio import atomic_write_bytes
from coopsgd.theory.bounds import network_error_term

__all__ = ["network_error_grid", "plot_network_error_heatmap"]

_SUFFIXES = {".png", ".svg", ".pdf"}


#: Resolution of the heatmap (the figures of coopsgd.plots use the same, FIGURE_DPI: 6.4 x 4.8 in -> 1024 x 768 px).
HEATMAP_DPI = 160

def _vector(field: str, values: Any) -> np.ndarray:
    try:
        arr = np.asarray(list(values) if not isinstance(values, np.ndarray) else values, dtype=np.float64)
    except (TypeError, ValueError):
        raise ConfigError.invalid(field, values, "must be a 1-D sequence of numbers") from None
    if arr.ndim != 1 or arr.size == 0:
        raise ConfigError.invalid(field, values, "must be a non-empty 1-D sequence of numbers")
    return arr


def network_error_grid(taus: Iterable[float], zetas: Iterable[float]) -> np.ndarray:
    """Grid G[i, j] = (1+zeta_i^2)/(1-zeta_i^2) * tau_j - 1, shape (len(zetas), len(taus)).

    Rows follow ``zetas`` (the y axis of Fig. 3a), columns ``taus`` (the x axis). ``inf`` where zeta >= 1.
    """
    t = _vector("taus", taus)
    z = _vector("zetas", zetas)
    return np.asarray(network_error_term(t[None, :], z[:, None]), dtype=np.float64)


def plot_network_error_heatmap(
    path: str | Path,
    *,
    taus: Iterable[float] = range(1, 21),
    zetas: Iterable[float] | None = None,
    circled: Sequence[tuple[Any, ...]] = (),
    log: bool = True,
    title: str | None = None,
) -> Path:
    """Draw [CSGD] Fig. 3a and write it to ``path`` (PNG, SVG or PDF by suffix); return the path.

    Args:
        path: output file; parent directories are created.
        taus: communication periods on the x axis (default 1..20).
        zetas: zeta values on the y axis (default ``np.linspace(0, 0.95, 20)``); values >= 1 are infinite
            and rejected.
        circled: points ``(tau, zeta)`` or ``(tau, zeta, label)`` to circle and label (Fig. 3a circles the
            settings run in Fig. 3b); the default label is ``"tau=.., zeta=.."``.
        log: symmetric-log colour scale (linear below 1) instead of a linear one.
        title: optional figure title.
    """
    out = Path(path)
    if out.suffix.lower() not in _SUFFIXES:
        raise ConfigError.invalid("path", str(path), f"must end with one of {', '.join(sorted(_SUFFIXES))}")
    t = _vector("taus", taus)
    z = _vector("zetas", np.linspace(0.0, 0.95, 20) if zetas is None else zetas)
    if np.any(z >= 1.0):
        raise ConfigError.invalid("zetas", zetas, "must all be < 1 (the bound is infinite at zeta >= 1)")
    points = []
    for p in circled:
        if not isinstance(p, (tuple, list)) or len(p) not in (2, 3):
            raise ConfigError.invalid("circled", p, "entries must be (tau, zeta) or (tau, zeta, label)")
        try:
            pt, pz = float(p[0]), float(p[1])
        except (TypeError, ValueError):
            raise ConfigError.invalid("circled", p, "tau and zeta must be numbers") from None
        label = str(p[2]) if len(p) == 3 else f"τ={pt:g}, ζ={pz:g}"
        points.append((pt, pz, label))

    grid = network_error_grid(t, z)

    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.colors import Normalize, SymLogNorm

    vmax = float(np.max(grid)) if grid.size else 1.0
    vmin = float(np.min(grid))
    norm: Normalize
    if log:
        norm = SymLogNorm(linthresh=1.0, linscale=0.5, vmin=min(0.0, vmin), vmax=max(vmax, 1.0), base=10)
    else:
        norm = Normalize(vmin=min(0.0, vmin), vmax=max(vmax, 1e-12))

    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    try:
        mesh = ax.pcolormesh(t, z, grid, shading="nearest", cmap="viridis", norm=norm)
        cbar = fig.colorbar(mesh, ax=ax)
        cbar.set_label(r"network error factor $\frac{1+\zeta^2}{1-\zeta^2}\tau - 1$")
        for pt, pz, label in points:
            ax.plot(pt, pz, marker="o", markersize=14, markerfacecolor="none", markeredgecolor="red", mew=2)
            ax.annotate(label, (pt, pz), xytext=(8, 8), textcoords="offset points", color="red", fontsize=8)
        ax.set_xlabel(r"communication period $\tau$")
        ax.set_ylabel(r"$\zeta$ (second largest |eigenvalue| of W)")
        ax.set_title(title or "Additional network error bound ([CSGD] Fig. 3a)")
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.tight_layout()
        buf = io.BytesIO()  # written in one step: a failed write leaves an earlier figure as it was
        fig.savefig(buf, dpi=HEATMAP_DPI, format=out.suffix.lower()[1:] or "png")
    finally:
        plt.close(fig)
    return atomic_write_bytes(out, buf.getvalue())
