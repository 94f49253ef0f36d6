"""Topologies and mixing matrices ([CSGD] §2, Assumption 5; [SPEC] §2 "Topologies").

A :class:`MixingMatrix` S is an immutable, validated float64 matrix; with the paper's d x n state X a
round is ``X <- X S`` so column i holds node i's in-weights (``new x_i = sum_j S[j, i] x_j``).

Build one by name (:func:`mixing_matrix`, :func:`mixing_schedule`), from a graph
(:func:`from_adjacency` with a rule from :data:`WEIGHT_RULES`), or from a matrix
(:func:`from_matrix`, :func:`load_matrix`).
"""

from __future__ import annotations

from coopsgd.topology import graphs, weights
from coopsgd.topology.builders import (
    TIME_VARYING,
    TOPOLOGIES,
    from_adjacency,
    from_matrix,
    load_matrix,
    mixing_matrix,
    mixing_schedule,
)
from coopsgd.topology.graphs import one_peer_exponential, random_matching
from coopsgd.topology.mixing import CHECKS, MixingMatrix
from coopsgd.topology.plot import plot_mixing_matrix
from coopsgd.topology.weights import WEIGHT_RULES

__all__ = [
    "MixingMatrix",
    "CHECKS",
    "TOPOLOGIES",
    "TIME_VARYING",
    "WEIGHT_RULES",
    "mixing_matrix",
    "mixing_schedule",
    "from_adjacency",
    "from_matrix",
    "load_matrix",
    "one_peer_exponential",
    "random_matching",
    "plot_mixing_matrix",
    "graphs",
    "weights",
]
