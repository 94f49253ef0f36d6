"""The problem of a run built from a :class:`RunConfig`: data, partition, loader, spec, model and step counts.

:func:`build_problem` is the one construction every neural-network run uses (the simulator, each rank of a
distributed run, the parent that checks a distributed run before starting processes); it returns a typed,
frozen :class:`Problem`. The pieces every engine's loop shares live here too: the learning rate of a step
(:func:`lr_at`) and the data of a step (:func:`feed_from`: each worker its own shard, its own order per
epoch, last incomplete batch dropped).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F

from coopsgd.algorithms import AlgorithmSpec
from coopsgd.algorithms.registry import declaration
from coopsgd.data import Dataset, WorkerLoader, label_histograms, lm_windows, load_dataset, partition
from coopsgd.errors import ConfigError
from coopsgd.models import make_model
from coopsgd.train.config import RunConfig
from coopsgd.train.config.sections import DEFAULT_LR

__all__ = ["Problem", "TrainingData", "build_problem", "holdout_split", "split_holdout", "lr_at", "feed_from", "lm_loss",
           "run_length", "epoch_steps", "base_lr", "inner_optimizer", "planned_steps", "settle", "run_threads",
           "LM_SEQ_LEN", "REFERENCE_STEPS", "FITTED_ROUNDS", "ONE_THREAD_MODELS"]

#: Tokens per window of a language-model data set (:func:`coopsgd.data.lm_windows`).
LM_SEQ_LEN = 35
#: Steps of a reference-engine run without ``max_steps``.
REFERENCE_STEPS = 300
#: Communication rounds a run gets when its preset's default period is longer than the run (:func:`settle`).
FITTED_ROUNDS = 10
#: Models whose steps are faster with one torch thread than with two on a 2-core machine, alone and beside
#: another job (benchmarks/README.md, "Threads"): a run of one of them uses 1 thread unless ``threads`` is given.
ONE_THREAD_MODELS = ("mlp", "lenet", "resnet20")

LossFn = Callable[..., torch.Tensor]


@dataclass(frozen=True)
class Problem:
    """What a run trains on, whatever the engine (:func:`build_problem`).

    Attributes:
        spec: the algorithm, with the preset's run-time inputs from the data (FedAvg's shard sizes).
        train_set: the training data the workers' shards partition (the held-out part removed).
        test_set: the test data.
        holdout_set: the held-out part of the training data (``holdout_fraction``; ``None``: no split).
        is_lm: a language model (token windows; perplexity instead of accuracy).
        histograms: the label histogram of each worker's shard (``None`` for a language model).
        loader: the workers' data order (:class:`coopsgd.data.WorkerLoader`).
        model: the initial model (every engine copies it).
        loss_fn: the loss of a batch.
        dtype: the parameters' dtype.
        probe: LSGD's probe batch (``loss_estimate="probe"``), else ``None``.
        total_steps: the step the run stops at.
        eval_every: evaluate after every ``eval_every`` steps (and at the end).
    """

    spec: AlgorithmSpec
    train_set: Dataset
    test_set: Dataset
    holdout_set: Dataset | None
    is_lm: bool
    histograms: np.ndarray | None
    loader: WorkerLoader
    model: torch.nn.Module
    loss_fn: LossFn
    dtype: torch.dtype
    probe: tuple[torch.Tensor, torch.Tensor] | None
    total_steps: int
    eval_every: int

    @property
    def steps_per_epoch(self) -> int:
        """Steps of one epoch, one pass over the training set (:func:`epoch_steps`)."""
        return epoch_steps(self.loader)


def epoch_steps(loader: Any) -> int:
    """Steps of one epoch: one pass over the whole training set, its samples / (workers x batch size), at least 1.

    Each worker still draws its own shard in its own order (:func:`feed_from`, the loader's own epochs); with
    unequal shards (a Dirichlet partition) an epoch is no longer decided by the smallest one."""
    sizes = loader.shard_sizes
    return _pass_steps(int(sum(sizes)), len(sizes), int(loader.batch_size))


def _pass_steps(samples: int, workers: int, batch_size: int) -> int:
    return max(1, samples // (workers * batch_size))


class TrainingData(Protocol):
    """What the loop plan and the evaluation of a neural-network run read: a :class:`Problem`, or a run
    built by hand (:class:`coopsgd.train.trainer.Experiment`)."""

    @property
    def spec(self) -> AlgorithmSpec: ...
    @property
    def loader(self) -> Any: ...
    @property
    def train_set(self) -> Any: ...
    @property
    def test_set(self) -> Any: ...
    @property
    def holdout_set(self) -> Any: ...
    @property
    def is_lm(self) -> bool: ...
    @property
    def loss_fn(self) -> LossFn: ...
    @property
    def total_steps(self) -> int: ...
    @property
    def eval_every(self) -> int: ...
    @property
    def steps_per_epoch(self) -> int: ...


def lr_at(config: RunConfig, step: int, steps_per_epoch: int, sim_time: float) -> float:
    """Learning rate of ``step``: linear warm-up, then x ``lr_decay_factor`` per passed epoch/time milestone."""
    lr = base_lr(config)
    if config.schedule.lr_warmup_steps and step < config.schedule.lr_warmup_steps:
        lr *= (step + 1) / config.schedule.lr_warmup_steps
    epoch = step / steps_per_epoch
    passed = sum(1 for e in config.schedule.lr_decay_epochs if epoch >= e)
    passed += sum(1 for t in config.schedule.lr_decay_times_s if sim_time >= t)
    return lr * config.schedule.lr_decay_factor**passed


@functools.cache
def _prescribed_optimizer(preset: str) -> str | None:
    """The inner optimizer a preset prescribes (DiLoCo: AdamW; ``None``: none), from a spec built with its
    defaults: what a preset prescribes does not depend on its settings."""
    try:
        return RunConfig(preset=preset, workers=4).build_spec(shard_sizes=[1.0] * 4, steps_per_epoch=1).inner_optimizer
    except ConfigError:
        return None


def inner_optimizer(config: RunConfig) -> str | None:
    """The workers' inner optimizer by name: the run's, else the preset's own, else ``"sgd"`` (``None``: a
    torch.optim class given through the Python API)."""
    if config.optimizer.torch_class is not None:
        return None
    return config.optimizer.name or _prescribed_optimizer(config.algorithm.preset) or "sgd"


def base_lr(config: RunConfig) -> float:
    """The run's learning rate before its schedule: ``lr``, or when none is given the default of the inner
    optimizer (:data:`coopsgd.train.config.sections.DEFAULT_LR`: 0.1 for SGD, 1e-3 for Adam and AdamW)."""
    if config.schedule.lr is not None:
        return float(config.schedule.lr)
    return DEFAULT_LR.get(inner_optimizer(config) or "sgd", DEFAULT_LR["sgd"])


def lm_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over every token of a language model's windows."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))


def run_length(config: RunConfig, steps_per_epoch: int) -> tuple[int, int]:
    """``(total_steps, eval_every)`` of a run: ``max_steps`` or ``epochs`` of ``steps_per_epoch``; evaluation
    ``eval_every`` steps apart, by default ten times a run but at least once an epoch."""
    s = config.schedule
    total = s.max_steps if s.max_steps is not None else max(1, math.ceil(s.epochs * steps_per_epoch))
    eval_every = config.evaluation.eval_every or max(1, min(steps_per_epoch, total // 10 or 1))
    return total, eval_every


def run_threads(config: RunConfig) -> int | None:
    """The torch threads of a run in this process: ``threads``, else 1 for a simulator run of one of the small
    models of :data:`ONE_THREAD_MODELS`, else ``None`` (torch's own; the reference engine computes with numpy)."""
    e = config.execution
    if e.threads is not None:
        return e.threads
    if e.engine == "simulate" and config.problem.model in ONE_THREAD_MODELS:
        return 1
    return None


def planned_steps(config: RunConfig) -> int:
    """The number of steps a fresh run of ``config`` takes, before anything is built: ``max_steps``, the
    reference engine's :data:`REFERENCE_STEPS`, or ``epochs`` of the training set (its data is loaded)."""
    s = config.schedule
    if s.max_steps is not None:
        return s.max_steps
    if config.execution.engine == "reference":
        return REFERENCE_STEPS
    _, _, _, parts, _ = _data(config)
    per_epoch = _pass_steps(sum(len(p) for p in parts), config.algorithm.workers, config.problem.batch_size)
    return run_length(config, per_epoch)[0]


def _fitted_tau(config: RunConfig) -> tuple[int, str] | None:
    """``(tau, note)`` when the preset's default period (``tau`` not given) is longer than the run, so no round
    would communicate: tau becomes the run's length / :data:`FITTED_ROUNDS`."""
    a = config.algorithm
    arg = declaration(a.preset).arg("tau")
    if arg is None or a.tau is not None or a.local_epochs is not None or a.workers < 2 or a.warmup_steps:
        return None
    default = arg.default
    if not isinstance(default, int) or default <= 1:
        return None
    total = planned_steps(config)
    if total >= default:
        return None
    tau = max(1, total // FITTED_ROUNDS)
    return tau, (f"{a.preset}'s default tau = {default} is longer than this run of {total} steps (no round would "
                 f"communicate): tau = {tau} instead, {total // tau} rounds; give --tau to choose")


def settle(config: RunConfig) -> tuple[RunConfig, tuple[str, ...]]:
    """The config a fresh run starts from, with the defaults that depend on the run written in (so that
    ``config.json`` says what ran, and a resumed or repeated run is the same run), and a note for each choice
    a user would not expect:

    * ``lr`` not given: the inner optimizer's default (:func:`base_lr`; noted for an adaptive optimizer);
    * ``tau`` not given and the preset's default longer than the run (DiLoCo's H = 500 in a run of 155 steps):
      tau = steps / :data:`FITTED_ROUNDS`.
    """
    changes: dict[str, Any] = {}
    notes: list[str] = []
    if config.schedule.lr is None:
        changes["lr"] = lr = base_lr(config)
        name = inner_optimizer(config)
        if name is not None and name != "sgd":
            notes.append(f"lr = {lr:g}, the default learning rate of {name} (sgd's is {DEFAULT_LR['sgd']:g}); give "
                         "--lr to choose")
    fitted = _fitted_tau(config)
    if fitted is not None:
        changes["tau"] = fitted[0]
        notes.append(fitted[1])
    return (config.replace(**changes) if changes else config), tuple(notes)


def feed_from(loader: Any) -> Callable[[int, Sequence[int], np.ndarray | None], list[Any]]:
    """The data of step k for the workers a process runs: worker i's k-th batch of its own shard order."""
    m = len(loader.shard_sizes)
    spe = loader.steps_per_epoch

    def feed(step: int, local: Sequence[int], active: np.ndarray | None) -> list[Any]:
        epoch, bi = divmod(step, spe)
        out: list[Any] = [None] * m
        for i in local:
            if active is None or active[i]:
                out[i] = loader.batch(epoch, i, bi)
        return out

    return feed


def _check_model_fits(model: torch.nn.Module, data: Any, c: RunConfig, dtype: torch.dtype) -> None:
    """One forward pass of two samples (on a copy): a model that does not fit the data is a ConfigError
    naming the model and the input shape, before any training (or any process) starts."""
    x = data.x[:2]
    probe = copy.deepcopy(model).to(dtype=dtype)
    try:
        with torch.no_grad():
            probe.eval()(x if data.vocab is not None else x.to(dtype))
    except (RuntimeError, ValueError, IndexError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError.invalid("model", c.problem.model, f"does not fit dataset {c.problem.dataset!r} (inputs of shape "
                                  f"{tuple(x.shape[1:])}): {first}") from None


def holdout_split(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``(train, held_out)``: sorted int64 indices splitting ``range(n)`` for ``evaluation.holdout_fraction``.

    ``round(fraction * n)`` samples (at least one when ``fraction > 0``) are drawn without replacement by a
    generator of their own seeded with ``seed`` (the global RNGs are not touched), so the split depends on
    ``(n, fraction, seed)`` alone; the rest, in their original order, is the training set. ``fraction = 0``:
    every index trains, nothing is drawn.
    """
    fraction = float(fraction)
    if not 0.0 <= fraction < 1.0:
        raise ConfigError.invalid("holdout_fraction", fraction, "must be in [0, 1)")
    if fraction == 0.0:
        return np.arange(n, dtype=np.int64), np.zeros(0, dtype=np.int64)
    k = max(1, int(round(fraction * n)))
    if k >= n:
        raise ConfigError.invalid("holdout_fraction", fraction, f"holds out all {n} training samples; "
                                  "leave some to train on")
    rng = np.random.default_rng([int(seed), 0x484F4C44])  # its own stream ("HOLD")
    held = np.sort(rng.choice(n, size=k, replace=False)).astype(np.int64)
    keep = np.ones(n, dtype=bool)
    keep[held] = False
    return np.flatnonzero(keep).astype(np.int64), held


def split_holdout(data: Any, fraction: float, seed: int) -> tuple[Any, Any]:
    """``(train, held_out)`` :class:`~coopsgd.data.Dataset` s of ``data`` (samples or LM windows) by
    :func:`holdout_split`; ``held_out`` is ``None`` when ``fraction`` is 0 (``data`` is returned as is)."""
    if not fraction:
        return data, None
    keep, held = holdout_split(len(data), fraction, seed)
    train = dataclasses.replace(data, x=data.x[torch.from_numpy(keep)], y=data.y[torch.from_numpy(keep)])
    out = dataclasses.replace(data, x=data.x[torch.from_numpy(held)], y=data.y[torch.from_numpy(held)],
                              name=f"{data.name} (held out)", transform=None)
    return train, out


def _data(c: RunConfig) -> tuple[Any, Any, Any, list[np.ndarray], np.ndarray | None]:
    """``(train_set, holdout_set, test_set, parts, histograms)``: the data sets and the workers' shards.

    With ``holdout_fraction > 0`` the held-out samples (LM windows) are split off (:func:`split_holdout`)
    before the workers' partition: ``train_set`` is what remains."""
    p, seed = c.problem, c.execution.seed
    train_set = load_dataset(p.dataset, root=p.data_root, split="train", download=p.download, seed=seed,
                             augment=p.augment)
    test_set = load_dataset(p.dataset, root=p.data_root, split="test", download=p.download, seed=seed)
    if train_set.vocab is not None:
        train_set = lm_windows(train_set.x, LM_SEQ_LEN, vocab=train_set.vocab)
        test_set = lm_windows(test_set.x, LM_SEQ_LEN, vocab=train_set.vocab)
        train_set, holdout_set = split_holdout(train_set, c.evaluation.holdout_fraction, seed)
        parts = partition(np.zeros(len(train_set), dtype=np.int64), c.algorithm.workers, "iid", seed=seed)
        return train_set, holdout_set, test_set, parts, None
    train_set, holdout_set = split_holdout(train_set, c.evaluation.holdout_fraction, seed)
    if c.algorithm.workers > len(train_set):
        raise ConfigError.invalid("workers", c.algorithm.workers, f"more workers than training samples ({len(train_set)})")
    parts = partition(train_set.y, c.algorithm.workers, p.partition, beta=p.dirichlet_beta,
                      shards_per_worker=p.shards_per_worker, seed=seed)
    return train_set, holdout_set, test_set, parts, label_histograms(train_set.y, parts, train_set.num_classes)


def build_problem(config: RunConfig) -> Problem:
    """Data, partition, loader, spec, model and step counts of a run: the one construction every engine uses.

    The model is created right after ``torch.manual_seed(config.execution.seed)`` and checked against the data
    (one forward pass of two samples on a copy): a model that does not fit is a :class:`ConfigError`.
    """
    c = config
    train_set, holdout_set, test_set, parts, histograms = _data(c)
    is_lm = train_set.vocab is not None
    loader = WorkerLoader(train_set, parts, c.problem.batch_size, seed=c.execution.seed)
    # the preset's declaration says which run-time inputs it takes (FedAvg: shard sizes, local epochs)
    spec = c.build_spec(shard_sizes=loader.shard_sizes, steps_per_epoch=loader.steps_per_epoch)
    torch.manual_seed(c.execution.seed)
    model_kw: dict[str, Any] = dict(c.problem.model_args)
    if is_lm and c.problem.model == "lstm_lm":
        model_kw.setdefault("batch_first", True)  # lm_windows + WorkerLoader give (batch, seq_len) tokens
    model = make_model(c.problem.model, num_classes=train_set.num_classes, input_shape=train_set.input_shape, **model_kw)
    dtype = torch.float64 if c.execution.dtype == "float64" else torch.float32
    _check_model_fits(model, train_set, c, dtype)
    probe = None
    if c.algorithm.loss_estimate == "probe":
        g = torch.Generator().manual_seed(c.execution.seed)
        idx = torch.randperm(len(train_set), generator=g)[: min(512, len(train_set))]
        probe = (train_set.x[idx].to(dtype) if not is_lm else train_set.x[idx], train_set.y[idx])
    total, eval_every = run_length(c, epoch_steps(loader))
    return Problem(spec=spec, train_set=train_set, test_set=test_set, holdout_set=holdout_set, is_lm=is_lm,
                   histograms=histograms, loader=loader, model=model, loss_fn=lm_loss if is_lm else F.cross_entropy,
                   dtype=dtype, probe=probe, total_steps=total, eval_every=eval_every)
