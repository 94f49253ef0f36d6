"""Per-worker mini-batches from pre-loaded tensors ([SPEC] §5 "Policies": data order).

Policy, identical in every engine:

* each worker draws only from its own shard (the index array :func:`~coopsgd.data.partition.partition`
  gave it);
* each epoch each worker visits its shard in its own order, a permutation drawn from a ``torch.Generator``
  seeded from ``(seed, worker, epoch)`` -- reproducible, different across workers and epochs, and
  independent of how many batches were consumed before (so resuming needs only the position);
* fixed batch size; the last incomplete batch of every worker is dropped, and all workers take the
  same number of steps per epoch: ``steps_per_epoch = min_i(len(shard_i) // batch_size)``;
* an optional per-batch augmentation runs with its own generator seeded from
  ``(seed, worker, epoch, batch)``.

Batches are plain tensor indexing of ``x`` and ``y``: no ``DataLoader``, no worker processes.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from coopsgd.data._seed import mix_seed
from coopsgd.data.datasets import BatchTransform, Dataset
from coopsgd.data.partition import partition
from coopsgd.errors import ConfigError, check_int

__all__ = ["WorkerLoader", "deterministic_batches"]

Batch = tuple[Tensor, Tensor]

_ORDER_TAG = 0
_AUGMENT_TAG = 1


class _Default:
    """Sentinel: use the data set's own transform."""


_DEFAULT = _Default()


def _xy(
    data: Dataset | tuple[Tensor, Tensor] | Sequence[Tensor],
) -> tuple[Tensor, Tensor, BatchTransform | None]:
    if isinstance(data, Dataset):
        return data.x, data.y, data.transform
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, Tensor) for t in data):
        x, y = data
        if x.shape[0] != y.shape[0]:
            raise ConfigError.invalid(
                "dataset",
                f"(x of {x.shape[0]} rows, y of {y.shape[0]} rows)",
                "x and y must have the same length",
            )
        return x, y, None
    raise ConfigError.invalid(
        "dataset", type(data).__name__, "must be a coopsgd Dataset or a pair (x, y) of tensors"
    )


class WorkerLoader:
    """Mini-batches for m workers, each from its own shard, with a resumable position.

    Args:
        dataset: a :class:`~coopsgd.data.datasets.Dataset` or a pair ``(x, y)`` of tensors (same length).
        parts: one index array per worker (e.g. from :func:`~coopsgd.data.partition.partition`).
        batch_size: samples per batch per worker (>= 1, <= the smallest shard).
        seed: base seed of the per-(worker, epoch) orders and of the augmentation.
        transform: per-batch augmentation ``(x, generator) -> x``; default: the data set's own
            ``transform`` (``None`` for a pair of tensors). Pass ``None`` to disable (e.g. evaluation).

    The stateful cursor (:meth:`next_step`, iteration) yields one batch per worker per step and moves
    through epochs; :meth:`state_dict` / :meth:`load_state_dict` save and restore that position, so a
    run resumes mid-epoch with exactly the batches it would have seen. The random-access methods
    (:meth:`batch`, :meth:`batches`) do not touch the cursor.
    """

    def __init__(
        self,
        dataset: Dataset | tuple[Tensor, Tensor],
        parts: Sequence[np.ndarray | Tensor | Sequence[int]],
        batch_size: int,
        *,
        seed: int = 0,
        transform: BatchTransform | None | _Default = _DEFAULT,
    ) -> None:
        x, y, own_transform = _xy(dataset)
        self.x: Tensor = x
        self.y: Tensor = y
        self.transform: BatchTransform | None = (
            own_transform if isinstance(transform, _Default) else transform
        )
        self.seed: int = check_int("seed", seed, minimum=0)
        self.batch_size: int = check_int("batch_size", batch_size, minimum=1)
        if len(parts) < 1:
            raise ConfigError.invalid(
                "parts", list(parts), "must hold one index array per worker (at least one)"
            )
        n = int(x.shape[0])
        self.parts: list[Tensor] = []
        for w, p in enumerate(parts):
            idx = torch.as_tensor(np.asarray(p.cpu() if isinstance(p, Tensor) else p), dtype=torch.int64)
            if idx.dim() != 1:
                raise ConfigError.invalid(f"parts[{w}]", f"array of shape {tuple(idx.shape)}", "must be 1-D")
            if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= n):
                raise ConfigError.invalid(f"parts[{w}]", "index array", f"indices must lie in [0, {n - 1}]")
            self.parts.append(idx.to(x.device))
        smallest = min(int(p.numel()) for p in self.parts)
        self.steps_per_epoch: int = smallest // self.batch_size
        if self.steps_per_epoch == 0:
            raise ConfigError.invalid(
                "batch_size",
                batch_size,
                f"must be <= the smallest worker shard ({smallest} samples), or no full batch is left "
                "(the last incomplete batch is dropped)",
            )
        self._epoch = 0
        self._batch = 0
        self._order_cache: dict[tuple[int, int], Tensor] = {}

    @classmethod
    def from_partition(
        cls,
        dataset: Dataset,
        workers: int,
        batch_size: int,
        *,
        scheme: str = "iid",
        beta: float = 0.5,
        shards_per_worker: int = 2,
        seed: int = 0,
        transform: BatchTransform | None | _Default = _DEFAULT,
    ) -> WorkerLoader:
        """Partition ``dataset`` by its labels (see :func:`~coopsgd.data.partition.partition`) and wrap it."""
        parts = partition(
            dataset.y, workers, scheme, beta=beta, shards_per_worker=shards_per_worker, seed=seed
        )
        return cls(dataset, parts, batch_size, seed=seed, transform=transform)

    # ------------------------------------------------------------------ properties

    @property
    def workers(self) -> int:
        """Number of workers m."""
        return len(self.parts)

    @property
    def shard_sizes(self) -> tuple[int, ...]:
        """Samples in each worker's shard."""
        return tuple(int(p.numel()) for p in self.parts)

    @property
    def position(self) -> tuple[int, int]:
        """Cursor position ``(epoch, batch index within the epoch)`` of the next :meth:`next_step`."""
        return self._epoch, self._batch

    @property
    def epoch_progress(self) -> float:
        """Fractional epochs consumed by the cursor."""
        return self._epoch + self._batch / self.steps_per_epoch

    # ------------------------------------------------------------------ random access

    def order(self, epoch: int, worker: int) -> Tensor:
        """Global sample indices of ``worker``'s shard in its ``epoch`` order (full shard, int64)."""
        epoch = check_int("epoch", epoch, minimum=0)
        worker = check_int("worker", worker, minimum=0, maximum=self.workers - 1)
        key = (epoch, worker)
        cached = self._order_cache.get(key)
        if cached is not None:
            return cached
        if len(self._order_cache) >= 4 * self.workers:  # keep roughly the current and previous epoch
            self._order_cache.clear()
        part = self.parts[worker]
        gen = torch.Generator().manual_seed(mix_seed(self.seed, _ORDER_TAG, worker, epoch))
        perm = torch.randperm(part.numel(), generator=gen).to(part.device)
        out = part[perm]
        self._order_cache[key] = out
        return out

    def batch(self, epoch: int, worker: int, index: int) -> Batch:
        """Batch number ``index`` (0-based) of ``worker`` in ``epoch``: tensors ``(x, y)``."""
        index = check_int("index", index, minimum=0, maximum=self.steps_per_epoch - 1)
        order = self.order(epoch, worker)
        idx = order[index * self.batch_size : (index + 1) * self.batch_size]
        xb, yb = self.x[idx], self.y[idx]
        if self.transform is not None:
            gen = torch.Generator().manual_seed(mix_seed(self.seed, _AUGMENT_TAG, worker, epoch, index))
            xb = self.transform(xb, gen)
        return xb, yb

    def batches(self, epoch: int, worker: int, start: int = 0) -> Iterator[Batch]:
        """The batches of ``worker`` in ``epoch`` from batch ``start`` on (``steps_per_epoch`` in all)."""
        start = check_int("start", start, minimum=0, maximum=self.steps_per_epoch)
        for b in range(start, self.steps_per_epoch):
            yield self.batch(epoch, worker, b)

    # ------------------------------------------------------------------ cursor

    def next_step(self) -> list[Batch]:
        """One batch for every worker at the cursor position, then advance (rolling over epochs)."""
        out = [self.batch(self._epoch, w, self._batch) for w in range(self.workers)]
        self._batch += 1
        if self._batch == self.steps_per_epoch:
            self._epoch += 1
            self._batch = 0
        return out

    def __iter__(self) -> Iterator[list[Batch]]:
        """Endless stream of :meth:`next_step` results (the caller decides when to stop)."""
        while True:
            yield self.next_step()

    def seek(self, epoch: int = 0, batch: int = 0) -> None:
        """Move the cursor to ``(epoch, batch)``."""
        self._epoch = check_int("epoch", epoch, minimum=0)
        self._batch = check_int("batch", batch, minimum=0, maximum=self.steps_per_epoch - 1)

    def _fingerprint(self) -> int:
        crc = 0
        for p in self.parts:
            crc = zlib.crc32(p.cpu().numpy().astype("<i8").tobytes(), crc)
            crc = zlib.crc32(b"|", crc)
        return crc

    def state_dict(self) -> dict[str, Any]:
        """Position plus what it depends on (seed, batch size, shards), as plain Python values."""
        return {
            "epoch": self._epoch,
            "batch": self._batch,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "workers": self.workers,
            "shard_sizes": list(self.shard_sizes),
            "parts_crc32": self._fingerprint(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the position saved by :meth:`state_dict`; the loader must be built the same way."""
        if not isinstance(state, dict) or "epoch" not in state or "batch" not in state:
            raise ConfigError.invalid(
                "state_dict", type(state).__name__, "must be a dict from WorkerLoader.state_dict()"
            )
        mine = self.state_dict()
        for key in ("seed", "batch_size", "workers", "shard_sizes", "parts_crc32"):
            if key in state and state[key] != mine[key]:
                raise ConfigError.invalid(
                    f"state_dict[{key!r}]", state[key], f"does not match this loader ({key}={mine[key]!r})"
                )
        self.seek(state["epoch"], state["batch"])


def deterministic_batches(
    dataset: Dataset | tuple[Tensor, Tensor], batch_size: int, num_batches: int, *, seed: int = 0
) -> list[Batch]:
    """``num_batches`` batches of ``batch_size`` drawn from seeded permutations of the whole data set.

    Cycles through fresh permutations (seeded from ``(seed, pass)``) when more batches than one pass are
    needed; the last incomplete batch of a pass is dropped. Meant for tests and small examples.
    """
    x, y, _ = _xy(dataset)
    batch_size = check_int("batch_size", batch_size, minimum=1, maximum=int(x.shape[0]))
    num_batches = check_int("num_batches", num_batches, minimum=0)
    per_pass = int(x.shape[0]) // batch_size
    out: list[Batch] = []
    p = 0
    while len(out) < num_batches:
        gen = torch.Generator().manual_seed(mix_seed(seed, 2, p))
        perm = torch.randperm(int(x.shape[0]), generator=gen).to(x.device)
        for b in range(min(per_pass, num_batches - len(out))):
            idx = perm[b * batch_size : (b + 1) * batch_size]
            out.append((x[idx], y[idx]))
        p += 1
    return out
