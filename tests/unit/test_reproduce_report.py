"""The multi-seed rule (coopsgd.experiments.stats) and the generated report (coopsgd.experiments.report)."""

from __future__ import annotations

import json
import math

import pytest

from coopsgd.errors import ConfigError
from coopsgd.experiments.report import render_report
from coopsgd.experiments.stats import (
    CONTRADICTED,
    NOT_MEASURED,
    REPRODUCED,
    UNRESOLVED,
    Assessment,
    Claim,
    PaperRow,
    aggregate,
    band,
    format_band,
    verdict,
)


def test_band_closed_form_and_missing_values() -> None:
    b = band([1.0, 2.0, 3.0])
    assert (b["n"], b["mean"], b["min"], b["max"]) == (3, 2.0, 1.0, 3.0)
    assert b["std"] == pytest.approx(math.sqrt(2 / 3))
    b = band([1.0, None, float("nan")])
    assert (b["n"], b["missing"], b["values"]) == (1, 2, [1.0, None, None])
    assert band([None])["mean"] is None


def test_verdict_is_interval_separation() -> None:
    lo, hi, mid = band([1.0, 2.0]), band([3.0, 4.0]), band([1.5, 3.5])
    assert verdict(lo, hi) == REPRODUCED
    assert verdict(hi, lo) == CONTRADICTED
    assert verdict(lo, mid) == UNRESOLVED and verdict(mid, hi) == UNRESOLVED
    assert verdict(band([2.0]), band([2.0])) == UNRESOLVED  # equal is not "below"
    assert verdict(lo, band([None, 5.0])) == NOT_MEASURED  # a seed without a value decides nothing
    assert verdict(0.5, band([1.0, 1.0])) == REPRODUCED and verdict(band([0.0, 1.0]), 0.5) == UNRESOLVED


def test_claim_chain_needs_every_pair() -> None:
    bands = {"a": band([1, 2]), "b": band([3, 4]), "c": band([3.5, 5]), "d": band([0, 0.5])}
    assert Claim("", ("a", "b")).evaluate(bands)["verdict"] == REPRODUCED
    assert Claim("", ("a", "b", "c")).evaluate(bands)["verdict"] == UNRESOLVED
    assert Claim("", ("a", "b"), also=(("a", "d"),)).evaluate(bands)["verdict"] == CONTRADICTED
    assert Claim("", ("a", "zz")).evaluate(bands)["verdict"] == NOT_MEASURED
    assert Claim("", ("a", "zz", "b"), skip_absent=True).evaluate(bands)["verdict"] == REPRODUCED


def _fixture_result() -> dict:
    per_seed = [{"loss, tau=1": 0.30, "loss, tau=4": 0.40, "saving": 0.41},
                {"loss, tau=1": 0.31, "loss, tau=4": 0.42, "saving": 0.43},
                {"loss, tau=1": 0.29, "loss, tau=4": 0.30, "saving": 0.42}]
    agg = aggregate(per_seed, Assessment(lambda _: {}, [
        Claim("loss grows with tau", ("loss, tau=1", "loss, tau=4")),
        Claim("non-blocking saves time", (0.0, "saving")),
    ], [PaperRow("time saving", "about 0.5 (Fig. 4c)", "saving", fmt=".3f")]))
    return {"experiment": "csgd-fig4", "description": "[CSGD] Fig. 4 fixture", "quick": True, "seeds": [0, 1, 2],
            "scale": "tiny", "runtime_s": 12.3, "plots": ["somewhere/csgd_fig4_easgd.png"], **agg}


def test_report_renders_from_a_stored_result_json(tmp_path) -> None:
    (tmp_path / "csgd-fig4").mkdir()
    (tmp_path / "csgd-fig4" / "result.json").write_text(json.dumps(_fixture_result()))
    (tmp_path / "csgd-fig4" / "csgd_fig4_easgd.png").write_bytes(b"png")
    text = render_report(tmp_path, machine="test machine").read_text()
    assert "test machine" in text and "## csgd-fig4" in text
    # the paper's number beside ours, ours as mean ± std (min–max)
    assert "| time saving | about 0.5 (Fig. 4c) | 0.420 ± 0.008 (0.410–0.430, n=3) |" in text
    # tau=1 spans 0.29-0.31 and tau=4 spans 0.30-0.42: they overlap, so the claim is not resolved
    assert "| loss grows with tau | loss, tau=1 < loss, tau=4 | not resolved at this scale |" in text
    assert "| non-blocking saves time | 0.0 < saving | **reproduced** |" in text
    assert "![csgd_fig4_easgd](csgd-fig4/csgd_fig4_easgd.png)" in text
    assert "1 not resolved at this scale, 1 reproduced" in text


def test_assessment_notes_are_computed_from_the_bands_and_rendered(tmp_path) -> None:
    # without a notes function the aggregate has no "notes" key (the other experiments' results are unchanged)
    assert "notes" not in _fixture_result()
    per_seed = [{"saving": 0.40}, {"saving": 0.44}]
    agg = aggregate(per_seed, Assessment(lambda _: {}, notes=lambda b: [f"mean saving {b['saving']['mean']:.2f} | x"]))
    assert agg["notes"] == ["mean saving 0.42 | x"]
    data = {"experiment": "csgd-fig4", "description": "d", "quick": True, "seeds": [0, 1], **agg}
    (tmp_path / "csgd-fig4").mkdir()
    (tmp_path / "csgd-fig4" / "result.json").write_text(json.dumps(data))
    text = render_report(tmp_path, machine="m").read_text()
    assert "- mean saving 0.42 \\| x\n" in text  # one list item per line, table pipes escaped


def test_report_of_nothing_is_a_config_error(tmp_path) -> None:
    with pytest.raises(ConfigError, match="result.json"):
        render_report(tmp_path)
    with pytest.raises(ConfigError, match="not a directory"):
        render_report(tmp_path / "absent")


def test_cli_reproduce_report(tmp_path, capsys) -> None:
    from coopsgd.cli import main

    (tmp_path / "csgd-fig4").mkdir()
    (tmp_path / "csgd-fig4" / "result.json").write_text(json.dumps(_fixture_result()))
    assert main(["reproduce", "report", str(tmp_path)]) == 0
    assert (tmp_path / "report.md").is_file()
    assert main(["reproduce", "report"]) == 2
    assert "DIR" in capsys.readouterr().err
    assert main(["reproduce", "csgd-fig4", str(tmp_path)]) == 2


def test_format_band() -> None:
    assert format_band(band([2.0, 2.0])) == "2 (all 2 seeds)"
    assert format_band(band([None, None])) == "not measured (2 missing)"


def test_one_seed_decides_no_claim_unless_the_experiment_is_deterministic() -> None:
    from coopsgd.experiments.stats import NOT_MEASURED, REPRODUCED, UNRESOLVED, Assessment, Claim, aggregate

    claims = [Claim("a below b", ("a", "b")), Claim("a below c", ("a", "c"))]
    one = [{"a": 1.0, "b": 2.0}]  # c never measured
    seeded = aggregate(one, Assessment(lambda _: {}, claims))
    assert [c["verdict"] for c in seeded["claims"]] == [UNRESOLVED, NOT_MEASURED]
    assert "one seed" in seeded["claims"][0]["note"]
    fixed = aggregate(one, Assessment(lambda _: {}, claims), deterministic=True)
    assert [c["verdict"] for c in fixed["claims"]] == [REPRODUCED, NOT_MEASURED]
    two = aggregate([{"a": 1.0, "b": 2.0}, {"a": 1.1, "b": 2.1}], Assessment(lambda _: {}, claims))
    assert two["claims"][0]["verdict"] == REPRODUCED and "note" not in two["claims"][0]


def test_report_html_is_written_beside_the_markdown(tmp_path) -> None:
    pytest.importorskip("markdown")  # optional ([report] extra; TensorBoard, a dev dependency, brings it)
    (tmp_path / "csgd-fig4").mkdir()
    (tmp_path / "csgd-fig4" / "result.json").write_text(json.dumps(_fixture_result()))
    (tmp_path / "csgd-fig4" / "csgd_fig4_easgd.png").write_bytes(b"png")
    render_report(tmp_path, machine="test machine")
    page = (tmp_path / "report.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and "<h2>csgd-fig4</h2>" in page
    assert "<td>time saving</td>" in page and "<table>" in page  # the tables extension rendered the tables
    assert '<img alt="csgd_fig4_easgd" src="csgd-fig4/csgd_fig4_easgd.png"' in page
    assert "| quantity | ours |" not in page and "<th>quantity</th>" in page  # the table inside <details> too


def _with_code(data: dict, results_code: str | None) -> dict:
    if results_code is None:
        return data
    return {**data, "provenance": {"coopsgd": "0.1.0", "git_commit": "a" * 40, "git_dirty": False,
                                   "source_sha256": "b" * 64, "results_code_sha256": results_code,
                                   "torch": "2.13.0+cpu", "threads": 2, "one_thread_models": ["mlp"]}}


def test_report_marks_results_of_other_code_as_stale(tmp_path) -> None:
    current = {"coopsgd": "0.1.0", "git_commit": "c" * 40, "source_sha256": "d" * 64, "results_code_sha256": "1" * 64}
    fig3 = {**_fixture_result(), "experiment": "csgd-fig3", "scale": None}
    toy = {"experiment": "lsgd-toy", "description": "toy", "quick": True, "seeds": [0], "deterministic": True,
           "settings": {"workers": 4, "lr": 0.1}}
    for name, data in (("csgd-fig3", _with_code(fig3, "2" * 64)), ("csgd-fig4", _with_code(_fixture_result(), "1" * 64)),
                       ("lsgd-toy", toy)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "result.json").write_text(json.dumps(data))
    text = render_report(tmp_path, machine="m", current=current).read_text()
    assert "| csgd-fig3 | quick | 3 | 12 s | **stale** |" in text
    assert "| csgd-fig4 | quick | 3 | 12 s | current |" in text
    assert "| lsgd-toy | quick | 1 | — | not recorded |" in text
    assert "Results: 1 current, 1 stale, 1 not recorded." in text
    fig3_part, fig4_part, toy_part = text.split("## csgd-fig3")[1], text.split("## csgd-fig4")[1], text.split("## lsgd-toy")[1]
    assert ("**Stale: it was produced by other results code (222222222222) than the code rendering this report "
            "(111111111111)") in fig3_part.split("## ")[0]
    assert "Rerun `coopsgd reproduce csgd-fig3 --quick` before citing them." in fig3_part
    assert "Code: coopsgd 0.1.0, commit aaaaaaaaaa, results code 111111111111, torch 2.13.0+cpu" in fig4_part
    assert "Produced by the results code rendering this report" in fig4_part.split("## ")[0]
    assert "**Code version not recorded.**" in toy_part and "`coopsgd reproduce lsgd-toy --quick`" in toy_part
    # every section has a scale line: the result's own, else its recorded settings, else a note saying so
    assert text.count("\nScale: ") == 3
    assert "Scale: tiny" in fig4_part and "Scale: (the recorded settings) workers 4, lr 0.1" in toy_part
    assert "Scale: not stated in this result.json" in fig3_part


def test_report_refuses_a_provenance_that_is_not_a_mapping(tmp_path) -> None:
    (tmp_path / "csgd-fig4").mkdir()
    (tmp_path / "csgd-fig4" / "result.json").write_text(json.dumps({**_fixture_result(), "provenance": "abc"}))
    with pytest.raises(ConfigError, match="provenance='abc' is invalid: must be a mapping"):
        render_report(tmp_path, current={})


def test_dry_run_memory_is_said_and_measured() -> None:
    from coopsgd.cli import reproduce
    from coopsgd.experiments import dry_run
    from coopsgd.experiments.multiseed import summary_lines

    assert reproduce.DRY_RUN_MEMORY_GB == dry_run.DRY_RUN_MEMORY_GB  # --help's copy of the measured peak
    peak = dry_run.peak_memory_gb()
    assert peak is None or 0.01 < peak < 1e4
    data = {"experiment": "csgd-fig3", "seeds": [0], "dry_run": True, "runtime_s": 3.0, "peak_memory_gb": 4.87,
            "per_seed": [{"summary": ["csgd-fig3 dry run: ..."]}]}
    assert summary_lines(data)[-1].endswith("; peak memory so far 4.9 GB (resident; this process or one of its finished "
                                           "child processes)")
