"""scripts/benchmark_extension.py's report on synthetic results (no training): goals, paired intervals, and the
command-line ``--report`` that regenerates the Markdown from the JSON."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "benchmark_extension.py"
OLD, NEW = ["dom_a", "dom_b"], "dom_c"


def _entry(name: str, dice: dict[str, float], iterations: int, spread: float = 0.02) -> dict:
    """One run entry as evaluate() records it: 5 test cases per domain around ``dice[domain]``."""
    cases = [{"case": f"{d}_{i}", "domain": d, "mean_dice": dice[d] + spread * (i - 2), "routing": d}
             for d in dice for i in range(5)]
    return {"variant": name, "iterations": [iterations], "epochs": [iterations // 16], "train_wall_s": [60.0],
            "train_commit": "c0ffee", "predict_commit": "c0ffee", "cases": cases}


def _results() -> dict:
    runs = {"old": _entry("old", {"dom_a": 0.60, "dom_b": 0.70}, 480),
            "joint": _entry("joint", {"dom_a": 0.58, "dom_b": 0.80, NEW: 0.84}, 480),
            "new_parts": _entry("new_parts", {"dom_a": 0.60, "dom_b": 0.70, NEW: 0.83}, 128),
            "full": _entry("full", {"dom_a": 0.55, "dom_b": 0.75, NEW: 0.70}, 128)}
    return {"config": {"size": "small", "schedule": [30, 16, 2], "extension_schedule": [8, 16, 2], "holdout": 5,
                       "threads": 1, "device": "cpu", "old_domains": OLD, "new_domain": NEW},
            "runs": runs}


def test_report_states_goals_and_paired_intervals(tmp_path):
    (tmp_path / "extension_small.json").write_text(json.dumps(_results()))
    proc = subprocess.run([sys.executable, str(SCRIPT), "--size", "small", "--report", "--results", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    md = (tmp_path / "extension_small.md").read_text()
    parts = md.split("\n- ")
    new_parts = next(p for p in parts if p.startswith("extension, only the new parts trained: ≤ 30 %"))
    assert "new domain within 2 points of from scratch (-1.0)" in new_parts
    assert "old domains all within 1 point" in new_parts
    full = next(p for p in parts if p.startswith("extension, everything trained (old data replayed): ≤ 30 %"))
    assert "NOT within 2 points" in full and "NOT all within 1 point" in full
    # paired per case: the same cases in both runs, a constant difference -> a zero-width interval
    assert "dom_a vs before -5.0 (-5.0 to -5.0, 5 cases)" in md
    assert "dom_c vs from scratch -14.0 (-14.0 to -14.0, 5 cases)" in md
    assert "run-to-run variance of training is not in them" in md


def test_combine_reports_run_level_intervals_over_repeats(tmp_path):
    """``--combine``: two repeats whose new-parts extension trails from scratch by 1 and 3 points: the mean over runs
    (-2.0), each run's difference, how many runs meet the goal, and a run-level interval wider than either run's
    zero-width case-level one."""
    first = _results()
    second = _results()
    second["config"]["seed"] = 1
    for c in second["runs"]["new_parts"]["cases"]:
        if c["domain"] == NEW:
            c["mean_dice"] -= 0.02
    (tmp_path / "extension_small.json").write_text(json.dumps(first))
    (tmp_path / "extension_small_seed1.json").write_text(json.dumps(second))
    proc = subprocess.run([sys.executable, str(SCRIPT), "--size", "small", "--combine", "--results", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    md = (tmp_path / "extension_small_runs.md").read_text()
    line = next(x for x in md.splitlines() if x.startswith("- extension, only the new parts trained:"))
    new = line.split("dom_c vs from scratch ")[1]
    assert new.startswith("-2.0 (run-level -3.0 to -1.0; per run -1.0, -3.0; within 2 points in 1 of 2 runs)"), new
    assert "dom_a vs before +0.0 (run-level +0.0 to +0.0" in line
    # compute per model: iterations against from scratch, mean training wall time
    assert "| extension, only the new parts trained | 2 | 128 (27 %) + old model's | 60 |" in md
    assert "| old model (before the extension) | 2 | 480 (100 %) | 60 |" in md


def test_run_level_interval_needs_paired_runs():
    sys.path.insert(0, str(SCRIPT.parent))
    import benchmark_extension as be

    a = [_entry("x", {"dom_a": 0.5}, 1)]
    try:
        be.run_level_interval(a, a + a, "dom_a")
    except ValueError as e:
        assert "paired by repeat" in str(e)
    else:
        raise AssertionError("unpaired runs were accepted")
    one = be.run_level_interval(a, [_entry("y", {"dom_a": 0.4}, 1)], "dom_a")
    assert one is not None and abs(one[0] - 0.1) < 1e-9 and one[3:] == (1, 5)
