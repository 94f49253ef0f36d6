"""[LSGD] the LSTM experiment: ``coopsgd reproduce lsgd-lstm``.

The four methods of ``lsgd-nets`` (:mod:`coopsgd.experiments.lsgd_nets`: fully synchronous SGD, DOWNPOUR and
the tuned EASGD and LSGD, tuned the same way on held-out training windows) train a 2-layer LSTM language model
on WikiText-2; the curves are the test perplexity of the centre variable against simulated wall-clock. The
grids are smaller than the nets' (:data:`LSTM_METHODS`: lambda in {0.1, 0.25, 0.025}, beta in {0.43, 0.9}; 10%
of the training windows held out; ``lsgd_lstm_sweep.png``): seven runs per seed instead of the nets' ten,
since a quick LSTM run costs about half a minute on 2 CPU cores. tau = 4 for the three communication-saving
methods is our choice.

Full scale: the 2-layer, 200-unit LSTM on WikiText-2 (sequence 35, 4 workers; trains on valid.txt and tests
on test.txt when the train split is absent). Quick scale: 64 units on the bundled WikiText-2 files with the
vocabulary cut to the 2,000 most frequent words. A dry run (``args.dry_run``) runs every method of the full
scale for two steps on random tokens of WikiText-2's 33,278-word vocabulary.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from coopsgd.algorithms import make_preset
from coopsgd.data import WorkerLoader, lm_windows, load_dataset, partition
from coopsgd.engines.simulator import Simulator
from coopsgd.experiments.base import assess, register
from coopsgd.experiments.dry_run import (
    DRY_RUN_BATCH,
    DRY_RUN_STEPS,
    DRY_RUN_WORKERS,
    WIKITEXT2_VOCAB,
    dry_run_summary,
    dry_run_tau,
)
from coopsgd.experiments.figure_axes import clock_x, zoom_window
from coopsgd.experiments.harness import (
    DEVICE,
    ExperimentArgs,
    describe_time,
    first_reach,
    panel,
    plot_panels,
    public_runs,
    run_built,
    scaled,
    time_fields,
)
from coopsgd.experiments.lsgd_nets import (
    HOLDOUT_FRACTION,
    SELECTION,
    SWEPT_NAME,
    Method,
    comm_table,
    loss_at_time,
    method_lines,
    plot_sweep,
    run_methods,
    short,
    sweep_summary,
)
from coopsgd.experiments.stats import Assessment, Claim
from coopsgd.models import make_model
from coopsgd.train import trainer
from coopsgd.train.config import RunConfig
from coopsgd.train.problem import run_length

__all__ = ["LSTM_METHODS", "LSTM_LAMBDAS", "LSTM_BETAS", "LSTM_FULL", "LSTM_QUICK", "run_lsgd_lstm",
           "build_lm_experiment", "lstm_metrics"]

#: ``lsgd-lstm``'s methods, as :data:`NET_METHODS` with smaller grids (a quick LSTM run costs about half a minute
#: on 2 CPU cores): LSGD at the paper's lambda = 0.1 and the grid's second and last values, EASGD at the paper's
#: beta = 0.43 and 0.9 (the weaker 0.1 lost clearly on both nets). The first value of a grid is the dry run's.
LSTM_LAMBDAS: tuple[float, ...] = (0.1, 0.25, 0.025)
LSTM_BETAS: tuple[float, ...] = (0.43, 0.9)
LSTM_METHODS: list[Method] = [
    ("SGD (sync)", "sync", {}, None, ()),
    ("DOWNPOUR (tau=4)", "downpour", {"tau": 4}, None, ()),
    ("EASGD (tuned beta, tau=4)", "easgd", {"tau": 4}, "beta", LSTM_BETAS),
    ("LSGD (tuned lambda, tau=4)", "lsgd", {"tau": 4}, "lam", LSTM_LAMBDAS),
]

LSTM_FULL: dict[str, Any] = {
    "workers": 4,
    "hidden": 200,
    "layers": 2,
    "seq_len": 35,
    "batch_size": 20,
    "lr": 1.0,
    "epochs": 40.0,
    "vocab_cap": None,
    "test_windows": None,
    "eval_samples": 2000,
    "holdout_fraction": HOLDOUT_FRACTION,
}
LSTM_QUICK: dict[str, Any] = {
    "workers": 4,
    "hidden": 64,
    "layers": 2,
    "seq_len": 35,
    "batch_size": 20,
    "lr": 1.0,
    "max_steps": 300,
    "vocab_cap": 2000,
    "test_windows": 150,
    "eval_samples": 150,
    "holdout_fraction": HOLDOUT_FRACTION,
}


def _lm_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))


def _cap_vocab(train: torch.Tensor, test: torch.Tensor, cap: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Keep the ``cap - 1`` most frequent training words; every other word becomes one <unk> id."""
    counts = torch.bincount(train, minlength=int(max(train.max(), test.max())) + 1)
    keep = torch.argsort(counts, descending=True, stable=True)[: cap - 1]
    remap = torch.full((counts.numel(),), cap - 1, dtype=torch.long)
    remap[keep] = torch.arange(cap - 1)
    return remap[train], remap[test], cap


def build_lm_experiment(cfg: RunConfig, settings: dict[str, Any]) -> Any:
    """The trainer's :class:`~coopsgd.train.trainer.Experiment` for the LSTM language model, built by hand.

    Built here rather than by :func:`coopsgd.train.trainer.build` because the quick scale cuts the vocabulary
    (``settings["vocab_cap"]``) and the test set (``settings["test_windows"]``), which a ``RunConfig`` does not
    express. Everything else is the trainer's: data order, loop, records, and the held-out windows of
    ``cfg.holdout_fraction`` (:func:`~coopsgd.train.trainer.split_holdout`).

    ``settings["synthetic_vocab"]`` (the dry run): instead of WikiText-2, seeded random tokens of that
    vocabulary, enough windows for ``cfg.max_steps`` steps of every worker and ``settings["test_windows"]``
    test windows.
    """
    L = int(settings["seq_len"])
    train_set, holdout_set, test_set, vocab = _lm_data(cfg, settings)
    parts = partition(np.zeros(len(train_set), dtype=np.int64), cfg.algorithm.workers, "iid", seed=cfg.execution.seed)
    loader = WorkerLoader(train_set, parts, cfg.problem.batch_size, seed=cfg.execution.seed)
    spec = make_preset(cfg.algorithm.preset, cfg.algorithm.workers, **cfg.spec_kwargs())
    torch.manual_seed(cfg.execution.seed)
    h = int(settings["hidden"])
    model = make_model(
        "lstm_lm",
        num_classes=vocab,
        input_shape=(L,),
        emb_size=h,
        hidden_size=h,
        num_layers=int(settings["layers"]),
        batch_first=True,
    )
    clock = trainer.sim_clock(cfg)  # the config's network and compute model, as every RunConfig run's
    sim = Simulator(
        spec,
        model,
        loss_fn=_lm_loss,
        optimizer=cfg.optimizer,
        executor=cfg.execution.executor,
        seed=cfg.execution.seed,
        loss_estimate=cfg.algorithm.loss_estimate,
        clock=clock,
        device=cfg.execution.device,
    )
    spe = loader.steps_per_epoch
    total, eval_every = run_length(cfg, spe)
    return trainer.Experiment(
        config=cfg,
        spec=spec,
        sim=sim,
        loader=loader,
        train_set=train_set,
        test_set=test_set,
        loss_fn=_lm_loss,
        total_steps=total,
        eval_every=eval_every,
        is_lm=True,
        holdout_set=holdout_set,
    )


def _lm_data(cfg: RunConfig, settings: dict[str, Any]) -> tuple[Any, Any, Any, int]:
    """The training windows, the held-out windows, the test windows and the vocabulary size of the LSTM."""
    L = int(settings["seq_len"])
    if settings.get("synthetic_vocab"):
        vocab = int(settings["synthetic_vocab"])
        gen = torch.Generator().manual_seed(cfg.execution.seed)
        n_train = cfg.algorithm.workers * cfg.problem.batch_size * int(cfg.schedule.max_steps or 1) * L + 1
        tr_tokens = torch.randint(vocab, (n_train,), generator=gen)
        te_tokens = torch.randint(vocab, (int(settings["test_windows"]) * L + 1,), generator=gen)
    else:
        tr = load_dataset("wikitext2", split="train")
        te = load_dataset("wikitext2", split="test")
        tr_tokens, te_tokens, vocab = tr.x, te.x, tr.num_classes
    if settings.get("vocab_cap"):
        tr_tokens, te_tokens, vocab = _cap_vocab(tr_tokens, te_tokens, int(settings["vocab_cap"]))
    train_set = dataclasses.replace(lm_windows(tr_tokens, L, name="wikitext2/train"), num_classes=vocab)
    test_set = dataclasses.replace(lm_windows(te_tokens, L, name="wikitext2/test"), num_classes=vocab)
    if settings.get("test_windows"):
        n = int(settings["test_windows"])
        test_set = dataclasses.replace(test_set, x=test_set.x[:n], y=test_set.y[:n])
    # windows, as the trainer holds out samples
    train_set, holdout_set = trainer.split_holdout(train_set, cfg.evaluation.holdout_fraction, cfg.execution.seed)
    return train_set, holdout_set, test_set, vocab


@register(
    "lsgd-lstm", "[LSGD] LSTM on WikiText-2: test perplexity vs wall-clock for SGD, DOWNPOUR, EASGD, LSGD"
)
def run_lsgd_lstm(args: ExperimentArgs) -> dict[str, Any]:
    """Test perplexity of the centre variable vs simulated wall-clock for the four methods."""
    out = args.start()
    st, length = _lstm_settings(args)
    tf = time_fields(args.quick)
    # the four reported runs (EASGD and LSGD: tuned), the choices, the sweep and every run in the order it ran
    runs, chosen, sweep, sweep_lines, executed = run_methods(
        "LSTM", LSTM_METHODS, args, functools.partial(_run_lstm, args, out, st, length))
    note = _lstm_note(args, st)
    ylabel = "test perplexity (centre variable)"
    steps = max((r["_metrics"][-1]["step"] for r in runs if r.get("_metrics")), default=0)
    plot = plot_panels(out / "lsgd_lstm.png", runs, [
        panel("time_s", "test_perplexity", ylabel, logy=True, **clock_x("time_s")),
        panel("step", "test_perplexity", ylabel, logy=True),
        # the best methods end about 1% apart (LSGD 111.9, EASGD 113.3 on three seeds): the second half of the
        # run (same step budget for every method) on a linear scale around the best final values shows it
        panel("step", "test_perplexity", ylabel, ylim=zoom_window(runs, "test_perplexity"), legend=True,
              xlim=(steps / 2, steps * 1.02) if steps else None,
              title="zoom: the best final perplexities (linear scale)"),
    ], note=f"{note}; {describe_time(tf)}", ncols=3,
        title="[LSGD] LSTM on WikiText-2 (bundled: train = valid.txt, test = test.txt)")
    sweep_plot = plot_sweep(out / "lsgd_lstm_sweep.png", sweep_lines, st, tf, what="LSTM") if sweep_lines else None
    table = comm_table(runs)
    summary = _lstm_summary(args, note, runs, table, sweep, st, tf)
    if args.dry_run:
        summary = dry_run_summary("lsgd-lstm", "every method", executed, every=None)
    return {
        "experiment": "lsgd-lstm",
        "quick": args.quick,
        "settings": st,
        "time_model": tf,
        "scale": note,
        "communication_table": table,
        "runs": public_runs(runs),
        "plots": [str(plot)] + ([str(sweep_plot)] if sweep_plot is not None else []),
        "summary": summary,
        "selection": SELECTION,
        "chosen": chosen,
        "sweep": sweep,
        "time_to_best_sync_perplexity": _time_to(runs),
        "perplexity_at_equal_time": _ppl_at_equal_time(runs),
    }


def _lstm_settings(args: ExperimentArgs) -> tuple[dict[str, Any], dict[str, Any]]:
    """The LSTM's settings (:data:`LSTM_QUICK` / :data:`LSTM_FULL`, a dry run's random tokens) and the RunConfig
    fields of the run's length."""
    st = dict(LSTM_QUICK if args.quick else LSTM_FULL)
    length: dict[str, Any] = (
        {"max_steps": scaled(st["max_steps"], args.scale, 4)} if args.quick else {"epochs": st["epochs"] * args.scale}
    )
    if args.dry_run:  # the full scale's model and vocabulary size on random tokens, two steps, every step checkpointed
        st.update(synthetic_vocab=WIKITEXT2_VOCAB, test_windows=100, batch_size=DRY_RUN_BATCH.get() or st["batch_size"],
                  workers=DRY_RUN_WORKERS.get() or st["workers"])
        length = {"max_steps": DRY_RUN_STEPS, "eval_every": 1, "checkpoint_every": 1}
    return st, length


def _run_lstm(args: ExperimentArgs, out: Path, st: dict[str, Any], length: dict[str, Any], preset: str,
              settings: dict[str, Any], swept: dict[str, Any], run_label: str, sub: str) -> dict[str, Any]:
    """One setting of one method (``run_one`` of :func:`~coopsgd.experiments.lsgd_nets.run_methods`)."""
    cfg = RunConfig(
        preset=preset,
        model="lstm_lm",
        dataset="wikitext2",
        workers=st["workers"],
        batch_size=st["batch_size"],
        seed=args.seed,
        eval_samples=st["eval_samples"],
        holdout_fraction=st["holdout_fraction"],
        executor="loop",  # measured: the per-replica loop beats vmap for this LSTM on CPU
        device=DEVICE.get(),
        **({"eval_every": max(1, length["max_steps"] // 12) if args.quick else None, **length}),
        # a method's settings may set its own learning rate (over the experiment's)
        **{"lr": st["lr"], **settings, **(dry_run_tau(settings) if args.dry_run else {})},
        **time_fields(args.quick),
    )
    res = run_built(
        build_lm_experiment(cfg, st),
        out / f"lstm_{sub}",
        run_label,
        progress=args.progress,
        extra={"net": "LSTM", "method": run_label, "preset": preset, "lstm": st, **swept,
               **({"data": f"random tokens (vocabulary {WIKITEXT2_VOCAB:,}, seq {st['seq_len']})"}
                  if args.dry_run else {})},
    )
    res["final_test_perplexity"] = (res.get("final") or {}).get("test_perplexity")
    return res


def _lstm_note(args: ExperimentArgs, st: dict[str, Any]) -> str:
    return (
        f"2-layer LSTM, {st['hidden']} units, seq {st['seq_len']}, {st['workers']} workers, batch "
        f"{st['batch_size']}, lr {st['lr']:g}"
        + (
            f", vocabulary cut to {st['vocab_cap']} words, test on the first {st['test_windows']} windows"
            if args.quick
            else ""
        )
        + (f"; dry run: {DRY_RUN_STEPS} steps on random tokens of WikiText-2's {WIKITEXT2_VOCAB:,}-word vocabulary"
           if args.dry_run else "")
    )


def _lstm_summary(args: ExperimentArgs, note: str, runs: list[dict[str, Any]], table: list[dict[str, Any]],
                  sweep: list[dict[str, Any]], st: dict[str, Any], tf: dict[str, Any]) -> list[str]:
    summary = [f"lsgd-lstm ({args.scale_name}): {note}; {describe_time(tf)}"
               + (f"; EASGD and LSGD tuned on {100 * st['holdout_fraction']:g}% held-out training windows (lowest "
                  "final held-out loss)" if sweep else "")]
    summary += method_lines(
        runs, table, lambda r: f"{r['method']:26s}",
        lambda r, row: (f"test perplexity {r['final_test_perplexity']:8.1f}  simulated {r['time_s']:7.1f} s  "
                        f"communication {100 * row['communication_fraction']:5.1f}%"))
    return summary + sweep_summary(sweep, net_width=None)


def _ppl_at_equal_time(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Each method's test perplexity at the simulated time the fastest method finished, read off its curve as
    in ``lsgd-nets`` (:func:`~coopsgd.experiments.lsgd_nets.loss_at_time`)."""
    ok = [r for r in runs if not r["diverged"] and r.get("time_s") is not None]
    if not ok:
        return {}
    t = min(r["time_s"] for r in ok)
    return {"time_s": t, **{r["method"]: loss_at_time(r, t, y="test_perplexity") for r in ok}}


def _time_to(runs: list[dict[str, Any]]) -> dict[str, float | None]:
    """Simulated time each method needs to reach the final perplexity of synchronous SGD."""
    target = runs[0].get("final_test_perplexity")
    if target is None:
        return {}
    return {r["method"]: first_reach(r, target, y="test_perplexity") for r in runs}


# --------------------------------------------------------------------------------- multi-seed assessment

def lstm_metrics(res: dict[str, Any]) -> dict[str, float | None]:
    """One seed's numbers: the four reported methods' perplexities, times and communication fractions; the tuned
    lambda / beta; every swept setting's final held-out loss."""
    m: dict[str, float | None] = {}
    comm = {row["method"]: row["communication_fraction"] for row in res["communication_table"]}
    eq = res.get("perplexity_at_equal_time") or {}
    reach = res.get("time_to_best_sync_perplexity") or {}
    for r in res["runs"]:
        meth, ok = short(r["method"]), not r["diverged"]
        m[f"{meth} final test perplexity"] = r.get("final_test_perplexity") if ok else None
        m[f"{meth} test perplexity at equal time"] = eq.get(r["method"]) if ok else None
        m[f"{meth} time to sync's final perplexity (s)"] = reach.get(r["method"]) if ok else None
        m[f"{meth} communication fraction"] = comm.get(r["method"]) if ok else None
    for meth, v in (res.get("chosen") or {}).items():
        m[f"{meth} tuned {'lambda' if meth == 'LSGD' else 'beta'}"] = v
    for row in res.get("sweep") or []:
        m[f"{row['method']} held-out loss, {SWEPT_NAME[row['setting']]}={row['value']:g}"] = row["final_holdout_loss"]
    return m


assess("lsgd-lstm", Assessment(lstm_metrics, [
    Claim("LSGD reaches a given test perplexity in the least wall-clock (LSTM; EASGD and LSGD each at its "
          "setting of lowest held-out loss)",
          ("LSGD test perplexity at equal time", "EASGD test perplexity at equal time"),
          also=(("LSGD test perplexity at equal time", "SGD test perplexity at equal time"),
                ("LSGD test perplexity at equal time", "DOWNPOUR test perplexity at equal time"))),
    Claim("DOWNPOUR spends a larger share of time communicating than LSGD",
          ("LSGD communication fraction", "DOWNPOUR communication fraction")),
]))
