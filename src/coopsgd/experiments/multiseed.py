"""Run one registered experiment over several seeds and summarise it (``coopsgd reproduce NAME --seeds N``).

Seed ``s`` runs into ``<out>/seed<s>/`` exactly as a single ``coopsgd reproduce NAME --seed s`` would. The
result keeps every seed's own result (``per_seed``) and adds, from the experiment's
:class:`~coopsgd.experiments.stats.Assessment`: the band of every metric over the seeds (``metrics``), the
claims judged by :func:`coopsgd.experiments.stats.verdict` (``claims``) and the paper-vs-ours rows
(``paper_table``). Every curve figure is redrawn in ``<out>/`` as the mean over the seeds with a min-max
band; figures that do not depend on the seed (the NEB heat map) are copied from the first seed.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from coopsgd.errors import ConfigError
from coopsgd.experiments.dry_run import peak_memory_gb
from coopsgd.experiments.harness import FIGURES, ExperimentArgs, plot_panels
from coopsgd.experiments.registry import ASSESSMENTS, DETERMINISTIC, EXPERIMENTS
from coopsgd.experiments.stats import VERDICT_MARKS, aggregate, format_band

__all__ = ["run_seeds", "summary_lines", "DEFAULT_QUICK_SEEDS"]

#: ``--seeds`` default of ``--quick`` (full scale and ``--dry-run``: 1).
DEFAULT_QUICK_SEEDS = 3

_MARK = VERDICT_MARKS


def run_seeds(name: str, args: ExperimentArgs, seeds: Sequence[int], **options: Any) -> dict[str, Any]:
    """Run experiment ``name`` once per seed and return the multi-seed result (see the module docstring).

    Seed ``s`` runs with ``args.replace(seed=s, out=args.out / f"seed{s}")``; ``options`` go to the experiment
    function as they are (the tests' reduced sweeps, such as Fig. 5's ``taus``).
    """
    if name not in EXPERIMENTS:
        raise ConfigError.invalid("NAME", name, f"choose one of {', '.join(sorted(EXPERIMENTS))}")
    seeds = list(seeds)
    if not seeds or len(set(seeds)) != len(seeds):
        raise ConfigError.invalid("seeds", seeds, "one or more distinct seeds")
    deterministic = name in DETERMINISTIC
    if deterministic:
        seeds = seeds[:1]
    entry = EXPERIMENTS[name]
    out = args.start()
    t0 = time.perf_counter()
    per_seed, figures = _run_each_seed(entry.run, args, seeds, options)
    plots = _band_figures(figures, seeds, out)
    banded = {Path(fig["path"]).name for fig in figures[0]}
    for p in per_seed[0].get("plots", []):
        src = Path(p)
        if src.name not in banded and src.is_file():
            shutil.copyfile(src, out / src.name)
            plots.append(str(out / src.name))
    assessment = ASSESSMENTS.get(name)
    agg: dict[str, Any] = {"metrics": {}, "claims": [], "paper_table": []}
    if assessment is not None:
        agg = aggregate([assessment.metrics(r) for r in per_seed], assessment, deterministic=deterministic)
        if args.dry_run:  # computed (the code is checked), but two steps decide no claim
            agg["claims"], agg["paper_table"] = [], []
    data: dict[str, Any] = {
        "experiment": name,
        "description": entry.description,
        "quick": args.quick,
        "dry_run": bool(args.dry_run),
        "engine": args.engine,
        "seeds": seeds,
        "deterministic": deterministic,
        "scale": per_seed[0].get("scale"),
        "time_model": per_seed[0].get("time_model"),
        **agg,
        "plots": plots,
        "runtime_s": round(time.perf_counter() - t0, 1),
        **({"peak_memory_gb": peak_memory_gb()} if args.dry_run else {}),
        "per_seed": per_seed,
    }
    if deterministic:  # one run: its own keys stay at the top, as a single `reproduce NAME` writes them
        data = {**{k: v for k, v in per_seed[0].items() if k not in data}, **data}
    data["summary"] = summary_lines(data)
    return data


def _run_each_seed(run: Any, args: ExperimentArgs, seeds: Sequence[int], options: dict[str, Any]
                   ) -> tuple[list[dict[str, Any]], list[list[dict[str, Any]]]]:
    """Every seed's result and the figures it drew (recorded through :data:`~coopsgd.experiments.harness.FIGURES`)."""
    per_seed: list[dict[str, Any]] = []
    figures: list[list[dict[str, Any]]] = []
    for s in seeds:
        drawn: list[dict[str, Any]] = []
        token = FIGURES.set(drawn)
        try:
            res = run(args.replace(seed=s, out=Path(args.out) / f"seed{s}"), **options)
        finally:
            FIGURES.reset(token)
        res["seed"] = s
        per_seed.append(res)
        figures.append(drawn)
    return per_seed, figures


def _band_figures(figures: list[list[dict[str, Any]]], seeds: list[int], out: Path) -> list[str]:
    """Redraw every curve figure of the first seed in ``out``: each line the mean over the seeds with a min-max band."""
    plots: list[str] = []
    for j, fig in enumerate(figures[0]):
        runs = []
        for i, run in enumerate(fig["runs"]):
            div = [f[j]["runs"][i]["diverged"] for f in figures if f[j]["runs"][i]["diverged"]]
            runs.append({"label": run["label"] + (f" [{len(div)}/{len(seeds)} seeds]" if div else ""),
                         "diverged": div[0] if div else None,
                         "_band": [f[j]["runs"][i]["_metrics"] for f in figures]})
        what = "mean and min-max band over" if len(seeds) > 1 else "one run,"
        path = plot_panels(out / Path(fig["path"]).name, runs, fig["panels"],
                           title=f"{fig['title']} ({what} seeds {', '.join(map(str, seeds))})",
                           note=fig["note"], ncols=fig["ncols"], colors=fig["colors"], styles=fig["styles"])
        plots.append(str(path))
    return plots


def _memory_text(gb: Any) -> str:
    """``"; peak memory 4.9 GB ..."`` for a dry run's summary (``""`` when it was not measured)."""
    if not isinstance(gb, (int, float)):
        return ""
    return f"; peak memory so far {gb:.1f} GB (resident; this process or one of its finished child processes)"


def summary_lines(data: dict[str, Any]) -> list[str]:
    """The printed summary of a multi-seed result: every metric's band, then every claim's verdict."""
    seeds = data["seeds"]
    if data.get("dry_run"):  # one line per setting (the experiment's own dry-run summary)
        return [line for r in data["per_seed"] for line in r.get("summary", [])] + [
            f"  dry run finished in {data.get('runtime_s', 0):.0f} s (seed {seeds[0]}); every setting wrote and "
            "reloaded its checkpoint" + _memory_text(data.get("peak_memory_gb"))]
    how = "deterministic: one run" if data.get("deterministic") else f"seeds {', '.join(map(str, seeds))}"
    scale = "dry run" if data.get("dry_run") else ("quick" if data.get("quick") else "full")
    lines = [f"{data['experiment']} ({scale}, {how}; {data.get('runtime_s', 0):.0f} s): mean ± std (min–max)"]
    for key, b in data["metrics"].items():
        lines.append(f"  {key}: {format_band(b)}")
    for c in data["claims"]:
        lines.append(f"  [{_MARK[c['verdict']]}] {c['paper']} -- {c['what']}" + (f" ({c['note']})" if c.get("note") else ""))
    return lines
