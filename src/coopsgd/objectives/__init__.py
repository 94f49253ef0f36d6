"""Analytic objectives for the reference engine (float64 numpy, exact or noisy gradients).

Every objective has ``dim`` (length of a flat parameter vector), ``value(x)`` (the global objective F at
one point of shape (d,) or at each row of an (n, d) array) and ``gradient(x, worker, rng)`` (worker
``worker``'s stochastic gradient g_i(x); exact when the objective has no noise). ``initial_point(rng)``
gives a default start.
"""

from __future__ import annotations

from coopsgd.objectives.analytic import (
    OBJECTIVES,
    LogisticRegression,
    MatrixCompletion,
    Objective,
    Quadratic,
    SincToy,
    make_objective,
)

__all__ = [
    "Objective",
    "Quadratic",
    "SincToy",
    "MatrixCompletion",
    "LogisticRegression",
    "OBJECTIVES",
    "make_objective",
]
