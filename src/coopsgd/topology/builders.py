"""Named topologies -> mixing matrices, plus loading user-given matrices ([SPEC] §2 "Topologies").

``mixing_matrix("ring", 8)`` builds the ring on 8 workers with Metropolis–Hastings weights (name
``"ring-metropolis-8"``); ``mixing_schedule`` also covers the time-varying one-peer exponential graph.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from coopsgd.errors import ConfigError, check_choice, check_int
from coopsgd.fileio import not_a_file
from coopsgd.topology import graphs
from coopsgd.topology.mixing import CHECKS, MAX_DENSE_NODES, MixingMatrix, check_dense_nodes
from coopsgd.topology.weights import WEIGHT_RULES

__all__ = [
    "TOPOLOGIES",
    "TIME_VARYING",
    "mixing_matrix",
    "mixing_schedule",
    "from_adjacency",
    "from_matrix",
    "load_matrix",
]

#: Topology names accepted by :func:`mixing_matrix` / :func:`mixing_schedule`.
TOPOLOGIES: tuple[str, ...] = (
    "complete",
    "ring",
    "torus",
    "hypercube",
    "exponential",
    "one_peer_exponential",
    "star",
    "random",
    "groups",
)
#: Topologies whose matrix changes every round (only :func:`mixing_schedule` builds them).
TIME_VARYING: tuple[str, ...] = ("one_peer_exponential",)

_LOAD_SUFFIXES = (".npy", ".csv", ".txt", ".json")



def _adjacency(
    topology: str, workers: int, *, seed: int, p: float, groups: int, rows: int | None
) -> np.ndarray:
    builders: dict[str, Callable[[], np.ndarray]] = {
        "complete": lambda: graphs.complete(workers),
        "ring": lambda: graphs.ring(workers),
        "torus": lambda: graphs.torus(workers, rows=rows),
        "hypercube": lambda: graphs.hypercube(workers),
        "exponential": lambda: graphs.exponential(workers),
        "star": lambda: graphs.star(workers),
        "random": lambda: graphs.erdos_renyi(workers, p, seed),
        "groups": lambda: graphs.groups(workers, groups),
    }
    return builders[topology]()


def mixing_matrix(
    topology: str,
    workers: int,
    weights: str = "metropolis",
    *,
    seed: int = 0,
    p: float = 0.5,
    groups: int = 2,
    rows: int | None = None,
) -> MixingMatrix:
    """Build the static mixing matrix of a named topology with a named weight rule.

    Parameters
    ----------
    topology: one of :data:`TOPOLOGIES` except the time-varying ``"one_peer_exponential"``.
    workers: number of nodes m >= 1.
    weights: one of :data:`~coopsgd.topology.weights.WEIGHT_RULES` (default Metropolis–Hastings).
    seed, p: Erdős–Rényi seed and edge probability (``topology="random"``).
    groups: number of disjoint complete groups (``topology="groups"``).
    rows: torus rows (``topology="torus"``; default the most square shape).

    ``"complete"`` with any rule other than ``best_constant`` returns exactly ``J = 1 1^T / m``.
    The name is ``"<topology>-<weights>-<workers>"``, e.g. ``"ring-metropolis-8"``.
    """
    topo = check_choice("topology", topology, TOPOLOGIES)
    m = check_int("workers", workers, minimum=1)
    rule = check_choice("weights", weights, list(WEIGHT_RULES))
    if topo in TIME_VARYING:
        raise ConfigError.invalid(
            "topology",
            topology,
            f"{topo} is time-varying (a different matrix each round); call "
            f"mixing_schedule({topo!r}, workers) to get its list of matrices",
        )
    name = f"{topo}-{rule}-{m}"
    if topo == "complete" and rule != "best_constant":
        # Every averaging rule gives 1/m everywhere on K_m; build it exactly (no round-off on the diagonal).
        graphs.complete(m)  # validates workers
        return MixingMatrix(np.full((m, m), 1.0 / m), name=name)
    adj = _adjacency(topo, m, seed=seed, p=p, groups=groups, rows=rows)
    return WEIGHT_RULES[rule](adj, name=name)


def mixing_schedule(
    topology: str,
    workers: int,
    weights: str = "metropolis",
    *,
    seed: int = 0,
    p: float = 0.5,
    groups: int = 2,
    rows: int | None = None,
) -> list[MixingMatrix]:
    """The per-round matrices of a topology: ``[W]`` for a static one, ``log2(m)`` matrices otherwise.

    For ``"one_peer_exponential"`` round t uses ``W_t = (I + P_t)/2`` (``P_t`` shifts by ``2^t``); the
    weights are fixed by the construction, so ``weights`` is only validated. Cycle through the list.
    """
    topo = check_choice("topology", topology, TOPOLOGIES)
    m = check_int("workers", workers, minimum=1)
    check_choice("weights", weights, list(WEIGHT_RULES))
    if topo == "one_peer_exponential":
        return graphs.one_peer_exponential(m)
    return [mixing_matrix(topo, m, weights, seed=seed, p=p, groups=groups, rows=rows)]


def from_adjacency(adj: Any, weights: str = "metropolis", name: str = "custom") -> MixingMatrix:
    """Mixing matrix of a user-given symmetric adjacency (non-zero off-diagonal entries are edges)."""
    rule = check_choice("weights", weights, list(WEIGHT_RULES))
    return WEIGHT_RULES[rule](adj, name=name)


def from_matrix(
    W: Any, check: str = "doubly", name: str = "custom", allow_negative: bool = False
) -> MixingMatrix:
    """Validate a user-given matrix (column i = node i's in-weights); see :class:`MixingMatrix`."""
    return MixingMatrix(W, name=name, check=check, allow_negative=allow_negative)


def load_matrix(path: str | Path, *, check: str = "doubly", allow_negative: bool = False) -> MixingMatrix:
    """Load and validate a mixing matrix from ``.npy``, ``.csv``/``.txt`` or ``.json``.

    ``.csv``/``.txt`` may be comma- or whitespace-separated; ``.json`` holds a nested list or an object
    with a ``"matrix"`` key (as written by :meth:`MixingMatrix.to_dict`, whose ``"name"`` is kept).
    Errors name the path. The matrix is named after the file stem unless the JSON gives a name.
    """
    p = Path(path)
    if check not in CHECKS:
        raise ConfigError.invalid("check", check, f"must be one of {', '.join(map(repr, CHECKS))}")
    if not p.is_file():
        raise ConfigError(f"mixing matrix file {str(p)!r} {not_a_file(p)}", field="path", value=str(p))
    suffix = p.suffix.lower()
    if suffix not in _LOAD_SUFFIXES:
        raise ConfigError(
            f"mixing matrix file {str(p)!r} has unsupported suffix {p.suffix!r}; use one of "
            f"{', '.join(_LOAD_SUFFIXES)}",
            field="path",
            value=str(p),
        )
    name = p.stem
    try:
        if suffix == ".npy":
            arr = np.load(p, allow_pickle=False, mmap_mode="r")  # the header first: refuse a huge one unread
            if arr.ndim >= 1 and arr.shape[0] > MAX_DENSE_NODES:
                check_dense_nodes(int(arr.shape[0]), "matrix")
            arr = np.array(arr)
        elif suffix == ".json":
            data = json.loads(p.read_text())
            if isinstance(data, dict):
                if "matrix" not in data:
                    raise ValueError('JSON object has no "matrix" key')
                name = str(data.get("name", name))
                data = data["matrix"]
            arr = np.asarray(data, dtype=np.float64)
        else:
            text = p.read_text()
            delimiter = "," if "," in text else None
            arr = np.loadtxt(p, delimiter=delimiter, dtype=np.float64, ndmin=2)
    except (OSError, ValueError, TypeError) as exc:
        raise ConfigError(
            f"could not read mixing matrix from {str(p)!r}: {exc}", field="path", value=str(p)
        ) from None
    return MixingMatrix(arr, name=name, check=check, allow_negative=allow_negative)
