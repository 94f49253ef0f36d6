"""Runs built from a :class:`RunConfig`: the problem, the engine, the one training loop, the run directory.

Every engine is driven by :func:`coopsgd.train.loop.run_loop` with the same :class:`LoopPlan` pieces built
here: the learning rate of each step (:func:`lr_at`), the data order (:class:`coopsgd.data.WorkerLoader`:
each worker its own shard, its own order per epoch, last incomplete batch dropped; :func:`feed_from`),
the evaluation (:func:`nn_evaluator`; one metric schema whatever the engine, :data:`TIME_KEYS`) and the
checkpoints (:func:`checkpoint_state`, :func:`load_run_checkpoint`: one layout, the engine's state
envelope inside). :func:`train` runs the simulator, :func:`train_reference` the reference engine and
:func:`coopsgd.train.distributed.run_distributed` one process per worker, each rank running this loop.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from coopsgd.algorithms import AlgorithmSpec
from coopsgd.engines.base import Engine, ModelEngine, NonFiniteError, StepStats
from coopsgd.errors import ConfigError
from coopsgd.train.config import RunConfig
from coopsgd.train.loop import LoopPlan, LoopState, run_loop
from coopsgd.train.progress import Progress
from coopsgd.train.rundir import RunDir, check_run_dir, tensorboard_enabled

__all__ = ["Experiment", "build", "holdout_split", "split_holdout", "engine_optimizer_kwargs", "build_problem", "iterate", "train", "train_reference", "run", "lr_at",
           "evaluate_model", "checkpoint_state", "load_run_checkpoint", "summarize", "TIME_KEYS",
           "CHECKPOINT_FORMAT"]

log = logging.getLogger(__name__)

#: ``format`` of every run checkpoint (``checkpoint.pt``), whatever the engine: ``engine`` says which wrote it.
CHECKPOINT_FORMAT = "coopsgd-checkpoint-v2"


@dataclass
class Experiment:
    """Everything built from a RunConfig: spec, data, model, simulator, loader."""

    config: RunConfig
    spec: AlgorithmSpec
    sim: Any
    loader: Any
    train_set: Any
    test_set: Any
    loss_fn: Callable[..., torch.Tensor]
    total_steps: int
    eval_every: int
    is_lm: bool = False
    histograms: np.ndarray | None = None
    #: the held-out part of the training data (``config.holdout_fraction``; ``None``: no split)
    holdout_set: Any = None
    loop_state: LoopState = field(default_factory=LoopState)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def steps_per_epoch(self) -> int:
        return int(self.loader.steps_per_epoch)


def lr_at(config: RunConfig, step: int, steps_per_epoch: int, sim_time: float) -> float:
    """Learning rate of ``step``: linear warm-up, then x ``lr_decay_factor`` per passed epoch/time milestone."""
    lr = config.schedule.lr
    if config.schedule.lr_warmup_steps and step < config.schedule.lr_warmup_steps:
        lr *= (step + 1) / config.schedule.lr_warmup_steps
    epoch = step / steps_per_epoch
    passed = sum(1 for e in config.schedule.lr_decay_epochs if epoch >= e)
    passed += sum(1 for t in config.schedule.lr_decay_times_s if sim_time >= t)
    return lr * config.schedule.lr_decay_factor**passed


def _lm_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))


def _check_model_fits(model: torch.nn.Module, data: Any, c: RunConfig, dtype: torch.dtype) -> None:
    """One forward pass of two samples (on a copy): a model that does not fit the data is a ConfigError
    naming the model and the input shape, before any training (or any process) starts."""
    import copy

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
    """``(train, held_out)``: sorted int64 indices splitting ``range(n)`` for ``RunConfig.holdout_fraction``.

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
    import dataclasses

    if not fraction:
        return data, None
    keep, held = holdout_split(len(data), fraction, seed)
    train = dataclasses.replace(data, x=data.x[torch.from_numpy(keep)], y=data.y[torch.from_numpy(keep)])
    out = dataclasses.replace(data, x=data.x[torch.from_numpy(held)], y=data.y[torch.from_numpy(held)],
                              name=f"{data.name} (held out)", transform=None)
    return train, out


def build_problem(config: RunConfig) -> dict[str, Any]:
    """Data, partition, loader, spec, model and step counts of a run: the one construction every engine uses.

    Keys: train_set, holdout_set, test_set, is_lm, histograms, loader, spec, model, dtype, probe, total,
    eval_every, loss_fn. With ``holdout_fraction > 0`` the held-out samples (LM windows) are split off
    (:func:`split_holdout`) before the workers' partition: ``train_set`` is what remains.
    """
    from coopsgd.data import WorkerLoader, label_histograms, load_dataset, partition
    from coopsgd.models import make_model

    c = config
    train_set = load_dataset(c.problem.dataset, root=c.problem.data_root, split="train", download=c.problem.download, seed=c.execution.seed,
                             augment=c.problem.augment)
    test_set = load_dataset(c.problem.dataset, root=c.problem.data_root, split="test", download=c.problem.download, seed=c.execution.seed)
    is_lm = train_set.vocab is not None
    histograms = None
    if is_lm:
        from coopsgd.data import lm_windows

        seq_len = 35
        train_set = lm_windows(train_set.x, seq_len, vocab=train_set.vocab)
        test_set = lm_windows(test_set.x, seq_len, vocab=train_set.vocab)
        train_set, holdout_set = split_holdout(train_set, c.evaluation.holdout_fraction, c.execution.seed)
        parts = partition(np.zeros(len(train_set), dtype=np.int64), c.algorithm.workers, "iid", seed=c.execution.seed)
    else:
        train_set, holdout_set = split_holdout(train_set, c.evaluation.holdout_fraction, c.execution.seed)
        if c.algorithm.workers > len(train_set):
            raise ConfigError.invalid("workers", c.algorithm.workers, f"more workers than training samples ({len(train_set)})")
        parts = partition(train_set.y, c.algorithm.workers, c.problem.partition, beta=c.problem.dirichlet_beta,
                          shards_per_worker=c.problem.shards_per_worker, seed=c.execution.seed)
        histograms = label_histograms(train_set.y, parts, train_set.num_classes)
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
    spe = loader.steps_per_epoch
    total = c.schedule.max_steps if c.schedule.max_steps is not None else max(1, math.ceil(c.schedule.epochs * spe))
    eval_every = c.evaluation.eval_every or max(1, min(spe, total // 10 or 1))
    return {"train_set": train_set, "holdout_set": holdout_set, "test_set": test_set, "is_lm": is_lm, "histograms": histograms,
            "loader": loader, "spec": spec, "model": model, "dtype": dtype, "probe": probe, "total": total,
            "eval_every": eval_every, "loss_fn": _lm_loss if is_lm else F.cross_entropy}


def sim_clock(config: RunConfig) -> Any:
    """The simulated clock of a run (:class:`coopsgd.engines.simulator.clock.SimClock`): the config's network and
    compute model (``"flops"``: counted FLOPs at ``compute_gflops``, falling back to a constant
    ``compute_ms`` for a model that cannot be counted; ``"measured"``; or a ``compute_ms`` distribution)."""
    from coopsgd.engines.simulator.clock import FlopCompute, SimClock
    from coopsgd.theory.cost import ComputeModel, NetworkModel

    c = config
    network = NetworkModel.from_mbps(c.clock.net_latency_ms, c.clock.net_bandwidth_mbps)
    compute: ComputeModel | FlopCompute | None = None
    if c.clock.compute == "flops":
        compute = FlopCompute(c.clock.compute_gflops, fallback=ComputeModel(mean_s=c.clock.compute_ms / 1e3))
    elif c.clock.compute != "measured":
        compute = ComputeModel(mean_s=c.clock.compute_ms / 1e3, distribution=c.clock.compute, spread=c.clock.compute_spread)
    return SimClock(network, compute, seed=c.execution.seed)


def engine_optimizer_kwargs(config: RunConfig) -> dict[str, Any]:
    """The inner-optimizer arguments of the simulator and the distributed engine from a config: ``optimizer``
    (``None``: the preset's own, else SGD), SGD's momentum / Nesterov, Adam's betas / eps / AMSGrad and the
    optimizer's weight decay (``None``: torch's default)."""
    o = config.optimizer
    return {"optimizer": o.name, "momentum": o.momentum, "nesterov": o.nesterov, "weight_decay": o.weight_decay,
            "betas": o.betas, "eps": o.eps, "amsgrad": o.amsgrad}


def build(config: RunConfig) -> Experiment:
    """Build the spec, data, partition, model and simulator of a ``simulate`` run.

    The simulator's one-time choices are made here, on the batches of step 0 (nothing is trained):
    ``executor="auto"`` reads the executor from the cache (:class:`coopsgd.engines.simulator.calibration.ExecutorCache`,
    ``$COOPSGD_CACHE_DIR``) or times both once and stores the choice, and the FLOP compute model counts
    the FLOPs of one worker's step (``sim.executor_info()``, ``sim.compute_model_info()``).
    """
    from coopsgd.engines.simulator import Simulator
    from coopsgd.engines.simulator.calibration import ExecutorCache

    c = config
    p = build_problem(c)
    clock = sim_clock(c)
    sim = Simulator(p["spec"], p["model"], loss_fn=p["loss_fn"], **engine_optimizer_kwargs(c),
                    executor=c.execution.executor, dtype=p["dtype"], seed=c.execution.seed,
                    loss_estimate=c.algorithm.loss_estimate, probe_batch=p["probe"], clock=clock,
                    downpour_order=c.algorithm.downpour_order if p["spec"].schedule.sequential else "schedule",
                    nan_policy=c.execution.nan_policy, device=c.execution.device,
                    executor_cache=ExecutorCache() if c.execution.executor == "auto" else None)
    sim.prepare(feed_from(p["loader"])(0, range(c.algorithm.workers), p["spec"].schedule.active(0)))
    return Experiment(config=c, spec=p["spec"], sim=sim, loader=p["loader"], train_set=p["train_set"],
                      test_set=p["test_set"], loss_fn=p["loss_fn"], total_steps=p["total"],
                      eval_every=p["eval_every"], is_lm=p["is_lm"], histograms=p["histograms"],
                      holdout_set=p["holdout_set"])


@torch.no_grad()
def evaluate_model(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn: Callable[..., torch.Tensor],
                   *, is_lm: bool = False, batch: int = 500, dtype: torch.dtype = torch.float32) -> dict[str, float]:
    """Mean loss and accuracy (classification) or perplexity (language model) of ``model`` on (x, y).

    The data may live elsewhere (the data sets are on the CPU): each batch moves to the model's device.
    """
    model.eval()
    first: torch.Tensor | None = next(iter(model.parameters()), None)
    if first is None:
        first = next(iter(model.buffers()), None)
    device = first.device if first is not None else torch.device("cpu")
    total, correct, n = 0.0, 0, 0
    for i in range(0, len(x), batch):
        xb, yb = x[i:i + batch], y[i:i + batch].to(device)
        xb = xb.to(device) if is_lm else xb.to(device, dtype)
        out = model(xb)
        k = yb.numel() if is_lm else len(yb)
        total += float(loss_fn(out, yb)) * k
        if not is_lm:
            correct += int((out.argmax(dim=1) == yb).sum())
        n += k
    model.train()
    loss = total / max(n, 1)
    if is_lm:
        return {"loss": loss, "perplexity": float(math.exp(min(loss, 50.0)))}
    return {"loss": loss, "accuracy": correct / max(n, 1)}


def _zeta(spec: AlgorithmSpec) -> float | None:
    from coopsgd.theory.spectral import zeta

    return None if spec.theory_matrix is None else float(zeta(spec.theory_matrix))


#: Keys every engine's metric records and summaries carry (``None`` where an engine has no such value):
#: simulated time from the simulated clock / cost model, measured time from real clocks, and ``time_s``,
#: the run's own clock for plots (``time_source`` says which).
TIME_KEYS = ("time_s", "time_source", "simulated_time_s", "simulated_compute_s", "simulated_communication_s",
             "simulated_idle_s", "measured_train_s", "measured_compute_s", "measured_communication_s",
             "wall_time_s")


def nn_evaluator(exp: Experiment, *, wall_offset: float = 0.0) -> Callable[..., dict[str, Any]]:
    """The evaluation of a neural-network run, the same for the simulator and the distributed engine.

    Every process calls it (the engine's views are collective on the distributed engine); the writer
    gets the record, the others an empty dict. The centre model (:meth:`AlgorithmSpec.center_node`) is
    evaluated on the first ``eval_samples`` test samples, the averaged model u_k on as many training
    samples; with a held-out set (``holdout_fraction``), the centre model on its first ``eval_samples``
    samples too (``holdout_loss``, ``holdout_accuracy`` / ``holdout_perplexity``).
    """
    c = exp.config
    steps_per_epoch = exp.steps_per_epoch
    dtype = torch.float64 if c.execution.dtype == "float64" else torch.float32
    test_set, train_set, is_lm, loss_fn = exp.test_set, exp.train_set, exp.is_lm, exp.loss_fn
    holdout_set = exp.holdout_set
    zeta = _zeta(exp.spec)
    t0 = time.perf_counter() - wall_offset

    def evaluate(engine: Engine, step: int, lr: float, worker_losses: np.ndarray, st: LoopState) -> dict[str, Any]:
        assert isinstance(engine, ModelEngine)
        center = engine.center_model()
        avg = engine.average_model()
        consensus = engine.consensus_distance()
        times = engine.time_record()
        if not engine.is_writer:
            return {}
        nt = min(c.evaluation.eval_samples, len(test_set))
        test = evaluate_model(center, test_set.x[:nt], test_set.y[:nt], loss_fn, is_lm=is_lm, dtype=dtype)
        n = min(c.evaluation.eval_samples, len(train_set))
        train = evaluate_model(avg, train_set.x[:n], train_set.y[:n], loss_fn, is_lm=is_lm, dtype=dtype)
        wall = time.perf_counter() - t0
        rec: dict[str, Any] = {
            "step": step,
            "epoch": step / steps_per_epoch,
            "lr": lr,
            "train_loss": train["loss"],
            "worker_losses": [float(v) for v in worker_losses],
            "test_loss": test["loss"],
            "consensus_distance": float(consensus),
            "zeta": zeta,
            "rounds": int(engine.rounds),
            "leader": engine.leader,
            "dropped_rounds": list(st.dropped),
            **_time_fields(times, st.train_s, wall),
            "measured_samples_per_s": step * c.algorithm.workers * c.problem.batch_size / st.train_s if st.train_s > 0 else None,
        }
        if is_lm:
            rec["test_perplexity"] = test["perplexity"]
            rec["train_perplexity"] = train["perplexity"]
        else:
            rec["test_accuracy"] = test["accuracy"]
            rec["train_accuracy"] = train["accuracy"]
        if holdout_set is not None:
            nh = min(c.evaluation.eval_samples, len(holdout_set))
            held = evaluate_model(center, holdout_set.x[:nh], holdout_set.y[:nh], loss_fn, is_lm=is_lm, dtype=dtype)
            rec["holdout_loss"] = held["loss"]
            rec["holdout_perplexity" if is_lm else "holdout_accuracy"] = held["perplexity" if is_lm else "accuracy"]
        return rec

    return evaluate


def _time_fields(times: dict[str, Any], train_s: float, wall: float) -> dict[str, Any]:
    simulated = times.get("simulated_time_s")
    out = {k: times.get(k) for k in TIME_KEYS}
    out["bytes_sent"] = float(times.get("bytes_sent", 0.0))
    out["measured_train_s"] = float(train_s)
    out["wall_time_s"] = float(wall)
    out["time_source"] = "simulated" if simulated is not None else "measured"
    out["time_s"] = float(simulated) if simulated is not None else float(train_s)
    return out


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


def loop_plan(exp: Experiment, *, checkpoint: Callable[[int, LoopState], None] | None = None,
              progress: Any = None, lr_agree: Callable[[float], float] | None = None,
              wall_offset: float = 0.0) -> LoopPlan:
    """The :class:`LoopPlan` of a run built from a :class:`RunConfig` (simulator or one distributed rank)."""
    c, eng = exp.config, exp.sim
    spe = exp.steps_per_epoch
    uses_time = bool(c.schedule.lr_decay_times_s)

    def lr(step: int, train_s: float) -> float:
        if not uses_time:
            return lr_at(c, step, spe, 0.0)
        t = eng.time_record(local=True).get("simulated_time_s")
        if t is None:  # measured: every rank must agree on the milestone (the slowest clock)
            t = lr_agree(train_s) if lr_agree is not None else train_s
        return lr_at(c, step, spe, float(t))

    def on_step(stats: StepStats) -> None:
        if progress is not None:
            progress(stats)

    return LoopPlan(
        total_steps=exp.total_steps, eval_every=exp.eval_every, lr=lr, feed=feed_from(exp.loader),
        evaluate=nn_evaluator(exp, wall_offset=wall_offset), checkpoint=checkpoint,
        checkpoint_every=c.output.checkpoint_every, nan_policy=c.execution.nan_policy, max_skips=c.execution.max_skips,
        on_step=on_step if progress is not None else None,
    )


def iterate(
    exp: Experiment,
    *,
    start_step: int = 0,
    progress: bool = False,
    on_checkpoint: Callable[[int], None] | None = None,
    state: LoopState | None = None,
) -> Generator[dict[str, Any], None, None]:
    """Run the experiment from the simulator's current step; yield one metric record per evaluation.

    ``on_checkpoint(step)`` is called after every ``config.checkpoint_every`` steps.
    """
    if start_step != exp.sim.step_count:
        raise ConfigError.invalid("start_step", start_step, f"the simulator is at step {exp.sim.step_count}")
    bar = None
    if progress:  # a bar on a terminal, a line every ~10 s or 10% elsewhere
        bar = Progress(exp.total_steps, initial=start_step, desc=f"{exp.spec.name} x{exp.config.algorithm.workers}")

    def tick(stats: StepStats) -> None:
        assert bar is not None
        bar.update(stats.step + 1, loss=lambda: stats.loss, rounds=stats.round)

    def ckpt(step: int, st: LoopState) -> None:
        exp.loop_state = st
        if on_checkpoint is not None:
            on_checkpoint(step)

    plan = loop_plan(exp, checkpoint=ckpt if on_checkpoint is not None else None, progress=tick if bar else None)
    try:
        exp.loop_state = yield from run_loop(exp.sim, plan, state=state if state is not None else exp.loop_state)
    finally:
        if bar is not None:
            bar.close()


def checkpoint_state(exp: Experiment, step: int) -> dict[str, Any]:
    """A run checkpoint: the engine's state envelope, the data position and the loop's state."""
    epoch, bi = divmod(step, exp.steps_per_epoch)
    exp.loader.seek(epoch, bi)
    return {
        "format": CHECKPOINT_FORMAT,
        "engine": exp.sim.name,
        "step": step,
        "config": exp.config.to_dict(),
        "engine_state": exp.sim.state_dict(),
        "loader": exp.loader.state_dict(),
        "loop": exp.loop_state.to_dict(),
    }


def load_run_checkpoint(path: str | Path, engine: str) -> dict[str, Any]:
    """Read a run checkpoint (a file, or a run directory holding ``checkpoint.pt``) written by ``engine``.

    One code path for every engine: the file must be a :data:`CHECKPOINT_FORMAT` checkpoint whose
    ``engine`` matches, and every entry the engines read must have its type and range (:func:`_check_run_state`:
    ``step`` an integer in [0, 2^63), ``config`` a mapping, the data position, the loop state, the engine
    state; ``world_size`` and ``ranks`` for the distributed engine). When a ``config.json`` lies beside it
    (a run directory), the checkpoint's config must equal it in every field but the ones a resume may
    change: a checkpoint of another run, or a damaged ``config.json``, is refused naming the field.
    Anything else is a :class:`ConfigError` naming the file and the entry.
    """
    from coopsgd.train.rundir import IGNORED_FIELDS, config_difference, load_checkpoint, read_run_json

    rp = Path(path)
    file = rp / "checkpoint.pt" if rp.is_dir() else rp
    state = load_checkpoint(file)
    if state.get("format") != CHECKPOINT_FORMAT:
        raise ConfigError.invalid("resume", str(path), f"not a {CHECKPOINT_FORMAT} checkpoint "
                                                       f"(format {state.get('format')!r})")
    if state.get("engine") != engine:
        raise ConfigError.invalid("resume", str(path), f"written by the {state.get('engine')!r} engine; "
                                                       f"this run uses the {engine!r} engine")
    _check_run_state(state, file, engine)
    beside = file.parent / "config.json"
    if beside.is_file() and "config" in state:
        saved = read_run_json(beside, "config")
        diff = config_difference(state["config"], saved, ignore=IGNORED_FIELDS)
        if diff is not None:
            key, there, here = diff
            raise ConfigError(f"checkpoint {str(file)!r} does not belong to the run in {str(beside)!r}: {key} is "
                              f"{there!r} in the checkpoint and {here!r} in config.json (a checkpoint of another "
                              "run, or a damaged config.json)", field=key, value=here)
    return state


def _check_run_state(state: dict[str, Any], file: Path, engine: str) -> None:
    """Check the types and ranges of the entries of a run checkpoint the engines read (see
    :func:`load_run_checkpoint`); a bad one is a :class:`ConfigError` naming the file and the entry.

    ``step`` is always required; the simulator's ``config``, ``engine_state`` and ``loader`` too (every
    simulator checkpoint has them).
    Every other entry is checked when present (the distributed engine's ``world_size`` and ``ranks`` are
    compared with the run by :func:`coopsgd.train.distributed.load_distributed_checkpoint`)."""
    from coopsgd.errors import INT64_MAX

    def bad(entry: str, value: Any, allowed: str) -> ConfigError:
        shown = value if isinstance(value, (int, float, str, bool, type(None))) else type(value).__name__
        return ConfigError(f"checkpoint {str(file)!r}: {entry}={shown!r} is invalid: {allowed}", field=entry,
                           value=shown)

    def integer(entry: str, value: Any, minimum: int = 0) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= INT64_MAX:
            raise bad(entry, value, f"must be an integer in [{minimum}, 2^63)")
        return value

    simulate = engine != "distributed"
    integer("step", state.get("step"))
    if (simulate or "config" in state) and not isinstance(state.get("config"), dict):
        raise bad("config", state.get("config"), "must be a mapping (the run's resolved config)")
    if simulate or "loader" in state:
        loader = state.get("loader")
        if not isinstance(loader, dict):
            raise bad("loader", loader, "must be a mapping (the data position)")
        for key in ("epoch", "batch"):
            integer(f"loader.{key}", loader.get(key))
    loop = state.get("loop")
    if loop is not None:
        if not isinstance(loop, dict):
            raise bad("loop", loop, "must be a mapping (the training loop's state) or absent")
        if "skips_in_a_row" in loop:
            integer("loop.skips_in_a_row", loop["skips_in_a_row"])
        if "dropped" in loop and not isinstance(loop["dropped"], list):
            raise bad("loop.dropped", loop["dropped"], "must be a list (the dropped rounds)")
        t = loop.get("train_s", 0.0)
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0:
            raise bad("loop.train_s", t, "must be a finite number >= 0")
    if not simulate:
        if "world_size" in state:
            integer("world_size", state["world_size"], minimum=1)
        ranks = state.get("ranks")
        if ranks is not None and (not isinstance(ranks, list) or not all(isinstance(r, dict) for r in ranks)):
            raise bad("ranks", ranks, "must be a list of engine states (one per rank)")
        return
    from coopsgd.engines.base import ENGINE_STATE_FORMAT

    es = state.get("engine_state")
    if not isinstance(es, dict):
        raise bad("engine_state", es, "must be a mapping (the engine's state)")
    if es.get("format") != ENGINE_STATE_FORMAT:
        raise bad("engine_state.format", es.get("format"), f"must be {ENGINE_STATE_FORMAT!r}")


def _warn_without_rounds(exp: Experiment) -> None:
    """Warn when the run ends before its first communication round (``total_steps < tau``): the workers
    then train alone and nothing is averaged. (Reconstructed; see the helper report of issue 14.)"""
    spec = exp.spec
    if spec.workers > 1 and exp.total_steps < spec.tau and not exp.config.algorithm.warmup_steps:
        log.warning("%s: no communication round happens in this run's %d steps (tau = %d); the workers train "
                    "alone and are never averaged: raise max_steps or lower tau", spec.name, exp.total_steps,
                    spec.tau)


def train(
    config: RunConfig,
    *,
    progress: bool = False,
    out: str | Path | None = None,
    resume: str | Path | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Run ``config`` (engine ``simulate``), write the run directory, return the summary.

    The summary holds ``final`` (train_loss, test_loss, test_accuracy or test_perplexity),
    ``simulated_time_s`` and its split, ``wall_time_s``, ``communication_rounds``, ``bytes_sent``.
    On a non-finite loss the run stops with an error naming the worker and the step; the metrics
    written so far stay valid and ``summary.json`` records the failure (no checkpoint of a broken state).

    ``resume`` is a checkpoint file (or a run directory holding ``checkpoint.pt``): the simulator state
    (all nodes, buffers, momentum, RNG, schedule and leader state, clock), the data position and the
    counters are restored and the run continues; the final parameters equal an uninterrupted run's
    exactly. Metric records after the checkpoint's step are replaced.

    The run directory (``out`` or ``config.out``; none: nothing is written) must not hold another
    configuration's run (:func:`coopsgd.train.rundir.check_run_dir`; checked before anything is built)
    unless ``overwrite``; the old run's files are removed first (not when resuming).
    """
    if config.execution.engine != "simulate":
        raise ConfigError.invalid("engine", config.execution.engine, "train() runs the 'simulate' engine")
    out_dir = out or config.output.out
    if out_dir:
        check_run_dir(out_dir, config.to_dict(), overwrite=overwrite, resume=resume is not None)
    tensorboard = tensorboard_enabled(config.output.tensorboard, has_dir=bool(out_dir))
    exp = build(config)
    _warn_without_rounds(exp)
    start = 0
    if resume is not None:
        state = load_run_checkpoint(resume, "simulate")
        exp.sim.load_state_dict(state["engine_state"])
        exp.loader.load_state_dict(state["loader"])
        exp.loop_state = LoopState.from_dict(state.get("loop"))
        start = int(state["step"])
        if start > exp.total_steps:
            raise ConfigError.invalid("max_steps", exp.total_steps, f"the checkpoint is already at step {start}")
    rd = RunDir.create(out_dir, config.to_dict(), overwrite=overwrite, resume=resume is not None) if out_dir else None
    if rd is not None:
        # the executor and where it came from (cache key, timed medians) and the compute model: how the
        # run's numbers and simulated times were produced (see docs/reliability.md, "Determinism")
        calib = exp.sim.executor_info()
        extra = {"executor": exp.sim.executor_name, "executor_from_cache": calib["from_cache"],
                 "optimizer": exp.sim.optimizer_info(),
                 "executor_calibration": calib, "compute_model": exp.sim.compute_model_info(),
                 "steps_per_epoch": exp.steps_per_epoch,
                 "total_steps": exp.total_steps, "spec": exp.spec.describe(), "resumed_from_step": start}
        if exp.histograms is not None:
            extra["label_histograms"] = exp.histograms.tolist()
        rd.write_config(config.to_dict(), extra)
        if start > 0:
            rd.truncate_metrics(start)
        rd.start_metrics(append=start > 0, tensorboard=tensorboard, start_step=start)

    def on_checkpoint(step: int) -> None:
        if rd is not None:
            rd.checkpoint(checkpoint_state(exp, step))

    t0 = time.perf_counter()
    last, _ = record_run(iterate(exp, start_step=start, progress=progress, on_checkpoint=on_checkpoint), rd)
    wall = time.perf_counter() - t0
    summary = summarize(exp.spec, config, last, total_steps=exp.total_steps, wall=wall, engine="simulate",
                        is_lm=exp.is_lm, extra={"executor": exp.sim.executor_name})
    if rd is not None:
        rd.checkpoint(checkpoint_state(exp, exp.total_steps))
        rd.write_summary(summary)
        summary["out"] = str(rd.path)
    return summary


def record_run(records: Generator[dict[str, Any], None, Any], rd: RunDir | None) -> tuple[dict[str, Any], Any]:
    """Consume a loop's records, logging each non-empty one to the run directory (``None``: nowhere).

    Returns the last record and the generator's return value. On divergence the run directory gets
    ``summary.json`` with ``"status": "diverged"``, the error and the last record, and the error is raised.
    """
    last: dict[str, Any] = {}
    try:
        while True:
            rec = next(records)
            if rec:
                last = rec
                if rd is not None:
                    rd.log(rec)
    except StopIteration as stop:
        return last, stop.value
    except NonFiniteError as exc:
        if rd is not None:
            rd.close()
            rd.write_summary({"status": "diverged", "error": str(exc), "last_record": last})
        raise
    finally:
        if rd is not None:
            rd.close()


def summarize(spec: AlgorithmSpec, config: RunConfig, last: dict[str, Any], *, total_steps: int, wall: float,
              engine: str, is_lm: bool, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The run summary from the last metric record; the same keys from every engine."""
    final: dict[str, Any] = {"train_loss": last["train_loss"], "test_loss": last["test_loss"]}
    for k in ("test_perplexity", "test_accuracy"):
        if k in last:
            final[k] = last[k]
    sim = last.get("simulated_time_s")
    summary: dict[str, Any] = {
        "status": "ok",
        "engine": engine,
        "preset": spec.name,
        "workers": config.algorithm.workers,
        "steps": total_steps,
        "final": final,
        "time_s": last.get("time_s"),
        "time_source": last.get("time_source"),
        "simulated_time_s": sim,
        "simulated_split_s": None if sim is None else {
            "compute_s": last.get("simulated_compute_s"), "communication_s": last.get("simulated_communication_s"),
            "idle_s": last.get("simulated_idle_s")},
        "measured_train_s": last.get("measured_train_s"),
        "wall_time_s": wall,
        "communication_rounds": last["rounds"],
        "bytes_sent": last["bytes_sent"],
        "consensus_distance": last.get("consensus_distance"),
        "zeta": last.get("zeta"),
        "dropped_rounds": list(last.get("dropped_rounds") or []),
    }
    summary.update(extra or {})
    return summary


def train_reference(config: RunConfig, *, progress: bool = False, out: str | Path | None = None,
                    overwrite: bool = False) -> dict[str, Any]:
    """Run ``config`` on the exact reference engine (analytic ``objective``) through the training loop;
    the summary has the same keys as :func:`train`'s.

    ``final.train_loss`` is F at the averaged model u_k, ``final.test_loss`` F at the centre model (the
    held-out loss for ``logistic``, with ``test_accuracy``). Time comes from the cost model
    (:func:`coopsgd.theory.cost.expected_runtime` with ``compute_ms`` per step; an analytic objective has no
    model to FLOP-count, so ``compute="flops"`` and ``"measured"`` are a constant ``compute_ms`` here).
    The run directory is checked and replaced as in :func:`train` (``overwrite``).
    """
    from coopsgd.analysis import spec_round_cost
    from coopsgd.engines.reference import ReferenceEngine, consensus_distance
    from coopsgd.objectives import make_objective
    from coopsgd.theory.cost import ComputeModel, NetworkModel, expected_runtime

    c = config
    out_dir = out or c.output.out
    if out_dir:
        check_run_dir(out_dir, c.to_dict(), overwrite=overwrite)
    tensorboard = tensorboard_enabled(c.output.tensorboard, has_dir=bool(out_dir))
    args = dict(c.problem.objective_args)
    if c.problem.objective in ("quadratic", "logistic"):
        args.setdefault("workers", c.algorithm.workers)
    if c.problem.objective in ("quadratic", "matrix_completion", "logistic"):
        args.setdefault("seed", c.execution.seed)
    if c.problem.objective == "logistic":
        args.setdefault("batch_size", c.problem.batch_size)
        args.setdefault("iid", c.problem.partition == "iid")
    obj = make_objective(c.problem.objective, **args)
    spec = c.build_spec()
    inner = c.optimizer.name or spec.inner_optimizer or "sgd"
    if inner != "sgd":
        raise ConfigError.invalid("optimizer", inner, "the reference engine's workers run plain SGD on analytic "
                                  f"objectives; use --optimizer sgd (preset {spec.name!r}) or another engine")
    steps = c.schedule.max_steps or 300
    eng = ReferenceEngine(spec, obj, seed=c.execution.seed, nan_policy=c.execution.nan_policy)
    rc = spec_round_cost(spec, obj.dim, bytes_per_param=8)
    network = NetworkModel.from_mbps(c.clock.net_latency_ms, c.clock.net_bandwidth_mbps)
    compute = ComputeModel(mean_s=c.clock.compute_ms / 1e3, spread=c.clock.compute_spread,
                           distribution="constant" if c.clock.compute in ("measured", "flops") else c.clock.compute)
    clock = expected_runtime(steps=steps, tau=spec.tau, workers=spec.workers, cost=rc, network=network,
                             compute=compute, overlap=spec.overlap, trials=1 if compute.deterministic else 50)
    per_step = clock["per_step_s"]
    zeta = _zeta(spec)
    t0 = time.perf_counter()
    logistic = hasattr(obj, "accuracy")

    def evaluate(engine: Engine, step: int, lr: float, worker_losses: np.ndarray, st: LoopState) -> dict[str, Any]:
        assert isinstance(engine, ReferenceEngine)
        center = engine.center()
        frac = step / steps
        times = {"simulated_time_s": step * per_step, "simulated_compute_s": frac * clock["compute_s"],
                 "simulated_communication_s": frac * clock["communication_s"],
                 "simulated_idle_s": frac * clock["idle_s"], "bytes_sent": rc.bytes_sent * engine.rounds}
        rec: dict[str, Any] = {
            "step": step, "epoch": None, "lr": lr, "train_loss": float(obj.value(engine.average())),
            "worker_losses": [float(v) for v in np.asarray(obj.value(engine.workers_state))],
            "test_loss": _logistic_test_loss(obj, center) if logistic else float(obj.value(center)),
            "center_objective": float(obj.value(center)),
            "consensus_distance": consensus_distance(engine.state, spec.workers), "zeta": zeta,
            "rounds": int(engine.rounds), "leader": engine.leader, "dropped_rounds": list(st.dropped),
            **_time_fields(times, st.train_s, time.perf_counter() - t0), "measured_samples_per_s": None,
        }
        if logistic:
            rec["test_accuracy"] = float(obj.accuracy(center))  # type: ignore[attr-defined]
        return rec

    plan = LoopPlan(total_steps=steps, eval_every=max(1, steps // 200), lr=lambda k, _t: lr_at(c, k, max(1, steps), 0.0),
                    feed=lambda k, local, active: None, evaluate=evaluate, nan_policy=c.execution.nan_policy,
                    max_skips=c.execution.max_skips)
    rd = RunDir.create(out_dir, c.to_dict(), overwrite=overwrite) if out_dir else None
    if rd is not None:
        rd.write_config(c.to_dict(), {"spec": spec.describe()})
        rd.start_metrics(tensorboard=tensorboard)
    bar = None
    if progress:  # a bar on a terminal, a line every ~10 s or 10% elsewhere
        bar = Progress(steps, desc=f"{spec.name} x{spec.workers}")

        def tick(stats: StepStats) -> None:
            assert bar is not None
            bar.update(stats.step + 1, loss=lambda: stats.loss)

        plan.on_step = tick
    try:
        last, _ = record_run(run_loop(eng, plan), rd)
    finally:
        if bar is not None:
            bar.close()
    summary = summarize(spec, c, last, total_steps=steps, wall=time.perf_counter() - t0, engine="reference",
                        is_lm=False)
    if logistic:
        summary["final"]["test_accuracy"] = last["test_accuracy"]
    # the cost model's expected totals (exact for deterministic compute)
    summary["simulated_time_s"] = summary["time_s"] = clock["total_s"]
    summary["simulated_split_s"] = {k: clock[k] for k in ("compute_s", "communication_s", "idle_s")}
    summary["worker_objectives"] = [float(v) for v in np.asarray(obj.value(eng.workers_state))]
    summary["center_objective"] = last["center_objective"]
    if rd is not None:
        rd.write_summary(summary)
        summary["out"] = str(rd.path)
    return summary


def _logistic_test_loss(obj: Any, w: np.ndarray) -> float:
    logits = obj.X_test @ np.asarray(w).reshape(obj.features, obj.classes)
    logits = logits - logits.max(axis=1, keepdims=True)
    logp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    return float(-np.mean(logp[np.arange(len(obj.y_test)), obj.y_test]))


def run(config: RunConfig, *, progress: bool = False, out: str | Path | None = None,
        resume: str | Path | None = None, overwrite: bool = False) -> dict[str, Any]:
    """Dispatch on ``config.engine``. ``overwrite``: replace another configuration's run in the run directory
    (:func:`coopsgd.train.rundir.check_run_dir`)."""
    if resume is not None and config.execution.engine == "reference":
        raise ConfigError.invalid("resume", str(resume), "resuming is supported by the 'simulate' and 'distributed' engines")
    if config.execution.engine == "reference":
        return train_reference(config, progress=progress, out=out, overwrite=overwrite)
    if config.execution.engine == "simulate":
        return train(config, progress=progress, out=out, resume=resume, overwrite=overwrite)
    from coopsgd.train.distributed import run_distributed

    emulate = config.clock.emulate_network
    return run_distributed(config, out=out, timeout_s=config.execution.timeout_s, resume=resume,
                           net_latency_ms=config.clock.net_latency_ms if emulate else None,
                           net_bandwidth_mbps=config.clock.net_bandwidth_mbps if emulate else None,
                           overwrite=overwrite, progress=progress)
