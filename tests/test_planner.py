"""UniversalPlanner on a hand-written merged dataset (one CT domain, two MR domains with different slot sets).

One real ``nnunet-universal plan`` run (subprocess, with ``--verify``) is shared by the module; the other tests
plan tiny datasets in-process.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from merged_fixture import SLOTS, make_merged_dataset

from nnunet_universal.metadata import NETWORK_CLASS, PLANS_NAME, MetadataError, NetworkOptions, read_plans_universal
from nnunet_universal.planners.fingerprint import SAMPLES_ENV

BUDGET = 30000  # per-slot foreground sample budget (nnU-Net's is 1e8); small for speed
DATASET_ID = 990


def _cli() -> str:
    exe = Path(sys.executable).parent / "nnunet-universal"
    return str(exe) if exe.exists() else shutil.which("nnunet-universal")


@pytest.fixture(scope="module")
def planned(tmp_path_factory):
    """The fixture dataset planned and preprocessed (2d, 3d_fullres) by the real CLI."""
    root = tmp_path_factory.mktemp("nnunet")
    dirs = {k: root / k for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")}
    for d in dirs.values():
        d.mkdir()
    raw = make_merged_dataset(dirs["nnUNet_raw"], DATASET_ID)
    env = {**os.environ, **{k: str(v) for k, v in dirs.items()}, SAMPLES_ENV: str(BUDGET), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([_cli(), "plan", "-d", str(DATASET_ID), "-c", "2d", "3d_fullres", "-np", "1", "--verify"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    pre = dirs["nnUNet_preprocessed"] / raw.name
    return {"raw": raw, "pre": pre, "stdout": proc.stdout,
            "dataset_json": json.loads((raw / "dataset.json").read_text()),
            "plans": json.loads((pre / f"{PLANS_NAME}.json").read_text()),
            "fingerprint": json.loads((pre / "dataset_fingerprint.json").read_text())}


def _read(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def test_cli_writes_plans_and_integrity_check_passes(planned):
    assert "verify_dataset_integrity Done" in planned["stdout"]
    assert f"{PLANS_NAME}.json" in planned["stdout"]
    for cfg in ("2d", "3d_fullres"):
        assert len(list((planned["pre"] / f"{PLANS_NAME}_{cfg}").glob("*.b2nd"))) == 2 * 9  # data + seg per case


def test_ct_statistics_are_a_hand_computation_over_ct_cases_only(planned):
    """nnU-Net's rule (foreground voxels, RandomState(1234), sampling with replacement), on CT cases only."""
    raw, ct = planned["raw"], SLOTS.index("CT")
    ct_cases = sorted(k for k, c in planned["dataset_json"]["universal"]["cases"].items() if "CT" in c["slots"])
    assert len(ct_cases) == 3
    n = int(BUDGET // len(ct_cases))
    samples = []
    for case in ct_cases:
        image = _read(raw / "imagesTr" / f"{case}_{ct:04d}.nii.gz")
        label = _read(raw / "labelsTr" / f"{case}.nii.gz")
        samples.append(np.random.RandomState(1234).choice(image[label > 0], n, replace=True))
    samples = np.concatenate(samples)
    got = planned["fingerprint"]["foreground_intensity_properties_per_channel"][str(ct)]
    np.testing.assert_allclose(got["mean"], np.mean(samples), rtol=1e-6)
    np.testing.assert_allclose(got["std"], np.std(samples), rtol=1e-6)
    np.testing.assert_allclose(got["percentile_00_5"], np.percentile(samples, 0.5), rtol=1e-6)
    np.testing.assert_allclose(got["percentile_99_5"], np.percentile(samples, 99.5), rtol=1e-6)
    # the plans carry these statistics for CTNormalization
    assert planned["plans"]["foreground_intensity_properties_per_channel"][str(ct)] == got
    assert planned["fingerprint"]["universal_cases_per_slot"] == {"T1": 3, "T1c": 6, "T2": 3, "FLAIR": 6, "CT": 3}


def test_stock_analysis_would_pollute_ct_statistics(planned):
    """What the availability-aware fingerprint avoids: stock nnU-Net samples the zero-filled CT of MR cases."""
    from nnunetv2.experiment_planning.dataset_fingerprint.fingerprint_extractor import DatasetFingerprintExtractor
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    raw, ct = planned["raw"], SLOTS.index("CT")
    files = [str(raw / "imagesTr" / f"mr_b_000_{c:04d}.nii.gz") for c in range(len(SLOTS))]
    stock = DatasetFingerprintExtractor.analyze_case(files, str(raw / "labelsTr" / "mr_b_000.nii.gz"), SimpleITKIO,
                                                     num_samples=100)
    assert len(stock[2][ct]) == 100 and np.all(np.asarray(stock[2][ct]) == 0)
    got = planned["fingerprint"]["foreground_intensity_properties_per_channel"][str(ct)]
    assert got["min"] > 20 and got["percentile_00_5"] > 20  # liver/tumour HU only, no zeros


def test_missing_slots_after_preprocessing(planned):
    """A missing MR slot is all zeros; a missing CT slot is the constant CTNormalization gives to 0 HU."""
    from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2

    ct = SLOTS.index("CT")
    s = planned["plans"]["foreground_intensity_properties_per_channel"][str(ct)]
    ct_of_zero = (np.clip(0.0, s["percentile_00_5"], s["percentile_99_5"]) - s["mean"]) / s["std"]
    cases = planned["dataset_json"]["universal"]["cases"]
    for cfg in ("2d", "3d_fullres"):
        ds = nnUNetDatasetBlosc2(str(planned["pre"] / f"{PLANS_NAME}_{cfg}"))
        for case, info in cases.items():
            data = np.asarray(ds.load_case(case)[0][:])
            for c, slot in enumerate(SLOTS):
                ch = data[c]
                if slot in info["slots"]:
                    assert ch.std() > 0.1, (cfg, case, slot)
                elif slot == "CT":
                    np.testing.assert_allclose(ch, ct_of_zero, rtol=1e-5, atol=1e-5, err_msg=f"{cfg} {case}")
                else:
                    assert np.all(ch == 0), (cfg, case, slot)


def test_plans_hold_universal_block_and_stock_names(planned):
    plans = planned["plans"]
    assert plans["plans_name"] == PLANS_NAME
    assert {"2d", "3d_fullres"} <= set(plans["configurations"])
    for cfg in ("2d", "3d_fullres"):
        c = plans["configurations"][cfg]
        assert c["preprocessor_name"] == "DefaultPreprocessor"
        assert c["architecture"]["network_class_name"].endswith(".PlainConvUNet")
        assert c["normalization_schemes"] == ["ZScoreNormalization"] * 4 + ["CTNormalization"]
        assert c["resampling_fn_data"] == "resample_data_or_seg_to_shape"
    assert plans["label_manager"] == "LabelManager" and plans["image_reader_writer"] == "SimpleITKIO"
    block = plans["universal"]
    assert block["network_class"] == NETWORK_CLASS
    assert block["slot_normalization"]["CT"] == "CTNormalization"
    assert block["slot_normalization"]["T1c"] == "ZScoreNormalization"
    meta, options = read_plans_universal(plans)
    assert meta.slots == SLOTS
    assert meta.domains["mr_b"].labels == {"NETC": 2, "SNFH": 3, "ET": 4}
    assert meta.domains["mr_b"].regions["WT"] == ["NETC", "SNFH", "ET"]
    assert meta.domains["ct"].labels == {"liver": 5, "tumor": 6}
    assert meta.num_union_labels() == len(planned["dataset_json"]["labels"]) == 7
    assert options == NetworkOptions()
    # the block travels with the preprocessed dataset.json too (nnU-Net copies it verbatim)
    copied = json.loads((planned["pre"] / "dataset.json").read_text())
    assert copied["universal"] == planned["dataset_json"]["universal"]


def test_ensure_universal_plans_derives_the_block(planned):
    from nnunet_universal.planners.plans_block import ensure_universal_plans

    plain = {k: v for k, v in planned["plans"].items() if k != "universal"}
    derived = ensure_universal_plans(plain, planned["dataset_json"])
    assert derived["universal"] == planned["plans"]["universal"]
    assert "universal" not in plain  # input untouched
    kept = ensure_universal_plans(planned["plans"], {})  # a block present is kept; dataset.json not needed
    assert kept == planned["plans"] and kept is not planned["plans"]
    with pytest.raises(MetadataError, match="nnunet-universal"):
        ensure_universal_plans(plain, {k: v for k, v in planned["dataset_json"].items() if k != "universal"})
    swapped = json.loads(json.dumps(planned["dataset_json"]))
    swapped["channel_names"]["0"], swapped["channel_names"]["1"] = "T1c", "T1"
    with pytest.raises(MetadataError, match="channel_names"):
        ensure_universal_plans(plain, swapped)


def test_resenc_preset_and_target_spacing_in_process(nnunet_dirs, monkeypatch):
    """ResEnc-M preset gets its own plans name, architecture and preprocessed folder (not stock nnU-Net's
    ``nnUNetPlans_3d_fullres``); --target-spacing overrides; n_proc_DA=0 is safe."""
    from nnunet_universal.planners.api import plan_and_preprocess

    monkeypatch.setenv(SAMPLES_ENV, "3000")
    monkeypatch.setenv("nnUNet_n_proc_DA", "0")
    make_merged_dataset(nnunet_dirs["nnUNet_raw"], 991, cases_per_domain=1, shape=(12, 16, 16))
    files = plan_and_preprocess(991, configurations=["3d_fullres"], preset="resenc-m", num_processes=1,
                                target_spacing=(1.5, 1.0, 1.0))
    assert os.environ["nnUNet_n_proc_DA"] == "0"  # restored
    assert [f.name for f in files] == ["nnUNetUniversalResEncUNetMPlans.json"]
    plans = json.loads(files[0].read_text())
    assert plans["configurations"]["3d_fullres"]["spacing"] == [1.5, 1.0, 1.0]
    assert plans["configurations"]["3d_fullres"]["architecture"]["network_class_name"].endswith(
        ".ResidualEncoderUNet")
    assert plans["experiment_planner_used"] == "UniversalPlannerResEncM"
    name = "nnUNetUniversalResEncUNetMPlans"
    assert {c: v["data_identifier"] for c, v in plans["configurations"].items() if "data_identifier" in v} == {
        c: f"{name}_{c}" for c, v in plans["configurations"].items() if "data_identifier" in v}
    pre = files[0].parent
    assert len(list((pre / f"{name}_3d_fullres").glob("*.b2nd"))) == 2 * 3  # data + seg per case
    assert not (pre / "nnUNetPlans_3d_fullres").exists()
    assert read_plans_universal(plans)[0].slots == SLOTS


def test_missing_slot_with_data_is_rejected(nnunet_dirs, monkeypatch):
    from nnunet_universal.planners.fingerprint import UniversalFingerprintExtractor

    monkeypatch.setenv(SAMPLES_ENV, "3000")
    raw = make_merged_dataset(nnunet_dirs["nnUNet_raw"], 992, cases_per_domain=2, shape=(8, 10, 10))
    dj = json.loads((raw / "dataset.json").read_text())
    dj["universal"]["cases"]["mr_b_000"]["slots"] = ["T1c", "T2", "FLAIR"]  # T1 holds data but is declared missing
    (raw / "dataset.json").write_text(json.dumps(dj))
    with pytest.raises(MetadataError, match=r"mr_b_000.*T1"):
        UniversalFingerprintExtractor(992, num_processes=1).run(overwrite_existing=True)


def test_plan_rejects_channel_names_that_are_not_the_slots(nnunet_dirs):
    from nnunet_universal.planners.api import plan_and_preprocess

    raw = make_merged_dataset(nnunet_dirs["nnUNet_raw"], 993, cases_per_domain=1, shape=(8, 10, 10))
    dj = json.loads((raw / "dataset.json").read_text())
    dj["channel_names"]["4"] = "zscore"
    (raw / "dataset.json").write_text(json.dumps(dj))
    with pytest.raises(MetadataError, match="channel_names"):
        plan_and_preprocess(993, num_processes=1)
    assert not (nnunet_dirs["nnUNet_preprocessed"] / raw.name).exists()  # failed before any work


def test_fp_samples_env_new_name_and_deprecated_old_name(monkeypatch):
    from nnunet_universal.planners.fingerprint import sample_budget_from_env

    monkeypatch.delenv("NNUNET_UNIVERSAL_FP_SAMPLES", raising=False)
    monkeypatch.delenv("nnUNet_universal_fp_samples", raising=False)
    assert sample_budget_from_env() is None
    monkeypatch.setenv("NNUNET_UNIVERSAL_FP_SAMPLES", "5000")
    assert sample_budget_from_env() == 5000.0
    monkeypatch.setenv("nnUNet_universal_fp_samples", "7000")
    with pytest.warns(DeprecationWarning, match="NNUNET_UNIVERSAL_FP_SAMPLES"):
        assert sample_budget_from_env() == 5000.0  # the new name wins
    monkeypatch.delenv("NNUNET_UNIVERSAL_FP_SAMPLES")
    with pytest.warns(DeprecationWarning, match="nnUNet_universal_fp_samples is deprecated"):
        assert sample_budget_from_env() == 7000.0  # the old name still works


def test_a_changed_split_after_planning_is_refused_with_a_message(tmp_path):
    """Re-merging after planning changes splits_final.json; nnU-Net's planner would stop with a bare AssertionError."""
    from nnunet_universal.planners.api import check_splits_unchanged

    raw, pre = tmp_path / "raw_splits.json", tmp_path / "pre_splits.json"
    fold = {"train": ["a", "b"], "val": ["c"]}
    raw.write_text(json.dumps([fold]))
    check_splits_unchanged(raw, pre)  # nothing planned yet
    pre.write_text(json.dumps([fold, {"train": ["a", "c"], "val": ["b"]}]))
    check_splits_unchanged(raw, pre)  # same folds (the planned file may hold more)
    raw.write_text(json.dumps([{"train": ["a"], "val": ["b", "c"]}]))
    with pytest.raises(ValueError, match=r"fold 0.*re-merged.*Delete .*pre_splits.json"):
        check_splits_unchanged(raw, pre)
