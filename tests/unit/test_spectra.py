"""Closed-form spectra of the named topologies (coopsgd.topology.spectra) against the dense matrices."""

from __future__ import annotations

import math

import numpy as np
import pytest

from coopsgd.errors import ConfigError
from coopsgd.topology import mixing_matrix
from coopsgd.topology.mixing import MAX_DENSE_NODES
from coopsgd.topology.spectra import closed_form_summary, laplacian_spectrum, mixing_eigenvalues

RULES = ("uniform", "metropolis", "max_degree", "best_constant")
GRAPHS = [
    ("complete", n, {}) for n in (1, 2, 3, 7)
] + [("ring", n, {}) for n in (2, 3, 4, 9, 16)] + [
    ("exponential", n, {}) for n in (2, 3, 8, 12, 17)
] + [("torus", n, {}) for n in (4, 6, 9, 12, 16, 30)] + [("torus", 12, {"rows": 2}), ("torus", 12, {"rows": 3})] + [
    ("hypercube", n, {}) for n in (1, 2, 8, 16)
] + [("star", n, {}) for n in (2, 3, 9)] + [("groups", 12, {"groups": g}) for g in (1, 2, 3, 12)]


@pytest.mark.parametrize("topology,n,kw", GRAPHS, ids=[f"{t}-{n}-{kw}" for t, n, kw in GRAPHS])
def test_closed_form_equals_the_dense_eigendecomposition(topology, n, kw) -> None:
    for rule in RULES:
        try:
            W = mixing_matrix(topology, n, rule, **kw)
        except ConfigError:  # e.g. uniform weights on the star: refused the same way in closed form
            with pytest.raises(ConfigError, match="weights"):
                mixing_eigenvalues(topology, n, rule, **kw)
            continue
        ev = mixing_eigenvalues(topology, n, rule, **kw)
        np.testing.assert_allclose(ev, W.eigenvalues, rtol=0, atol=1e-12)
        info = closed_form_summary(topology, n, rule, **kw)
        assert info["zeta"] == pytest.approx(W.zeta, abs=1e-12)
        assert info["connected"] == W.is_connected and info["theory_applies"] == W.theory_applies
        assert (info["degree_min"], info["degree_max"]) == (int(W.degrees.min()), W.max_degree)


def test_laplacian_spectra_closed_forms_at_scale() -> None:
    n = 10**6
    mu, dmin, dmax = laplacian_spectrum("ring", n)
    assert (dmin, dmax) == (2, 2) and mu[0] == 0.0
    assert mu[1] == pytest.approx(2 - 2 * math.cos(2 * math.pi / n), rel=1e-9) and mu[-1] == pytest.approx(4.0)
    assert mu.sum() == pytest.approx(2.0 * n, rel=1e-12)  # trace of L = sum of degrees
    mu, _, dmax = laplacian_spectrum("hypercube", 2**20)
    assert dmax == 20 and mu.sum() == pytest.approx(20 * 2**20) and mu[-1] == 40.0
    # beyond the dense limit the builders refuse, naming the limit
    with pytest.raises(ConfigError, match=str(MAX_DENSE_NODES)):
        mixing_matrix("ring", MAX_DENSE_NODES + 1)
