"""MATCHA: matching decomposition, activation probabilities, alpha, sampled matrices, theory, errors."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from coopsgd.algorithms import MixContext, make_preset, presets
from coopsgd.algorithms.schedules import MatchaSchedule
from coopsgd.analysis import analyze
from coopsgd.cli import main
from coopsgd.errors import ConfigError
from coopsgd.theory import matcha as mt
from coopsgd.topology import graphs, mixing_schedule
from coopsgd.train import RunConfig

GRAPHS = {
    "ring8": lambda: graphs.ring(8),
    "ring7": lambda: graphs.ring(7),
    "ring2": lambda: graphs.ring(2),
    "torus16": lambda: graphs.torus(16),
    "torus9": lambda: graphs.torus(9),
    "hypercube8": lambda: graphs.hypercube(8),
    "complete6": lambda: graphs.complete(6),
    "star6": lambda: graphs.star(6),
    "random12": lambda: graphs.erdos_renyi(12, 0.4, 3),
    "random20": lambda: graphs.erdos_renyi(20, 0.2, 1),
}


def _mixes(spec, steps):
    return [spec.schedule.mix(k, MixContext(step=k)) for k in range(steps)]


@pytest.mark.parametrize("name", list(GRAPHS))
def test_matchings_partition_the_edges(name: str) -> None:
    adj = GRAPHS[name]()
    edges = mt.graph_edges(adj)
    matchings = mt.matching_decomposition(adj)
    flat = [e for mtc in matchings for e in mtc]
    assert sorted(flat) == sorted(edges)  # every edge exactly once
    assert len(flat) == len(set(flat))
    for mtc in matchings:
        nodes = [x for e in mtc for x in e]
        assert len(nodes) == len(set(nodes)), f"{mtc} is not a matching"
    max_degree = int(np.asarray(adj, dtype=bool).sum(axis=0).max())
    assert max_degree <= len(matchings) <= max_degree + 1  # Vizing's bound, reached by Misra-Gries
    # the Laplacians add up to the graph's Laplacian
    n = adj.shape[0]
    L = np.sum([mt.matching_laplacian(n, mtc) for mtc in matchings], axis=0)
    A = np.asarray(adj, dtype=float)
    np.testing.assert_array_equal(L, np.diag(A.sum(axis=1)) - A)


@pytest.mark.parametrize("name", ["ring8", "torus16", "hypercube8"])
def test_bipartite_graphs_need_max_degree_matchings(name: str) -> None:
    adj = GRAPHS[name]()
    assert len(mt.matching_decomposition(adj)) == int(np.asarray(adj, dtype=bool).sum(axis=0).max())


def test_random_graphs_are_coloured_properly() -> None:
    rng = np.random.default_rng(0)
    for _ in range(200):
        n = int(rng.integers(2, 13))
        A = np.triu(rng.random((n, n)) < rng.random(), 1)
        A = A | A.T
        matchings = mt.matching_decomposition(A)
        flat = [e for mtc in matchings for e in mtc]
        assert sorted(flat) == mt.graph_edges(A)
        for mtc in matchings:
            nodes = [x for e in mtc for x in e]
            assert len(nodes) == len(set(nodes))
        if flat:
            assert len(matchings) <= A.sum(axis=0).max() + 1


@pytest.mark.parametrize("topology,budget", [("ring", 0.5), ("torus", 0.3), ("complete", 0.7)])
def test_sampled_matrices_are_symmetric_doubly_stochastic(topology: str, budget: float) -> None:
    spec = presets.matcha(8, topology=topology, budget=budget, seed=3)
    mixes = [m for m in _mixes(spec, 60) if m is not None]
    assert mixes and all(m.pattern == "neighbor" for m in mixes)
    for mix in mixes:
        W = mix.matrix
        np.testing.assert_allclose(W, W.T, rtol=0, atol=0)
        np.testing.assert_allclose(W.sum(axis=0), 1.0, rtol=0, atol=1e-14)
        np.testing.assert_allclose(W.sum(axis=1), 1.0, rtol=0, atol=1e-14)
    # different rounds activate different matchings
    assert len({tuple(m.info["matchings"]) for m in mixes}) > 1


def test_budget_one_is_dpsgd_laplacian_mixing() -> None:
    m = 8
    spec = presets.matcha(m, budget=1.0)
    sched = spec.schedule
    assert isinstance(sched, MatchaSchedule)
    np.testing.assert_array_equal(sched.probabilities, 1.0)
    A = graphs.ring(m).astype(float)
    L = np.diag(A.sum(axis=1)) - A
    ev = np.linalg.eigvalsh(L)
    alpha = 2.0 / (ev[1] + ev[-1])  # the alpha minimising ||I - alpha L - J||
    assert sched.alpha == pytest.approx(alpha, rel=1e-6)
    W = np.eye(m) - sched.alpha * L
    for mix in _mixes(spec, 10):
        assert mix is not None and mix.info["matchings"] == list(range(sched.matchings))
        np.testing.assert_allclose(mix.matrix, W, rtol=0, atol=1e-15)
    # the expected zeta of the deterministic W is its zeta
    out = analyze(spec)
    ez = np.sort(np.abs(np.linalg.eigvalsh(W - np.full((m, m), 1 / m))))[-1]
    assert out["expected_zeta"] == pytest.approx(ez, rel=1e-9)


@pytest.mark.parametrize("name", ["ring7", "torus16", "random12", "random20", "star6"])
@pytest.mark.parametrize("budget", [0.1, 0.35, 0.8])
def test_probabilities_respect_the_budget_and_beat_uniform(name: str, budget: float) -> None:
    adj = GRAPHS[name]()
    laps = [mt.matching_laplacian(adj.shape[0], x) for x in mt.matching_decomposition(adj)]
    p = mt.activation_probabilities(laps, budget)
    assert np.all(p >= 0) and np.all(p <= 1)
    assert p.mean() <= budget + 1e-9
    assert p.mean() == pytest.approx(budget, abs=1e-6)  # lambda_2 never decreases in p: the budget is used
    uniform = mt.algebraic_connectivity(mt.expected_laplacian(laps, np.full(len(laps), budget)))
    assert mt.algebraic_connectivity(mt.expected_laplacian(laps, p)) >= uniform - 1e-12


def test_alpha_minimises_rho() -> None:
    spec = presets.matcha(10, topology="torus", budget=0.4)
    s = spec.schedule
    laps = list(s.laplacians)
    rho = mt.expected_rho(laps, s.probabilities, s.alpha)
    for da in (-1e-3, 1e-3, -0.05, 0.05):
        assert rho <= mt.expected_rho(laps, s.probabilities, s.alpha + da) + 1e-12


@pytest.mark.parametrize("budget", [0.2, 0.5, 1.0])
def test_expected_zeta_below_one_for_a_connected_ring(budget: float) -> None:
    out = analyze(presets.matcha(8, budget=budget))
    assert 0.0 < out["expected_zeta"] < 1.0
    assert out["expected_zeta"] == pytest.approx(math.sqrt(out["rho"]))
    # a smaller budget contracts less per round
    assert out["expected_zeta"] >= analyze(presets.matcha(8, budget=1.0))["expected_zeta"] - 1e-12


def test_closed_form_expected_gram_matches_monte_carlo() -> None:
    spec = presets.matcha(6, topology="complete", budget=0.3, seed=11)
    s = spec.schedule
    rounds = 6000
    acc = np.zeros((6, 6))
    for r in range(rounds):
        W = s.round_matrix(s.activations(r))
        acc += W.T @ W
    np.testing.assert_allclose(acc / rounds, s.expected_gram(), rtol=0, atol=0.02)
    # and the activation frequencies match p
    freq = np.mean([s.activations(r) for r in range(rounds)], axis=0)
    np.testing.assert_allclose(freq, s.probabilities, atol=0.03)


def test_same_seed_same_matrices_and_rounds_follow_tau() -> None:
    a, b = presets.matcha(8, 3, budget=0.3, seed=5), presets.matcha(8, 3, budget=0.3, seed=5)
    c = presets.matcha(8, 3, budget=0.3, seed=6)
    ma, mb, mc = _mixes(a, 90), _mixes(b, 90), _mixes(c, 90)
    for x, y in zip(ma, mb, strict=True):
        assert (x is None) == (y is None)
        if x is not None:
            np.testing.assert_array_equal(x.matrix, y.matrix)
            assert x.round == y.round
    assert [x is None for x in ma] != [x is None for x in mc] or any(
        x is not None and not np.array_equal(x.matrix, y.matrix) for x, y in zip(ma, mc, strict=True)
    )
    # only after every third step, and some rounds draw no matching at all (budget 0.3, two matchings)
    fired = [k for k, x in enumerate(ma) if x is not None]
    assert all((k + 1) % 3 == 0 for k in fired)
    assert 0 < len(fired) < 30
    assert all(x.round == k // 3 for k, x in enumerate(ma) if x is not None)
    # stateless: the schedule's run state is empty and the matrices are random (not enumerable)
    assert a.schedule.init_state() == {} and a.schedule.matrices() is None


def test_round_without_matchings_is_identity() -> None:
    s = MatchaSchedule(4, [mt.matching_laplacian(4, [(0, 1), (2, 3)])], [0.0], 0.5)
    assert all(s.mix(k) is None for k in range(20))


def test_topologies_and_custom_mixing() -> None:
    spec = presets.matcha(8, topology="one_peer_exponential", budget=0.5)  # edges of the whole cycle
    assert spec.params["matchings"] >= 3
    W = mixing_schedule("torus", 9)[0].matrix
    custom = presets.matcha(9, mixing=W)
    assert custom.params["topology"] == "custom"
    assert custom.params["matchings"] == presets.matcha(9, topology="torus").params["matchings"]


BAD = [
    (lambda: presets.matcha(8, budget=0.0), "budget"),
    (lambda: presets.matcha(8, budget=1.5), "budget"),
    (lambda: presets.matcha(8, budget=float("nan")), "budget"),
    (lambda: presets.matcha(8, budget="half"), "budget"),
    (lambda: make_preset("matcha", 8, budget=-0.1), "budget"),
    (lambda: RunConfig(preset="matcha", budget=0.0), "budget"),
    (lambda: RunConfig(preset="matcha", budget=float("nan")), "budget"),
    (lambda: presets.matcha(8, 0), "tau"),
    (lambda: presets.matcha(8, topology="moebius"), "topology"),
    (lambda: make_preset("matcha", 8, weights="metropolis"), "weights"),
    (lambda: RunConfig(preset="matcha", weights="uniform").spec_kwargs(), "weights"),
    (lambda: RunConfig(preset="local_sgd", budget=0.5).spec_kwargs(), "budget"),
]


@pytest.mark.parametrize("make,field", BAD, ids=[f"{i}-{f}" for i, (_, f) in enumerate(BAD)])
def test_bad_arguments_name_the_field(make, field) -> None:
    with pytest.raises(ConfigError) as info:
        make()
    assert field in str(info.value)


def test_budget_comes_from_the_declaration(capsys) -> None:
    cfg = RunConfig(preset="matcha", budget=0.25, topology="torus", workers=9)
    kw = cfg.spec_kwargs()
    assert kw["budget"] == 0.25 and kw["topology"] == "torus" and kw["seed"] == 0
    spec = cfg.build_spec()
    assert spec.name == "matcha" and spec.params["budget"] == 0.25
    assert main(["theory", "--preset", "matcha", "--workers", "8", "--budget", "0.25", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["params"]["budget"] == 0.25
    for key in ("expected_zeta", "expected_zeta_note", "rho", "matchings", "activation_probabilities", "alpha"):
        assert key in out, key
    assert "||E[W^T W] - J||_2" in out["expected_zeta_note"]
    assert len(out["activation_probabilities"]) == out["matchings"] == 2
    assert np.mean(out["activation_probabilities"]) <= 0.25 + 1e-9
    assert out["zeta"] is None and out["communication_per_round"]["pattern"] == "neighbor"
    assert main(["theory", "--preset", "matcha", "--budget", "0", "--json"]) == 2
    assert "budget" in capsys.readouterr().err
    # with problem constants: the indicator bound at the expected zeta
    assert main(["theory", "--preset", "matcha", "--workers", "8", "--L", "1", "--sigma2", "1", "--lr", "0.05",
                 "--steps", "10000", "--f-gap", "1", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)["bounds"]
    assert "theorem1_at_expected_zeta" in res and "indicator" in res["theorem1_at_expected_zeta"]["notes"][0]
    # the human-readable form shows the hook's entries too
    assert main(["theory", "--preset", "matcha", "--workers", "8"]) == 0
    text = capsys.readouterr().out
    assert "expected_zeta" in text and "activation_probabilities" in text
