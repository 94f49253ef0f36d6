"""Spread over seeds and the one rule that decides whether a qualitative claim is reproduced.

Every number of a multi-seed reproduction is kept per seed and summarised as a *band*: mean, standard
deviation (population, ``ddof=0``), min, max and the values themselves (:func:`band`).

**The rule** (:func:`verdict`, the only place it is written in code; docs/reproductions.md states it):
a claim "A < B" is *reproduced* when the min-max intervals of A and B over the seeds do not overlap and A's
lies below B's (``max(A) < min(B)``); it is *contradicted* when they do not overlap the other way round
(``max(B) < min(A)``); otherwise the difference is within the spread and the claim is *not resolved at
this scale*. A chain "A < B < C" is reproduced when every consecutive pair is, contradicted when any pair
is, and otherwise not resolved. A side that was not measured (missing, diverged) makes the claim
*not measured*. Constants (thresholds such as 0 or 0.5) are bands of width 0.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "RULE",
    "REPRODUCED",
    "CONTRADICTED",
    "UNRESOLVED",
    "NOT_MEASURED",
    "VERDICT_MARKS",
    "band",
    "verdict",
    "Claim",
    "PaperRow",
    "evaluate_claims",
    "aggregate",
    "format_band",
]

REPRODUCED = "reproduced"
CONTRADICTED = "contradicted"
UNRESOLVED = "not resolved at this scale"
NOT_MEASURED = "not measured"
#: How every command and report prints a verdict in brackets: a decisive one in capitals.
VERDICT_MARKS = {REPRODUCED: "REPRODUCED", CONTRADICTED: "CONTRADICTED", UNRESOLVED: "not resolved",
                 NOT_MEASURED: "not measured"}

#: The rule in words (printed in result.json and in the report).
RULE = (
    "A claim 'A < B' is reproduced when the min-max intervals over seeds do not overlap and A's lies below "
    "B's (max A < min B); contradicted when they do not overlap the other way (max B < min A); otherwise "
    "not resolved at this scale. A chain A < B < C needs every consecutive pair. One seed decides no claim "
    "(unless the experiment does not depend on the seed)."
)


def band(values: Sequence[float | None]) -> dict[str, Any]:
    """``{"n", "mean", "std", "min", "max", "values"}`` of the finite values (``std``: ``ddof=0``).

    ``values`` keeps every input in seed order (``None`` for a missing or non-finite one); the statistics
    are ``None`` when no value is finite, and ``missing`` counts the rest.
    """
    kept: list[float | None] = []
    for v in values:
        kept.append(float(v) if v is not None and math.isfinite(float(v)) else None)
    ok = [v for v in kept if v is not None]
    if not ok:
        return {"n": 0, "missing": len(kept), "mean": None, "std": None, "min": None, "max": None, "values": kept}
    mean = math.fsum(ok) / len(ok)
    std = math.sqrt(math.fsum((v - mean) ** 2 for v in ok) / len(ok))
    return {"n": len(ok), "missing": len(kept) - len(ok), "mean": mean, "std": std, "min": min(ok),
            "max": max(ok), "values": kept}


def _interval(b: Mapping[str, Any] | float) -> tuple[float, float] | None:
    if isinstance(b, (int, float)):
        return float(b), float(b)
    if not b.get("n") or b.get("missing"):
        return None
    return float(b["min"]), float(b["max"])


def verdict(lower: Mapping[str, Any] | float, higher: Mapping[str, Any] | float) -> str:
    """The rule for the claim ``lower < higher`` (bands from :func:`band`, or constants)."""
    a, b = _interval(lower), _interval(higher)
    if a is None or b is None:
        return NOT_MEASURED
    if a[1] < b[0]:
        return REPRODUCED
    if b[1] < a[0]:
        return CONTRADICTED
    return UNRESOLVED


@dataclass(frozen=True)
class Claim:
    """A qualitative claim of a paper as a chain ``chain[0] < chain[1] < ...`` of metric names (or numbers).

    ``paper``: the claim in the paper's words; ``what``: how we measure it.
    """

    paper: str
    chain: tuple[str | float, ...]
    what: str = ""
    #: further ``(lower, higher)`` pairs the claim needs besides the chain ("A is below B, C and D")
    also: tuple[tuple[str | float, str | float], ...] = ()
    #: drop chain members that the run did not measure at all (a reduced sweep keeps the claim over its points)
    skip_absent: bool = False

    def evaluate(self, bands: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
        chain = self.chain
        if self.skip_absent:
            chain = tuple(c for c in chain if isinstance(c, (int, float)) or c in bands)
        pairs = []
        for lo, hi in [*zip(chain[:-1], chain[1:], strict=True), *self.also]:
            lb = lo if isinstance(lo, (int, float)) else bands.get(lo, {"n": 0})
            hb = hi if isinstance(hi, (int, float)) else bands.get(hi, {"n": 0})
            pairs.append({"lower": lo, "higher": hi, "verdict": verdict(lb, hb)})
        vs = [p["verdict"] for p in pairs]
        if not vs or NOT_MEASURED in vs:
            overall = NOT_MEASURED
        elif CONTRADICTED in vs:
            overall = CONTRADICTED
        elif all(v == REPRODUCED for v in vs):
            overall = REPRODUCED
        else:
            overall = UNRESOLVED
        what = self.what or "; ".join([" < ".join(map(str, chain)), *(f"{a} < {b}" for a, b in self.also)])
        return {"paper": self.paper, "what": what,
                "chain": list(chain), "verdict": overall, "pairs": pairs}


@dataclass(frozen=True)
class PaperRow:
    """One line of a paper-vs-ours table: the paper's number (as the paper states it) beside our metric."""

    quantity: str
    paper: str
    ours: str | None = None  # metric name, or None when the paper's line has no number of ours
    note: str = ""
    fmt: str = ".4g"


def evaluate_claims(claims: Sequence[Claim], bands: Mapping[str, Mapping[str, Any]]) -> list[dict[str, Any]]:
    return [c.evaluate(bands) for c in claims]


def format_band(b: Mapping[str, Any] | None, fmt: str = ".4g") -> str:
    """``"mean ± std (min–max, n=K)"``; one value alone when every seed gave the same number."""
    if not b or not b.get("n"):
        return "not measured" if not b or not b.get("missing") else f"not measured ({b['missing']} missing)"
    miss = f", {b['missing']} missing" if b.get("missing") else ""
    if b["n"] == 1:
        return f"{b['mean']:{fmt}} (1 seed{miss})"
    if b["min"] == b["max"]:
        return f"{b['mean']:{fmt}} (all {b['n']} seeds{miss})"
    return f"{b['mean']:{fmt}} ± {b['std']:{fmt}} ({b['min']:{fmt}}–{b['max']:{fmt}}, n={b['n']}{miss})"


@dataclass(frozen=True)
class Assessment:
    """What an experiment contributes to the multi-seed summary: its metrics per seed, claims and paper rows."""

    metrics: Callable[[dict[str, Any]], dict[str, float | None]]
    claims: Sequence[Claim] = field(default_factory=tuple)
    paper: Sequence[PaperRow] = field(default_factory=tuple)
    #: optional: lines of text computed from the bands of the metrics (an explanation the report prints
    #: under the paper table, e.g. a cost-model decomposition); ``None``: the result has no ``notes`` key
    notes: Callable[[Mapping[str, Mapping[str, Any]]], list[str]] | None = None


def _one_run_decides_nothing(claim: dict[str, Any]) -> dict[str, Any]:
    """A claim judged on one seed of a seed-dependent experiment: no spread to compare a difference with."""
    pairs = [{**p, "verdict": p["verdict"] if p["verdict"] == NOT_MEASURED else UNRESOLVED} for p in claim["pairs"]]
    overall = claim["verdict"] if claim["verdict"] == NOT_MEASURED else UNRESOLVED
    return {**claim, "pairs": pairs, "verdict": overall,
            "note": "one seed: no spread to judge the difference against (run --seeds 2 or more)"}


def aggregate(per_seed: Sequence[Mapping[str, float | None]], assessment: Assessment, *,
              deterministic: bool = False) -> dict[str, Any]:
    """Bands of every metric over the seeds, the claims judged by :func:`verdict`, the paper-vs-ours rows
    and, when the assessment has a ``notes`` function, its lines (``notes``).

    With a single seed the min-max interval is a point, so :func:`verdict` would decide any difference: unless
    the experiment is ``deterministic`` (its result does not depend on the seed), every claim of a one-seed
    result is then "not resolved at this scale" (or "not measured"), with a note saying why."""
    keys: list[str] = []
    for m in per_seed:
        keys += [k for k in m if k not in keys]
    bands = {k: band([m.get(k) for m in per_seed]) for k in keys}
    rows = []
    for row in assessment.paper:
        b = bands.get(row.ours) if row.ours else None
        rows.append({"quantity": row.quantity, "paper": row.paper, "ours_metric": row.ours,
                     "ours": b, "ours_text": format_band(b, row.fmt) if row.ours else "", "note": row.note})
    claims = evaluate_claims(assessment.claims, bands)
    if len(per_seed) < 2 and not deterministic:
        claims = [_one_run_decides_nothing(c) for c in claims]
    out = {"rule": RULE, "metrics": bands, "claims": claims, "paper_table": rows}
    if assessment.notes is not None:
        out["notes"] = [str(line) for line in assessment.notes(bands)]
    return out


__all__ += ["Assessment"]
