"""Dry runs (``coopsgd reproduce NAME --dry-run``): two steps of every full-scale setting on synthetic data of the
real shapes, through the full-scale models, partitions, learning-rate schedule, checkpoint, figures and result.

:func:`dry_run_fields` turns a full-scale setting into its dry run; the harness's runners
(:func:`coopsgd.experiments.harness.run_config` / ``run_built``) reload the checkpoint each setting wrote
(:func:`dry_run_check`), and :func:`dry_run_summary` prints one line per setting.
"""

from __future__ import annotations

import contextvars
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from coopsgd.data import load_dataset, partition
from coopsgd.data.datasets import _SYNTHETIC_SHAPES
from coopsgd.train import trainer

__all__ = [
    "DRY_RUN",
    "DRY_RUN_STEPS",
    "DRY_RUN_DATA",
    "DRY_RUN_BATCH",
    "DRY_RUN_WORKERS",
    "WIKITEXT2_VOCAB",
    "dry_run_fields",
    "dry_run_tau",
    "dry_run_check",
    "dry_run_summary",
    "shape_text",
    "peak_memory_gb",
    "DRY_RUN_MEMORY_GB",
]

#: Whether the current ``coopsgd reproduce`` call is a dry run (``--dry-run``), set from :class:`~coopsgd.experiments.harness.ExperimentArgs`: every
#: setting runs :data:`DRY_RUN_STEPS` steps of the full-scale configuration on synthetic data of the real
#: shapes (:func:`dry_run_fields`), and :func:`~coopsgd.experiments.harness.run_config` / ``run_built`` reload the checkpoint it wrote
#: and describe the run in one line (``res["dry_run_line"]``).
DRY_RUN: contextvars.ContextVar[bool] = contextvars.ContextVar("coopsgd_experiment_dry_run", default=False)
#: Steps of every setting of a dry run.
DRY_RUN_STEPS = 2
#: A dry run evaluates the centre and averaged models on this many batches' worth of samples (``eval_samples``).
DRY_RUN_EVAL_BATCHES = 4
#: The stand-in of each full-scale data set in a dry run: seeded synthetic inputs of the same shape and number
#: of classes (:func:`coopsgd.data.load_dataset`; 2,048 training and 512 test samples, no download).
DRY_RUN_DATA: dict[str, str] = {"cifar10": "synthetic_cifar", "mnist": "synthetic_mnist"}
#: Size of WikiText-2's vocabulary (train + valid + test words, ``<eos>`` included): the dry run of the LSTM
#: draws random tokens from it.
WIKITEXT2_VOCAB = 33278
#: Private test hook: the batch size per worker of every dry-run setting (``None``: the experiment's own). The
#: slow test sets it to keep VGG-16 cheap on a CPU; ``coopsgd reproduce --dry-run`` never does (real shapes).
DRY_RUN_BATCH: contextvars.ContextVar[int | None] = contextvars.ContextVar("coopsgd_dry_run_batch", default=None)
#: Private test hook: the number of workers of every dry-run setting (``None``: the experiment's own; same use).
DRY_RUN_WORKERS: contextvars.ContextVar[int | None] = contextvars.ContextVar("coopsgd_dry_run_workers", default=None)


#: Peak memory of a dry run (resident set, GB): 8.0 GB measured for ``coopsgd reproduce csgd-fig3 --dry-run`` on
#: the project's VM (/usr/bin/time: 7,807,908 KiB); the VGG-16 settings (8 workers of batch 128, every worker's
#: activations held at once) decide it, and csgd-fig4..6 run the same. What ``--help`` and the docs tell a user.
DRY_RUN_MEMORY_GB = 8.0


def peak_memory_gb() -> float | None:
    """The peak resident memory so far of this process and of its finished child processes (the distributed
    engine's ranks), in GB, the larger of the two; ``None`` where the platform does not say (no ``resource``)."""
    try:
        import resource
        import sys
    except ImportError:
        return None
    unit = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB elsewhere
    peak = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
    return round(peak * unit / 1e9, 2)


def dry_run_fields(fields: dict[str, Any]) -> dict[str, Any]:
    """The RunConfig fields of a full-scale setting turned into its dry run.

    Only the length and the data change: the data set becomes its synthetic stand-in (:data:`DRY_RUN_DATA`),
    the run stops after :data:`DRY_RUN_STEPS` steps, every step is evaluated and checkpointed, and the
    learning-rate milestones keep their place as a fraction of the run (``lr_decay_epochs`` of an
    ``epochs``-long run are rescaled so that the same decays happen within the two steps), a tau above 2 becomes
    2 (:func:`dry_run_tau`: one communication round happens), and the evaluation
    reads :data:`DRY_RUN_EVAL_BATCHES` batches' worth of test and training samples. Model, workers,
    partition, preset, learning rate, momentum and time model stay the full scale's.
    """
    f = dict(fields)
    if f["dataset"] not in DRY_RUN_DATA:
        raise ValueError(f"no dry-run stand-in for dataset {f['dataset']!r}")
    f["dataset"] = DRY_RUN_DATA[f["dataset"]]
    f["batch_size"] = DRY_RUN_BATCH.get() or f["batch_size"]
    f["workers"] = DRY_RUN_WORKERS.get() or f["workers"]
    decays = list(f.get("lr_decay_epochs") or [])
    if decays:
        if f.get("max_steps") is not None:
            raise ValueError("a dry run rescales epoch milestones of epoch-long runs only")
        train = load_dataset(f["dataset"], split="train", seed=int(f.get("seed", 0)))
        parts = partition(train.y, int(f["workers"]), str(f.get("partition", "iid")), seed=int(f.get("seed", 0)))
        spe = min(len(p) for p in parts) // int(f["batch_size"])
        length = DRY_RUN_STEPS / spe  # the dry run's length in epochs of the stand-in data
        f["lr_decay_epochs"] = [length * e / float(f["epochs"]) for e in decays]
    f.update(dry_run_tau(f))
    f["max_steps"] = DRY_RUN_STEPS
    f.pop("epochs", None)  # the length is max_steps now (a run refuses both)
    f["eval_every"] = 1
    f["eval_samples"] = min(int(f.get("eval_samples", 2000)), DRY_RUN_EVAL_BATCHES * int(f["batch_size"]))
    f["checkpoint_every"] = 1
    return f


def dry_run_tau(fields: dict[str, Any]) -> dict[str, Any]:
    """``{"tau": DRY_RUN_STEPS}`` when the setting's tau is longer than a dry run (so that its second step ends
    in a communication round and the round code runs too), else ``{}``."""
    tau = fields.get("tau")
    return {"tau": DRY_RUN_STEPS} if tau is not None and int(tau) > DRY_RUN_STEPS else {}


def dry_run_check(res: dict[str, Any], cfg: Any, engine: str, shape: str) -> None:
    """Reload the checkpoint of a finished dry-run setting and describe the setting in ``res["dry_run_line"]``."""
    run_dir = Path(res["dir"])
    if res.get("diverged"):
        res["dry_run_line"] = f"  {res['label']}: DIVERGED ({res['diverged']['error']})"
        return
    state = trainer.load_run_checkpoint(run_dir, engine)
    lrs = [r["lr"] for r in res["_metrics"] if r.get("lr") is not None]
    final = res.get("final") or {}
    test = (f"test perplexity {final['test_perplexity']:.4g}" if "test_perplexity" in final
            else f"test loss {final.get('test_loss', float('nan')):.4f}")
    res["dry_run_checkpoint_step"] = int(state["step"])
    res["dry_run_line"] = (
        f"  {res['label']}: {cfg.problem.model} on {shape}, {cfg.algorithm.workers} workers x batch {cfg.problem.batch_size}, "
        f"{len(res['_metrics'])} evaluated steps, {res['communication_rounds']} communication round(s), "
        f"lr {' -> '.join(f'{v:g}' for v in lrs)}, "
        f"train loss {final.get('train_loss', float('nan')):.4f}, {test}, "
        f"checkpoint.pt at step {state['step']} reloaded, {res['wall_s']:.0f} s"
    )


def dry_run_summary(experiment: str, ran: str, runs: Sequence[dict[str, Any]], *, every: str | None) -> list[str]:
    """The printed lines of a dry run: which settings ran (``every``: what ``--all-settings`` adds), then one
    line per setting."""
    head = (f"{experiment} dry run: {DRY_RUN_STEPS} steps per setting on synthetic data of the real shapes (a tau above "
            f"{DRY_RUN_STEPS} cut to {DRY_RUN_STEPS}, so that every setting communicates); ran {ran}")
    if every:
        head += f" (the first of each sweep; --all-settings runs {every})"
    return [head] + [r["dry_run_line"] for r in runs]


def shape_text(dataset: str) -> str:
    """The data of a dry run in words: the stand-in's name, shape and classes."""
    shape = _SYNTHETIC_SHAPES.get(dataset)
    return f"{dataset} ({'x'.join(map(str, shape))}, 10 classes)" if shape else dataset
