"""``--protocol brats2024``: our lesion-wise numbers equal the official BraTS 2024+ package called directly.

Skipped where ``brats-evaluation`` is not importable (it pins numpy<2.3: the main environment and CI do not have
it). Run it in an environment with the extra, e.g.::

    python -m venv /tmp/brats && /tmp/brats/bin/pip install brats-evaluation SimpleITK pytest cc3d scipy
    PYTHONPATH=. /tmp/brats/bin/python -m pytest -q tests/test_brats2024.py

The official path is the package's own: NIfTI files in the BraTS label convention (1 NETC, 2 SNFH, 3 ET, 1 mm
isotropic), ``evaluate_single_exam`` with a bundled config, and the official parser on its JSON.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest

from nnunet_universal.evaluation import brats2024

if not brats2024.available():
    pytest.skip("brats-evaluation (optional extra 'brats2024') is not importable here", allow_module_level=True)

sitk = pytest.importorskip("SimpleITK")

from nnunet_universal.evaluation.report import evaluate_case, summarize, to_markdown  # noqa: E402
from nnunet_universal.metadata import CaseInfo, DomainInfo, UniversalMeta  # noqa: E402

SHAPE = (24, 24, 24)
BRATS_LABELS = {"NETC": 1, "SNFH": 2, "ET": 3}
REGIONS = {"TC": ["NETC", "ET"], "WT": ["NETC", "SNFH", "ET"]}


def _meta() -> UniversalMeta:
    """A metastasis domain (auto parser: mets) and a glioma one (auto parser: seg), BraTS ids, plus a CT domain
    whose id 5 appears in predictions as a cross-domain false positive."""
    domains = {
        "brats_mets": DomainInfo(source="BraTS-METS", slots=["T1c"], labels=dict(BRATS_LABELS), regions=REGIONS,
                                 lesion_wise=True),
        "brats_gli": DomainInfo(source="BraTS-GLI", slots=["T1c"], labels=dict(BRATS_LABELS), regions=REGIONS,
                                lesion_wise=True),
        "liver": DomainInfo(source="LiTS", slots=["CT"], labels={"liver": 5}, modality="CT"),
    }
    return UniversalMeta(slots=["T1c", "CT"], domains=domains,
                         cases={"c": CaseInfo(domain="brats_mets", slots=["T1c"])})


def _put(arr: np.ndarray, label: int, z: tuple[int, int], y: tuple[int, int], x: tuple[int, int]) -> None:
    arr[z[0]:z[1], y[0]:y[1], x[0]:x[1]] = label


def _cases() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """name -> (prediction, ground truth), BraTS label ids."""
    out = {}
    # missed lesion: two ET lesions with SNFH around one, the prediction finds one
    gt = np.zeros(SHAPE, np.int32)
    _put(gt, 2, (2, 9), (2, 9), (2, 9))
    _put(gt, 3, (4, 7), (4, 7), (4, 7))
    _put(gt, 3, (14, 18), (14, 18), (14, 18))
    pred = np.zeros_like(gt)
    _put(pred, 2, (2, 9), (2, 9), (3, 9))
    _put(pred, 3, (4, 7), (4, 7), (4, 8))
    out["missed"] = (pred, gt)
    # false positive: an exact lesion and a far-away predicted one (partly the foreign CT label 5)
    gt = np.zeros(SHAPE, np.int32)
    _put(gt, 3, (3, 7), (3, 7), (3, 7))
    pred = gt.copy()
    _put(pred, 1, (15, 19), (15, 19), (15, 19))
    _put(pred, 5, (20, 22), (20, 22), (20, 22))
    out["false_positive"] = (pred, gt)
    # tiny lesion (2x2x2 = 8 mm³ < 20 mm³, detected) next to a large one (half found)
    gt = np.zeros(SHAPE, np.int32)
    _put(gt, 3, (2, 8), (2, 8), (2, 8))
    _put(gt, 3, (15, 17), (15, 17), (15, 17))
    pred = np.zeros_like(gt)
    _put(pred, 3, (2, 8), (2, 8), (2, 5))
    _put(pred, 3, (15, 17), (15, 17), (15, 16))
    out["tiny"] = (pred, gt)
    # a tiny lesion missed entirely, nothing else
    gt = np.zeros(SHAPE, np.int32)
    _put(gt, 1, (10, 12), (10, 12), (10, 13))
    out["tiny_missed"] = (np.zeros_like(gt), gt)
    # empty ground truth, one predicted lesion; and both empty
    gt = np.zeros(SHAPE, np.int32)
    pred = np.zeros_like(gt)
    _put(pred, 3, (5, 9), (5, 9), (5, 9))
    out["empty_gt"] = (pred, gt)
    out["both_empty"] = (np.zeros_like(gt), gt)
    return out


def _official(pred: np.ndarray, gt: np.ndarray, config: str, parser: str, tmp: Path) -> dict[str, str]:
    """The package's own pipeline on files: evaluate_single_exam + the official parser; its CSV row."""
    from brats_evaluation import config_path, evaluate_single_exam
    from brats_evaluation.metrics_parser import parse_mets_results, parse_seg_results
    from panoptica import Panoptica_Evaluator

    tmp.mkdir(parents=True, exist_ok=True)
    for name, arr in (("pred", pred), ("ref", gt)):
        img = sitk.GetImageFromArray(np.where(arr == 5, 0, arr).astype(np.uint8))  # BraTS files have no id 5
        img.SetSpacing((1.0, 1.0, 1.0))
        sitk.WriteImage(img, str(tmp / f"{name}.nii.gz"))
    evaluator = Panoptica_Evaluator.load_from_config(str(config_path(config)))
    res = evaluate_single_exam(str(tmp / "pred.nii.gz"), str(tmp / "ref.nii.gz"), "case", evaluator)
    assert "error" not in res, res
    (tmp / "summary.json").write_text(json.dumps({"metrics": [res], "missings": []}, default=float))
    if parser == "mets":
        parse_mets_results(str(tmp / "summary.json"), 20.0, 0.1, str(tmp / "out.csv"))
    else:
        parse_seg_results(str(tmp / "summary.json"), str(tmp / "out.csv"))
    with open(tmp / "out.csv", newline="") as f:
        return next(csv.DictReader(f))


def _same(ours: float, official: str) -> bool:
    theirs = math.nan if official == "" else float(official)
    return (math.isnan(ours) and math.isnan(theirs)) or ours == pytest.approx(theirs, rel=1e-9, abs=1e-9)


@pytest.mark.parametrize("domain,config,parser", [("brats_mets", "mets", "mets"), ("brats_gli", "gli", "seg")])
def test_protocol_brats2024_equals_official_package(domain, config, parser, tmp_path):
    meta = _meta()
    groups = {"ET": "et", "TC": "tc", "WT": "wt", **({"NETC": "netc", "SNFH": "snfh"} if config == "gli" else {})}
    results = []
    for case, (pred, gt) in _cases().items():
        ours = evaluate_case(pred, gt, (1.0, 1.0, 1.0), domain, meta, lesion_protocol="brats2024")
        row = _official(pred, gt, config, parser, tmp_path / f"{domain}_{case}")
        for target, group in groups.items():
            mine = ours["lesions"][target]
            assert mine["parser"] == parser
            cols = {k[: -len(group) - 1]: v for k, v in row.items() if k.endswith(f"_{group}")}
            assert set(cols) == set(mine) - {"parser"}, (case, target)
            wrong = {k: (mine[k], v) for k, v in cols.items() if not _same(mine[k], v)}
            assert not wrong, (case, target, wrong)
        results.append({"case": case, **ours})

    # hand-checked anchors of the cases (mets parser)
    by_case = {r["case"]: r["lesions"] for r in results}
    if parser == "mets":
        assert by_case["missed"]["ET"]["all_instance_fn"] == 1 and by_case["missed"]["ET"]["all_instance_tp"] == 1
        assert by_case["missed"]["ET"]["lesionwise_dsc_mean"] < 1.0
        assert by_case["false_positive"]["TC"]["all_instance_fp"] == 1
        assert by_case["false_positive"]["TC"]["lesionwise_dsc_mean"] == pytest.approx(0.5)  # (1 + 0) / 2
        assert by_case["false_positive"]["TC"]["lesionwise_hd95_mean"] == pytest.approx(373 / 2)
        assert by_case["tiny"]["ET"]["small_instance_tp"] == 1  # detection only:
        assert by_case["tiny"]["ET"]["lesionwise_dsc_mean"] == pytest.approx(2 * 108 / (216 + 108))  # large only
        assert by_case["tiny_missed"]["NETC"]["small_instance_fn"] == 1
        assert math.isnan(by_case["tiny_missed"]["NETC"]["lesionwise_dsc_mean"])  # no large GT lesion: NaN
        assert math.isnan(by_case["empty_gt"]["ET"]["lesionwise_dsc_mean"])  # no GT lesion: NaN
        assert by_case["empty_gt"]["ET"]["all_instance_fp"] == 1

    # the domain summary and the Markdown name the protocol and carry NSD
    for r in results:
        r["domain"] = domain
    summary = {"protocol": "nnunet-universal", "lesion_protocol": "brats2024",
               "lesion_protocol_detail": brats2024.describe(), **summarize(results, meta)}
    et = summary["domains"][domain]["lesions"]["ET"]
    assert et["protocol"] == "brats2024" and et["parser"] == parser
    assert et["lesion_dice"]["n"] + et["lesion_dice"]["n_excluded"] == len(results)
    md = to_markdown(summary)
    assert "brats2024 (official brats-evaluation" in md and "lesion-wise NSD" in md


def test_anisotropic_spacing_is_passed_per_array_axis():
    """Panoptica gets the spacing per array axis: a lesion of 3x3x3 voxels at 1 x 1 x 3 mm (27 mm³ per 9 voxels)
    is large (27 voxels * 3 mm³ = 81 mm³ >= 20) and scored; at 0.5 mm isotropic (3.4 mm³) it is detection only."""
    meta = _meta()
    gt = np.zeros(SHAPE, np.int32)
    _put(gt, 3, (5, 8), (5, 8), (5, 8))
    big = evaluate_case(gt, gt, (3.0, 1.0, 1.0), "brats_mets", meta, lesion_protocol="brats2024")["lesions"]["ET"]
    small = evaluate_case(gt, gt, (0.5, 0.5, 0.5), "brats_mets", meta, lesion_protocol="brats2024")["lesions"]["ET"]
    assert big["large_instance_tp"] == 1 and big["lesionwise_dsc_mean"] == 1.0
    assert small["small_instance_tp"] == 1 and math.isnan(small["lesionwise_dsc_mean"])


def test_cli_evaluate_protocol_brats2024_writes_and_names_it(nnunet_dirs, tmp_path):
    """``nnunet-universal evaluate --protocol brats2024`` end to end: metrics.json and metrics.md carry the official
    numbers (equal to evaluate_case's) and name the protocol; the default run of the same folder names brats2023."""
    pytest.importorskip("nnunetv2")  # dataset lookup (installed --no-deps next to the extra)
    import os
    import subprocess
    import sys

    from nnunet_universal.metadata import atomic_write_json

    meta = _meta()
    cases = {"mets_001": "missed", "mets_002": "tiny"}
    meta.cases = {c: CaseInfo(domain="brats_mets", slots=["T1c"]) for c in cases}
    ds = nnunet_dirs["nnUNet_raw"] / "Dataset993_Brats2024"
    (ds / "labelsTr").mkdir(parents=True)
    atomic_write_json({"channel_names": {"0": "T1c", "1": "CT"}, "labels": {"background": 0, **BRATS_LABELS,
                       "liver": 5}, "numTraining": len(cases), "file_ending": ".nii.gz",
                       "universal": meta.to_dict()}, ds / "dataset.json")
    pred_dir = tmp_path / "pred"
    pred_dir.mkdir()
    made = _cases()
    for case, which in cases.items():
        for folder, arr in ((pred_dir, made[which][0]), (ds / "labelsTr", made[which][1])):
            img = sitk.GetImageFromArray(arr.astype(np.uint8))
            sitk.WriteImage(img, str(folder / f"{case}.nii.gz"))

    def run(*extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "nnunet_universal.cli", "evaluate", str(pred_dir), "-d", "993",
                               *extra], capture_output=True, text=True, env=os.environ.copy(), timeout=300)

    proc = run("--protocol", "brats2024", "-o", str(tmp_path / "b24"))
    assert proc.returncode == 0, proc.stderr
    assert "lesion-wise protocol brats2024 (official brats-evaluation" in proc.stdout
    m = json.loads((tmp_path / "b24" / "metrics.json").read_text())
    md = (tmp_path / "b24" / "metrics.md").read_text()
    assert m["lesion_protocol"] == "brats2024" and m["brats2024"]["parser"] == "auto"
    assert "lesion-wise protocol: brats2024 (official brats-evaluation" in md and "lesion-wise NSD" in md
    et = m["domains"]["brats_mets"]["lesions"]["ET"]
    per_case = [evaluate_case(made[w][0], made[w][1], (1.0, 1.0, 1.0), "brats_mets", meta,
                              lesion_protocol="brats2024")["lesions"]["ET"] for w in cases.values()]
    assert et["lesion_dice"]["mean"] == pytest.approx(np.mean([x["lesionwise_dsc_mean"] for x in per_case]))
    assert et["tp"] == sum(x["all_instance_tp"] for x in per_case) and et["parser"] == "mets"
    for case in m["cases"]:
        assert case["lesions"]["ET"]["parser"] == "mets"

    proc = run("-o", str(tmp_path / "b23"))
    assert proc.returncode == 0, proc.stderr
    m = json.loads((tmp_path / "b23" / "metrics.json").read_text())
    assert m["lesion_protocol"] == "brats2023" and "parser" not in m["domains"]["brats_mets"]["lesions"]["ET"]
    assert "lesion-wise protocol: brats2023 (" in (tmp_path / "b23" / "metrics.md").read_text()
