"""bench.report renders a saved full run: targets, tables, README section and plot.

Uses the newest committed `bench/results/run-*.json` of a full run, so a change to the report code that
no longer reads the run format `python -m bench` writes fails here instead of at the end of a 16-minute run.
"""
import json
from pathlib import Path

import pytest

from bench import report

RESULTS = Path(__file__).resolve().parent.parent / "bench" / "results"


def _latest_full_run() -> dict:
    for path in sorted(RESULTS.glob("run-*.json"), reverse=True):
        run = json.loads(path.read_text())
        if run["meta"].get("mode") == "full" and {"encoder", "generation", "coldstart"} <= set(run):
            return run
    pytest.skip("no committed full run under bench/results")


def test_targets_markdown_readme_and_plot_render_from_a_saved_run(tmp_path):
    run = _latest_full_run()
    targets = report.targets(run)
    names = {t["target"] for t in targets}
    assert any("b1 L128 fp32" in n for n in names) and any("SmolLM2 decode b1 fp32" in n for n in names)
    assert any("cold start" in n for n in names) and any("install" in n for n in names)
    # None: a figure above its physical ceiling, flagged as a measurement error (bench/limits.py)
    assert all((isinstance(t["pass"], bool) or (t["pass"] is None and "measurement error" in t["figure"]))
               and t["figure"] for t in targets)
    # the verdicts come from the figures, not from a list: recomputing gives the same answers as stored
    stored = {t["target"]: t["pass"] for t in run.get("targets", [])}
    assert all(stored[t["target"]] == t["pass"] for t in targets if t["target"] in stored)

    run = {**run, "targets": targets}
    md, png = tmp_path / "r.md", tmp_path / "r.png"
    report.write(run, md, png)
    text = md.read_text()
    for t in targets:
        assert t["target"] in text
    assert "## Machine limits" in text and "## Cold start" in text
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000

    section = report.readme_section(run)
    assert section.count("| ") > 20 and "![benchmark plot]" in section


def test_readme_update_replaces_only_the_marked_section(tmp_path):
    run = _latest_full_run()
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\n## Benchmarks\n\nhand-written\n\n{report.README_MARKER}\n\nold table\n\n## Server\n\nkept\n")
    assert report.update_readme({**run, "targets": report.targets(run)}, readme)
    text = readme.read_text()
    assert "hand-written" in text and "old table" not in text and text.endswith("## Server\n\nkept\n")
    assert "Latest full run:" in text


def test_a_decode_rate_above_the_bandwidth_ceiling_is_flagged_not_printed_as_a_share(tmp_path):
    """Issue 26: "149% of the numpy-bandwidth ceiling" is a broken probe; the report says so instead."""
    run = json.loads(json.dumps(_latest_full_run()))
    g = next(g for g in run["generation"] if g["key"] == "smollm2" and g["batch"] == 1)
    fp = g["contenders"]["onnxpipe fp32"]
    fp["of_ceiling"], fp["of_matmul_ceiling"] = 1.49, 1.6
    t = next(t for t in report.targets(run) if t["target"].startswith("SmolLM2 decode b1 fp32"))
    assert t["pass"] is None and "measurement error" in t["figure"] and "149%" not in t["figure"]
    run["targets"] = report.targets(run)
    md = tmp_path / "r.md"
    report.write(run, md, tmp_path / "r.png")
    text = md.read_text()
    assert "measurement error" in text and "149%" not in text


def test_a_partial_ray_bench_run_names_the_machine_that_measured_the_figures_it_keeps():
    from bench.ray_scale import carried

    full = {"machine": {"loadavg_1m_before": 0.2}}
    assert carried(full, {"batch"}) == {"machine": {"loadavg_1m_before": 0.2}, "parts": ["serve"]}
    batch_only = {"machine": {"loadavg_1m_before": 0.7}, **{"carried_from_previous_run": carried(full, {"batch"})}}
    # run the batch part again: the serve figures are still the full run's
    assert carried(batch_only, {"batch"})["machine"] == {"loadavg_1m_before": 0.2}
    # run the serve part: the batch figures are the batch-only run's
    assert carried(batch_only, {"serve"}) == {"machine": {"loadavg_1m_before": 0.7}, "parts": ["batch"]}
