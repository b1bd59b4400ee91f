"""scripts/benchmark_accuracy.py's report and statistics on synthetic results (no training, no prediction)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "benchmark_accuracy.py"


@pytest.fixture(scope="module")
def ba():
    import importlib.util

    spec = importlib.util.spec_from_file_location("benchmark_accuracy", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses resolve the module's string annotations through sys.modules
    try:
        spec.loader.exec_module(mod)
        yield mod
    finally:
        sys.modules.pop(spec.name, None)


DOMAINS = ("dom_a", "dom_b")
CASES = [(f"{d}_{i:02d}", d) for d in DOMAINS for i in range(8)]


def _entry(arm: str, seed: int, mode: str, dice: dict[str, float], commit: str = "c0ffee",
           routing: dict[str, tuple[str, dict[str, float]]] | None = None) -> dict:
    """One run entry as run_arm records it (routing: case -> (inferred domain, weights))."""
    cases = []
    for case, dom in CASES:
        inferred, weights = (routing or {}).get(case, (dom, {dom: 0.9}))
        cases.append({"case": case, "domain": dom, "mean_dice": dice[case], "dice": {"ET": dice[case]},
                      "routing": inferred if mode != "oracle" else dom, "routing_weights": weights})
    return {"arm": arm, "trainer": "T", "seed": seed, "mode": mode, "withheld": None, "train_wall_s": 60.0,
            "train_sessions": 1, "train_commands": [], "predict_wall_s": 1.0, "train_commit": commit,
            "predict_commit": commit, "cases": cases}


def _results(*entries: dict) -> dict:
    runs = {f"{e['arm']}|seed{e['seed']}|{e['mode']}|all": e for e in entries}
    return {"runs": runs, "config": {"size": "small", "suite": "mr", "cases": 20, "holdout": 8,
                                     "schedule": [40, 16, 2], "base_features": 16, "tta": False,
                                     "sources": ["brats-mets", "ucsf-bmsr", "brainmetshare"]},
            "machine": {"host": "test"}}


def _dice(base: float, offset: float = 0.0, noise: float = 0.01, seed: int = 0) -> dict[str, float]:
    rng = np.random.default_rng(seed)
    return {c: float(np.clip(base + offset + noise * rng.standard_normal(), 0, 1)) for c, _ in CASES}


def test_std_is_the_sample_std(ba):
    """± is numpy's std with ddof 1; one value has std 0.0."""
    assert ba._stat([0.1, 0.2, 0.4])[1] == pytest.approx(np.std([0.1, 0.2, 0.4], ddof=1))
    assert ba._stat([0.7]) == (0.7, 0.0, 1)
    assert ba._stat([None, 0.5, None]) == (0.5, 0.0, 1)
    assert ba._stat([]) is None
    # several repeats: the ± of a domain is the sample std of the repeats' means
    runs = _results(_entry("universal", 0, "dataset-free", _dice(0.5, noise=0)),
                    _entry("universal", 1, "dataset-free", _dice(0.7, noise=0)))["runs"]
    st = ba._domain_dice(ba._entries(runs, "universal", "dataset-free"), "dom_a")
    assert st[0] == pytest.approx(0.6) and st[1] == pytest.approx(np.std([0.5, 0.7], ddof=1))


def test_hierarchical_interval_is_wider_when_runs_disagree(ba):
    """Arm A's repeats differ by ±20 points (their per-case mean does not): the per-case interval is narrow, the
    hierarchical one, which resamples the repeats, is much wider and not significant."""
    a = [_entry("universal", s, "dataset-free", _dice(0.6, off, seed=s)) for s, off in enumerate((-0.2, 0, 0.2))]
    b = [_entry("prompts", s, "dataset-free", _dice(0.55, 0, seed=10 + s)) for s in range(3)]
    runs = _results(*a, *b)["runs"]
    pa, pb = ("universal", "dataset-free"), ("prompts", "dataset-free")
    diff, lo, hi, n = ba._paired(runs, pa, pb, list(DOMAINS))
    h = ba._hierarchical(runs, pa, pb, list(DOMAINS))
    assert n == len(CASES) and h["n"] == len(CASES) and h["runs"] == (3, 3)
    assert h["diff"] == pytest.approx(diff)
    assert lo > 0  # the per-case interval alone claims an effect
    assert h["hi"] - h["lo"] > 5 * (hi - lo)
    assert h["lo"] < 0 < h["hi"] and not h["significant"] and h["p"] > 0.05
    assert h["mde"] == pytest.approx(2.8 * h["se"])
    # deterministic (fixed RNG seed)
    assert ba._hierarchical(runs, pa, pb, list(DOMAINS)) == h


def test_hierarchical_significant_for_a_clear_effect(ba):
    a = [_entry("universal", s, "dataset-free", _dice(0.7, 0.01 * s, seed=s)) for s in range(3)]
    b = [_entry("no_harmony", s, "dataset-free", _dice(0.5, 0.01 * s, seed=10 + s)) for s in range(3)]
    h = ba._hierarchical(_results(*a, *b)["runs"], ("universal", "dataset-free"), ("no_harmony", "dataset-free"),
                         list(DOMAINS))
    assert h["significant"] and h["lo"] > 0.15 and h["p"] == 0.0
    assert ba._fmt_p(h["p"], h["draws"]) == "p < 0.0002"


def test_one_run_arm_has_no_run_level_interval(ba):
    """An arm run once: the claim keeps the per-case interval and says the training variance is unknown."""
    a = [_entry("universal", s, "dataset-free", _dice(0.6, 0.05 * s, seed=s)) for s in range(2)]
    single = _entry("single", 0, "oracle", _dice(0.8, seed=5))
    results = _results(*a, single)
    h = ba._hierarchical(results["runs"], ("universal", "dataset-free"), ("single", "oracle"), list(DOMAINS))
    assert h == {"one_run": ["single"]}
    md = ba.report(results)
    line = next(x for x in md.splitlines() if x.startswith("- UniversalTrainer (dataset-free) vs single-dataset"))
    assert "95 % interval over the 16 test cases" in line
    assert "one run: training variance unknown" in line
    assert "- single-dataset nnU-Net (one model per domain) (`single`): 1 run; commit c0ffee" in md


def test_mixed_commits_refused_without_the_flag(ba, tmp_path):
    """Runs of different commits in one table: report() raises naming arms and commits; --allow-mixed-commits
    renders them with the commits in the title; the CLI exits with the message."""
    results = _results(*[_entry("universal", s, "dataset-free", _dice(0.6, seed=s), commit="aaaa1111") for s in (0, 1)],
                       *[_entry("no_harmony", s, "dataset-free", _dice(0.5, seed=s), commit="bbbb2222-dirty")
                         for s in (0, 1)])
    with pytest.raises(ba.MixedCommitsError, match=r"aaaa1111: universal; bbbb2222-dirty: no_harmony"):
        ba.report(results)
    md = ba.report(results, allow_mixed_commits=True)
    assert "### Ablations (Dice %; Δ: mean vs the full UniversalTrainer, dataset-free) (mixed commits: aaaa1111: " \
           "universal; bbbb2222-dirty: no_harmony)" in md
    assert "the same network without harmonization (paper: harmonization helps) (mixed commits:" in md

    (tmp_path / "accuracy_small.json").write_text(json.dumps(results))
    cmd = [sys.executable, str(SCRIPT), "--size", "small", "--report", "--results", str(tmp_path)]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    assert res.returncode != 0 and "--allow-mixed-commits" in res.stderr and "bbbb2222-dirty" in res.stderr
    assert not (tmp_path / "accuracy_small.md").exists()
    res = subprocess.run([*cmd, "--allow-mixed-commits"], capture_output=True, text=True, cwd=REPO)
    assert res.returncode == 0, res.stderr
    assert "mixed commits" in (tmp_path / "accuracy_small.md").read_text()


def test_commit_of_a_model_trained_over_two_commits_is_mixed(ba):
    e = {**_entry("universal", 0, "dataset-free", _dice(0.6), commit="aaa,bbb"), "predict_commit": "bbb"}
    assert ba._commits_of(e) == ["aaa", "bbb"]
    with pytest.raises(ba.MixedCommitsError, match="aaa: universal; bbb: universal"):
        ba._commit_note("table 'x'", [e], allow=False)
    old = {k: v for k, v in e.items() if k not in ("train_commit", "predict_commit")}
    assert ba._commits_of(old) == ["unknown"]
    assert ba._commit_note("x", [old, old], allow=False) == ""


def test_ece_equals_the_hand_computed_value(ba):
    # bins: 0.95, 0.95, 1.0 -> [0.9, 1.0] (accuracy 2/3, confidence 0.9667); 0.65, 0.62 -> [0.6, 0.7) (1, 0.635)
    # ECE = 3/5 * |2/3 - 0.9667| + 2/5 * |1 - 0.635| = 0.18 + 0.146
    assert ba._ece([0.95, 0.95, 0.65, 0.62, 1.0], [True, False, True, True, True]) == pytest.approx(0.326)
    assert ba._ece([0.5, 0.5], [True, False]) == pytest.approx(0.0)
    with pytest.raises(ValueError):
        ba._ece([], [])


def test_routing_stats_and_section(ba):
    """Accuracy, mean top weight, ECE, uncertain cases and the misrouted cases' Dice vs the oracle, pooled."""
    wrong = {"dom_a_00": ("dom_b", {"dom_a": 0.4, "dom_b": 0.6}), "dom_b_03": ("dom_a", {"dom_a": 0.7, "dom_b": 0.3})}
    free = [_entry("universal", s, "dataset-free", _dice(0.5, noise=0), routing=wrong if s == 0 else None)
            for s in (0, 1)]
    free[0]["cases"][0]["routing_uncertain"] = True
    oracle = [_entry("universal", s, "oracle", _dice(0.8, noise=0)) for s in (0, 1)]
    runs = _results(*free, *oracle)["runs"]
    st = ba._routing_stats(runs, "universal")
    assert st["n"] == 32 and st["correct"] == 30 and st["misrouted"] == 2 and st["uncertain"] == 1
    top = [0.6, 0.7] + [0.9] * 30
    hit = [False, False] + [True] * 30
    assert st["mean_top"] == pytest.approx(np.mean(top))
    assert st["ece"] == pytest.approx(ba._ece(top, hit))
    assert st["misrouted_free"] == pytest.approx(0.5) and st["misrouted_oracle"] == pytest.approx(0.8)
    md = ba.report(_results(*free, *oracle))
    assert "| UniversalTrainer | 32 | 94% | 0.88 |" in md and "| 1 | 2 cases: 50.0 -> 80.0 (+30.0) |" in md
    assert ba.SHARED_ROUTING_NOTE not in md
    shared = _results(*free, *oracle)
    shared["config"]["suite"] = "shared"
    assert ba.SHARED_ROUTING_NOTE in ba.report(shared)


def test_suites_and_equal_compute(ba, tmp_path):
    assert [ba.suite_name("small", x) for x in ("mr", "shared", "ct")] == ["small", "small_shared", "small_ct"]
    s = ba.Suite(tmp_path, "small", "shared", 1, "cpu", tmp_path)
    assert s.sources == ["brats-mets", "msd-braintumour"] and s.identical == []
    assert s.results_json.name == "accuracy_small_shared.json"
    assert s.multiplier(ba.ARMS["universal_equal_compute"]) == 2 and s.multiplier(ba.ARMS["universal"]) == 1
    assert s.results_dir(0, 2).name == "nnUNet_results_seed0_x2" and s.results_dir(0).name == "nnUNet_results_seed0"
    assert ba.Suite(tmp_path, "small", "ct", 1, "cpu", tmp_path).multiplier(ba.ARMS["universal_equal_compute"]) == 4
    assert ba.SIZES["small"]["cases"] == 20 and ba.SIZES["small"]["holdout"] == 10
    assert "dataset-free-soft" in ba.MODES and ba.ARMS["prompts"].trainer == "UniversalTrainer_Prompts"
    assert not {"no_prompts", "no_harmony_no_prompts"} & set(ba.ARMS)


def test_v1_results_still_render(ba):
    """The committed results from before commits were recorded render, with the sections the README copies."""
    path = REPO / "benchmarks" / "results" / "accuracy_small_v1.json"
    md = ba.report(json.loads(path.read_text()), allow_mixed_commits=True)
    for title in ("Universal model vs", "Per class and region", "Ablations", "Missing modality",
                  "Gate routing accuracy", "The paper's claims"):
        assert f"\n### {title}" in md
    assert "no prompts (dataset-free)" in md and "commit unknown" in md


def test_a_class_nobody_learns_is_reported_apart_from_the_domain_means(ba):
    """brats_mets.NETC (0 for every arm) stays in the per-class table but leaves the domain's case means."""
    case = {"case": "b1", "domain": "brats_mets", "mean_dice": 0.5, "dice": {"NETC": 0.0, "SNFH": 0.6, "ET": 0.9,
                                                                              "TC": 0.9, "WT": 0.7}}
    other = {"case": "u1", "domain": "ucsf_bmsr", "mean_dice": 0.8, "dice": {"ET": 0.8}}
    run = {"cases": [case, other], "domains": {"brats_mets": {"classes": {"NETC": {}, "SNFH": {}, "ET": {}}},
                                               "ucsf_bmsr": {"classes": {"ET": {}}}}}
    runs, notes = ba._without_separate_classes({"r": run})
    assert runs["r"]["cases"][0]["mean_dice"] == pytest.approx(0.75)  # (SNFH + ET) / 2, regions not counted
    assert runs["r"]["cases"][1]["mean_dice"] == 0.8 and run["cases"][0]["mean_dice"] == 0.5  # input unchanged
    assert len(notes) == 1 and "brats_mets.NETC" in notes[0]


def _unseen(entry: dict, train: str = "c0ffee", predict: str = "beef01") -> dict:
    """An entry as run_unseen records it: same arm/mode, test_set unseen, predicted at a later commit."""
    return {**entry, "test_set": "unseen", "institution": "unseen", "train_commit": train, "predict_commit": predict}


def _with_unseen(results: dict, *entries: dict) -> dict:
    out = json.loads(json.dumps(results))
    out["runs"].update({f"{e['arm']}|seed{e['seed']}|{e['mode']}|all|unseen": e for e in entries})
    out["unseen"] = {"institution": "unseen", "description": "a scanner never seen in training",
                     "parameters": {"gamma": 1.4, "tissue_contrast": 0.75, "bias": 0.45, "noise": 1.7,
                                    "spacing": [1.15, 1.15, 1.35], "blur_mm": [0, 0, 1], "scale": 0.6},
                     "cases_per_domain": 8, "seeds": {"brats-mets": 100}, "dataset": "Dataset710_BenchUnseen"}
    return out


def test_unseen_runs_get_their_own_sections_and_leave_the_others_unchanged(ba):
    """Unseen-institution entries (same arms and modes, test_set 'unseen') change no held-out table, claim or run
    list; they get their own Dice table (next to the held-out mean), routing, comparisons and runs, with commits."""
    wrong = {"dom_a_00": ("dom_b", {"dom_a": 0.4, "dom_b": 0.6})}
    held = _results(*[_entry("universal", s, "dataset-free", _dice(0.7, seed=s)) for s in (0, 1)],
                    *[_entry("universal", s, "oracle", _dice(0.72, seed=s)) for s in (0, 1)],
                    _entry("single", 0, "oracle", _dice(0.8, seed=5)), _entry("joint_stock", 0, "dataset-free",
                                                                                _dice(0.6, seed=6)))
    before = ba.report(held)
    unseen = [_unseen(_entry("universal", s, "dataset-free", _dice(0.5, seed=10 + s), routing=wrong)) for s in (0, 1)]
    unseen += [_unseen(_entry("universal", s, "oracle", _dice(0.55, seed=10 + s))) for s in (0, 1)]
    unseen += [_unseen(_entry("single", 0, "oracle", _dice(0.4, seed=20))),
               _unseen(_entry("joint_stock", 0, "dataset-free", _dice(0.3, seed=21)))]
    after = ba.report(_with_unseen(held, *unseen))
    assert after.startswith(before.split("\n### Runs")[0]), "every held-out section is unchanged"
    assert after.split("\n### Runs")[1] == before.split("\n### Runs")[1], "the runs table lists the held-out runs"
    unseen_md = after[len(before.split("\n### Runs")[0]):].split("\n### Runs")[0]
    assert unseen_md.startswith("\n### Unseen institution: Dice % per domain")
    assert unseen_md.splitlines()[1].endswith("nothing retrained; trained at c0ffee, predicted at beef01)")
    assert "8 cases per domain synthesized with institution `unseen`" in unseen_md
    assert "bias field 0.45" in unseen_md and "voxel size x1.15/1.15/1.35 (x/y/z)" in unseen_md
    assert "Dataset710_BenchUnseen" in unseen_md
    u = ba._mean_over_domains(ba._entries({k: e for k, e in enumerate(unseen)}, "universal", "dataset-free"),
                              list(DOMAINS))
    h = ba._mean_over_domains(ba._entries(held["runs"], "universal", "dataset-free"), list(DOMAINS))
    row = next(x for x in unseen_md.splitlines() if x.startswith("| UniversalTrainer (dataset-free) |"))
    assert row.endswith(f"| {ba._fmt(u)} | {ba._fmt(h)} | {100 * (u[0] - h[0]):+.1f} |")
    assert "| single-dataset nnU-Net (one model per domain) (oracle) |" in unseen_md
    assert "| joint, plain nnU-Net (network and loss) (dataset-free) |" in unseen_md
    # routing on the unseen set: one misrouted case per repeat, its cost against the same repeat's oracle
    assert "### Unseen institution: gate routing" in unseen_md
    routing = next(x for x in unseen_md.splitlines() if x.startswith("| UniversalTrainer | "))
    assert "| 88% (14/16) | 100% (16/16) | 94% (30/32) |" in routing and "| 2 cases: " in routing
    assert "### Unseen institution: paired comparisons" in unseen_md
    assert "- gated head (dataset-free, hard routing) vs its own heads with the domain given" in unseen_md
    assert "| universal / seed0 / dataset-free / all / unseen | 1 | c0ffee / beef01 |" in unseen_md
    # the README takes sections by title prefix: the unseen ones are separate sections of their own
    assert [t for t in re.findall(r"(?m)^### (.*)$", after) if t.startswith("Unseen institution")] == [
        t for t in re.findall(r"(?m)^### (.*)$", unseen_md)]


def test_unseen_runs_of_other_commits_are_refused_and_the_held_out_gap_needs_the_same_commits(ba):
    held = _results(_entry("universal", 0, "dataset-free", _dice(0.7)), _entry("no_harmony", 0, "dataset-free",
                                                                                _dice(0.6)))
    mixed = _with_unseen(held, _unseen(_entry("universal", 0, "dataset-free", _dice(0.5))),
                         _unseen(_entry("no_harmony", 0, "dataset-free", _dice(0.5)), predict="dddd4444"))
    with pytest.raises(ba.MixedCommitsError, match="Unseen institution.*predicted at dddd4444: no_harmony"):
        ba.report(mixed)
    assert "mixed commits: trained at c0ffee, predicted at beef01: universal" in ba.report(mixed, True)
    # unseen runs predicted where training ran: the held-out mean is shown; held-out runs predicted at another
    # commit than the unseen ones: the gap is left out (shown with --allow-mixed-commits)
    same = ba.report(_with_unseen(held, _unseen(_entry("universal", 0, "dataset-free", _dice(0.5)),
                                                predict="c0ffee")))
    assert "(the trained models above, nothing retrained; commit c0ffee)" in same
    assert "Held-out column" not in same
    held_later = json.loads(json.dumps(held))
    held_later["runs"]["universal|seed0|dataset-free|all"]["predict_commit"] = "aaaa0000"
    held_later["runs"]["universal|seed0|dataset-free|all"]["train_commit"] = "aaaa0000"
    held_later["runs"]["no_harmony|seed0|dataset-free|all"].update(train_commit="aaaa0000", predict_commit="aaaa0000")
    md = ba.report(_with_unseen(held_later, _unseen(_entry("universal", 0, "dataset-free", _dice(0.5)))))
    assert "Held-out column left out" in md and "| – | – |" in md.split("### Unseen institution")[1]
    assert "Held-out column: runs of other commits (aaaa0000)" in ba.report(
        _with_unseen(held_later, _unseen(_entry("universal", 0, "dataset-free", _dice(0.5)))), True)


def test_unseen_only_results_render(ba):
    """A results file with unseen runs only (held-out entries removed) still renders the unseen sections."""
    md = ba.report(_with_unseen(_results(), _unseen(_entry("universal", 0, "dataset-free", _dice(0.5)))))
    assert "No results yet." in md and "### Unseen institution: Dice % per domain" in md


def test_unseen_set_description_and_skips_untrained_arms(ba, tmp_path, capsys):
    """--unseen: the set's description is plain JSON (compared with set.json on resume); an arm without a final
    checkpoint is skipped without training, and a suite with a CT domain is refused."""
    s = ba.Suite(tmp_path, "tiny", "mr", 1, "cpu", tmp_path)
    desc = ba.unseen_description(s, 10)
    assert desc == json.loads(json.dumps(desc)) and desc["cases_per_domain"] == 10
    assert desc["seeds"] == {"brats-mets": 100, "ucsf-bmsr": 101, "brainmetshare": 102}
    assert desc["parameters"]["bias"] == 0.45 and desc["institution"] == "unseen"
    raw = tmp_path / "nnUNet_raw" / f"Dataset{ba.MERGED_ID}_{ba.MERGED_NAME}"
    raw.mkdir(parents=True)
    assert ba.trained_model(s, ba.ARMS["universal"], 0) is None
    ba.run_unseen(s, ba.ARMS["universal"], 0, desc)
    assert "unseen: skip universal seed 0: not trained" in capsys.readouterr().out
    assert not (tmp_path / "nnUNet_results_seed0").exists() and not s.results_json.exists()
    fold = ba.model_dir(s, ba.MERGED_ID, "UniversalTrainer", s.plans, 0) / "fold_0"
    fold.mkdir(parents=True)
    (fold / "checkpoint_final.pth").touch()
    assert ba.trained_model(s, ba.ARMS["universal"], 0) == fold.parent
    with pytest.raises(SystemExit, match="CT domain"):
        ba.prepare_unseen(ba.Suite(tmp_path, "tiny", "ct", 1, "cpu", tmp_path), 10)
    with pytest.raises(SystemExit, match="run the suite"):
        ba.prepare_unseen(ba.Suite(tmp_path / "empty", "tiny", "mr", 1, "cpu", tmp_path), 10)


def test_unseen_runs_every_trained_repeat_by_default(ba, tmp_path):
    s = ba.Suite(tmp_path, "small", "mr", 1, "cpu", tmp_path)
    for name in ("nnUNet_results_seed0", "nnUNet_results_seed2", "nnUNet_results_seed2_x3", "nnUNet_results_seedx"):
        (tmp_path / name).mkdir()
    assert ba.trained_seeds(s) == [0, 2]


def test_time_budget_stops_the_running_command_and_its_children(ba, tmp_path):
    """--time-budget: a command still running at the deadline is stopped with its process group (a training's
    data-loader workers included), its log says so, and BudgetExhausted tells main to stop and report; a command
    started after the deadline is not run at all."""
    import time

    s = ba.Suite(tmp_path / "work", "tiny", "mr", 1, "cpu", tmp_path / "res")
    child_pid = tmp_path / "child.pid"
    code = (f"import subprocess, sys, time; c = subprocess.Popen([sys.executable, '-c', 'import time; "
            f"time.sleep(60)']); open({str(child_pid)!r}, 'w').write(str(c.pid)); time.sleep(60)")
    s.deadline = time.monotonic() + 3
    t = time.monotonic()
    with pytest.raises(ba.BudgetExhausted, match="ran out during"):
        s.run([sys.executable, "-c", code], "long")
    assert time.monotonic() - t < 30
    pid = int(child_pid.read_text())
    time.sleep(0.5)
    assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2], \
        "the command's child survived the budget"
    assert "the time budget ran out" in (tmp_path / "work" / "logs" / "long.log").read_text()
    with pytest.raises(ba.BudgetExhausted, match="used up before"):
        s.run([sys.executable, "-c", "open('ran', 'w')"], "late")
    assert not Path("ran").exists()


def test_time_budget_cli(tmp_path):
    """The CLI rejects a non-positive budget with a usage error."""
    r = subprocess.run([sys.executable, str(SCRIPT), "--size", "tiny", "--work", str(tmp_path), "--time-budget", "0",
                        "--results", str(tmp_path)], capture_output=True, text=True)
    assert r.returncode == 2 and "--time-budget must be positive" in r.stderr
