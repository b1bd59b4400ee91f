"""Evaluation: Dice/HD95, lesion-wise scores, regions and cross-domain FPs against hand-computed values; the CLI."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from nnunet_universal.evaluation.api import evaluate
from nnunet_universal.evaluation.lesions import LesionConfig, lesion_wise
from nnunet_universal.evaluation.metrics import dice, hd95, stats
from nnunet_universal.evaluation.report import cross_domain_fp, evaluate_case, headline_lesion_target, summarize
from nnunet_universal.metadata import CaseInfo, DomainInfo, UniversalMeta, atomic_write_json


def _meta(cases: dict[str, str] | None = None) -> UniversalMeta:
    """Three domains: BraTS-like (regions, lesion-wise), binary metastases (lesion-wise, shares id 3 with ET
    by an 'identical' declaration), liver CT (no lesion-wise)."""
    domains = {
        "brats": DomainInfo(source="BraTS-METS", slots=["T1c"], labels={"NETC": 1, "SNFH": 2, "ET": 3},
                            regions={"TC": ["NETC", "ET"], "WT": ["NETC", "SNFH", "ET"]}, lesion_wise=True),
        "mets": DomainInfo(source="UCSF-BMSR", slots=["T1c"], labels={"met": 4, "ET": 3}, lesion_wise=True),
        "liver": DomainInfo(source="LiTS", slots=["CT"], labels={"liver": 5, "tumor": 6}, modality="CT"),
    }
    slots = {"brats": ["T1c"], "mets": ["T1c"], "liver": ["CT"]}
    return UniversalMeta(slots=["T1c", "CT"], domains=domains,
                         cases={c: CaseInfo(domain=d, slots=slots[d]) for c, d in (cases or {}).items()})


def _box(shape, *ranges) -> np.ndarray:
    m = np.zeros(shape, dtype=bool)
    m[tuple(slice(a, b) for a, b in ranges)] = True
    return m


# ---- voxel metrics ---------------------------------------------------------------------------------

def test_dice_hand_computed():
    a = _box((8, 8, 8), (0, 4), (0, 4), (0, 4))  # 64 voxels
    b = _box((8, 8, 8), (2, 6), (0, 4), (0, 4))  # 64 voxels, 32 shared
    assert dice(a, b) == pytest.approx(0.5)
    assert dice(a, a) == 1.0
    assert dice(a, np.zeros_like(a)) == 0.0
    assert dice(np.zeros_like(a), np.zeros_like(a)) == 1.0  # empty vs empty: defined as 1.0, never NaN


def test_hd95_planes_respects_spacing_per_axis():
    shape = (10, 6, 6)
    p = _box(shape, (2, 3), (1, 5), (1, 5))  # one-voxel sheets: every voxel is surface
    g = _box(shape, (5, 6), (1, 5), (1, 5))  # 3 voxels away along axis 0
    assert hd95(p, g, (3.0, 1.0, 1.0)) == pytest.approx(9.0)
    assert hd95(p, g, (1.0, 1.0, 3.0)) == pytest.approx(3.0)
    assert hd95(p, p, (3.0, 1.0, 1.0)) == 0.0
    assert hd95(np.zeros(shape, bool), np.zeros(shape, bool), (1, 1, 1)) == 0.0
    assert math.isnan(hd95(p, np.zeros(shape, bool), (1, 1, 1)))


def test_hd95_slab_in_cube_hand_computed():
    # GT: 4x4x4 cube (56 surface voxels); pred: its lower 4x4x2 half (all 32 voxels are surface).
    # pred->GT: 28 zeros, 4 ones -> P95 = 1; GT->pred: 28 zeros, 12 ones, 16 twos -> P95 = 2.
    g = _box((8, 8, 8), (2, 6), (2, 6), (2, 6))
    p = _box((8, 8, 8), (2, 6), (2, 6), (2, 4))
    assert hd95(p, g, (1.0, 1.0, 1.0)) == pytest.approx(2.0)
    assert dice(p, g) == pytest.approx(2 / 3)


def test_stats_excludes_undefined_values():
    s = stats([1.0, 3.0, math.nan, None])
    assert (s["mean"], s["std"], s["n"], s["n_excluded"]) == (2.0, 1.0, 2, 2)
    assert stats([math.nan])["mean"] is None


# ---- lesion-wise -----------------------------------------------------------------------------------

def test_lesion_wise_known_lesions():
    shape = (20, 20, 20)
    gt = _box(shape, (2, 5), (2, 5), (2, 5)) | _box(shape, (10, 14), (2, 6), (2, 6)) | _box(shape, (2, 4), (12, 14),
                                                                                              (12, 14))
    pred = (_box(shape, (2, 5), (2, 5), (2, 5))  # lesion A: exact
            | _box(shape, (10, 14), (2, 6), (2, 4))  # lesion B: half of it -> Dice 2/3, HD95 2 (see above)
            | _box(shape, (15, 17), (15, 17), (15, 17)))  # far from everything: a false positive
    r = lesion_wise(pred, gt, (1.0, 1.0, 1.0), LesionConfig(dilation=1, min_volume_mm3=2.0, hd95_penalty_mm=374.0))
    assert (r["n_gt"], r["tp"], r["fn"], r["fp"], r["n_pred"], r["pred_matched"]) == (3, 2, 1, 1, 3, 2)
    assert r["recall"] == pytest.approx(2 / 3)
    assert r["precision"] == pytest.approx(2 / 3)
    assert r["f1"] == pytest.approx(2 / 3)
    by_volume = sorted(r["lesions"], key=lambda x: x["volume_mm3"])  # C (8 voxels, missed), A (27), B (64)
    assert [x["volume_mm3"] for x in by_volume] == [8.0, 27.0, 64.0]
    assert [x["dice"] for x in by_volume] == pytest.approx([0.0, 1.0, 2 / 3])
    assert [x["hd95"] for x in by_volume] == pytest.approx([374.0, 0.0, 2.0])
    assert r["lesion_dice"] == pytest.approx((1 + 2 / 3 + 0) / 4)  # 3 GT lesions + 1 FP
    assert r["lesion_hd95"] == pytest.approx((0 + 2 + 374 + 374) / 4)


def test_lesion_merging_adjacent_match_and_small_lesions():
    shape = (12, 12, 12)
    two = _box(shape, (2, 4), (2, 4), (2, 4)) | _box(shape, (5, 7), (2, 4), (2, 4))  # 1-voxel gap
    assert lesion_wise(two, two, (1, 1, 1), LesionConfig(dilation=1))["n_gt"] == 1  # dilations touch: one lesion
    assert lesion_wise(two, two, (1, 1, 1), LesionConfig(dilation=0))["n_gt"] == 2

    gt = _box(shape, (2, 4), (2, 4), (2, 4))
    beside = _box(shape, (4, 6), (2, 4), (2, 4))  # touches the GT face: inside the dilated lesion, no overlap
    r = lesion_wise(beside, gt, (1, 1, 1))
    assert (r["tp"], r["fp"], r["recall"], r["precision"], r["lesion_dice"]) == (1, 0, 1.0, 1.0, 0.0)

    tiny = np.zeros(shape, bool)
    tiny[9, 9, 9] = True  # 1 mm^3 <= 2 mm^3: ignored, and the prediction on it is not a false positive
    r = lesion_wise(gt | tiny, gt | tiny, (1, 1, 1))
    assert (r["n_gt"], r["n_gt_ignored"], r["fp"], r["lesion_dice"]) == (1, 1, 0, 1.0)
    empty = np.zeros(shape, bool)
    r = lesion_wise(empty, empty, (1, 1, 1))
    assert (r["lesion_dice"], r["lesion_hd95"], r["f1"]) == (1.0, 0.0, 1.0)


# ---- per case: classes, BraTS regions, cross-domain FPs -----------------------------------------------

def test_brats_regions_and_classes():
    gt = np.array([0, 2, 2, 1, 3, 3, 1, 2, 0, 0]).reshape(1, 1, 10)
    pred = np.array([0, 2, 1, 1, 3, 2, 0, 0, 0, 0]).reshape(1, 1, 10)
    r = evaluate_case(pred, gt, (1.0, 1.0, 1.0), "brats", _meta())
    assert r["classes"]["ET"]["dice"] == pytest.approx(2 / 3)
    assert r["classes"]["NETC"]["dice"] == pytest.approx(1 / 2)
    assert r["classes"]["SNFH"]["dice"] == pytest.approx(2 / 5)
    assert r["regions"]["TC"]["dice"] == pytest.approx(4 / 7)
    assert r["regions"]["WT"]["dice"] == pytest.approx(5 / 6)
    assert r["mean_dice"] == pytest.approx((2 / 3 + 1 / 2 + 2 / 5) / 3)
    assert set(r["lesions"]) == {"NETC", "SNFH", "ET", "TC", "WT"}
    assert headline_lesion_target(_meta().domains["brats"]) == "WT"
    assert r["lesions"]["WT"]["tp"] == 1 and r["cross_domain_fp"]["voxels"] == 0


def test_cross_domain_false_positives():
    meta = _meta()
    pred = np.zeros((6, 10, 10), dtype=np.int32)
    pred[0, 0, 0:2] = 3  # 'mets.ET' is identical to 'brats.ET' (shared id): not foreign for mets
    pred[1, 1:6, 1] = 1  # brats.NETC: 5 voxels
    pred[1, 6, 1] = 5  # liver.liver touching them: same component
    pred[4, 7:9, 8] = 6  # liver.tumor elsewhere: 2 voxels, second component
    r = cross_domain_fp(pred, "mets", meta, (2.0, 1.0, 1.0))
    assert (r["voxels"], r["lesions"]) == (8, 2)
    assert r["ml"] == pytest.approx(8 * 2.0 / 1000)
    assert r["by_label"] == {"brats.NETC": 5, "liver.liver": 1, "liver.tumor": 2}
    assert cross_domain_fp(pred, "brats", meta, (1, 1, 1))["voxels"] == 3  # ids 5, 6


def test_summarize_pools_detection_and_routing():
    meta = _meta()
    shape = (1, 12, 12)
    gt = np.zeros(shape, np.int32)
    gt[0, 1:3, 1:3] = 4
    gt[0, 8:10, 8:10] = 4
    hit = np.where(_box(shape, (0, 1), (1, 3), (1, 3)), 4, 0)  # finds one of two lesions
    c1 = {"case": "a", **evaluate_case(hit, gt, (1, 1, 1), "mets", meta),
          "routing": {"mode": "dataset-free", "inferred_domain": "mets"}}
    c2 = {"case": "b", **evaluate_case(gt, gt, (1, 1, 1), "mets", meta),
          "routing": {"mode": "dataset-free", "inferred_domain": "brats"}}
    s = summarize([c1, c2], meta)
    les = s["domains"]["mets"]["lesions"]["met"]
    assert (les["tp"], les["fn"], les["fp"], les["recall"]) == (3, 1, 0, 0.75)
    assert s["domains"]["mets"]["routing"] == {"n": 2, "correct": 1, "accuracy": 0.5}
    assert s["routing"]["matrix"][s["routing"]["labels"].index("mets")][0] == 1  # mets routed to brats once


# ---- the CLI on a tiny merged dataset ----------------------------------------------------------------

def _write(arr: np.ndarray, path: Path, spacing=(1.0, 1.0, 3.0)) -> None:
    img = sitk.GetImageFromArray(arr.astype(np.uint8))
    img.SetSpacing(spacing)  # (x, y, z): z is the array's first axis
    sitk.WriteImage(img, str(path))


def test_cli_evaluate_end_to_end(nnunet_dirs, tmp_path):
    cases = {"brats_001": "brats", "mets_001": "mets", "liver_001": "liver", "liver_002": "liver"}
    meta = _meta(cases)
    ds = nnunet_dirs["nnUNet_raw"] / "Dataset990_EvalTest"
    (ds / "labelsTr").mkdir(parents=True)
    labels = {"background": 0, "NETC": 1, "SNFH": 2, "ET": 3, "met": 4, "liver": 5, "tumor": 6}
    atomic_write_json({"channel_names": {"0": "T1c", "1": "CT"}, "labels": labels, "numTraining": len(cases),
                       "file_ending": ".nii.gz", "universal": meta.to_dict()}, ds / "dataset.json")
    pred_dir = tmp_path / "pred"
    pred_dir.mkdir()
    shape = (8, 10, 10)  # (z, y, x), z spacing 3 mm
    # brats: GT WT block with ET core; prediction exact except one foreign 'liver' voxel
    g = np.zeros(shape, np.uint8)
    g[2:6, 2:6, 2:6] = 2
    g[3:5, 3:5, 3:5] = 3
    p = g.copy()
    p[7, 9, 9] = 5
    _write(g, ds / "labelsTr" / "brats_001.nii.gz")
    _write(p, pred_dir / "brats_001.nii.gz")
    # mets: two lesions, one found
    g = np.zeros(shape, np.uint8)
    g[1:3, 1:3, 1:3] = 4
    g[5:7, 6:9, 6:9] = 4
    _write(g, ds / "labelsTr" / "mets_001.nii.gz")
    _write(np.where(np.arange(8)[:, None, None] < 4, g, 0), pred_dir / "mets_001.nii.gz")
    # liver: one-voxel-thick sheets one slice apart -> HD95 = 3 mm only if spacing is read in (z, y, x) order
    g = np.zeros(shape, np.uint8)
    g[2, 2:8, 2:8] = 5
    p = np.zeros(shape, np.uint8)
    p[3, 2:8, 2:8] = 5
    _write(g, ds / "labelsTr" / "liver_001.nii.gz")
    _write(p, pred_dir / "liver_001.nii.gz")
    _write(g, ds / "labelsTr" / "liver_002.nii.gz")  # no prediction: listed as missing
    for case, inferred in (("brats_001", "brats"), ("mets_001", "brats"), ("liver_001", "liver")):
        (pred_dir / f"{case}.routing.json").write_text(json.dumps(
            {"case": case, "mode": "dataset-free", "inferred_domain": inferred, "routing": {inferred: 0.9},
             "slots": ["T1c"]}))

    exe = Path(sys.executable).parent / "nnunet-universal"
    proc = subprocess.run([str(exe), "evaluate", str(pred_dir), "-d", "990"], capture_output=True, text=True,
                          env=os.environ.copy(), timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "protocol nnunet-universal" in proc.stdout and "| brats | 1 |" in proc.stdout  # the table is printed
    out = pred_dir / "evaluation"
    m = json.loads((out / "metrics.json").read_text())
    md = (out / "metrics.md").read_text()
    for png in ("dice_boxplots.png", "routing_confusion.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    d = m["domains"]
    assert m["n_cases"] == 3 and m["missing_predictions"] == ["liver_002"]
    assert d["brats"]["classes"]["ET"]["dice"]["mean"] == 1.0
    assert d["brats"]["regions"]["WT"]["dice"]["mean"] == 1.0
    assert d["brats"]["cross_domain_fp"]["voxels_total"] == 1
    assert d["brats"]["cross_domain_fp"]["ml_total"] == pytest.approx(3 / 1000)
    assert d["mets"]["lesions"]["met"]["recall"] == 0.5 and d["mets"]["lesions"]["met"]["fp"] == 0
    assert d["mets"]["lesions"]["met"]["lesion_dice"]["mean"] == pytest.approx(0.5)
    assert d["liver"]["classes"]["liver"]["dice"]["mean"] == 0.0
    assert d["liver"]["classes"]["liver"]["hd95"]["mean"] == pytest.approx(3.0)
    assert d["liver"]["classes"]["tumor"]["hd95"]["mean"] == 0.0  # both empty
    assert d["mets"]["routing"]["accuracy"] == 0.0 and m["routing"]["accuracy"] == pytest.approx(2 / 3)
    assert "| brats | 1 |" in md and "cross-domain FP" in md and "liver_002" in md
    assert "## Routing (dataset-free, 3 cases" in md
    assert m["protocol"] == "nnunet-universal" and "Protocol: nnunet-universal" in md
    assert m["lesion_protocol"] == "brats2023" and m["lesion_protocol_detail"].startswith("brats2023 (")
    assert "lesion-wise protocol: brats2023 (" in md and "Lesion-wise: protocol brats2023" in md
    assert "lesion-wise protocol brats2023" in proc.stdout

    # --protocol brats2024 needs the optional extra; without it: exit 2 and how to install it, nothing written
    from nnunet_universal.evaluation.brats2024 import available

    if not available():
        proc = subprocess.run([str(exe), "evaluate", str(pred_dir), "-d", "990", "--protocol", "brats2024", "-o",
                               str(tmp_path / "b24")], capture_output=True, text=True, env=os.environ.copy(),
                              timeout=120)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        assert "pip install 'nnunet-universal[brats2024]'" in proc.stderr and "numpy<2.3" in proc.stderr
        assert not (tmp_path / "b24").exists()
    assert "MONAI" in md and "n/a" in md and "HD95 374 mm" in md


def test_evaluate_errors_name_the_problem(nnunet_dirs, tmp_path):
    ds = nnunet_dirs["nnUNet_raw"] / "Dataset991_EvalErr"
    (ds / "labelsTr").mkdir(parents=True)
    meta = _meta({"mets_001": "mets"})
    atomic_write_json({"channel_names": {"0": "T1c", "1": "CT"}, "labels": {"background": 0, "ET": 3, "met": 4,
                       "NETC": 1, "SNFH": 2, "liver": 5, "tumor": 6}, "numTraining": 1, "file_ending": ".nii.gz",
                       "universal": meta.to_dict()}, ds / "dataset.json")
    _write(np.zeros((4, 4, 4)), ds / "labelsTr" / "mets_001.nii.gz")
    pred = tmp_path / "p"
    pred.mkdir()
    _write(np.zeros((4, 4, 4)), pred / "other.nii.gz")
    with pytest.raises(FileNotFoundError, match="has a ground truth"):
        evaluate(pred, dataset_id=991)
    _write(np.zeros((4, 4, 5)), pred / "mets_001.nii.gz")
    with pytest.raises(ValueError, match="case mets_001.*shape"):
        evaluate(pred, dataset_id=991)


# ---- plots -------------------------------------------------------------------------------------------

def _liver_cases() -> list[dict]:
    """Two LiTS-like cases whose 'liver' region (liver + tumour) scores differently from the 'liver' class."""
    def case(cls_liver, reg_liver):
        return {"domain": "liver", "classes": {"liver": {"dice": cls_liver}, "tumor": {"dice": 0.5}},
                "regions": {"liver": {"dice": reg_liver}, "tumor": {"dice": 0.4}}}
    return [case(0.1, 0.9), case(0.2, 0.8)]


def test_boxplots_draw_regions_from_region_values():
    from nnunet_universal.evaluation.plots import boxplot_series

    assert boxplot_series(_liver_cases()) == [("liver", [0.1, 0.2]), ("tumor", [0.5, 0.5]),
                                              ("liver (region)", [0.9, 0.8]), ("tumor (region)", [0.4, 0.4])]


def test_plots_ignore_global_matplotlib_settings(tmp_path):
    """nnU-Net's progress plot sets rcParams (font size 18) in the training process; our PNGs must not change."""
    import matplotlib

    from nnunet_universal.evaluation.plots import dice_boxplots, routing_confusion_plot
    from nnunet_universal.trainers.progress import plot_domain_progress

    confusion = {"labels": ["brats_mets", "ucsf_bmsr", "lits"], "matrix": [[2, 0, 0], [1, 2, 0], [0, 0, 2]], "n": 7,
                 "accuracy": 6 / 7}
    log = {"mean_fg_dice": [0.1, 0.3, 0.4], "ema_fg_dice": [0.1, 0.12, 0.15], "gate_accuracy": [0.5, 1.0, 1.0],
           "dice_per_domain": [[0.1, 0.2], [0.3, 0.4], [0.35, 0.5]]}

    def draw(folder: Path) -> list[bytes]:
        folder.mkdir()
        files = [dice_boxplots(_liver_cases(), ["liver"], folder / "dice_boxplots.png"),
                 routing_confusion_plot(confusion, folder / "routing_confusion.png"),
                 Path(plot_domain_progress(log, ["brats_mets", "lits"], str(folder)))]
        return [f.read_bytes() for f in files]

    clean = draw(tmp_path / "clean")
    with matplotlib.rc_context():
        matplotlib.rc("font", weight="normal", size=18)  # what nnU-Net's LocalLogger.plot_progress_png does
        matplotlib.rcParams["figure.autolayout"] = True
        leaked = draw(tmp_path / "leaked")
        assert matplotlib.rcParams["font.size"] == 18  # and the caller's settings are restored afterwards
    assert leaked == clean


def test_nnunet_style_summary_has_means_and_cases():
    from nnunet_universal.trainers.final_validation import nnunet_style_summary

    meta = _meta()
    gt = np.zeros((1, 4, 10), np.int32)
    gt[0, 0, :4] = 5
    pred = gt.copy()
    pred[0, 0, 3] = 0
    cases = [{"case": "l1", **evaluate_case(pred, gt, (1, 1, 1), "liver", meta)},
             {"case": "l2", **evaluate_case(gt, gt, (1, 1, 1), "liver", meta)}]
    s = nnunet_style_summary(summarize(cases, meta))
    assert s["mean"]["5"]["Dice"] == pytest.approx((6 / 7 + 1) / 2) and s["mean"]["5"]["n"] == 2
    assert s["mean"]["6"] == {"Dice": 1.0, "HD95": 0.0, "n": 2}  # tumour empty in both: Dice 1, HD95 0
    assert [pc["case"] for pc in s["metric_per_case"]] == ["l1", "l2"]
    assert s["metric_per_case"][0]["metrics"]["5"]["Dice"] == pytest.approx(6 / 7)
    assert s["foreground_mean"]["Dice"] == pytest.approx(((6 / 7 + 1) / 2 + 1) / 2)
