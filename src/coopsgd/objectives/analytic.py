"""Analytic objectives: quadratics, the [LSGD] sinc toy, matrix completion, logistic regression (digits)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

import numpy as np

from coopsgd.errors import ConfigError, check_float, check_int

__all__ = ["Objective", "Quadratic", "SincToy", "MatrixCompletion", "LogisticRegression", "OBJECTIVES", "make_objective"]


@runtime_checkable
class Objective(Protocol):
    """What the reference engine needs from a problem."""

    dim: int

    def value(self, x: np.ndarray) -> np.ndarray | float: ...

    def gradient(self, x: np.ndarray, worker: int, rng: np.random.Generator) -> np.ndarray: ...

    def initial_point(self, rng: np.random.Generator) -> np.ndarray: ...


def _rows(x: np.ndarray) -> tuple[np.ndarray, bool]:
    x = np.asarray(x, dtype=np.float64)
    return (x[None, :], True) if x.ndim == 1 else (x, False)


class Quadratic:
    """``F(x) = (1/m) sum_i 1/2 (x - b_i)^T A (x - b_i)``, gradient noise ``sigma * N(0, I)``.

    ``A`` is symmetric positive definite with eigenvalues spread over [mu, L] (seeded); with
    ``heterogeneity > 0`` the workers' minimisers b_i differ (non-IID, [CSGD] Theorem 2's kappa).
    """

    def __init__(
        self,
        dim: int = 10,
        *,
        workers: int = 1,
        L: float = 1.0,
        mu: float = 0.1,
        sigma: float = 0.0,
        heterogeneity: float = 0.0,
        seed: int = 0,
    ) -> None:
        self.dim = check_int("dim", dim, minimum=1)
        self.workers = check_int("workers", workers, minimum=1)
        self.L = check_float("L", L, low=0.0, low_open=True)
        self.mu = check_float("mu", mu, low=0.0, low_open=True, high=self.L)
        self.sigma = check_float("sigma", sigma, low=0.0)
        heterogeneity = check_float("heterogeneity", heterogeneity, low=0.0)
        rng = np.random.default_rng(seed)
        Q, _ = np.linalg.qr(rng.standard_normal((self.dim, self.dim)))
        eig = np.linspace(self.mu, self.L, self.dim)
        self.A = (Q * eig) @ Q.T
        self.A = (self.A + self.A.T) / 2
        self.b = heterogeneity * rng.standard_normal((self.workers, self.dim))
        self.b_mean = self.b.mean(axis=0)
        # F(x) = 1/2 (x - bbar)^T A (x - bbar) + const, const = mean_i 1/2 (b_i - bbar)^T A (b_i - bbar)
        D = self.b - self.b_mean
        self._const = 0.5 * float(np.mean(np.einsum("id,de,ie->i", D, self.A, D)))

    def value(self, x: np.ndarray) -> np.ndarray | float:
        X, single = _rows(x)
        D = X - self.b_mean
        v = 0.5 * np.einsum("nd,de,ne->n", D, self.A, D) + self._const
        return float(v[0]) if single else v

    def gradient(self, x: np.ndarray, worker: int, rng: np.random.Generator) -> np.ndarray:
        g = self.A @ (np.asarray(x, dtype=np.float64) - self.b[worker % self.workers])
        if self.sigma > 0:
            g = g + self.sigma * rng.standard_normal(self.dim)
        return g

    def initial_point(self, rng: np.random.Generator) -> np.ndarray:
        return rng.standard_normal(self.dim)

    @property
    def minimum(self) -> float:
        return self._const


class SincToy:
    """The [LSGD] toy ``L(x, y) = sin(pi r) / (pi r)``, ``r = sqrt(x^2 + y^2)`` (value 1 at r = 0).

    Rings of local minima; the global minimum -0.2172 lies on the circle r ~ 1.430. Gradient:
    ``(cos(pi r) - sinc(r)) / r * (x, y) / r``. Optional gradient noise ``sigma``.
    """

    dim = 2
    #: [LSGD] toy starting points of the 4 workers.
    STARTS = np.array([[-6.0, -4.0], [-15.0, -18.0], [20.0, 11.0], [17.0, 8.0]])

    def __init__(self, *, sigma: float = 0.0) -> None:
        self.sigma = check_float("sigma", sigma, low=0.0)

    @staticmethod
    def _sinc(r: np.ndarray) -> np.ndarray:
        return np.sinc(r)  # numpy's sinc is sin(pi r)/(pi r)

    def value(self, x: np.ndarray) -> np.ndarray | float:
        X, single = _rows(x)
        v = self._sinc(np.linalg.norm(X, axis=1))
        return float(v[0]) if single else v

    def gradient(self, x: np.ndarray, worker: int, rng: np.random.Generator) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64)
        r = float(np.linalg.norm(x))
        if r < 1e-12:
            g = np.zeros(2)
        else:
            dr = (np.cos(np.pi * r) - np.sinc(r)) / r
            g = dr * x / r
        if self.sigma > 0:
            g = g + self.sigma * rng.standard_normal(2)
        return g

    def initial_point(self, rng: np.random.Generator) -> np.ndarray:
        return self.STARTS[0].copy()


class MatrixCompletion:
    """``F(X) = 1/4 ||M - X X^T||_F^2`` with ``M = U U^T``, ``U in R^{d x r}`` i.i.d. N(0, 1) ([LSGD] §5).

    Parameters are ``X`` flattened (row-major, d*r entries). ``grad F = (X X^T - M) X`` is evaluated as
    ``X (X^T X) - U (U^T X)`` in O(d r^2), and the value as
    ``1/4 (||U^T U||^2 - 2 ||U^T X||^2 + ||X^T X||^2)``, never forming d x d matrices.
    """

    def __init__(self, d: int = 1000, rank: int = 10, *, sigma: float = 0.0, seed: int = 0) -> None:
        self.d = check_int("d", d, minimum=1)
        self.rank = check_int("rank", rank, minimum=1)
        self.sigma = check_float("sigma", sigma, low=0.0)
        self.U = np.random.default_rng(seed).standard_normal((self.d, self.rank))
        self.dim = self.d * self.rank

    def value(self, x: np.ndarray) -> np.ndarray | float:
        X, single = _rows(x)
        Xs = X.reshape(X.shape[0], self.d, self.rank)
        # M - X X^T = A D A^T with A = [U, X], D = diag(I, -I). With A = Q R (Q orthonormal),
        # ||A D A^T||_F = ||R D R^T||_F: exact near the optimum, where expanding the square cancels badly.
        A = np.concatenate([np.broadcast_to(self.U, Xs.shape[:1] + self.U.shape), Xs], axis=2)
        R = np.linalg.qr(A, mode="r")
        sign = np.concatenate([np.ones(self.rank), -np.ones(self.rank)])
        core = np.einsum("nik,k,njk->nij", R, sign, R)
        v = 0.25 * np.sum(core * core, axis=(1, 2))
        return float(v[0]) if single else v

    def gradient(self, x: np.ndarray, worker: int, rng: np.random.Generator) -> np.ndarray:
        X = np.asarray(x, dtype=np.float64).reshape(self.d, self.rank)
        g = X @ (X.T @ X) - self.U @ (self.U.T @ X)
        if self.sigma > 0:
            g = g + self.sigma * rng.standard_normal(g.shape)
        return g.reshape(-1)

    def initial_point(self, rng: np.random.Generator) -> np.ndarray:
        return rng.standard_normal(self.dim)


class LogisticRegression:
    """Multinomial logistic regression on scikit-learn's digits (1,797 8x8 images, 10 classes).

    Features are pixels / 16 plus a bias; ``F(w) = mean cross-entropy + reg/2 ||W||^2`` over the training
    part. Each worker owns an IID shard (or a label-sorted shard when ``iid=False``) and uses mini-batches
    of ``batch_size`` drawn with its own generator (``batch_size=None``: full shard gradient, exact).
    """

    def __init__(
        self,
        *,
        workers: int = 1,
        batch_size: int | None = 32,
        reg: float = 1e-3,
        iid: bool = True,
        test_fraction: float = 0.2,
        seed: int = 0,
    ) -> None:
        from sklearn.datasets import load_digits

        self.workers = check_int("workers", workers, minimum=1)
        self.batch_size = None if batch_size is None else check_int("batch_size", batch_size, minimum=1)
        self.reg = check_float("reg", reg, low=0.0)
        test_fraction = check_float("test_fraction", test_fraction, low=0.0, high=1.0, high_open=True)
        data = load_digits()
        X = np.hstack([data.data / 16.0, np.ones((len(data.data), 1))])
        y = data.target.astype(np.int64)
        rng = np.random.default_rng(seed)
        perm = rng.permutation(len(y))
        n_test = int(round(test_fraction * len(y)))
        test, train = perm[:n_test], perm[n_test:]
        self.X_train, self.y_train = X[train], y[train]
        self.X_test, self.y_test = X[test], y[test]
        self.classes = 10
        self.features = X.shape[1]
        self.dim = self.features * self.classes
        if self.workers > len(train):
            raise ConfigError.invalid("workers", workers, f"more workers than training samples ({len(train)})")
        order = np.argsort(self.y_train, kind="stable") if not iid else rng.permutation(len(train))
        self.shards = np.array_split(order, self.workers)
        if self.batch_size is not None and self.batch_size > min(len(s) for s in self.shards):
            raise ConfigError.invalid(
                "batch_size", batch_size, f"must be <= the smallest shard ({min(len(s) for s in self.shards)} samples)"
            )

    def _loss_grad(self, w: np.ndarray, X: np.ndarray, y: np.ndarray, need_grad: bool) -> tuple[float, np.ndarray | None]:
        W = w.reshape(self.features, self.classes)
        logits = X @ W
        logits -= logits.max(axis=1, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
        loss = -float(np.mean(logp[np.arange(len(y)), y])) + 0.5 * self.reg * float(np.sum(W * W))
        if not need_grad:
            return loss, None
        p = np.exp(logp)
        p[np.arange(len(y)), y] -= 1.0
        G = X.T @ p / len(y) + self.reg * W
        return loss, G.reshape(-1)

    def value(self, x: np.ndarray) -> np.ndarray | float:
        X, single = _rows(x)
        v = np.array([self._loss_grad(row, self.X_train, self.y_train, False)[0] for row in X])
        return float(v[0]) if single else v

    def gradient(self, x: np.ndarray, worker: int, rng: np.random.Generator) -> np.ndarray:
        shard = self.shards[worker % self.workers]
        if self.batch_size is not None:
            shard = rng.choice(shard, size=self.batch_size, replace=False)
        _, g = self._loss_grad(np.asarray(x, dtype=np.float64), self.X_train[shard], self.y_train[shard], True)
        assert g is not None
        return g

    def accuracy(self, x: np.ndarray, *, test: bool = True) -> float:
        X, y = (self.X_test, self.y_test) if test else (self.X_train, self.y_train)
        W = np.asarray(x, dtype=np.float64).reshape(self.features, self.classes)
        return float(np.mean(np.argmax(X @ W, axis=1) == y))

    def initial_point(self, rng: np.random.Generator) -> np.ndarray:
        return 0.01 * rng.standard_normal(self.dim)


OBJECTIVES: dict[str, Callable[..., Any]] = {
    "quadratic": Quadratic,
    "sinc": SincToy,
    "matrix_completion": MatrixCompletion,
    "logistic": LogisticRegression,
}


def make_objective(name: str, **kwargs: Any) -> Objective:
    """Build an objective by name; unknown names/arguments raise ConfigError naming them."""
    import inspect

    if name not in OBJECTIVES:
        raise ConfigError.invalid("objective", name, f"choose one of {', '.join(OBJECTIVES)}")
    cls = OBJECTIVES[name]
    accepted = set(inspect.signature(cls).parameters)
    for key, value in kwargs.items():
        if key not in accepted:
            raise ConfigError.invalid(key, value, f"not an argument of objective {name!r}; it takes {', '.join(sorted(accepted))}")
    return cls(**kwargs)
