"""Unit tests for coopsgd.topology: closed-form spectra, structure, validation, I/O and plotting."""

from __future__ import annotations

import json
import pickle
from math import comb

import numpy as np
import pytest

from coopsgd.errors import ConfigError, MixingMatrixError
from coopsgd.topology import (
    TOPOLOGIES,
    WEIGHT_RULES,
    MixingMatrix,
    from_adjacency,
    from_matrix,
    graphs,
    load_matrix,
    mixing_matrix,
    mixing_schedule,
    one_peer_exponential,
    plot_mixing_matrix,
    random_matching,
)
from coopsgd.topology import weights as wrules

# ---------------------------------------------------------------------------- closed-form spectra


@pytest.mark.parametrize("m", [3, 5, 8, 13, 16])
def test_ring_metropolis_eigenvalues(m: int) -> None:
    W = mixing_matrix("ring", m)
    expected = np.sort(1 / 3 + (2 / 3) * np.cos(2 * np.pi * np.arange(m) / m))[::-1]
    np.testing.assert_allclose(W.eigenvalues, expected, atol=1e-12)
    assert W.zeta == pytest.approx(max(abs(expected[1]), abs(expected[-1])), abs=1e-12)
    assert W.name == f"ring-metropolis-{m}"
    assert W.theory_applies and W.theory_issues() == []


@pytest.mark.parametrize("rule", ["uniform", "metropolis", "max_degree"])
@pytest.mark.parametrize("m", [1, 2, 6])
def test_complete_is_exact_average(rule: str, m: int) -> None:
    W = mixing_matrix("complete", m, rule)
    assert np.array_equal(W.matrix, np.full((m, m), 1.0 / m))
    assert W.is_averaging
    assert W.zeta == pytest.approx(0.0, abs=1e-12)
    assert W.spectral_gap == pytest.approx(1.0, abs=1e-12)


def test_complete_best_constant_is_average_too() -> None:
    W = mixing_matrix("complete", 6, "best_constant")
    np.testing.assert_allclose(W.matrix, np.full((6, 6), 1 / 6), atol=1e-12)


@pytest.mark.parametrize("k", [1, 2, 3, 4])
@pytest.mark.parametrize("rule", ["metropolis", "max_degree", "uniform"])
def test_hypercube_spectrum(k: int, rule: str) -> None:
    m = 2**k
    W = mixing_matrix("hypercube", m, rule)
    A = graphs.hypercube(m)
    np.testing.assert_allclose(W.matrix, (np.eye(m) + A) / (k + 1), atol=1e-15)
    expected = np.sort(np.concatenate([np.full(comb(k, j), 1 - 2 * j / (k + 1)) for j in range(k + 1)]))[::-1]
    np.testing.assert_allclose(W.eigenvalues, expected, atol=1e-12)
    assert np.all(W.degrees == k)


@pytest.mark.parametrize(("r", "c"), [(3, 3), (3, 4), (4, 5), (5, 5)])
def test_torus_spectrum(r: int, c: int) -> None:
    m = r * c
    W = mixing_matrix("torus", m, "metropolis", rows=r)
    A = graphs.torus(m, rows=r)
    np.testing.assert_allclose(W.matrix, (np.eye(m) + A) / 5, atol=1e-15)
    a, b = np.meshgrid(np.arange(r), np.arange(c), indexing="ij")
    expected = np.sort(((1 + 2 * np.cos(2 * np.pi * a / r) + 2 * np.cos(2 * np.pi * b / c)) / 5).ravel())[
        ::-1
    ]
    np.testing.assert_allclose(W.eigenvalues, expected, atol=1e-12)


def test_torus_default_shape_is_most_square() -> None:
    # 12 = 3 x 4: every node has 4 distinct neighbours; 36 = 6 x 6.
    assert np.all(graphs.torus(12).sum(axis=1) == 4)
    A = graphs.torus(36)
    np.testing.assert_array_equal(A, graphs.torus(36, rows=6))
    assert not np.array_equal(A, graphs.torus(36, rows=4))


# ---------------------------------------------------------------------------- structure of each graph


def test_star_metropolis_entries() -> None:
    m = 5
    W = mixing_matrix("star", m).matrix
    # hub degree m-1, leaf degree 1: edge weight 1/(1 + max(m-1, 1)) = 1/m
    assert W[0, 0] == pytest.approx(1 / m)
    for j in range(1, m):
        assert W[0, j] == pytest.approx(1 / m) and W[j, 0] == pytest.approx(1 / m)
        assert W[j, j] == pytest.approx(1 - 1 / m)
        for k in range(1, m):
            if k != j:
                assert W[j, k] == 0.0
    assert mixing_matrix("star", m).degrees.tolist() == [m - 1] + [1] * (m - 1)


def test_star_max_degree_entries() -> None:
    W = mixing_matrix("star", 4, "max_degree").matrix
    np.testing.assert_allclose(W[0], [0.25, 0.25, 0.25, 0.25])
    np.testing.assert_allclose(np.diag(W)[1:], 0.75)


@pytest.mark.parametrize(("m", "deg"), [(2, 1), (4, 3), (8, 5), (16, 7), (12, 6), (5, 4)])
def test_exponential_degrees(m: int, deg: int) -> None:
    A = graphs.exponential(m)
    assert np.array_equal(A, A.T) and not A.diagonal().any()
    assert np.all(A.sum(axis=1) == deg)
    W = mixing_matrix("exponential", m)
    assert W.max_degree == deg
    i = 3 % m
    expected = sorted(
        {(i + s) % m for s in (1, 2, 4, 8) if s < m} | {(i - s) % m for s in (1, 2, 4, 8) if s < m}
    )
    assert W.neighbors(i) == [j for j in expected if j != i]


def test_ring_of_two_is_one_edge() -> None:
    A = graphs.ring(2)
    assert A.tolist() == [[False, True], [True, False]]


def test_random_graph_connected_and_reproducible() -> None:
    a1 = graphs.erdos_renyi(20, 0.2, seed=3)
    a2 = graphs.erdos_renyi(20, 0.2, seed=3)
    a3 = graphs.erdos_renyi(20, 0.2, seed=4)
    assert np.array_equal(a1, a2)
    assert not np.array_equal(a1, a3)
    assert np.array_equal(a1, a1.T) and not a1.diagonal().any()
    W = mixing_matrix("random", 20, seed=3, p=0.2)
    assert W.is_connected and W.zeta < 1
    np.testing.assert_array_equal(W.adjacency, a1)


def test_groups_are_disconnected() -> None:
    W = mixing_matrix("groups", 8, groups=2)
    assert not W.is_connected
    assert W.zeta == pytest.approx(1.0, abs=1e-12)
    assert not W.theory_applies
    assert any("disconnected" in s for s in W.theory_issues())
    # two complete blocks of 4: exact averaging inside each block
    np.testing.assert_allclose(W.matrix[:4, :4], 0.25)
    assert np.all(W.matrix[:4, 4:] == 0)


def test_one_peer_exponential_properties() -> None:
    for m in (2, 4, 8, 16, 32):
        Ws = one_peer_exponential(m)
        assert len(Ws) == int(np.log2(m))
        for t, W in enumerate(Ws):
            assert W.is_doubly_stochastic
            assert W.in_weights((5 + 2**t) % m) == {(5 + 2**t) % m: 0.5, 5 % m: 0.5}
            # the shift by m/2 is an involution (symmetric); all smaller shifts are not
            assert W.is_symmetric == (2**t == m // 2)
        product = np.linalg.multi_dot([W.matrix for W in Ws]) if len(Ws) > 1 else Ws[0].matrix
        assert np.array_equal(product, np.full((m, m), 1.0 / m))
    assert mixing_schedule("one_peer_exponential", 8)[1].name == one_peer_exponential(8)[1].name


def test_one_peer_not_symmetric_theory_issue() -> None:
    W = one_peer_exponential(8)[0]
    assert not W.theory_applies
    assert "not symmetric" in W.theory_issues()


def test_random_matching() -> None:
    rng = np.random.default_rng(0)
    for m in (2, 7, 10):
        W = random_matching(m, rng)
        assert W.is_doubly_stochastic and W.is_symmetric
        assert np.all(W.degrees <= 1)
        assert int(W.degrees.sum()) == 2 * (m // 2)
    a = random_matching(10, np.random.default_rng(1)).matrix
    b = random_matching(10, np.random.default_rng(1)).matrix
    assert np.array_equal(a, b)


@pytest.mark.parametrize("adj", [graphs.ring(10), graphs.erdos_renyi(15, 0.3, seed=1), graphs.star(6)])
def test_best_constant_beats_metropolis(adj: np.ndarray) -> None:
    bc = from_adjacency(adj, "best_constant")
    mh = from_adjacency(adj, "metropolis")
    assert bc.is_doubly_stochastic and bc.is_symmetric
    assert bc.zeta <= mh.zeta + 1e-12
    # W = I - a L with a = 2 / (lambda_1 + lambda_{n-1}) equalises the two extreme eigenvalues
    ev = bc.eigenvalues
    assert abs(ev[1]) == pytest.approx(abs(ev[-1]), abs=1e-10)


def test_metropolis_on_irregular_graph() -> None:
    adj = np.array([[0, 1, 1, 1], [1, 0, 1, 0], [1, 1, 0, 0], [1, 0, 0, 0]])
    W = from_adjacency(adj)
    assert W.matrix[0, 1] == pytest.approx(1 / 4)  # max(d0=3, d1=2) + 1
    assert W.matrix[1, 2] == pytest.approx(1 / 3)  # max(2, 2) + 1
    assert W.matrix[0, 3] == pytest.approx(1 / 4)
    assert W.is_doubly_stochastic and W.is_symmetric and W.theory_applies


# ---------------------------------------------------------------------------- MixingMatrix API


def test_in_weights_use_column_convention() -> None:
    # column-stochastic, not row-stochastic, not symmetric
    S = np.array([[0.5, 0.0, 1.0], [0.5, 0.2, 0.0], [0.0, 0.8, 0.0]])
    W = MixingMatrix(S, check="columns")
    assert W.in_weights(0) == {0: 0.5, 1: 0.5}
    assert W.in_weights(2) == {0: 1.0}
    assert W.out_weights(0) == {0: 0.5, 2: 1.0}
    assert W.row(1) == W.in_weights(1)
    assert W.is_column_stochastic and not W.is_row_stochastic and not W.is_symmetric
    assert W.neighbors(2) == [0, 1]
    assert not W.theory_applies
    issues = W.theory_issues()
    assert "not symmetric" in issues and any("rows do not sum to 1" in s for s in issues)
    with pytest.raises(MixingMatrixError, match="row 0 sums to 1.5"):
        MixingMatrix(S)


def test_matrix_is_read_only_and_object_frozen() -> None:
    src = np.eye(3)
    W = MixingMatrix(src)
    src[0, 0] = 5.0  # input was copied
    assert W.matrix[0, 0] == 1.0
    with pytest.raises(ValueError):
        W.matrix[0, 0] = 2.0
    with pytest.raises(AttributeError):
        W.name = "x"  # type: ignore[misc]
    with pytest.raises(ValueError):
        W.eigenvalues[0] = 3.0
    assert W.is_identity and not W.is_averaging
    assert W.eigenvalues is W.eigenvalues  # cached


def test_identity_and_averaging_constructors() -> None:
    I4 = MixingMatrix.identity(4)
    J4 = MixingMatrix.averaging(4)
    assert I4.is_identity and I4.zeta == pytest.approx(1.0) and not I4.is_connected
    assert J4.is_averaging and J4.name == "complete-average" and J4.zeta == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ConfigError, match="workers"):
        MixingMatrix.averaging(0)


def test_to_dict_is_json_serialisable() -> None:
    d = mixing_matrix("torus", 9).to_dict()
    back = json.loads(json.dumps(d))
    assert back["n"] == 9 and back["symmetric"] and back["doubly_stochastic"] and back["connected"]
    assert back["theory_applies"] is True
    assert back["degrees"] == [4] * 9
    assert len(back["eigenvalues"]) == 9
    # complex spectrum (a cyclic shift average) -> [re, im] pairs
    dc = json.loads(json.dumps(one_peer_exponential(8)[0].to_dict()))
    assert all(isinstance(e, list) and len(e) == 2 for e in dc["eigenvalues"])


def test_pickle_round_trip() -> None:
    W = MixingMatrix(np.array([[0.5, 1.0], [0.5, 0.0]]), name="pull", check="columns")
    W2 = pickle.loads(pickle.dumps(W))
    assert W2.name == "pull" and np.array_equal(W2.matrix, W.matrix) and W2.check == "columns"


def test_signed_matrix_allowed_only_when_asked() -> None:
    S = np.array([[1.1, -0.1], [-0.1, 1.1]])
    with pytest.raises(MixingMatrixError, match=r"entry \(0, 1\) is -0.1, must be >= 0"):
        MixingMatrix(S)
    W = from_matrix(S, allow_negative=True)
    assert not W.is_nonnegative and W.is_doubly_stochastic


# ---------------------------------------------------------------------------- validation errors


@pytest.mark.parametrize(
    ("matrix", "kwargs", "pattern"),
    [
        (np.array([[0.5, 0.47], [0.5, 0.53]]), {}, r"row 0 sums to 0.97, must be 1"),
        (np.array([[0.5, 0.5], [0.6, 0.5]]), {"check": "columns"}, r"column 0 sums to 1.1, must be 1"),
        (np.array([[1.1, -0.1], [-0.1, 1.1]]), {}, r"entry \(0, 1\) is -0.1, must be >= 0"),
        (np.ones((3, 4)) / 4, {}, r"must be square, got shape \(3, 4\)"),
        (np.ones(3), {}, r"must be square, got shape \(3,\)"),
        (np.zeros((0, 0)), {}, r"at least one node"),
        (np.array([[0.5, np.nan], [0.5, 0.5]]), {}, r"NaN/inf at \(0, 1\)"),
        (np.array([[1.0, 0.0], [0.0, np.inf]]), {"check": "none"}, r"NaN/inf at \(1, 1\)"),
    ],
)
def test_mixing_matrix_validation(matrix: np.ndarray, kwargs: dict, pattern: str) -> None:
    with pytest.raises(MixingMatrixError, match=pattern):
        MixingMatrix(matrix, **kwargs)


def test_check_none_and_rows() -> None:
    S = np.array([[0.2, 0.8], [0.9, 0.1]])  # rows sum to 1, columns do not
    assert MixingMatrix(S, check="rows").is_row_stochastic
    with pytest.raises(MixingMatrixError, match="column 0 sums to 1.1"):
        MixingMatrix(S)
    assert not MixingMatrix(np.full((2, 2), 0.3), check="none").is_row_stochastic


def test_bad_check_value() -> None:
    with pytest.raises(ConfigError, match="check='both' is invalid"):
        MixingMatrix(np.eye(2), check="both")


@pytest.mark.parametrize(
    ("call", "pattern"),
    [
        (lambda: mixing_matrix("mesh", 4), r"topology='mesh' is invalid: must be one of complete, ring"),
        (
            lambda: mixing_matrix("ring", 4, "fastest"),
            r"weights='fastest' is invalid: must be one of uniform",
        ),
        (
            lambda: mixing_matrix("hypercube", 6),
            r"workers=6 is invalid: hypercube needs a power of two \(e.g. 4 or 8\)",
        ),
        (lambda: mixing_matrix("groups", 8, groups=3), r"groups=3 is invalid: must divide workers=8"),
        (
            lambda: mixing_matrix("star", 5, "uniform"),
            r"weights='uniform' is invalid.*'metropolis' or 'max_degree'",
        ),
        (lambda: mixing_matrix("torus", 7), r"workers=7 is invalid: torus"),
        (lambda: mixing_matrix("torus", 12, rows=5), r"rows=5 is invalid"),
        (lambda: mixing_matrix("ring", 0), r"workers=0 is invalid"),
        (lambda: mixing_matrix("complete", 0), r"workers=0 is invalid"),
        (lambda: mixing_matrix("random", 8, p=0.0), r"p=0.0 is invalid"),
        (lambda: mixing_matrix("random", 30, p=0.01), r"p=0.01 is invalid: .*larger p"),
        (lambda: mixing_matrix("random", 8, seed=-1), r"seed=-1 is invalid"),
        (lambda: mixing_matrix("one_peer_exponential", 8), r"time-varying.*mixing_schedule"),
        (lambda: one_peer_exponential(6), r"workers=6 is invalid: one_peer_exponential needs a power of two"),
        (lambda: mixing_schedule("ring", 8, "nope"), r"weights='nope'"),
    ],
)
def test_builder_errors(call, pattern: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ConfigError, match=pattern):
        call()


def test_adjacency_must_be_symmetric() -> None:
    with pytest.raises(MixingMatrixError, match=r"symmetric.*\(0, 1\)"):
        from_adjacency(np.array([[0, 1], [0, 0]]))


def test_names_and_registries() -> None:
    assert set(WEIGHT_RULES) == {"uniform", "metropolis", "max_degree", "best_constant"}
    assert WEIGHT_RULES["metropolis"] is wrules.metropolis
    for topo in TOPOLOGIES:
        if topo == "one_peer_exponential":
            continue
        W = mixing_matrix(topo, 16, seed=1)
        assert W.name == f"{topo}-metropolis-16"
        assert W.is_doubly_stochastic and W.is_symmetric
        assert W.is_connected == (topo != "groups")
    sched = mixing_schedule("ring", 8, "max_degree")
    assert len(sched) == 1 and sched[0].name == "ring-max_degree-8"
    assert mixing_matrix("ring", 4, "max-degree").name == "ring-max_degree-4"


# ---------------------------------------------------------------------------- loading


def test_load_matrix_formats(tmp_path) -> None:  # type: ignore[no-untyped-def]
    W = mixing_matrix("ring", 5)
    np.save(tmp_path / "w.npy", W.matrix)
    np.savetxt(tmp_path / "w.csv", W.matrix, delimiter=",")
    np.savetxt(tmp_path / "w.txt", W.matrix)
    (tmp_path / "w.json").write_text(json.dumps(W.matrix.tolist()))
    (tmp_path / "d.json").write_text(json.dumps(W.to_dict()))
    for name in ("w.npy", "w.csv", "w.txt", "w.json"):
        L = load_matrix(tmp_path / name)
        np.testing.assert_allclose(L.matrix, W.matrix, atol=1e-15)
        assert L.name == "w"
    assert load_matrix(tmp_path / "d.json").name == "ring-metropolis-5"


def test_load_matrix_errors(tmp_path) -> None:  # type: ignore[no-untyped-def]
    missing = tmp_path / "nope.npy"
    with pytest.raises(ConfigError, match=r"nope\.npy.*does not exist"):
        load_matrix(missing)
    bad = tmp_path / "bad.csv"
    bad.write_text("1,2\nx,y\n")
    with pytest.raises(ConfigError, match=r"could not read mixing matrix from .*bad\.csv"):
        load_matrix(bad)
    weird = tmp_path / "w.xlsx"
    weird.write_text("")
    with pytest.raises(ConfigError, match=r"w\.xlsx.*unsupported suffix"):
        load_matrix(weird)
    notstoch = tmp_path / "ns.json"
    notstoch.write_text("[[1, 1], [0, 0]]")
    with pytest.raises(MixingMatrixError, match="row 0 sums to 2"):
        load_matrix(notstoch)


# ---------------------------------------------------------------------------- plotting


def check_mixing_figure(fig, W) -> None:  # type: ignore[no-untyped-def]
    """``fig`` draws ``W``: one edge (a line, or an arrow i -> j when S is not symmetric) per non-zero
    off-diagonal entry between the right nodes of the circle, the heatmap is S, the title names W and zeta."""
    from matplotlib.text import Annotation

    S, n = W.matrix, W.n
    ax_g, ax_h = fig.axes[:2]
    angles = np.pi / 2 - 2 * np.pi * np.arange(n) / n
    xy = np.stack([np.cos(angles), np.sin(angles)], axis=1)

    def node(point) -> int:  # type: ignore[no-untyped-def]
        k = int(np.argmin(np.linalg.norm(xy - np.asarray(point, dtype=float), axis=1)))
        assert np.allclose(xy[k], point), point
        return k

    if W.is_symmetric:
        drawn = {frozenset(node(p) for p in line.get_xydata()) for line in ax_g.lines}
        want = {frozenset((i, j)) for i in range(n) for j in range(n) if i != j and S[i, j] != 0}
        assert len(ax_g.lines) == len(want)
    else:
        arrows = [t for t in ax_g.texts if isinstance(t, Annotation)]
        drawn = {(node(a.xyann), node(a.xy)) for a in arrows}  # (from i, to j)
        want = {(i, j) for i in range(n) for j in range(n) if i != j and S[i, j] != 0}
        assert len(arrows) == len(want)
    assert drawn == want
    np.testing.assert_array_equal(ax_h.images[0].get_array(), S)
    assert ax_h.images[0].get_cmap().name == ("RdBu_r" if S.min() < 0 else "viridis")
    assert fig._suptitle.get_text() == f"{W.name}   n = {n},  \u03b6 = {W.zeta:.4f}"


def test_plot_writes_png(tmp_path, saved_figures, check_png) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "sub" / "ring.png"
    ring = mixing_matrix("ring", 8)
    plot_mixing_matrix(ring, out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    check_png(out)
    check_mixing_figure(saved_figures[0], ring)
    # non-symmetric and signed matrices draw too
    ope, star = one_peer_exponential(8)[0], mixing_matrix("star", 5, "best_constant")
    plot_mixing_matrix(ope, tmp_path / "ope.svg")
    plot_mixing_matrix(star, tmp_path / "bc.pdf")
    assert (tmp_path / "ope.svg").read_text().lstrip().startswith("<?xml")
    assert (tmp_path / "bc.pdf").read_bytes()[:5] == b"%PDF-"
    check_mixing_figure(saved_figures[1], ope)
    check_mixing_figure(saved_figures[2], star)
    with pytest.raises(ConfigError, match="path"):
        plot_mixing_matrix(mixing_matrix("ring", 4), tmp_path / "x.bmp")
