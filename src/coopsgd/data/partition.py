"""Split a data set across workers ([SPEC] §6 "Partitions").

``partition(labels, workers, scheme)`` returns one sorted index array per worker:

``"iid"``
    A seeded permutation cut into ``workers`` nearly equal pieces (sizes differ by at most one).
``"dirichlet"``
    Label skew (Hsu et al. 2019, "Measuring the effects of non-identical data distribution"): for each
    class c, proportions p_c ~ Dir(beta * 1_m) decide which share of class c each worker gets. Small
    ``beta`` -> each worker sees few classes; ``beta -> inf`` -> IID class mix. The draw is repeated (a
    bounded number of times) until every worker has at least one sample.
``"shards"``
    By-class shards (McMahan et al. 2017, FedAvg): sort by label, cut into ``workers * shards_per_worker``
    equal shards, give each worker ``shards_per_worker`` random shards; each worker then sees at most
    ``shards_per_worker`` classes when shard boundaries align with classes.

:func:`label_histograms` reports the per-worker class counts (workers x classes).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from coopsgd.errors import ConfigError, check_float, check_int

__all__ = ["SCHEMES", "partition", "label_histograms", "DIRICHLET_MAX_DRAWS"]

#: Partition schemes accepted by :func:`partition`.
SCHEMES: tuple[str, ...] = ("iid", "dirichlet", "shards")
#: How many Dirichlet draws :func:`partition` tries before giving up on "every worker gets a sample".
DIRICHLET_MAX_DRAWS: int = 100


def _as_labels(labels: Any) -> np.ndarray:
    if isinstance(labels, torch.Tensor):
        labels = labels.detach().cpu().numpy()
    arr = np.asarray(labels)
    if arr.ndim != 1:
        raise ConfigError.invalid("labels", f"array of shape {arr.shape}", "must be a 1-D array of class ids")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise ConfigError.invalid("labels", f"array of dtype {arr.dtype}", "must hold integer class ids")
    if arr.size and arr.min() < 0:
        raise ConfigError.invalid("labels", f"array with minimum {arr.min()}", "class ids must be >= 0")
    return arr.astype(np.int64, copy=False)


def partition(
    labels: np.ndarray | torch.Tensor | Sequence[int],
    workers: int,
    scheme: str = "iid",
    *,
    beta: float = 0.5,
    shards_per_worker: int = 2,
    seed: int = 0,
) -> list[np.ndarray]:
    """Index arrays (sorted, int64), one per worker, that together cover every sample exactly once.

    Args:
        labels: class id of every sample (1-D, integers >= 0).
        workers: number of workers m (>= 1, <= number of samples).
        scheme: ``"iid"``, ``"dirichlet"`` or ``"shards"``.
        beta: Dirichlet concentration (> 0), used by ``"dirichlet"``.
        shards_per_worker: shards per worker (>= 1), used by ``"shards"``.
        seed: seed of every random choice.

    Raises:
        ConfigError: naming ``workers``, ``scheme``, ``beta``, ``shards_per_worker`` or ``labels``.
    """
    y = _as_labels(labels)
    n = int(y.size)
    workers = check_int("workers", workers, minimum=1)
    seed = check_int("seed", seed, minimum=0)
    if workers > n:
        raise ConfigError.invalid("workers", workers, f"must be <= the number of samples ({n})")
    if not isinstance(scheme, str) or scheme.strip().lower() not in SCHEMES:
        raise ConfigError.invalid("scheme", scheme, f"must be one of {', '.join(SCHEMES)}")
    key = scheme.strip().lower()
    rng = np.random.default_rng(seed)
    if key == "iid":
        parts = np.array_split(rng.permutation(n), workers)
    elif key == "dirichlet":
        beta = check_float("beta", beta, low=0.0, low_open=True)
        parts = _dirichlet(y, workers, beta, rng)
    else:
        shards_per_worker = check_int("shards_per_worker", shards_per_worker, minimum=1)
        parts = _shards(y, workers, shards_per_worker, rng)
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]


def _dirichlet(y: np.ndarray, workers: int, beta: float, rng: np.random.Generator) -> list[np.ndarray]:
    classes = np.unique(y)
    by_class = [np.flatnonzero(y == c) for c in classes]
    for _ in range(DIRICHLET_MAX_DRAWS):
        buckets: list[list[np.ndarray]] = [[] for _ in range(workers)]
        for idx in by_class:
            idx = rng.permutation(idx)
            p = rng.dirichlet(np.full(workers, beta))
            # Cut points from the cumulative proportions; rounding keeps every sample exactly once.
            cuts = np.round(np.cumsum(p)[:-1] * idx.size).astype(np.int64)
            for w, piece in enumerate(np.split(idx, cuts)):
                buckets[w].append(piece)
        parts = [np.concatenate(b) if b else np.empty(0, np.int64) for b in buckets]
        if min(p.size for p in parts) >= 1:
            return parts
    raise ConfigError.invalid(
        "beta",
        beta,
        f"Dirichlet label skew left some of the {workers} workers without samples in {DIRICHLET_MAX_DRAWS} "
        f"draws ({y.size} samples); use a larger beta, fewer workers or scheme='iid'",
    )


def _shards(y: np.ndarray, workers: int, per_worker: int, rng: np.random.Generator) -> list[np.ndarray]:
    total = workers * per_worker
    if total > y.size:
        raise ConfigError.invalid(
            "shards_per_worker",
            per_worker,
            f"workers * shards_per_worker = {workers} * {per_worker} = {total} must be <= the number of "
            f"samples ({y.size})",
        )
    # Random order within each class, then a stable sort by label: shards are runs of one class.
    perm = rng.permutation(y.size)
    order = perm[np.argsort(y[perm], kind="stable")]
    shards = np.array_split(order, total)
    assignment = rng.permutation(total)
    return [
        np.concatenate([shards[s] for s in assignment[w * per_worker : (w + 1) * per_worker]])
        for w in range(workers)
    ]


def label_histograms(
    labels: np.ndarray | torch.Tensor | Sequence[int],
    parts: Sequence[np.ndarray | torch.Tensor | Sequence[int]],
    num_classes: int | None = None,
) -> np.ndarray:
    """Per-worker label counts, an int64 array of shape ``(workers, num_classes)``.

    ``num_classes`` defaults to ``max(labels) + 1``; each row sums to the size of that worker's part.
    """
    y = _as_labels(labels)
    if num_classes is None:
        num_classes = int(y.max()) + 1 if y.size else 0
    num_classes = check_int("num_classes", num_classes, minimum=0)
    if y.size and int(y.max()) >= num_classes:
        raise ConfigError.invalid("num_classes", num_classes, f"must be > the largest label ({int(y.max())})")
    out = np.zeros((len(parts), num_classes), dtype=np.int64)
    for w, p in enumerate(parts):
        idx = p.detach().cpu().numpy() if isinstance(p, torch.Tensor) else np.asarray(p, dtype=np.int64)
        out[w] = np.bincount(y[idx], minlength=num_classes)
    return out
