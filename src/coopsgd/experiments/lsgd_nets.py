"""[LSGD] deep-net experiments: ``coopsgd reproduce lsgd-nets`` and ``coopsgd reproduce lsgd-lstm``.

Four methods on the same model, data and budget: fully synchronous SGD, DOWNPOUR, EASGD (beta = 0.43) and
LSGD; the curves are the test loss (perplexity for the LSTM) of the *centre* variable -- the average for
SGD, the server/auxiliary z for DOWNPOUR and EASGD, the leader for LSGD -- against simulated wall-clock,
and the table is the fraction of simulated time spent communicating ([LSGD] Table 6).

Full scale: CNN-7 and ResNet-20 on CIFAR-10 (needs torchvision + the files; batch 128), and the 2-layer,
200-unit LSTM on WikiText-2 (sequence 35, 4 workers; trains on valid.txt and tests on test.txt when the
train split is absent). Quick scale: LeNet and an MLP on the bundled MNIST subset standing in for CNN-7 and
ResNet-20 (both real CIFAR nets cost minutes per step-hundred on 2 CPU cores), and a 2-layer LSTM with 64
units on the bundled WikiText-2 files with the vocabulary cut to the 2,000 most frequent words.

``dry_run=True`` (``coopsgd reproduce lsgd-nets | lsgd-lstm --dry-run``) runs every method of the full scale
for two steps on synthetic data of the real shapes: 3x32x32 images of 10 classes for CNN-7 and ResNet-20,
random tokens of WikiText-2's 33,278-word vocabulary for the LSTM. The four methods are not a sweep: all run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from coopsgd.experiments.harness import (
    DEVICE,
    DRY_RUN_BATCH,
    DRY_RUN_STEPS,
    DRY_RUN_WORKERS,
    WIKITEXT2_VOCAB,
    check_full_data,
    describe_time,
    dry_run_fields,
    dry_run_summary,
    dry_run_tau,
    first_reach,
    panel,
    plot_panels,
    public_runs,
    run_built,
    run_config,
    scaled,
    tail_mean,
    time_fields,
    value_at,
)
from coopsgd.experiments.registry import register
from coopsgd.train.config import RunConfig

__all__ = [
    "METHODS",
    "NETS_FULL",
    "NETS_QUICK",
    "LSTM_FULL",
    "LSTM_QUICK",
    "run_lsgd_nets",
    "run_lsgd_lstm",
    "build_lm_experiment",
]

#: (label, preset, RunConfig fields). tau = 4 for the three communication-saving methods is our choice.
METHODS: list[tuple[str, str, dict[str, Any]]] = [
    ("SGD (sync)", "sync", {}),
    ("DOWNPOUR (tau=4)", "downpour", {"tau": 4}),
    ("EASGD (beta=0.43, tau=4)", "easgd", {"tau": 4, "beta": 0.43}),
    ("LSGD (lambda=0.1, tau=4)", "lsgd", {"tau": 4, "lam": 0.1}),
]

NETS_FULL: list[dict[str, Any]] = [
    {"name": "CNN-7", "model": "cnn7", "dataset": "cifar10"},
    {"name": "ResNet-20", "model": "resnet20", "dataset": "cifar10"},
]
NETS_QUICK: list[dict[str, Any]] = [
    {"name": "LeNet (for CNN-7)", "model": "lenet", "dataset": "mnist_bundled", "executor": "loop"},
    {"name": "MLP (for ResNet-20)", "model": "mlp", "dataset": "mnist_bundled", "executor": "vmap"},
]
_NET_TRAIN_FULL: dict[str, Any] = {
    "workers": 4,
    "batch_size": 128,
    "lr": 0.1,
    "momentum": 0.9,
    "weight_decay": 1e-4,
    "epochs": 200.0,
    "lr_decay_epochs": [100.0, 150.0],
    "eval_samples": 10000,
}
_NET_TRAIN_QUICK: dict[str, Any] = {
    "workers": 4,
    "batch_size": 32,
    "lr": 0.1,
    "max_steps": 400,
    "eval_samples": 2000,
}


def _comm_table(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for r in runs:
        total = r.get("time_s")
        comm = (r.get("simulated_split_s") or r.get("measured_split_s") or {}).get("communication_s")
        rows.append(
            {
                "net": r["net"],
                "method": r["method"],
                "time_s": total,
                "time_source": r.get("time_source"),
                "communication_s": comm,
                "communication_fraction": (comm / total) if total and comm is not None else None,
            }
        )
    return rows


@register(
    "lsgd-nets",
    "[LSGD] Fig. 4/5 + Table 6: SGD, DOWNPOUR, EASGD, LSGD on CNN-7 and ResNet-20",
    engines=("simulate", "distributed"),
)
def run_lsgd_nets(
    *,
    quick: bool,
    engine: str,
    out: Path,
    seed: int,
    progress: bool,
    _scale: float = 1.0,
    _nets: int | None = None,
    dry_run: bool = False,
    all_settings: bool = False,
) -> dict[str, Any]:
    """Test loss of the centre variable vs simulated wall-clock, and the communication fractions."""
    nets = NETS_QUICK if quick else NETS_FULL
    if not quick and not dry_run:
        check_full_data("cifar10")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    base = dict(_NET_TRAIN_QUICK if quick else _NET_TRAIN_FULL)
    if quick:
        base["max_steps"] = scaled(base["max_steps"], _scale, 8)
    else:
        base["epochs"] = base["epochs"] * _scale
    tf = time_fields(quick)
    runs: list[dict[str, Any]] = []
    plots = []
    for net in nets[: _nets or len(nets)]:
        net_runs = []
        for label, preset, kw in METHODS:
            fields: dict[str, Any] = dict(
                preset=preset,
                model=net["model"],
                dataset=net["dataset"],
                seed=seed,
                executor=net.get("executor", "auto"),
                device=DEVICE.get(),
                **base,
                **kw,
                **tf,
                eval_every=max(1, base["max_steps"] // 20) if quick else None,
            )
            cfg = RunConfig(**(dry_run_fields(fields) if dry_run else fields))
            res = run_config(
                cfg,
                out / f"{net['model']}_{preset}",
                label,
                progress=progress,
                extra={"net": net["name"], "method": label, "preset": preset},
            )
            net_runs.append(res)
        note = (
            f"{net['name']} on {cfg.dataset}, {base['workers']} workers, batch {cfg.batch_size}, "
            f"lr {base['lr']:g}; {describe_time(tf)}"
            + (f"; dry run: {DRY_RUN_STEPS} steps on synthetic data, a smoke test, not a result" if dry_run else "")
        )
        plots.append(
            str(
                plot_panels(
                    out / f"lsgd_nets_{net['model']}.png",
                    net_runs,
                    [
                        panel("time_s", "test_loss", "test loss (centre variable)", logy=True),
                        panel("time_s", "test_accuracy", "test accuracy (centre variable)"),
                        panel("step", "test_loss", "test loss (centre variable)", logy=True),
                    ],
                    title=f"[LSGD] {net['name']}: centre variable vs wall-clock",
                    note=note,
                    ncols=3,
                )
            )
        )
        runs += net_runs
    table = _comm_table(runs)
    equal_time: dict[str, dict[str, float | None]] = {}
    for net in {r["net"] for r in runs}:
        rs = [r for r in runs if r["net"] == net and not r["diverged"]]
        t = min(r["time_s"] for r in rs)
        equal_time[net] = {"time_s": t, **{r["method"]: value_at(r, t) for r in rs}}
    summary = [f"lsgd-nets ({'quick' if quick else 'full'}): {describe_time(tf)}"]
    for r, row in zip(runs, table, strict=True):
        if r["diverged"]:
            summary.append(f"  {r['net']:22s} {r['method']:26s} DIVERGED at step {r['diverged']['step']}")
            continue
        summary.append(
            f"  {r['net']:22s} {r['method']:26s} test loss {r['final']['test_loss']:.4f}  "
            f"acc {r['final']['test_accuracy']:.3f}  {r['time_source']} {r['time_s']:8.1f} s  "
            f"communication {100 * row['communication_fraction']:5.1f}%  test loss at "
            f"{equal_time[r['net']]['time_s']:.0f} s: {equal_time[r['net']][r['method']]:.4f}"
        )
    if dry_run:
        summary = dry_run_summary("lsgd-nets", "every method on " + " and ".join(n["name"] for n in nets[: _nets or len(nets)]),
                                  runs, every=None)
    return {
        "experiment": "lsgd-nets",
        "test_loss_at_equal_time": equal_time,
        "quick": quick,
        "time_model": tf,
        "train": base,
        "methods": [{"label": lab, "preset": p, **kw} for lab, p, kw in METHODS],
        "communication_table": table,
        "runs": public_runs(runs),
        "plots": plots,
        "summary": summary,
    }


# ------------------------------------------------------------------------------------------------------ LSTM

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

    :func:`coopsgd.train.trainer.build` cannot be used as is: it makes ``lstm_lm`` with ``batch_first=False``
    while its windows come as (batch, seq_len), and it has no way to pass the model's size or to limit the
    test set (see docs/reproductions.md). Everything else is the trainer's: data order, loop, records.

    ``settings["synthetic_vocab"]`` (the dry run): instead of WikiText-2, seeded random tokens of that
    vocabulary, enough windows for ``cfg.max_steps`` steps of every worker and ``settings["test_windows"]``
    test windows.
    """
    from coopsgd.algorithms import make_preset
    from coopsgd.data import WorkerLoader, lm_windows, load_dataset, partition
    from coopsgd.engines.simulator import Simulator
    from coopsgd.models import make_model
    from coopsgd.train.trainer import Experiment, sim_clock

    L = int(settings["seq_len"])
    if settings.get("synthetic_vocab"):
        vocab = int(settings["synthetic_vocab"])
        gen = torch.Generator().manual_seed(cfg.seed)
        n_train = cfg.workers * cfg.batch_size * int(cfg.max_steps or 1) * L + 1
        tr_tokens = torch.randint(vocab, (n_train,), generator=gen)
        te_tokens = torch.randint(vocab, (int(settings["test_windows"]) * L + 1,), generator=gen)
    else:
        tr = load_dataset("wikitext2", split="train")
        te = load_dataset("wikitext2", split="test")
        tr_tokens, te_tokens, vocab = tr.x, te.x, tr.num_classes
    if settings.get("vocab_cap"):
        tr_tokens, te_tokens, vocab = _cap_vocab(tr_tokens, te_tokens, int(settings["vocab_cap"]))
    import dataclasses

    train_set = dataclasses.replace(lm_windows(tr_tokens, L, name="wikitext2/train"), num_classes=vocab)
    test_set = dataclasses.replace(lm_windows(te_tokens, L, name="wikitext2/test"), num_classes=vocab)
    if settings.get("test_windows"):
        n = int(settings["test_windows"])
        test_set = dataclasses.replace(test_set, x=test_set.x[:n], y=test_set.y[:n])
    parts = partition(np.zeros(len(train_set), dtype=np.int64), cfg.workers, "iid", seed=cfg.seed)
    loader = WorkerLoader(train_set, parts, cfg.batch_size, seed=cfg.seed)
    spec = make_preset(cfg.preset, cfg.workers, **cfg.spec_kwargs())
    torch.manual_seed(cfg.seed)
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
    clock = sim_clock(cfg)  # the config's network and compute model, as every RunConfig run's
    sim = Simulator(
        spec,
        model,
        loss_fn=_lm_loss,
        momentum=cfg.momentum,
        weight_decay=cfg.weight_decay,
        executor=cfg.executor,
        seed=cfg.seed,
        loss_estimate=cfg.loss_estimate,
        clock=clock,
        device=cfg.device,
    )
    spe = loader.steps_per_epoch
    total = cfg.max_steps if cfg.max_steps is not None else max(1, int(np.ceil(cfg.epochs * spe)))
    eval_every = cfg.eval_every or max(1, min(spe, total // 10 or 1))
    return Experiment(
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
    )


@register(
    "lsgd-lstm", "[LSGD] LSTM on WikiText-2: test perplexity vs wall-clock for SGD, DOWNPOUR, EASGD, LSGD"
)
def run_lsgd_lstm(
    *,
    quick: bool,
    engine: str,
    out: Path,
    seed: int,
    progress: bool,
    _scale: float = 1.0,
    dry_run: bool = False,
    all_settings: bool = False,
) -> dict[str, Any]:
    """Test perplexity of the centre variable vs simulated wall-clock for the four methods."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    st = dict(LSTM_QUICK if quick else LSTM_FULL)
    tf = time_fields(quick)
    length: dict[str, Any] = (
        {"max_steps": scaled(st["max_steps"], _scale, 4)} if quick else {"epochs": st["epochs"] * _scale}
    )
    if dry_run:  # the full scale's model and vocabulary size on random tokens, two steps, every step checkpointed
        st.update(synthetic_vocab=WIKITEXT2_VOCAB, test_windows=100, batch_size=DRY_RUN_BATCH.get() or st["batch_size"],
                  workers=DRY_RUN_WORKERS.get() or st["workers"])
        length = {"max_steps": DRY_RUN_STEPS, "eval_every": 1, "checkpoint_every": 1}
    runs = []
    for label, preset, kw in METHODS:
        cfg = RunConfig(
            preset=preset,
            model="lstm_lm",
            dataset="wikitext2",
            workers=st["workers"],
            batch_size=st["batch_size"],
            lr=st["lr"],
            seed=seed,
            eval_samples=st["eval_samples"],
            executor="loop",  # measured: the per-replica loop beats vmap for this LSTM on CPU
            device=DEVICE.get(),
            **({"eval_every": max(1, length["max_steps"] // 12) if quick else None, **length}),
            **{**kw, **(dry_run_tau(kw) if dry_run else {})},
            **tf,
        )
        exp = build_lm_experiment(cfg, st)
        res = run_built(
            exp,
            out / f"lstm_{preset}",
            label,
            progress=progress,
            extra={"net": "LSTM", "method": label, "preset": preset, "lstm": st,
                   **({"data": f"random tokens (vocabulary {WIKITEXT2_VOCAB:,}, seq {st['seq_len']})"}
                      if dry_run else {})},
        )
        res["final_test_perplexity"] = (res.get("final") or {}).get("test_perplexity")
        runs.append(res)
    scale_note = (
        f"2-layer LSTM, {st['hidden']} units, seq {st['seq_len']}, {st['workers']} workers, batch "
        f"{st['batch_size']}, lr {st['lr']:g}"
        + (
            f", vocabulary cut to {st['vocab_cap']} words, test on the first {st['test_windows']} windows"
            if quick
            else ""
        )
        + (f"; dry run: {DRY_RUN_STEPS} steps on random tokens of WikiText-2's {WIKITEXT2_VOCAB:,}-word vocabulary"
           if dry_run else "")
    )
    plot = plot_panels(
        out / "lsgd_lstm.png",
        runs,
        [
            panel("time_s", "test_perplexity", "test perplexity (centre variable)", logy=True),
            panel("step", "test_perplexity", "test perplexity (centre variable)", logy=True),
        ],
        title="[LSGD] LSTM on WikiText-2 (bundled: train = valid.txt, test = test.txt)",
        note=f"{scale_note}; {describe_time(tf)}",
        ncols=2,
    )
    table = _comm_table(runs)
    summary = [f"lsgd-lstm ({'quick' if quick else 'full'}): {scale_note}; {describe_time(tf)}"]
    for r, row in zip(runs, table, strict=True):
        if r["diverged"]:
            summary.append(f"  {r['method']:26s} DIVERGED at step {r['diverged']['step']}")
            continue
        summary.append(
            f"  {r['method']:26s} test perplexity {r['final_test_perplexity']:8.1f}  simulated "
            f"{r['time_s']:7.1f} s  communication {100 * row['communication_fraction']:5.1f}%"
        )
    if dry_run:
        summary = dry_run_summary("lsgd-lstm", "every method", runs, every=None)
    return {
        "experiment": "lsgd-lstm",
        "quick": quick,
        "settings": st,
        "time_model": tf,
        "scale": scale_note,
        "communication_table": table,
        "runs": public_runs(runs),
        "plots": [str(plot)],
        "summary": summary,
        "time_to_best_sync_perplexity": _time_to(runs),
        "perplexity_at_equal_time": _ppl_at_equal_time(runs),
    }


def _ppl_at_equal_time(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Each method's test perplexity at the simulated time the fastest method finished."""
    ok = [r for r in runs if not r["diverged"] and r.get("time_s") is not None]
    if not ok:
        return {}
    t = min(r["time_s"] for r in ok)
    return {"time_s": t, **{r["method"]: value_at(r, t, y="test_perplexity") for r in ok}}


def _time_to(runs: list[dict[str, Any]]) -> dict[str, float | None]:
    """Simulated time each method needs to reach the final perplexity of synchronous SGD."""
    target = runs[0].get("final_test_perplexity")
    if target is None:
        return {}
    return {r["method"]: first_reach(r, target, y="test_perplexity") for r in runs}


__all__ += ["tail_mean"]


# --------------------------------------------------------------------------------- multi-seed assessments

from coopsgd.experiments.registry import assess  # noqa: E402
from coopsgd.experiments.stats import Assessment, Claim, PaperRow  # noqa: E402

_SHORT = ("SGD", "DOWNPOUR", "EASGD", "LSGD")
#: The quick nets stand in for the full ones, in this order; metric names use the full nets' names.
_ROLE = {**{n["name"]: n["name"] for n in NETS_FULL},
         **{q["name"]: f["name"] for q, f in zip(NETS_QUICK, NETS_FULL, strict=True)}}


def _short(method: str) -> str:
    return method.split(" ")[0]


def nets_metrics(res: dict[str, Any]) -> dict[str, float | None]:
    m: dict[str, float | None] = {}
    comm = {(row["net"], row["method"]): row["communication_fraction"] for row in res["communication_table"]}
    for r in res["runs"]:
        net, meth = _ROLE.get(r["net"], r["net"]), _short(r["method"])
        ok = not r["diverged"]
        m[f"{net}: {meth} test loss at equal time"] = (
            res["test_loss_at_equal_time"].get(r["net"], {}).get(r["method"]) if ok else None)
        m[f"{net}: {meth} final test loss"] = (r.get("final") or {}).get("test_loss") if ok else None
        m[f"{net}: {meth} communication fraction"] = comm.get((r["net"], r["method"])) if ok else None
    return m


def _best_claim(net: str) -> Claim:
    k = f"{net}: {{}} test loss at equal time"
    return Claim(f"LSGD reaches the lowest test loss of the centre variable fastest ({net}, Fig. 4/5)",
                 (k.format("LSGD"), k.format("EASGD")),
                 also=((k.format("LSGD"), k.format("SGD")), (k.format("LSGD"), k.format("DOWNPOUR"))))


assess("lsgd-nets", Assessment(nets_metrics, [
    *(_best_claim(f["name"]) for f in NETS_FULL),
    *(Claim(f"LSGD and EASGD communicate less than DOWNPOUR ({f['name']}, Table 6)",
            (f"{f['name']}: LSGD communication fraction", f"{f['name']}: DOWNPOUR communication fraction"),
            also=((f"{f['name']}: EASGD communication fraction", f"{f['name']}: DOWNPOUR communication fraction"),))
      for f in NETS_FULL),
], [
    PaperRow(f"{f['name']}: {meth} communication fraction", paper, f"{f['name']}: {meth} communication fraction",
             note="Table 6's range over its nets; our network is deliberately slow (100 Mbit/s) in quick mode",
             fmt=".3f")
    for f in NETS_FULL
    for meth, paper in (("LSGD", "0.01-0.02"), ("EASGD", "0.02-0.04"), ("DOWNPOUR", "0.17-0.57"))
]))


def lstm_metrics(res: dict[str, Any]) -> dict[str, float | None]:
    m: dict[str, float | None] = {}
    comm = {row["method"]: row["communication_fraction"] for row in res["communication_table"]}
    eq = res.get("perplexity_at_equal_time") or {}
    reach = res.get("time_to_best_sync_perplexity") or {}
    for r in res["runs"]:
        meth, ok = _short(r["method"]), not r["diverged"]
        m[f"{meth} final test perplexity"] = r.get("final_test_perplexity") if ok else None
        m[f"{meth} test perplexity at equal time"] = eq.get(r["method"]) if ok else None
        m[f"{meth} time to sync's final perplexity (s)"] = reach.get(r["method"]) if ok else None
        m[f"{meth} communication fraction"] = comm.get(r["method"]) if ok else None
    return m


assess("lsgd-lstm", Assessment(lstm_metrics, [
    Claim("LSGD reaches a given test perplexity in the least wall-clock (LSTM)",
          ("LSGD test perplexity at equal time", "EASGD test perplexity at equal time"),
          also=(("LSGD test perplexity at equal time", "SGD test perplexity at equal time"),
                ("LSGD test perplexity at equal time", "DOWNPOUR test perplexity at equal time"))),
    Claim("DOWNPOUR spends a larger share of time communicating than LSGD",
          ("LSGD communication fraction", "DOWNPOUR communication fraction")),
]))
