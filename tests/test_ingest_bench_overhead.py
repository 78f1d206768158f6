"""The ingest benchmark's orchestration overhead counts stage work along the flow's dependent chain."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_ingest.py"
_spec = importlib.util.spec_from_file_location("bench_ingest", _PATH)
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


def test_side_by_side_stages_count_once_on_the_longest_branch():
    s = {
        "ingest": 1.0,
        "consensus": 2.0,
        "train": 10.0,
        "label_issues": 4.0,
        "pseudo_labels": 3.0,
        "report": 5.0,
    }
    assert bench.critical_path(s) == pytest.approx(1 + 2 + 10 + 4 + 5)
    s["pseudo_labels"] = 6.0
    assert bench.critical_path(s) == pytest.approx(1 + 2 + 10 + 6 + 5)


def test_partial_flows_and_unknown_stages():
    assert bench.critical_path({"ingest": 1.5}) == pytest.approx(1.5)
    assert bench.critical_path({"ingest": 1.0, "later": 2.0}) == pytest.approx(3.0)


def test_the_dependency_table_matches_the_flow():
    """Every stage the refresh flow submits is in the table (a new stage must be placed in it)."""
    flow = (Path(__file__).resolve().parents[1] / "flows" / "refresh.py").read_text(encoding="utf-8")
    submitted = {line.split("=")[0].strip() for line in flow.splitlines() if "_task.submit(" in line}
    names = {"ingest", "consensus", "train", "pseudo", "issues", "report"}
    assert submitted == names, submitted
    assert set(bench.FLOW_DEPS) == {"ingest", "consensus", "train", "pseudo_labels", "label_issues", "report"}
