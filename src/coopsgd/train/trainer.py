"""The trainer: one loop that drives an engine with identical inputs and yields per-evaluation records.

The trainer owns what every engine must see identically: the step counter, the learning-rate schedule
and the data order (:class:`coopsgd.data.WorkerLoader`: each worker its own shard, its own order per
epoch, last incomplete batch dropped). :func:`iterate` is a generator of metric records; :func:`train`
consumes it, writes the run directory and returns the summary the CLI prints.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from coopsgd.algorithms import AlgorithmSpec, make_preset
from coopsgd.engines.reference import NonFiniteError
from coopsgd.errors import ConfigError
from coopsgd.train.config import RunConfig
from coopsgd.train.rundir import RunDir

__all__ = ["Experiment", "build", "iterate", "train", "train_reference", "run", "lr_at", "evaluate_model"]

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "coopsgd-checkpoint-v1"


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
    bytes_sent: float = 0.0
    skipped: list[int] = field(default_factory=list)
    skips_in_a_row: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def steps_per_epoch(self) -> int:
        return int(self.loader.steps_per_epoch)


def lr_at(config: RunConfig, step: int, steps_per_epoch: int, sim_time: float) -> float:
    """Learning rate of ``step``: linear warm-up, then x ``lr_decay_factor`` per passed epoch/time milestone."""
    lr = config.lr
    if config.lr_warmup_steps and step < config.lr_warmup_steps:
        lr *= (step + 1) / config.lr_warmup_steps
    epoch = step / steps_per_epoch
    passed = sum(1 for e in config.lr_decay_epochs if epoch >= e)
    passed += sum(1 for t in config.lr_decay_times_s if sim_time >= t)
    return lr * config.lr_decay_factor**passed


def _lm_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))


def build_problem(config: RunConfig) -> dict[str, Any]:
    """Data, partition, loader, spec, model and step counts of a run: the one construction every engine uses.

    Keys: train_set, test_set, is_lm, histograms, loader, spec, model, dtype, probe, total, eval_every, loss_fn.
    """
    from coopsgd.data import WorkerLoader, label_histograms, load_dataset, partition
    from coopsgd.models import make_model

    c = config
    train_set = load_dataset(c.dataset, root=c.data_root, split="train", download=c.download, seed=c.seed,
                             augment=c.augment)
    test_set = load_dataset(c.dataset, root=c.data_root, split="test", download=c.download, seed=c.seed)
    is_lm = train_set.vocab is not None
    histograms = None
    if is_lm:
        from coopsgd.data import lm_windows

        seq_len = 35
        train_set = lm_windows(train_set.x, seq_len, vocab=train_set.vocab)
        test_set = lm_windows(test_set.x, seq_len, vocab=train_set.vocab)
        parts = partition(np.zeros(len(train_set), dtype=np.int64), c.workers, "iid", seed=c.seed)
    else:
        if c.workers > len(train_set):
            raise ConfigError.invalid("workers", c.workers, f"more workers than training samples ({len(train_set)})")
        parts = partition(train_set.y, c.workers, c.partition, beta=c.dirichlet_beta,
                          shards_per_worker=c.shards_per_worker, seed=c.seed)
        histograms = label_histograms(train_set.y, parts, train_set.num_classes)
    loader = WorkerLoader(train_set, parts, c.batch_size, seed=c.seed)
    kwargs = c.spec_kwargs()
    if c.preset == "fedavg":
        kwargs["sample_counts"] = [float(s) for s in loader.shard_sizes]
        if c.local_epochs is not None:  # E local epochs = E passes over a client's shard between rounds
            kwargs["tau"] = max(1, round(c.local_epochs * loader.steps_per_epoch))
    spec = make_preset(c.preset, c.workers, **kwargs)
    torch.manual_seed(c.seed)
    model_kw: dict[str, Any] = dict(c.model_args)
    if is_lm and c.model == "lstm_lm":
        model_kw.setdefault("batch_first", True)  # lm_windows + WorkerLoader give (batch, seq_len) tokens
    model = make_model(c.model, num_classes=train_set.num_classes, input_shape=train_set.input_shape, **model_kw)
    dtype = torch.float64 if c.dtype == "float64" else torch.float32
    probe = None
    if c.loss_estimate == "probe":
        g = torch.Generator().manual_seed(c.seed)
        idx = torch.randperm(len(train_set), generator=g)[: min(512, len(train_set))]
        probe = (train_set.x[idx].to(dtype) if not is_lm else train_set.x[idx], train_set.y[idx])
    spe = loader.steps_per_epoch
    total = c.max_steps if c.max_steps is not None else max(1, math.ceil(c.epochs * spe))
    eval_every = c.eval_every or max(1, min(spe, total // 10 or 1))
    return {"train_set": train_set, "test_set": test_set, "is_lm": is_lm, "histograms": histograms,
            "loader": loader, "spec": spec, "model": model, "dtype": dtype, "probe": probe, "total": total,
            "eval_every": eval_every, "loss_fn": _lm_loss if is_lm else F.cross_entropy}


def build(config: RunConfig) -> Experiment:
    """Build the spec, data, partition, model and simulator of a ``simulate`` run."""
    from coopsgd.engines.clock import SimClock
    from coopsgd.engines.simulator import Simulator
    from coopsgd.theory.cost import ComputeModel, NetworkModel

    c = config
    p = build_problem(c)
    network = NetworkModel.from_mbps(c.net_latency_ms, c.net_bandwidth_mbps)
    compute = None if c.compute == "measured" else ComputeModel(
        mean_s=c.compute_ms / 1e3, distribution=c.compute, spread=c.compute_spread)
    clock = SimClock(network, compute, seed=c.seed)
    sim = Simulator(p["spec"], p["model"], loss_fn=p["loss_fn"], momentum=c.momentum, nesterov=c.nesterov,
                    weight_decay=c.weight_decay, executor=c.executor, dtype=p["dtype"], seed=c.seed,
                    loss_estimate=c.loss_estimate, probe_batch=p["probe"], clock=clock,
                    downpour_order=c.downpour_order if c.preset == "downpour" else "schedule")
    return Experiment(config=c, spec=p["spec"], sim=sim, loader=p["loader"], train_set=p["train_set"],
                      test_set=p["test_set"], loss_fn=p["loss_fn"], total_steps=p["total"],
                      eval_every=p["eval_every"], is_lm=p["is_lm"], histograms=p["histograms"])


@torch.no_grad()
def evaluate_model(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn: Callable[..., torch.Tensor],
                   *, is_lm: bool = False, batch: int = 500, dtype: torch.dtype = torch.float32) -> dict[str, float]:
    """Mean loss and accuracy (classification) or perplexity (language model) of ``model`` on (x, y)."""
    model.eval()
    total, correct, n = 0.0, 0, 0
    for i in range(0, len(x), batch):
        xb, yb = x[i:i + batch], y[i:i + batch]
        if not is_lm:
            xb = xb.to(dtype)
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


def _eval_record(exp: Experiment, step: int, lr: float, worker_losses: np.ndarray, wall: float) -> dict[str, Any]:
    sim, spec, c = exp.sim, exp.spec, exp.config
    dtype = torch.float64 if c.dtype == "float64" else torch.float32
    nt = min(c.eval_samples, len(exp.test_set))  # the first eval_samples test samples (all 2,000 by default)
    test = evaluate_model(sim.center_model(), exp.test_set.x[:nt], exp.test_set.y[:nt], exp.loss_fn,
                          is_lm=exp.is_lm, dtype=dtype)
    n = min(c.eval_samples, len(exp.train_set))
    avg_model = sim.average_model()
    train = evaluate_model(avg_model, exp.train_set.x[:n], exp.train_set.y[:n], exp.loss_fn, is_lm=exp.is_lm,
                           dtype=dtype)
    clock = sim.clock
    rec: dict[str, Any] = {
        "step": step,
        "epoch": step / exp.steps_per_epoch,
        "lr": lr,
        "train_loss": train["loss"],
        "worker_losses": [float(v) for v in worker_losses],
        "test_loss": test["loss"],
        "consensus_distance": float(sim.consensus_distance()),
        "zeta": None if spec.theory_matrix is None else float(_zeta(spec)),
        "rounds": int(sim.rounds),
        "bytes_sent": float(exp.bytes_sent),
        "simulated_time_s": float(clock.elapsed),
        "compute_s": float(clock.compute_s),
        "communication_s": float(clock.communication_s),
        "idle_s": float(clock.idle_s),
        "wall_time_s": wall,
        "samples_per_s": step * c.workers * c.batch_size / wall if wall > 0 else None,
    }
    if exp.is_lm:
        rec["test_perplexity"] = test["perplexity"]
        rec["train_perplexity"] = train["perplexity"]
    else:
        rec["test_accuracy"] = test["accuracy"]
        rec["train_accuracy"] = train["accuracy"]
    if exp.skipped:
        rec["skipped_steps"] = list(exp.skipped)
    leader = getattr(sim, "leader", None)
    if leader is not None:
        rec["leader"] = int(leader)
    return rec


def _zeta(spec: AlgorithmSpec) -> float:
    from coopsgd.theory.spectral import zeta

    return zeta(spec.theory_matrix)


def iterate(
    exp: Experiment,
    *,
    start_step: int = 0,
    progress: bool = False,
    on_checkpoint: Callable[[int], None] | None = None,
) -> Iterator[dict[str, Any]]:
    """Run the experiment from ``start_step``; yield one metric record per evaluation (step 0 included).

    ``on_checkpoint(step)`` is called after every ``config.checkpoint_every`` steps.
    """
    sim, loader, c = exp.sim, exp.loader, exp.config
    m = c.workers
    t0 = time.perf_counter()
    acc = np.zeros(m)
    cnt = np.zeros(m)
    if start_step == 0:
        yield _eval_record(exp, 0, lr_at(c, 0, exp.steps_per_epoch, 0.0), np.full(m, np.nan), 0.0)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=exp.total_steps, initial=start_step, desc=f"{exp.spec.name} x{m}", unit="step",
                   dynamic_ncols=True, leave=False)
    try:
        for step in range(start_step, exp.total_steps):
            lr = lr_at(c, step, exp.steps_per_epoch, float(sim.clock.elapsed))
            batches = loader.next_step()
            active = exp.spec.schedule.active(step)
            if active is not None:
                batches = [b if active[i] else None for i, b in enumerate(batches)]
            try:
                stats = sim.step(batches, lr)
            except NonFiniteError as exc:
                # the simulator raises before touching any state, so the last good state is intact
                if c.nan_policy != "skip" or exp.skips_in_a_row >= c.max_skips:
                    if c.nan_policy == "skip":
                        raise NonFiniteError(f"{exc} ({exp.skips_in_a_row} steps in a row skipped already; "
                                             f"max_skips={c.max_skips})") from None
                    raise
                exp.skips_in_a_row += 1
                exp.skipped.append(step)
                log.warning("step %d skipped (nan_policy=skip): %s", step, exc)
                stats = None
            if stats is not None:
                exp.skips_in_a_row = 0
                exp.bytes_sent += float(stats.bytes_sent)
                losses = np.asarray(stats.losses, dtype=np.float64)
                ok = np.isfinite(losses)
                acc[ok] += losses[ok]
                cnt[ok] += 1
            else:
                losses = np.full(m, np.nan)
            if bar is not None:
                bar.update(1)
                if (step + 1) % 10 == 0 and stats is not None:
                    bar.set_postfix(loss=f"{np.nanmean(losses):.3f}", rounds=sim.rounds)
            done = step + 1
            if on_checkpoint is not None and c.checkpoint_every and done % c.checkpoint_every == 0:
                on_checkpoint(done)
            if done % exp.eval_every == 0 or done == exp.total_steps:
                worker_losses = np.where(cnt > 0, acc / np.maximum(cnt, 1), np.nan)
                acc[:] = 0
                cnt[:] = 0
                yield _eval_record(exp, done, lr, worker_losses, time.perf_counter() - t0)
    finally:
        if bar is not None:
            bar.close()


def checkpoint_state(exp: Experiment, step: int) -> dict[str, Any]:
    return {
        "format": CHECKPOINT_FORMAT,
        "engine": "simulate",
        "step": step,
        "config": exp.config.to_dict(),
        "simulator": exp.sim.state_dict(),
        "loader": exp.loader.state_dict(),
        "bytes_sent": exp.bytes_sent,
    }


def train(
    config: RunConfig,
    *,
    progress: bool = False,
    out: str | Path | None = None,
    resume: str | Path | None = None,
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
    """
    if config.engine != "simulate":
        raise ConfigError.invalid("engine", config.engine, "train() runs the 'simulate' engine")
    exp = build(config)
    start = 0
    if resume is not None:
        from coopsgd.train.rundir import load_checkpoint

        rp = Path(resume)
        state = load_checkpoint(rp / "checkpoint.pt" if rp.is_dir() else rp)
        if state.get("format") != CHECKPOINT_FORMAT:
            raise ConfigError.invalid("resume", str(resume), f"not a {CHECKPOINT_FORMAT} checkpoint")
        exp.sim.load_state_dict(state["simulator"])
        exp.loader.load_state_dict(state["loader"])
        exp.bytes_sent = float(state.get("bytes_sent", 0.0))
        start = int(state["step"])
        if start > exp.total_steps:
            raise ConfigError.invalid("max_steps", exp.total_steps, f"the checkpoint is already at step {start}")
    out_dir = out or config.out
    rd = RunDir(out_dir) if out_dir else None
    if rd is not None:
        extra = {"executor": exp.sim.executor_name, "steps_per_epoch": exp.steps_per_epoch,
                 "total_steps": exp.total_steps, "spec": exp.spec.describe(), "resumed_from_step": start}
        if exp.histograms is not None:
            extra["label_histograms"] = exp.histograms.tolist()
        rd.write_config(config.to_dict(), extra)
        if start > 0 and rd.metrics_path.is_file():
            kept = [r for r in RunDir.read_metrics(rd.metrics_path) if r.get("step", 0) <= start]
            from coopsgd.train.rundir import atomic_write_bytes, jsonable

            atomic_write_bytes(rd.metrics_path, "".join(json.dumps(jsonable(r)) + "\n" for r in kept).encode())
        rd.start_metrics(append=start > 0)

    def on_checkpoint(step: int) -> None:
        if rd is not None:
            rd.checkpoint(checkpoint_state(exp, step))

    last: dict[str, Any] = {}
    t0 = time.perf_counter()
    try:
        for rec in iterate(exp, start_step=start, progress=progress, on_checkpoint=on_checkpoint):
            last = rec
            if rd is not None:
                rd.log(rec)
    except NonFiniteError as exc:
        if rd is not None:
            rd.close()
            rd.write_summary({"status": "failed", "error": str(exc), "last_record": last})
        raise
    finally:
        if rd is not None:
            rd.close()
    if not last:  # resumed exactly at the end
        last = _eval_record(exp, exp.total_steps, lr_at(config, exp.total_steps, exp.steps_per_epoch,
                                                         float(exp.sim.clock.elapsed)), np.full(config.workers, np.nan), 0.0)
    wall = time.perf_counter() - t0
    final = {"train_loss": last["train_loss"], "test_loss": last["test_loss"]}
    if exp.is_lm:
        final["test_perplexity"] = last["test_perplexity"]
    else:
        final["test_accuracy"] = last["test_accuracy"]
    summary: dict[str, Any] = {
        "status": "ok",
        "preset": exp.spec.name,
        "workers": config.workers,
        "steps": exp.total_steps,
        "final": final,
        "simulated_time_s": last["simulated_time_s"],
        "simulated_split_s": {k: last[k] for k in ("compute_s", "communication_s", "idle_s")},
        "wall_time_s": wall,
        "communication_rounds": last["rounds"],
        "bytes_sent": last["bytes_sent"],
        "consensus_distance": last["consensus_distance"],
        "zeta": last["zeta"],
        "executor": exp.sim.executor_name,
    }
    if rd is not None:
        rd.checkpoint(checkpoint_state(exp, exp.total_steps))
        rd.write_summary(summary)
        summary["out"] = str(rd.path)
    return summary


def train_reference(config: RunConfig, *, progress: bool = False, out: str | Path | None = None) -> dict[str, Any]:
    """Run ``config`` on the exact reference engine (analytic ``objective``); same summary shape as :func:`train`.

    ``final.train_loss`` is F at the averaged model u_k, ``final.test_loss`` F at the centre model (the
    held-out loss for ``logistic``, with ``test_accuracy``). Time comes from the cost model
    (:func:`coopsgd.theory.cost.expected_runtime` with ``compute_ms`` per step).
    """
    from coopsgd.analysis import spec_round_cost
    from coopsgd.engines.reference import run_reference
    from coopsgd.objectives import make_objective
    from coopsgd.theory.cost import ComputeModel, NetworkModel, expected_runtime

    c = config
    args = dict(c.objective_args)
    if c.objective in ("quadratic", "logistic"):
        args.setdefault("workers", c.workers)
    if c.objective in ("quadratic", "matrix_completion", "logistic"):
        args.setdefault("seed", c.seed)
    if c.objective == "logistic":
        args.setdefault("batch_size", c.batch_size)
        args.setdefault("iid", c.partition == "iid")
    obj = make_objective(c.objective, **args)
    spec = make_preset(c.preset, c.workers, **c.spec_kwargs())
    steps = c.max_steps or 300
    t0 = time.perf_counter()
    res = run_reference(spec, obj, steps=steps, lr=lambda k: lr_at(c, k, max(1, steps), 0.0), seed=c.seed,
                        record_every=max(1, steps // 200), progress=progress)
    wall = time.perf_counter() - t0
    rc = spec_round_cost(spec, obj.dim, bytes_per_param=8)
    network = NetworkModel.from_mbps(c.net_latency_ms, c.net_bandwidth_mbps)
    compute = ComputeModel(mean_s=c.compute_ms / 1e3, distribution="constant" if c.compute == "measured" else c.compute,
                           spread=c.compute_spread)
    clock = expected_runtime(steps=steps, tau=spec.tau, workers=spec.workers, cost=rc, network=network,
                             compute=compute, overlap=spec.overlap, trials=1 if compute.deterministic else 50)
    d = res.to_dict()
    final: dict[str, Any] = {"train_loss": d["final_average_objective"], "test_loss": d["final_objective"]}
    center = res.final_state[spec.workers] if spec.center == "auxiliary" else (
        res.final_state[res.leaders[-1]] if spec.center == "leader" and res.leaders[-1] is not None
        else res.final_state[: spec.workers].mean(axis=0))
    if hasattr(obj, "accuracy"):
        final["test_accuracy"] = obj.accuracy(center)
        final["test_loss"] = _logistic_test_loss(obj, center)
    summary: dict[str, Any] = {
        "status": "ok", "engine": "reference", "preset": spec.name, "workers": c.workers, "steps": steps,
        "final": final, "simulated_time_s": clock["total_s"],
        "simulated_split_s": {k: clock[k] for k in ("compute_s", "communication_s", "idle_s")},
        "wall_time_s": wall, "communication_rounds": d["communication_rounds"],
        "bytes_sent": rc.bytes_sent * d["communication_rounds"], "consensus_distance": d["consensus_distance"],
        "zeta": None if spec.theory_matrix is None else _zeta(spec),
        "worker_objectives": d["workers"], "center_objective": d["final_objective"],
    }
    out_dir = out or c.out
    if out_dir:
        rd = RunDir(out_dir)
        rd.write_config(c.to_dict(), {"spec": spec.describe()})
        rd.start_metrics()
        per_step = clock["per_step_s"]
        for j, step in enumerate(res.steps):
            rd.log({
                "step": int(step), "train_loss": float(res.average_objective[j]),
                "test_loss": float(res.center_objective[j]),
                "worker_losses": [float(v) for v in res.node_objectives[j, : spec.workers]],
                "consensus_distance": float(res.consensus[j]), "rounds": int(res.rounds[j]),
                "simulated_time_s": float(step) * per_step, "bytes_sent": rc.bytes_sent * int(res.rounds[j]),
            })
        rd.close()
        rd.write_summary(summary)
        summary["out"] = str(rd.path)
    return summary


def _logistic_test_loss(obj: Any, w: np.ndarray) -> float:
    logits = obj.X_test @ np.asarray(w).reshape(obj.features, obj.classes)
    logits = logits - logits.max(axis=1, keepdims=True)
    logp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    return float(-np.mean(logp[np.arange(len(obj.y_test)), obj.y_test]))


def run(config: RunConfig, *, progress: bool = False, out: str | Path | None = None,
        resume: str | Path | None = None) -> dict[str, Any]:
    """Dispatch on ``config.engine``."""
    if resume is not None and config.engine == "reference":
        raise ConfigError.invalid("resume", str(resume), "resuming is supported by the 'simulate' and 'distributed' engines")
    if config.engine == "reference":
        return train_reference(config, progress=progress, out=out)
    if config.engine == "simulate":
        return train(config, progress=progress, out=out, resume=resume)
    from coopsgd.engines.distributed import run_distributed

    net = {}
    if config.emulate_network:
        net = {"net_latency_ms": config.net_latency_ms, "net_bandwidth_mbps": config.net_bandwidth_mbps}
    return run_distributed(config, out=out, timeout_s=config.timeout_s, resume=resume, **net)
