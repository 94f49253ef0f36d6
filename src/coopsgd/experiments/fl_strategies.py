"""``coopsgd reproduce fl-strategies``: four qualitative claims about the federated strategies (docs/federated.md).

Every strategy is the project's preset (:mod:`coopsgd.algorithms.federated_presets`) at its documented defaults
unless stated here; nothing was tuned on these runs. The rounds are FedAvg's with full participation at the
quick scale (every client works every round), and a client's local steps in a round are drawn from (seed,
round, client) alone, so that "equal rounds" is also equal local work and equal bytes for every strategy but
SCAFFOLD (twice FedAvg's bytes).

a. **Client drift** (Karimireddy et al. 2020; Wang et al. 2020): on a Dirichlet(β = 0.1) label split with
   uneven local work (client i runs K_i local steps of a round, uniform on {1, ..., tau}: :data:`UNEVEN`),
   SCAFFOLD and FedNova reach a lower training loss than FedAvg at equal rounds. Measured: the training loss of
   the server model (which every client holds after a round) on the first ``eval_samples`` training samples
   after the last round
   (:func:`coopsgd.train.records.nn_evaluator`), "SCAFFOLD < FedAvg" and "FedNova < FedAvg".
b. **FedProx's stability** (Li et al. 2020): with μ > 0 the server model's training loss is more stable than
   FedAvg's under the same split and local work. *Stability* is measured as the mean rise of the training loss
   between consecutive rounds over the second half of the run,

       U = mean over the evaluated rounds k in the second half of max(0, L_k − L_(k−1))

   (L evaluated after every round; a smaller U is a steadier curve); "U(FedProx) < U(FedAvg)". U measures the
   oscillation and not the trend: a falling curve scores 0 whatever its speed, and a curve alternating between
   c + a and c − a scores a (a rise of 2a every other round), so a run that learns steadily is never counted as
   less stable than one that oscillates without learning. μ = 1, the largest value of the grid the FedProx paper
   tries (0.001, 0.01, 0.1, 1), chosen before running.
c. **Adaptive server optimizers** (Reddi et al. 2021): FedAdam and FedYogi reach FedAvg's test perplexity in
   fewer rounds on the LSTM task. Measured: the first evaluated round at which each reaches FedAvg's final test
   perplexity, and, at equal rounds, the final test perplexity. A run that never reaches it within the run took
   more rounds than FedAvg (a censored outcome, not missing data): it counts as the last evaluated round plus
   the evaluation interval, above any round a run can reach it at, and a note names the seeds it happened on. The server optimizers run at the presets' defaults (η 0.01, τ 1e-3, β₁ 0.9, β₂ 0.99).
d. **Robust aggregation** (Blanchard et al. 2017; Yin et al. 2018): with 20% of the clients Byzantine sending
   sign-flipped updates, the coordinate-wise median and Krum keep their accuracy while the mean collapses, on IID
   shards. Measured by the share of the clean run's accuracy above chance that a run keeps,

       R = (acc_attacked − 1/10) / (acc_clean − 1/10)

   (acc: the final test accuracy, acc_clean: FedAvg's mean without attackers on the same seed). *Keeps* means
   R > 0.95; *collapses* means R < 0.5.

Each claim is judged by the report's rule (:func:`coopsgd.experiments.stats.verdict`): min-max bands over the
seeds that do not overlap. The figure (``fl_strategies.png``) has one column per claim: the training loss (top)
and the test accuracy or perplexity (bottom) against rounds.

Quick scale (:data:`QUICK`): the MLP on the bundled MNIST (8,000 training images) with 5 label-skewed clients
(a, b) or 10 IID clients (d), and the LSTM task of ``lsgd-lstm`` (64 units, the bundled WikiText-2 with the
vocabulary cut to 2,000 words) with 4 clients; a few minutes per seed on 2 CPU cores. Full scale
(:data:`FULL`): the MLP on MNIST's 60,000 images (20 skewed clients, half of them per round; 50 IID clients, 10
per round) and the 200-unit LSTM on WikiText-2 with 8 clients. A dry run (``--dry-run``) runs every setting of
the full scale for two steps on synthetic data of the real shapes (the skewed clients' split IID there: 2,048
synthetic images leave some of 20 Dirichlet(0.1) shards without a full batch).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from coopsgd.experiments.base import assess, register
from coopsgd.experiments.dry_run import (
    DRY_RUN_BATCH,
    DRY_RUN_STEPS,
    DRY_RUN_WORKERS,
    WIKITEXT2_VOCAB,
    dry_run_fields,
    dry_run_summary,
    dry_run_tau,
)
from coopsgd.experiments.harness import (
    DEVICE,
    ExperimentArgs,
    check_full_data,
    plot_panels,
    public_runs,
    run_built,
    run_config,
    scaled,
    time_fields,
)
from coopsgd.experiments.stats import Assessment, Claim, PaperRow
from coopsgd.train.config import RunConfig

__all__ = ["QUICK", "FULL", "CLAIMS", "MLP_RUNS", "LSTM_RUNS", "KEEP", "COLLAPSE", "run_fl_strategies",
           "loss_rise", "retained", "rounds_to", "censored_rounds", "fl_metrics", "fl_assessment"]

#: Byzantine clients of claim d: 20% of the clients send their update negated.
ATTACK: dict[str, Any] = {"byzantine_fraction": 0.2, "attack": "sign_flip"}
#: Claim b's FedProx μ.
PROX_MU = 1.0
#: Claim d's thresholds on R, the share of the clean accuracy above chance a run keeps.
KEEP = 0.95
COLLAPSE = 0.5
#: Claims a's and b's uneven local work: client i runs K_i local steps of a round, drawn uniformly from
#: {1, ..., tau} per (seed, round, client) (:class:`~coopsgd.algorithms.schedules.FedAvgSchedule`).
UNEVEN: dict[str, Any] = {"local_work": "uniform", "min_local_steps": 1}
#: Chance accuracy of MNIST's 10 classes.
CHANCE = 0.1

#: The MLP runs: label -> (claim, preset, preset settings). Claims a and b run on the label-skewed clients
#: (``skew`` of :data:`QUICK`), d on the IID ones (``robust``); FedAvg on the skewed clients is a's and b's
#: baseline, one run.
MLP_RUNS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "FedAvg": ("drift", "fedavg", {}),
    "SCAFFOLD": ("drift", "scaffold", {}),
    "FedNova": ("drift", "fednova", {}),
    f"FedProx mu={PROX_MU:g}": ("prox", "fedprox", {"mu": PROX_MU}),
    "mean, no attack": ("robust", "fedavg", {}),
    "mean, 20% sign-flip": ("robust", "fedavg", dict(ATTACK)),
    "median, 20% sign-flip": ("robust", "fedavg", {**ATTACK, "aggregation": "median"}),
    "Krum, 20% sign-flip": ("robust", "fedavg", {**ATTACK, "aggregation": "krum"}),
}
#: The LSTM runs of claim c: label -> preset (at its defaults).
LSTM_RUNS: dict[str, str] = {"FedAvg": "fedavg", "FedAdam": "fedadam", "FedYogi": "fedyogi"}

#: The claims and the runs each one's panels show (``FedAvg`` of the MLP serves a and b).
CLAIMS: dict[str, tuple[str, tuple[str, ...]]] = {
    "drift": ("a. label skew, uneven work: SCAFFOLD, FedNova vs FedAvg", ("FedAvg", "SCAFFOLD", "FedNova")),
    "prox": (f"b. stability: FedProx mu={PROX_MU:g} vs FedAvg", ("FedAvg", f"FedProx mu={PROX_MU:g}")),
    "adaptive": ("c. LSTM: FedAdam, FedYogi vs FedAvg", tuple(f"LSTM {k}" for k in LSTM_RUNS)),
    "robust": ("d. 20% sign-flip clients (IID)", ("mean, no attack", "mean, 20% sign-flip", "median, 20% sign-flip",
                                                  "Krum, 20% sign-flip")),
}

#: ``mlp``: the MLP runs' common settings; ``skew``: the clients of claims a and b (a Dirichlet(0.1) label split:
#: 5 clients, so that every client holds a full batch -- with 10 clients of the 8,000 images the smallest shard
#: is below 32 samples on 5 of the seeds 0-19), ``robust``: claim d's (IID); ``lstm``: claim c's.
QUICK: dict[str, Any] = {
    "mlp": {"model": "mlp", "dataset": "mnist_bundled", "batch_size": 32, "lr": 0.05, "tau": 5, "rounds": 60,
            "eval_samples": 2000},
    "skew": {"workers": 5, "fraction": 1.0, "partition": "dirichlet", "dirichlet_beta": 0.1, **UNEVEN},
    "robust": {"workers": 10, "fraction": 1.0, "partition": "iid"},
    "lstm": {"workers": 4, "hidden": 64, "layers": 2, "seq_len": 35, "batch_size": 20, "lr": 1.0, "tau": 5,
             "rounds": 30, "eval_every_rounds": 2, "vocab_cap": 2000, "test_windows": 150, "eval_samples": 150},
}
FULL: dict[str, Any] = {
    "mlp": {"model": "mlp", "dataset": "mnist", "batch_size": 32, "lr": 0.05, "tau": 10, "rounds": 500,
            "eval_samples": 10000},
    "skew": {"workers": 20, "fraction": 0.5, "partition": "dirichlet", "dirichlet_beta": 0.1, **UNEVEN},
    "robust": {"workers": 50, "fraction": 0.2, "partition": "iid"},
    "lstm": {"workers": 8, "hidden": 200, "layers": 2, "seq_len": 35, "batch_size": 20, "lr": 1.0, "tau": 10,
             "rounds": 400, "eval_every_rounds": 10, "vocab_cap": None, "test_windows": None, "eval_samples": 2000},
}


def _settings(args: ExperimentArgs) -> dict[str, Any]:
    """The scale of ``args`` (``args.scale`` shortens the runs for the tests)."""
    base = QUICK if args.quick else FULL
    st = {k: dict(v) for k, v in base.items()}
    for part in (st["mlp"], st["lstm"]):
        part["rounds"] = scaled(part["rounds"], args.scale, 2)
    return st


def _mlp_config(args: ExperimentArgs, st: dict[str, Any], group: str, preset: str, settings: dict[str, Any]
                ) -> RunConfig:
    """One MLP run: FedAvg's rounds of ``preset`` for ``st["mlp"]["rounds"]`` rounds on the clients of ``group``
    (``skew`` or ``robust``), evaluated after every round. A dry run splits the skewed clients' data IID: its
    2,048 synthetic images leave some of 20 Dirichlet(0.1) shards without a full batch."""
    mlp, clients = st["mlp"], dict(st[group])
    if args.dry_run:
        clients = {k: v for k, v in clients.items() if k != "dirichlet_beta"} | {"partition": "iid"}
    tau = int(mlp["tau"])
    fields: dict[str, Any] = {
        "preset": preset, "model": mlp["model"], "dataset": mlp["dataset"], "batch_size": mlp["batch_size"],
        "lr": mlp["lr"], "tau": tau, "max_steps": tau * int(mlp["rounds"]), "eval_every": tau,
        "eval_samples": mlp["eval_samples"], "seed": args.seed, "device": DEVICE.get(), **time_fields(args.quick),
        **clients, **settings,
    }
    if args.dry_run:  # the MLP keeps its clients under the tests' DRY_RUN_WORKERS hook (Krum needs k >= f + 3)
        fields = {**dry_run_fields(fields), "workers": clients["workers"]}
    return RunConfig(**fields)


def _lstm_run(args: ExperimentArgs, out: Path, lstm: dict[str, Any], label: str, preset: str) -> dict[str, Any]:
    """One LSTM run of claim c (the model and data of ``lsgd-lstm``,
    :func:`coopsgd.experiments.lsgd_lstm.build_lm_experiment`)."""
    from coopsgd.experiments.lsgd_lstm import build_lm_experiment

    st = dict(lstm)
    tau = int(st["tau"])
    length: dict[str, Any] = {"max_steps": tau * int(st["rounds"]), "eval_every": tau * int(st["eval_every_rounds"])}
    if args.dry_run:  # the full scale's model and vocabulary size on random tokens, two steps
        st.update(synthetic_vocab=WIKITEXT2_VOCAB, test_windows=100, batch_size=DRY_RUN_BATCH.get() or st["batch_size"],
                  workers=DRY_RUN_WORKERS.get() or st["workers"])
        length = {"max_steps": DRY_RUN_STEPS, "eval_every": 1, "checkpoint_every": 1}
        tau = int(dry_run_tau({"tau": tau}).get("tau", tau))
    cfg = RunConfig(preset=preset, model="lstm_lm", dataset="wikitext2", workers=st["workers"],
                    batch_size=st["batch_size"], seed=args.seed, eval_samples=st["eval_samples"], holdout_fraction=0.0,
                    executor="loop", device=DEVICE.get(), lr=st["lr"], tau=tau, **length, **time_fields(args.quick))
    extra: dict[str, Any] = {"claim": "adaptive", "preset": preset, "lstm": st}
    if args.dry_run:
        extra["data"] = f"random tokens (vocabulary {WIKITEXT2_VOCAB:,}, seq {st['seq_len']})"
    return run_built(build_lm_experiment(cfg, st), out / f"lstm_{preset}", f"LSTM {label}", progress=args.progress,
                     extra=extra)


@register("fl-strategies", "federated strategies: SCAFFOLD vs FedAvg under label skew, FedProx's stability, "
                           "FedAdam/FedYogi on the LSTM, median and Krum against sign-flip clients")
def run_fl_strategies(args: ExperimentArgs, *, only: tuple[str, ...] | None = None) -> dict[str, Any]:
    """The four claims at the scale of ``args``; ``only``: a subset of the run labels (:data:`MLP_RUNS`, and
    ``"LSTM <label>"`` of :data:`LSTM_RUNS`) for the tests' reduced runs."""
    from coopsgd.errors import ConfigError

    every = [*MLP_RUNS, *(f"LSTM {k}" for k in LSTM_RUNS)]
    for name in only or ():
        if name not in every:
            raise ConfigError.invalid("only", name, f"choose from {', '.join(every)}")
    if not args.quick and not args.dry_run:
        check_full_data(FULL["mlp"]["dataset"])
    out = args.start()
    st = _settings(args)
    runs: list[dict[str, Any]] = []
    for label, (claim, preset, settings) in MLP_RUNS.items():
        if only is None or label in only:
            group = "robust" if claim == "robust" else "skew"
            cfg = _mlp_config(args, st, group, preset, settings)
            sub = label.replace(" ", "_").replace(",", "").replace("%", "").replace("=", "")
            runs.append(run_config(cfg, out / f"mlp_{sub}", label, progress=args.progress,
                                   extra={"claim": claim, "preset": preset, "settings": settings,
                                          "clients": st[group]}))
    for label, preset in LSTM_RUNS.items():
        if only is None or f"LSTM {label}" in only:
            runs.append(_lstm_run(args, out, st["lstm"], label, preset))
    note = _scale_text(args, st)
    plot = _plot(out / "fl_strategies.png", runs, note)
    summary = (dry_run_summary("fl-strategies", "every strategy", runs, every=None) if args.dry_run
               else _summary(args, runs, note))
    return {"experiment": "fl-strategies", "quick": args.quick, "settings": st, "scale": note,
            "runs": public_runs(runs), "curves": _curves(runs), "plots": [str(plot)], "summary": summary}


def _scale_text(args: ExperimentArgs, st: dict[str, Any]) -> str:
    m, sk, rb, lm = st["mlp"], st["skew"], st["robust"], st["lstm"]
    data = "bundled MNIST (8,000 images)" if m["dataset"] == "mnist_bundled" else "MNIST (60,000 images)"
    text = (f"MLP on {data}: tau {m['tau']}, batch {m['batch_size']}, lr {m['lr']:g}, {m['rounds']} rounds; "
            f"a-b: {sk['workers']} clients (fraction {sk['fraction']:g}), Dirichlet beta {sk['dirichlet_beta']:g}, "
            f"uneven work (K_i uniform on {sk['min_local_steps']}..{m['tau']}); "
            f"d: {rb['workers']} clients (fraction {rb['fraction']:g}), IID; LSTM ({lm['hidden']} units) on WikiText-2"
            + (f" (vocabulary cut to {lm['vocab_cap']} words)" if lm.get("vocab_cap") else "")
            + f": {lm['workers']} clients, tau {lm['tau']}, lr {lm['lr']:g}, {lm['rounds']} rounds")
    if args.dry_run:
        text += f"; dry run: {DRY_RUN_STEPS} steps per setting on synthetic data of the real shapes"
    return text


def _summary(args: ExperimentArgs, runs: list[dict[str, Any]], note: str) -> list[str]:
    lines = [f"fl-strategies ({args.scale_name}, seed {args.seed}): {note}"]
    for r in runs:
        final = r.get("final") or {}
        if r["diverged"]:
            what = f"diverged at step {r['diverged']['step']}"
        elif "test_perplexity" in final:
            what = f"training loss {final['train_loss']:.4f}, test perplexity {final['test_perplexity']:.1f}"
        else:
            what = f"training loss {final['train_loss']:.4f}, test accuracy {final['test_accuracy']:.4f}"
        lines.append(f"  {r['label']:24s} {what}")
    return lines


def _curves(runs: list[dict[str, Any]]) -> dict[str, list[list[float | None]]]:
    """Per run: ``[round, training loss, test accuracy or perplexity]`` of every evaluation (what the claims and
    the figure read)."""
    out: dict[str, list[list[float | None]]] = {}
    for r in runs:
        y = "test_perplexity" if r["label"].startswith("LSTM") else "test_accuracy"
        out[r["label"]] = [[rec.get("rounds"), rec.get("train_loss"), rec.get(y)] for rec in r["_metrics"]]
    return out


def _plot(path: Path, runs: list[dict[str, Any]], note: str) -> Path:
    """One column per claim: the training loss (top row) and the test accuracy or perplexity (bottom row)."""
    index = {r["label"]: i for i, r in enumerate(runs)}
    top, bottom = [], []
    for group, (title, labels) in CLAIMS.items():
        idx = [index[lab] for lab in labels if lab in index]
        if not idx:
            continue
        lm = group == "adaptive"
        top.append({"x": "rounds", "y": "train_loss", "xlabel": "round", "ylabel": "training loss", "logy": True,
                    "title": title, "runs": idx, "legend": True})
        bottom.append({"x": "rounds", "y": "test_perplexity" if lm else "test_accuracy", "xlabel": "round",
                       "ylabel": "test perplexity" if lm else "test accuracy", "logy": lm, "runs": idx,
                       "legend": False, **({} if lm else {"ylim": (0.0, 1.0)})})
    return plot_panels(path, runs, top + bottom, title="Federated strategies (the server model after each round)",
                       note=note, ncols=max(1, len(top)))


def loss_rise(curve: list[list[float | None]]) -> float | None:
    """Claim b's U: the mean of max(0, L_k − L_(k−1)) of the training loss over the evaluations in the second
    half of the rounds (``curve``: ``[round, loss, ...]`` rows); ``None`` without two finite values there.

    Only the rises count, so U measures oscillation and not progress: a falling curve scores 0 whatever its
    speed, a curve alternating between c + a and c − a scores a."""
    rows = [(float(r[0]), float(r[1])) for r in curve if r[0] is not None and r[1] is not None and np.isfinite(r[1])]
    if len(rows) < 3:
        return None
    half = rows[-1][0] / 2.0
    ys = np.array([y for x, y in rows if x >= half])
    return float(np.maximum(np.diff(ys), 0.0).mean()) if len(ys) >= 2 else None


def retained(acc: float | None, clean: float | None) -> float | None:
    """Claim d's R = (acc − 1/10) / (clean − 1/10); ``None`` when either is missing or the clean run is at
    chance."""
    if acc is None or clean is None or clean <= CHANCE:
        return None
    return (acc - CHANCE) / (clean - CHANCE)


def rounds_to(curve: list[list[float | None]], target: float) -> float | None:
    """The first evaluated round whose test perplexity (the third column) is at most ``target``; ``None`` when no
    evaluation reaches it (:func:`censored_rounds` is what claim c counts then)."""
    for r in curve:
        if r[0] is not None and r[2] is not None and r[2] <= target:
            return float(r[0])
    return None


def censored_rounds(curve: list[list[float | None]]) -> float | None:
    """Claim c's value for a run that never reaches the target: its last evaluated round plus the evaluation
    interval (the spacing of its last two evaluations, 1 with a single one), above every round a run of this
    length can reach the target at; ``None`` for a curve without an evaluated round."""
    xs = [float(r[0]) for r in curve if r[0] is not None]
    if not xs:
        return None
    return xs[-1] + (xs[-1] - xs[-2] if len(xs) >= 2 and xs[-1] > xs[-2] else 1.0)


def _final(curve: list[list[float | None]], col: int) -> float | None:
    v = curve[-1][col] if curve else None
    return None if v is None or not np.isfinite(v) else float(v)


def fl_metrics(res: dict[str, Any]) -> dict[str, float | None]:
    """One seed's numbers (every claim's metrics; a diverged run's are ``None``)."""
    curves = {r["label"]: (None if r["diverged"] else res["curves"].get(r["label"])) for r in res["runs"]}
    m: dict[str, float | None] = {}
    for label in MLP_RUNS:
        if label not in curves:
            continue
        c = curves[label]
        m[f"{label}: final training loss"] = None if c is None else _final(c, 1)
        m[f"{label}: final test accuracy"] = None if c is None else _final(c, 2)
        if MLP_RUNS[label][0] != "robust":
            m[f"{label}: loss rise U (2nd half)"] = None if c is None else loss_rise(c)
    clean = m.get("mean, no attack: final test accuracy")
    for who in ("mean", "median", "Krum"):
        key = f"{who}, 20% sign-flip: final test accuracy"
        if key in m:
            m[f"{who} under sign-flip: accuracy retained R"] = retained(m[key], clean)
    base = curves.get("LSTM FedAvg")
    target = None if base is None else _final(base, 2)
    for label in LSTM_RUNS:
        c = curves.get(f"LSTM {label}")
        if f"LSTM {label}" not in curves:
            continue
        m[f"LSTM {label}: final test perplexity"] = None if c is None else _final(c, 2)
        hit = None if c is None or target is None else rounds_to(c, target)
        m[f"LSTM {label}: reached FedAvg's final perplexity"] = (
            None if c is None or target is None else float(hit is not None))
        m[f"LSTM {label}: rounds to FedAvg's final perplexity"] = (
            None if c is None or target is None else hit if hit is not None else censored_rounds(c))
    m.update(_paired(m))
    return m


#: Same-seed differences the notes report (not judged: the claims compare the bands): name -> (A, B), A − B.
PAIRED: dict[str, tuple[str, str]] = {
    "SCAFFOLD − FedAvg: final training loss (same seed)": ("SCAFFOLD: final training loss",
                                                          "FedAvg: final training loss"),
    "FedNova − FedAvg: final training loss (same seed)": ("FedNova: final training loss",
                                                         "FedAvg: final training loss"),
    f"FedProx mu={PROX_MU:g} − FedAvg: U (same seed)": (f"FedProx mu={PROX_MU:g}: loss rise U (2nd half)",
                                                        "FedAvg: loss rise U (2nd half)"),
}


def _paired(m: Mapping[str, float | None]) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for name, (a, b) in PAIRED.items():
        if a in m and b in m:
            va, vb = m[a], m[b]
            out[name] = None if va is None or vb is None else va - vb
    return out


def fl_assessment() -> Assessment:
    """The claims of ``reproduce fl-strategies`` and the papers' statements beside our numbers."""
    prox = f"FedProx mu={PROX_MU:g}"
    claims = [
        Claim("a. On Dirichlet(0.1) label skew with uneven local work, SCAFFOLD and FedNova reach a lower training "
              "loss than FedAvg at equal rounds",
              ("SCAFFOLD: final training loss", "FedAvg: final training loss"),
              also=(("FedNova: final training loss", "FedAvg: final training loss"),)),
        Claim(f"b. FedProx with mu > 0 is more stable than FedAvg (mu = {PROX_MU:g}; U: mean rise of the "
              "training loss between consecutive rounds over the second half, falls counting 0)",
              (f"{prox}: loss rise U (2nd half)", "FedAvg: loss rise U (2nd half)")),
        Claim("c. FedAdam and FedYogi reach FedAvg's test perplexity in fewer rounds (LSTM; a run that never "
              "reaches it counts as its last evaluated round + the evaluation interval)",
              ("LSTM FedAdam: rounds to FedAvg's final perplexity", "LSTM FedAvg: rounds to FedAvg's final perplexity"),
              also=(("LSTM FedYogi: rounds to FedAvg's final perplexity",
                     "LSTM FedAvg: rounds to FedAvg's final perplexity"),)),
        Claim("c'. ... equivalently, a lower test perplexity than FedAvg at equal rounds (LSTM)",
              ("LSTM FedAdam: final test perplexity", "LSTM FedAvg: final test perplexity"),
              also=(("LSTM FedYogi: final test perplexity", "LSTM FedAvg: final test perplexity"),)),
        Claim("d. The median and Krum keep their accuracy with 20% sign-flip clients",
              (KEEP, "median under sign-flip: accuracy retained R"),
              what=f"R > {KEEP:g} for the median and for Krum (R: share of the clean accuracy above chance kept)",
              also=((KEEP, "Krum under sign-flip: accuracy retained R"),)),
        Claim("d'. ... while the mean collapses", ("mean under sign-flip: accuracy retained R", COLLAPSE),
              what=f"R < {COLLAPSE:g} for the mean"),
    ]
    rows = [
        PaperRow("FedAvg: final training loss (label skew, uneven work)", "the baseline", "FedAvg: final training loss"),
        PaperRow("SCAFFOLD: final training loss (FedAvg's: the first row)",
                 "SCAFFOLD converges in fewer rounds (Karimireddy et al., Fig. 2)", "SCAFFOLD: final training loss"),
        PaperRow("FedNova: final training loss (FedAvg's: the first row)",
                 "removes the objective inconsistency (Wang et al., Fig. 1)", "FedNova: final training loss"),
        PaperRow(f"{prox}: loss rise U, 2nd half (FedAvg's: claim b below)",
                 "mu > 0 stabilises training (Li et al., Fig. 1)", f"{prox}: loss rise U (2nd half)"),
        PaperRow("FedAdam: final test perplexity, LSTM (rounds to FedAvg's: claim c below)",
                 "fewer rounds to a given accuracy (Reddi et al., Fig. 1)", "LSTM FedAdam: final test perplexity"),
        PaperRow("the mean under sign-flip clients: accuracy retained R (median, Krum: claim d below)",
                 "robust rules keep accuracy, the mean does not (Blanchard et al.; Yin et al.)",
                 "mean under sign-flip: accuracy retained R"),
    ]
    return Assessment(fl_metrics, claims, rows, notes=_notes)


def _notes(bands: Mapping[str, Mapping[str, Any]]) -> list[str]:
    lines = []
    for who in ("LSTM FedAdam", "LSTM FedYogi"):
        b = bands.get(f"{who}: reached FedAvg's final perplexity")
        r = bands.get(f"{who}: rounds to FedAvg's final perplexity")
        if not b or not r:
            continue
        missed = [i for i, v in enumerate(b["values"]) if v == 0.0]
        if missed:
            at = ", ".join(f"{r['values'][i]:g}" for i in missed)
            lines.append(f"{who[5:]} did not reach FedAvg's final test perplexity within the run on {len(missed)} "
                         f"of {len(b['values'])} seeds (seed positions {', '.join(map(str, missed))}): censored, "
                         f"counted as round {at} (the last evaluated round + the evaluation interval, more than "
                         "FedAvg's)")
    for name in PAIRED:
        b = bands.get(name)
        if b and b.get("n"):
            below = sum(v is not None and v < 0 for v in b["values"])
            lines.append(f"seed by seed, {name}: {b['min']:.3g} to {b['max']:.3g} (negative on {below} of "
                         f"{b['n']} seeds)")
    return lines


assess("fl-strategies", fl_assessment())
