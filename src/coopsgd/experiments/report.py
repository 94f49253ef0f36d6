"""One Markdown report from the ``result.json`` files of ``coopsgd reproduce`` (``reproduce all`` / ``report``).

``render_report(DIR)`` reads ``DIR/<experiment>/result.json`` for every experiment that has one (in the
order of :data:`REPORT_ORDER`) and writes ``DIR/report.md``: the machine and date, the rule that decides a
claim, and per experiment its scale, seeds and runtime, the paper's numbers beside ours (mean ± std, min-max;
the paper's side comes from the experiment's code, :class:`coopsgd.experiments.stats.PaperRow`), the lines
the experiment's ``Assessment.notes`` computed from the bands (``notes`` in result.json), every claim
with its verdict, every measured number, and the figures. Nothing in it is typed by hand.

Every section also names the code that produced its result (``provenance`` in result.json,
:mod:`coopsgd.experiments.provenance`) and says whether that is the code rendering the report
(:func:`~coopsgd.experiments.provenance.staleness`): a result made by other results-affecting code is marked
stale, one without provenance "code version not recorded", in its section and in the table at the top.
"""

from __future__ import annotations

import datetime
import os
import platform
from pathlib import Path
from typing import Any

from coopsgd.errors import ConfigError
from coopsgd.experiments.provenance import describe, provenance, staleness
from coopsgd.experiments.stats import RULE, format_band
from coopsgd.fileio import atomic_write_bytes, read_json

__all__ = ["REPORT_ORDER", "render_report", "report_html", "report_markdown", "machine_note", "check_result"]

#: Experiments in report order (``coopsgd reproduce all`` runs them in this order too).
REPORT_ORDER: tuple[str, ...] = (
    "csgd-fig3", "csgd-fig4", "csgd-fig5", "csgd-fig6", "lsgd-nets", "lsgd-lstm", "lsgd-toy", "matrix-completion",
    "choco", "fl-strategies",
)

_VERDICT = {"reproduced": "**reproduced**", "contradicted": "**contradicted**",
            "not resolved at this scale": "not resolved at this scale", "not measured": "not measured"}


def machine_note() -> str:
    """One line naming the machine, the software and the date."""
    import torch

    return (f"{platform.machine()} {platform.system()} {platform.release()}, {os.cpu_count()} logical CPUs, "
            f"Python {platform.python_version()}, torch {torch.__version__}, "
            f"{datetime.date.today().isoformat()}")


#: The shape of what the report reads from a result.json: field -> (type, entry type or keys of entries).
_TEXT = (str,)
_NUMBER = (int, float)
_RESULT_SHAPE: dict[str, tuple[type | tuple[type, ...], Any]] = {
    "description": (_TEXT, None), "scale": (_TEXT, None), "runtime_s": (_NUMBER, None),
    "seeds": (list, None), "notes": (list, _TEXT), "plots": (list, _TEXT), "metrics": (dict, None),
    "claims": (list, ("paper", "what", "verdict")), "paper_table": (list, ("quantity", "paper")),
    "provenance": (dict, None),
}
_BAND_NUMBERS = ("n", "mean", "std", "min", "max", "missing")


def check_result(data: dict[str, Any], path: Path) -> dict[str, Any]:
    """``data`` (the ``result.json`` at ``path``) if every field the report reads has its shape; otherwise a
    :class:`ConfigError` naming the file and the field (a damaged or hand-edited file is one line, not a
    traceback halfway through the report)."""

    def bad(field: str, value: Any, allowed: str) -> ConfigError:
        shown = value if isinstance(value, (int, float, str, bool, type(None))) else type(value).__name__
        return ConfigError(f"{path}: {field}={shown!r} is invalid: {allowed} (a damaged result.json? rerun the "
                           "experiment)", field=field, value=shown)

    for key, (kind, entries) in _RESULT_SHAPE.items():
        value = data.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, kind):
            what = {list: "a list", dict: "a mapping", _NUMBER: "a number"}.get(kind, "text")
            raise bad(key, value, f"must be {what}")
        items: list[Any] = data[key] if kind is list and entries is not None else []
        for i, item in enumerate(items):
            if entries is _TEXT and not isinstance(item, str):
                raise bad(f"{key}[{i}]", item, "must be text")
            if entries is not _TEXT and (not isinstance(item, dict) or not all(isinstance(item.get(k), str)
                                                                                for k in entries)):
                raise bad(f"{key}[{i}]", item, f"must be a mapping with the texts {', '.join(entries)}")
    for name, band in (data.get("metrics") or {}).items():
        if band is not None and (not isinstance(band, dict) or not all(
                band.get(k) is None or (isinstance(band[k], (int, float)) and not isinstance(band[k], bool))
                for k in _BAND_NUMBERS)):
            raise bad(f"metrics.{name}", band, f"must be a band (a mapping of the numbers {', '.join(_BAND_NUMBERS)})")
    return data


def _esc(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _command(name: str, data: dict[str, Any]) -> str:
    """The ``coopsgd reproduce`` command of a result (its scale and, for a multi-seed run, its seeds)."""
    cmd = f"coopsgd reproduce {name}{' --quick' if data.get('quick') else ''}{' --dry-run' if data.get('dry_run') else ''}"
    seeds = data.get("seeds") or []
    if (name != "matrix-completion" and not data.get("deterministic") and not data.get("dry_run") and seeds
            and all(isinstance(x, int) and not isinstance(x, bool) for x in seeds)):
        default = 3 if data.get("quick") else 1
        if seeds[0] != 0:
            cmd += f" --seed {seeds[0]}"
        if len(seeds) != default:
            cmd += f" --seeds {len(seeds)}"
    return cmd


def _scale_text(data: dict[str, Any]) -> str:
    """The result's scale line: its ``scale``, else its recorded settings (``settings``, or the first seed's
    ``settings`` / ``train``), else a note that the result names none."""
    if data.get("scale"):
        return _esc(data["scale"])
    first = (data.get("per_seed") or [{}])[0]
    settings = data.get("settings") or (first.get("settings") if isinstance(first, dict) else None) or (
        first.get("train") if isinstance(first, dict) else None)
    if isinstance(settings, dict) and settings:
        return "(the recorded settings) " + _esc(", ".join(f"{k} {v}" for k, v in settings.items()))
    return "not stated in this result.json"


#: How the table at the top names each :func:`~coopsgd.experiments.provenance.staleness`.
_CODE_MARK = {"current": "current", "stale": "**stale**", "not recorded": "not recorded"}


def _code_lines(name: str, data: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """The section's lines on the code that produced the result and whether it is the report's."""
    recorded = data.get("provenance")
    state = staleness(recorded, current)
    rerun = f"`{_command(name, data)}`"
    if state == "not recorded" or not isinstance(recorded, dict):
        return [f"**Code version not recorded.** This result.json does not say which code produced it (it predates "
                f"the recording); rerun {rerun} to tie its numbers to a code version.", ""]
    lines = [f"Code: {_esc(describe(recorded))}.", ""]
    if state == "current":
        return lines + ["Produced by the results code rendering this report (same `results_code_sha256`).", ""]
    if recorded.get("source_changed_during_run"):
        why = "the package's files changed while it ran, so it may mix two versions of the code"
    else:
        why = (f"it was produced by other results code ({str(recorded.get('results_code_sha256'))[:12]}) than the "
               f"code rendering this report ({str(current.get('results_code_sha256'))[:12]})")
    return lines + [f"**Stale: {why}; its numbers may differ from what the code computes today.** Rerun {rerun} "
                    "before citing them.", ""]


def _section(name: str, data: dict[str, Any], base: Path, current: dict[str, Any]) -> list[str]:
    seeds = data.get("seeds") or []
    if data.get("deterministic"):
        how = "deterministic (the result does not depend on the seed): one run"
    elif name == "matrix-completion":
        how = f"{len(seeds)} trials (each its own M and starts; the trials are the seeds)"
    else:
        how = f"{len(seeds)} seed(s): {', '.join(map(str, seeds))}"
    scale = "dry run" if data.get("dry_run") else ("quick" if data.get("quick") else "full scale")
    runtime = data.get("runtime_s")
    lines = [f"## {name}", "", _esc(data.get("description", "")), "",
             f"`{_command(name, data)}` — {scale}, {how}"
             + (f", {runtime:.0f} s on the machine that ran it" if isinstance(runtime, (int, float)) else "") + ".", "",
             f"Scale: {_scale_text(data)}", ""]
    lines += _code_lines(name, data, current)
    if data.get("paper_table"):
        lines += ["| quantity | paper | ours (mean ± std (min–max)) | note |", "|---|---|---|---|"]
        for row in data["paper_table"]:
            ours = row.get("ours_text") or "—"
            lines.append(f"| {_esc(row['quantity'])} | {_esc(row['paper'])} | {_esc(ours)} | {_esc(row.get('note', ''))} |")
        lines.append("")
    if data.get("notes"):  # computed by the experiment's Assessment.notes from the bands (stats.aggregate)
        lines += [f"- {_esc(line)}" for line in data["notes"]] + [""]
    if data.get("claims"):
        lines += ["| paper's claim | what we compare | verdict |", "|---|---|---|"]
        for c in data["claims"]:
            note = f" ({_esc(c['note'])})" if c.get("note") else ""
            lines.append(f"| {_esc(c['paper'])} | {_esc(c['what'])} | {_VERDICT.get(c['verdict'], c['verdict'])}{note} |")
        lines.append("")
    if data.get("metrics"):
        lines += ["<details><summary>every measured number (mean ± std (min–max); per-seed values in "
                  "result.json)</summary>", "", "| quantity | ours |", "|---|---|"]
        for key, b in data["metrics"].items():
            lines.append(f"| {_esc(key)} | {_esc(format_band(b))} |")
        lines += ["", "</details>", ""]
    for p in data.get("plots", []):
        rel = f"{name}/{Path(p).name}"
        if (base / rel).is_file():
            lines.append(f"![{Path(p).stem}]({rel})")
    lines.append("")
    return lines


def report_markdown(results: dict[str, dict[str, Any]], base: Path, *, machine: str | None = None,
                    current: dict[str, Any] | None = None) -> str:
    """The report text for ``results`` (experiment name -> its result.json), figures relative to ``base``;
    ``current``: the provenance of the code rendering it (default: this process's,
    :func:`coopsgd.experiments.provenance.provenance`), against which each result is marked current or stale."""
    if not results:
        raise ConfigError.invalid("DIR", str(base), "holds no <experiment>/result.json to report on")
    current = provenance() if current is None else current
    states = {name: staleness(data.get("provenance"), current) for name, data in results.items()}
    counts: dict[str, int] = {}
    for data in results.values():
        for c in data.get("claims", []):
            counts[c["verdict"]] = counts.get(c["verdict"], 0) + 1
    lines = [
        "# Reproducing the papers' experiments (generated report)", "",
        f"Generated by `coopsgd reproduce report` from the `result.json` files under this directory; "
        f"machine and date: {machine or machine_note()}.", "",
        f"**Rule for a qualitative claim.** {RULE} (`coopsgd.experiments.stats.verdict`; the tests use it "
        "too.) Numbers are mean ± population std over the seeds, with the min–max range.", "",
        "Claims: " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())) + ".", "",
        f"**Code.** Rendered by {_esc(describe(current))}. Each result records the code that produced it; a "
        "result whose results code (`results_code_sha256`: the package's modules without their comments and "
        "docstrings, the report's own modules left out, plus its bundled data) differs from the renderer's is "
        "marked **stale**. Results: "
        + ", ".join(f"{n} {k}" for k in ("current", "stale", "not recorded")
                    if (n := sum(v == k for v in states.values()))) + ".", "",
        "Runtimes are wall-clock seconds of the whole experiment (every seed) on the machine that ran it, "
        "as its result.json records them.", "",
        "| experiment | scale | seeds | runtime | code |", "|---|---|---|---|---|",
    ]
    for name, data in results.items():
        rt = data.get("runtime_s")
        scale = "dry run" if data.get("dry_run") else ("quick" if data.get("quick") else "full")
        lines.append(f"| {name} | {scale} | {len(data.get('seeds') or [])} | "
                     f"{f'{rt:.0f} s' if isinstance(rt, (int, float)) else '—'} | {_CODE_MARK[states[name]]} |")
    lines.append("")
    for name, data in results.items():
        lines += _section(name, data, base, current)
    return "\n".join(lines).rstrip() + "\n"


def report_html(text: str) -> str | None:
    """The report's markdown as a standalone HTML page, or ``None`` when the optional ``markdown`` package
    (``pip install 'coopsgd[report]'``; it also comes with TensorBoard) is not installed."""
    try:
        import markdown
    except ImportError:
        return None
    # the collapsed tables sit in <details> blocks: md_in_html renders markdown inside a block marked markdown="1"
    text = text.replace("<details>", '<details markdown="1">')
    body = markdown.markdown(text, extensions=["tables", "md_in_html"], output_format="html")
    style = ("body{font-family:sans-serif;max-width:72rem;margin:2rem auto;padding:0 1rem;line-height:1.4}"
             "table{border-collapse:collapse;margin:1rem 0}td,th{border:1px solid #ccc;padding:.25rem .5rem}"
             "img{max-width:100%}")
    return (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>coopsgd reproductions</title>"
            f"<style>{style}</style></head><body>\n{body}\n</body></html>\n")


def render_report(directory: str | Path, *, machine: str | None = None, current: dict[str, Any] | None = None) -> Path:
    """Write ``DIR/report.md`` from ``DIR/<experiment>/result.json`` (and ``DIR/report.html`` when the optional
    ``markdown`` package is installed, see :func:`report_html`); returns the path of ``report.md``. ``current``:
    the provenance results are compared with (:func:`report_markdown`)."""
    base = Path(directory)
    if not base.is_dir():
        raise ConfigError.invalid("DIR", str(directory), "is not a directory")
    results = {}
    for name in REPORT_ORDER:
        path = base / name / "result.json"
        if path.is_file():
            results[name] = check_result(read_json(path, "result.json"), path)
    text = report_markdown(results, base, machine=machine, current=current)
    page = report_html(text)
    if page is not None:
        atomic_write_bytes(base / "report.html", page.encode("utf-8"))
    return atomic_write_bytes(base / "report.md", text.encode("utf-8"))
