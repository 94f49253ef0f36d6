"""The :class:`MixingMatrix`: an immutable, validated n x n float64 mixing matrix.

Convention ([CSGD] eq. (3)): the state X is d x n (one column per node) and a communication round is
``X <- X S``. Column i of S therefore holds node i's *in*-weights::

    new x_i = sum_j S[j, i] x_j.

"Rows sum to 1" means ``S 1 = 1`` (the paper's ``W 1 = 1``; it preserves the average of the columns of
X); "columns sum to 1" means ``1^T S = 1^T`` (every node's new value is an affine/convex combination).
The theorems of [CSGD] (Assumption 5) need S symmetric, doubly stochastic and
``zeta = max(|lambda_2|, |lambda_n|) < 1``; :attr:`MixingMatrix.theory_applies` checks exactly that.

Eigenvalues, zeta and the spectral gap come from :mod:`coopsgd.theory.spectral` and are computed once,
lazily, and cached on the instance.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np

from coopsgd.errors import ConfigError, MixingMatrixError, check_int
from coopsgd.theory import spectral

__all__ = ["MixingMatrix", "CHECKS", "Check", "undirected_adjacency", "is_connected_adjacency", "MAX_DENSE_NODES",
           "check_dense_nodes"]

Check = Literal["doubly", "rows", "columns", "none"]
#: Allowed values of the ``check`` argument: which sums must equal 1.
CHECKS: tuple[str, ...] = ("doubly", "rows", "columns", "none")

#: Tolerance for "sums to 1".
SUM_TOL = 1e-8
#: Tolerance for "entry >= 0" / "is identity" / "is averaging" (round-off in hand-built weights).
ENTRY_TOL = 1e-12
#: zeta must be below ``1 - ZETA_TOL`` for the theorems to apply.
ZETA_TOL = 1e-12
#: Most nodes of a dense matrix the topology builders make: one n x n float64 matrix is 8 n^2 bytes
#: (512 MiB at 8192 nodes, several times that while it is built and checked) and its eigendecomposition
#: takes O(n^3). Larger named graphs get their spectrum in closed form (:mod:`coopsgd.topology.spectra`).
MAX_DENSE_NODES = 8192


def check_dense_nodes(n: int, field: str = "workers") -> int:
    """``n`` if a dense ``n x n`` matrix may be built (at most :data:`MAX_DENSE_NODES`), else a
    :class:`ConfigError` naming ``field``, the memory it would take and the limit."""
    if n > MAX_DENSE_NODES:
        gib = 8 * n * n / 2**30
        raise ConfigError.invalid(field, n, f"a dense {n} x {n} mixing matrix needs {gib:,.0f} GiB (8 n^2 bytes) and "
                                  f"an O(n^3) eigendecomposition; at most {MAX_DENSE_NODES} nodes are built densely "
                                  "(`coopsgd topology` gives the spectrum of larger complete, ring, torus, "
                                  "hypercube, exponential, star and groups graphs in closed form)")
    return n


def undirected_adjacency(matrix: np.ndarray) -> np.ndarray:
    """Boolean adjacency with an edge i--j (i != j) when ``S[i, j] != 0`` or ``S[j, i] != 0``."""
    a = np.asarray(matrix)
    nz = a != 0
    adj = nz | nz.T
    np.fill_diagonal(adj, False)
    return adj


def is_connected_adjacency(adj: np.ndarray) -> bool:
    """True when the undirected graph with boolean adjacency ``adj`` has one connected component."""
    a = np.asarray(adj, dtype=bool)
    if a.shape[0] <= 1:
        return True
    from scipy.sparse import csgraph  # imported here: scipy costs ~0.2 s at start-up (`coopsgd --help`)

    n_components, _ = csgraph.connected_components(a.astype(np.int8), directed=False)
    return bool(n_components == 1)


def _fmt(x: float) -> str:
    return f"{x:.10g}"


def _rebuild(matrix: np.ndarray, name: str, check: str, allow_negative: bool) -> MixingMatrix:
    """Pickle helper: rebuild (and re-validate) a MixingMatrix."""
    return MixingMatrix(matrix, name, check=check, allow_negative=allow_negative)


class MixingMatrix:
    """An immutable, validated n x n float64 mixing matrix S (column i = node i's in-weights).

    Parameters
    ----------
    matrix:
        Anything ``np.asarray`` turns into a square 2-D float array. It is copied and made read-only.
    name:
        A short label used in logs, plots and result files (e.g. ``"ring-metropolis-8"``).
    check:
        Which sums must equal 1 (tolerance 1e-8): ``"doubly"`` (rows and columns; the default and what
        [CSGD] Assumption 5 needs), ``"rows"`` (``S 1 = 1``), ``"columns"`` (``1^T S = 1^T``, e.g. the
        LSGD pull matrix) or ``"none"``.
    allow_negative:
        Accept negative entries (e.g. the best-constant weights ``I - a L`` of Xiao & Boyd).

    Raises
    ------
    MixingMatrixError
        When the matrix is not square 2-D, is empty, has NaN/inf, has a negative entry (unless
        ``allow_negative``) or breaks the requested sums; the message names the property and where.
    ConfigError
        When ``check`` is not one of :data:`CHECKS`.
    """

    __slots__ = ("_matrix", "_name", "_check", "_allow_negative", "_cache", "__weakref__")

    _matrix: np.ndarray
    _name: str
    _check: str
    _allow_negative: bool
    _cache: dict[str, Any]

    def __init__(
        self,
        matrix: Any,
        name: str = "custom",
        *,
        check: str = "doubly",
        allow_negative: bool = False,
    ) -> None:
        if check not in CHECKS:
            raise ConfigError.invalid("check", check, f"must be one of {', '.join(map(repr, CHECKS))}")
        arr = _validate(matrix, check=check, allow_negative=allow_negative)
        arr.setflags(write=False)
        object.__setattr__(self, "_matrix", arr)
        object.__setattr__(self, "_name", str(name))
        object.__setattr__(self, "_check", check)
        object.__setattr__(self, "_allow_negative", bool(allow_negative))
        object.__setattr__(self, "_cache", {})

    # ------------------------------------------------------------------ immutability
    def __setattr__(self, key: str, value: Any) -> None:
        raise AttributeError(f"MixingMatrix is immutable; cannot set {key!r}")

    def __delattr__(self, key: str) -> None:
        raise AttributeError(f"MixingMatrix is immutable; cannot delete {key!r}")

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return (_rebuild, (np.array(self._matrix), self._name, self._check, self._allow_negative))

    def __copy__(self) -> MixingMatrix:
        return self

    def __deepcopy__(self, memo: dict[int, Any]) -> MixingMatrix:
        return self

    # ------------------------------------------------------------------ constructors
    @classmethod
    def identity(cls, n: int) -> MixingMatrix:
        """``S = I``: no communication (a local step of local SGD)."""
        n = check_dense_nodes(check_int("workers", n, minimum=1))
        return cls(np.eye(n), name="identity")

    @classmethod
    def averaging(cls, n: int) -> MixingMatrix:
        """``S = J = 1 1^T / n``: exact averaging (all-reduce), zeta = 0."""
        n = check_dense_nodes(check_int("workers", n, minimum=1))
        return cls(np.full((n, n), 1.0 / n), name="complete-average")

    # ------------------------------------------------------------------ basic attributes
    @property
    def matrix(self) -> np.ndarray:
        """The read-only float64 array S."""
        return self._matrix

    @property
    def name(self) -> str:
        return self._name

    @property
    def check(self) -> str:
        """The sums that were validated at construction (one of :data:`CHECKS`)."""
        return self._check

    @property
    def allow_negative(self) -> bool:
        return self._allow_negative

    @property
    def n(self) -> int:
        """Number of nodes."""
        return int(self._matrix.shape[0])

    @property
    def shape(self) -> tuple[int, int]:
        return (self.n, self.n)

    def _cached(self, key: str, fn: Any) -> Any:
        cache = self._cache
        if key not in cache:
            cache[key] = fn()
        return cache[key]

    def _adj(self) -> np.ndarray:
        """The cached undirected adjacency (internal; never handed out without a copy)."""
        adj: np.ndarray = self._cached("adjacency", lambda: undirected_adjacency(self._matrix))
        return adj

    # ------------------------------------------------------------------ structural properties
    @property
    def is_symmetric(self) -> bool:
        """``S == S^T`` (tolerance 1e-10)."""
        return bool(self._cached("symmetric", lambda: spectral.is_symmetric(self._matrix)))

    @property
    def is_row_stochastic(self) -> bool:
        """``S 1 = 1``: rows sum to 1 (the paper's ``W 1 = 1``, average-preserving)."""
        return bool(np.all(np.abs(self._matrix.sum(axis=1) - 1.0) <= SUM_TOL))

    @property
    def is_column_stochastic(self) -> bool:
        """``1^T S = 1^T``: columns sum to 1 (each node's new value is a weighted combination)."""
        return bool(np.all(np.abs(self._matrix.sum(axis=0) - 1.0) <= SUM_TOL))

    @property
    def is_doubly_stochastic(self) -> bool:
        return self.is_row_stochastic and self.is_column_stochastic

    @property
    def is_nonnegative(self) -> bool:
        return bool(np.all(self._matrix >= -ENTRY_TOL))

    @property
    def adjacency(self) -> np.ndarray:
        """Undirected boolean adjacency (edge i--j when ``S[i, j]`` or ``S[j, i]`` is non-zero, i != j)."""
        return self._adj().copy()

    @property
    def is_connected(self) -> bool:
        """Whether the undirected communication graph (see :attr:`adjacency`) is connected."""
        return bool(self._cached("connected", lambda: is_connected_adjacency(self._adj())))

    @property
    def is_identity(self) -> bool:
        return bool(np.allclose(self._matrix, np.eye(self.n), rtol=0.0, atol=ENTRY_TOL))

    @property
    def is_averaging(self) -> bool:
        """All entries equal ``1/n`` (``S = J``)."""
        return bool(np.allclose(self._matrix, 1.0 / self.n, rtol=0.0, atol=ENTRY_TOL))

    # ------------------------------------------------------------------ spectrum ([CSGD] Assumption 5)
    @property
    def eigenvalues(self) -> np.ndarray:
        """Eigenvalues (real and sorted descending when symmetric; else by descending modulus). Read-only."""

        def compute() -> np.ndarray:
            ev = np.array(spectral.eigenvalues(self._matrix))
            ev.setflags(write=False)
            return ev

        ev: np.ndarray = self._cached("eigenvalues", compute)
        return ev

    @property
    def zeta(self) -> float:
        """``zeta = max(|lambda_2(S)|, |lambda_n(S)|)`` ([CSGD] Theorem 1); 0 for ``S = J``, 1 if disconnected."""
        return float(self._cached("zeta", lambda: spectral.zeta(self._matrix)))

    @property
    def spectral_gap(self) -> float:
        """``1 - zeta``."""
        return 1.0 - self.zeta

    @property
    def degrees(self) -> np.ndarray:
        """Number of neighbours j != i of each node (in- or out-edge) as an int array."""

        def compute() -> np.ndarray:
            d = self._adj().sum(axis=1).astype(np.int64)
            d.setflags(write=False)
            return d

        d: np.ndarray = self._cached("degrees", compute)
        return d

    @property
    def max_degree(self) -> int:
        """Largest number of neighbours (the per-round handshakes of decentralized SGD, [CSGD] Table 3)."""
        return int(self.degrees.max()) if self.n else 0

    @property
    def theory_applies(self) -> bool:
        """[CSGD] Assumption 5: symmetric, doubly stochastic and ``zeta < 1``."""
        return self.is_symmetric and self.is_doubly_stochastic and self.zeta < 1.0 - ZETA_TOL

    def theory_issues(self) -> list[str]:
        """Human-readable reasons why :attr:`theory_applies` is False (empty list when it holds)."""
        issues: list[str] = []
        if not self.is_symmetric:
            issues.append("not symmetric")
        if not self.is_row_stochastic:
            issues.append("rows do not sum to 1 (S 1 != 1: the average is not preserved)")
        if not self.is_column_stochastic:
            issues.append("columns do not sum to 1 (1^T S != 1^T)")
        z = self.zeta
        if z >= 1.0 - ZETA_TOL:
            if not self.is_connected:
                issues.append(f"zeta = {z:.6g} (graph disconnected)")
            else:
                issues.append(f"zeta = {z:.6g} >= 1 (averaging does not converge, e.g. an eigenvalue -1)")
        return issues

    # ------------------------------------------------------------------ per-node views
    def _node(self, i: int) -> int:
        return check_int("node", i, minimum=0, maximum=self.n - 1)

    def in_weights(self, i: int) -> dict[int, float]:
        """Non-zero entries of column i: ``{j: S[j, i]}``, so that ``new x_i = sum_j S[j, i] x_j``."""
        i = self._node(i)
        col = self._matrix[:, i]
        return {int(j): float(col[j]) for j in np.flatnonzero(col)}

    def row(self, i: int) -> dict[int, float]:
        """Alias of :meth:`in_weights` (what rank i needs in the distributed engine)."""
        return self.in_weights(i)

    def out_weights(self, i: int) -> dict[int, float]:
        """Non-zero entries of row i: ``{j: S[i, j]}``, the weights node i's model receives at node j."""
        i = self._node(i)
        r = self._matrix[i, :]
        return {int(j): float(r[j]) for j in np.flatnonzero(r)}

    def neighbors(self, i: int) -> list[int]:
        """Sorted nodes j != i that node i exchanges with (``S[j, i] != 0`` or ``S[i, j] != 0``)."""
        i = self._node(i)
        return [int(j) for j in np.flatnonzero(self._adj()[i])]

    # ------------------------------------------------------------------ export
    def to_dict(self, *, matrix: bool = True) -> dict[str, Any]:
        """A JSON-ready summary (plain Python floats, ints, bools and lists); ``matrix=False`` leaves the
        n x n entries out (``"matrix": None``)."""
        ev = self.eigenvalues
        if np.iscomplexobj(ev):
            eigs: list[Any] = [[float(v.real), float(v.imag)] for v in ev]
        else:
            eigs = [float(v) for v in ev]
        return {
            "name": self.name,
            "n": self.n,
            "matrix": [[float(x) for x in r] for r in self._matrix] if matrix else None,
            "zeta": self.zeta,
            "spectral_gap": self.spectral_gap,
            "eigenvalues": eigs,
            "degrees": [int(d) for d in self.degrees],
            "symmetric": self.is_symmetric,
            "doubly_stochastic": self.is_doubly_stochastic,
            "connected": self.is_connected,
            "theory_applies": self.theory_applies,
        }

    def __repr__(self) -> str:
        parts = [f"name={self.name!r}", f"n={self.n}"]
        if "zeta" in self._cache:
            parts.append(f"zeta={self._cache['zeta']:.4g}")
        return f"MixingMatrix({', '.join(parts)})"

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        # Lets np.asarray(W) work; always hands out a fresh array so the stored one stays read-only.
        return np.array(self._matrix, dtype=dtype)


def check_square(arr: np.ndarray, what: str) -> None:
    """A square 2-D array with at least one node, else a MixingMatrixError naming ``what`` and the shape."""
    if arr.ndim != 2 or arr.shape[0] != arr.shape[1]:
        raise MixingMatrixError(f"{what} must be square, got shape {arr.shape}")
    if arr.shape[0] < 1:
        raise MixingMatrixError(f"{what} must have at least one node, got shape {arr.shape}")


def _validate(matrix: Any, *, check: str, allow_negative: bool) -> np.ndarray:
    """Return a float64 copy of ``matrix`` or raise a MixingMatrixError naming the broken property."""
    try:
        arr = np.array(getattr(matrix, "matrix", matrix), dtype=np.float64, copy=True)
    except (TypeError, ValueError) as exc:
        raise MixingMatrixError(f"mixing matrix must be a numeric 2-D array: {exc}") from None
    check_square(arr, "mixing matrix")
    bad = ~np.isfinite(arr)
    if bad.any():
        i, j = (int(v) for v in np.argwhere(bad)[0])
        raise MixingMatrixError(f"mixing matrix has NaN/inf at ({i}, {j})")
    if not allow_negative:
        neg = arr < -ENTRY_TOL
        if neg.any():
            i, j = (int(v) for v in np.argwhere(neg)[0])
            raise MixingMatrixError(
                f"mixing matrix entry ({i}, {j}) is {_fmt(arr[i, j])}, must be >= 0 "
                "(pass allow_negative=True to accept signed weights)"
            )
    if check in ("doubly", "rows"):
        _check_sums(arr.sum(axis=1), "row")
    if check in ("doubly", "columns"):
        _check_sums(arr.sum(axis=0), "column")
    return arr


def _check_sums(sums: np.ndarray, kind: str) -> None:
    off = np.abs(sums - 1.0) > SUM_TOL
    if off.any():
        k = int(np.flatnonzero(off)[0])
        raise MixingMatrixError(f"mixing matrix {kind} {k} sums to {_fmt(sums[k])}, must be 1")
