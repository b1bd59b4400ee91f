"""Fault injection through the real CLIs: every probe of issue 20, each in a subprocess of ``nnunet-universal``
or a stock ``nnUNetv2_*`` command on tiny synthetic data. An error must be one message naming the file or case
and what to do (exit code 2 for our commands, no traceback); nothing may be accepted silently.

Where each item of issue 20 is driven (``pytest tests/test_faults.py -q`` runs them all):

1. truncated NIfTI: ``test_convert_refuses_truncated_nifti`` (.nii.gz, .nii), ``test_skip_bad_...``,
   ``test_predict_refuses_bad_inputs_and_unsafe_names``, ``test_evaluate_refuses_misplaced_or_truncated_...``
   ``test_plan_verify_refuses_a_truncated_file`` (merge's own check: ``test_merge.py``);
2. a model that runs code: ``test_check_model_and_predict_refuse_a_checkpoint_with_code``,
   ``test_genuine_checkpoint_passes_...``; ``--c`` loads weights only (``test_train_c_with_a_damaged_...``);
3. chained ``--identical``: ``test_chained_identical_is_refused``;
4. ``predict -o`` equal to ``-i``: ``test_predict_refuses_bad_inputs_and_unsafe_names``;
5. ``evaluate`` geometry: ``test_evaluate_refuses_misplaced_or_truncated_predictions``;
6. symlinks and odd names: ``test_label_symlink_...``, ``test_symlinked_lits_volume_...``,
   ``test_ucsf_case_folder_with_a_space_...``, ``test_lits_file_with_an_odd_name_...``;
7. file modes: ``test_written_files_respect_the_umask``, ``test_converted_and_predicted_files_respect_the_umask``;
8. workers left by a killed ``convert -j 2``: ``test_killed_convert_leaves_no_process_and_reruns`` (SIGTERM,
   SIGKILL);
9. messages: ``test_bad_input_dataset_json_names_file_and_key``, ``test_skip_bad_...``,
   ``test_train_c_with_a_damaged_checkpoint_names_it_and_the_fallback``,
   ``test_stock_predict_with_a_missing_channel_file``, NaN input and ``--case-id ..`` in
   ``test_predict_refuses_...``, ``test_negative_holdout_is_refused``, ``test_remerge_over_planned_...``;

and the probes that already passed, so that they stay passing: ``test_convert_rejects`` (bad labels, NaN/Inf,
geometry and 4D mismatches, missing sequences, unsafe ids and path traversal, each listed in the report with its
file), ``test_convert_leaves_sources_untouched_and_reruns_identically``, and the ``kill -9`` probes
``test_interrupted_*`` (convert, merge, predict killed at a file rename; ``train --c`` killed in the middle of
a checkpoint save in ``test_train_c_...``): no half-written file, and the rerun's files equal an uninterrupted
run's byte for byte. The
in-process tests of each validation rule's full message on real native layouts are in ``test_conversion.py``.

Inputs: two tiny nnU-Net raw datasets (3 cases of 6x8x8 voxels each) converted once per module; tiny native trees
of three sources; an untrained but genuine universal model (planned, initialized, saved by nnU-Net's own code).
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from nnunet_universal.cli import main

EXE = Path(sys.executable).parent / "nnunet-universal"
CHAIN = ["brats_mets.ET=ucsf_bmsr.ET", "ucsf_bmsr.ET=brats_mets.NETC"]


def _write(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(sitk.GetImageFromArray(arr), str(path), True)


def _source(folder: Path, channels: dict[str, str], labels: dict[str, int], seed: int) -> Path:
    """A tiny nnU-Net raw dataset (input of 'convert nnunet'): 3 cases, every label value present."""
    rng = np.random.default_rng(seed)
    for c in ("c1", "c2", "c3"):
        lab = np.zeros((6, 8, 8), np.uint8)
        for v in range(1, len(labels)):
            lab[v, 2:5, 2:5] = v
        for i in range(len(channels)):
            _write(folder / "imagesTr" / f"{c}_{i:04d}.nii.gz", rng.normal(size=lab.shape).astype(np.float32))
        _write(folder / "labelsTr" / f"{c}.nii.gz", lab)
    (folder / "dataset.json").write_text(json.dumps({"channel_names": channels, "labels": labels,
                                                     "numTraining": 3, "file_ending": ".nii.gz"}))
    return folder


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict[str, str]:
    """Environment with fresh nnU-Net folders; $nnUNet_raw holds Dataset701 (brats_mets: NETC, ET on T1c) and
    Dataset702 (ucsf_bmsr: ET on T1c, FLAIR)."""
    base = tmp_path_factory.mktemp("faults")
    dirs = {k: base / k for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")}
    for d in dirs.values():
        d.mkdir()
    a = _source(base / "src" / "Dataset801_A", {"0": "T1c"}, {"background": 0, "NETC": 1, "ET": 2}, 0)
    b = _source(base / "src" / "Dataset802_B", {"0": "T1c", "1": "FLAIR"}, {"background": 0, "ET": 1}, 1)
    with pytest.MonkeyPatch.context() as mp:
        for k, d in dirs.items():
            mp.setenv(k, str(d))
        assert main(["convert", "nnunet", str(a), "-d", "701", "--domain", "brats_mets", "-j", "1"]) == 0
        assert main(["convert", "nnunet", str(b), "-d", "702", "--domain", "ucsf_bmsr", "-j", "1"]) == 0
    return {**os.environ, **{k: str(d) for k, d in dirs.items()}, "OMP_NUM_THREADS": "1"}


def cli(env: dict[str, str], *args: object, umask: int = 0o022) -> tuple[int, str]:
    """Run ``nnunet-universal`` in a subprocess; return (exit code, stderr). An error must not be a traceback."""
    proc = subprocess.run([str(EXE), *map(str, args)], env=env, capture_output=True, text=True, timeout=120,
                          umask=umask)
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc.returncode, proc.stderr


def _raw(env: dict[str, str]) -> Path:
    return Path(env["nnUNet_raw"])


def test_chained_identical_is_refused(env):
    rc, err = cli(env, "merge", "-d", 710, "-n", "Chain", 701, 702, "--identical", *CHAIN, "-j", 1)
    assert rc == 2, err
    assert "chain" in err and "domain 'brats_mets'" in err and "NETC" in err and "ucsf_bmsr.ET" in err, err
    assert "What to do" in err
    assert not (_raw(env) / "Dataset710_Chain").exists()


def test_written_files_respect_the_umask(env):
    folder = _raw(env) / "Dataset711_Modes"
    assert cli(env, "merge", "-d", 711, "-n", "Modes", 701, 702, "-j", 1, umask=0o022)[0] == 0
    for name in ("dataset.json", "provenance.json", "splits_final.json"):
        assert stat.S_IMODE((folder / name).stat().st_mode) == 0o644, name
    assert not [p for p in folder.iterdir() if p.name.endswith(".tmp")]
    assert cli(env, "merge", "-d", 711, "-n", "Modes", 701, 702, "-j", 1, umask=0o077)[0] == 0  # rewrites them
    assert stat.S_IMODE((folder / "dataset.json").stat().st_mode) == 0o600


def test_converted_and_predicted_files_respect_the_umask(env, model, tmp_path):
    """convert's dataset.json, images and labels, predict's label maps and routing reports: 0o666 & ~umask."""
    src = _source(tmp_path / "Dataset807_Umask", {"0": "T1c"}, {"background": 0, "ET": 1}, 7)
    assert cli(env, "convert", "nnunet", src, "-d", 733, "-j", 1, umask=0o027)[0] == 0
    folder = _raw(env) / "Dataset733_Umask"
    for p in (folder / "dataset.json", folder / "imagesTr" / "c1_0000.nii.gz", folder / "labelsTr" / "c1.nii.gz"):
        assert stat.S_IMODE(p.stat().st_mode) == 0o640, p
    out = tmp_path / "out"
    rc, err = cli(model["env"], "predict", "-m", model["dir"], "-i", model["inputs"], "-o", out, "-device", "cpu",
                  "--disable-tta", umask=0o027)
    assert rc == 0, err
    for p in (out / "mr_a_000.nii.gz", out / "mr_a_000.routing.json"):
        assert stat.S_IMODE(p.stat().st_mode) == 0o640, p


def test_negative_holdout_is_refused(env):
    rc, err = cli(env, "merge", "-d", 712, "-n", "Neg", 701, "--holdout", -2)
    assert rc == 2 and "--holdout" in err and "-2" in err, err
    assert not (_raw(env) / "Dataset712_Neg").exists()


def test_remerge_over_planned_trained_or_different_dataset(env):
    did, name = 713, "Again"
    folder = _raw(env) / f"Dataset{did}_{name}"
    merge = ["merge", "-d", did, "-n", name, "-j", 1]
    assert cli(env, *merge, 701, 702, "--holdout", 1)[0] == 0
    assert cli(env, *merge, 701, 702, "--holdout", 1)[0] == 0  # same inputs and options: an idempotent rerun

    rc, err = cli(env, *merge, 701, "--holdout", 1)  # other inputs: different labels and channels
    assert rc == 2 and "inputs" in err and "no more ucsf_bmsr.ET" in err and "--force" in err, err
    rc, err = cli(env, *merge, 701, 702, "--holdout", 1, "--identical", "brats_mets.ET=ucsf_bmsr.ET")
    assert rc == 2 and "label id change" in err and "renumber" in err, err
    assert json.loads((folder / "dataset.json").read_text())["labels"] == {
        "background": 0, "brats_mets.NETC": 1, "brats_mets.ET": 2, "ucsf_bmsr.ET": 3}

    pre = Path(env["nnUNet_preprocessed"]) / folder.name
    (pre / "nnUNetUniversalPlans_3d_fullres").mkdir(parents=True)
    (pre / "nnUNetUniversalPlans.json").write_text("{}")
    assert cli(env, *merge, 701, 702, "--holdout", 1)[0] == 0  # planned, but the merge changes nothing
    image = sorted((_raw(env) / "Dataset701_A" / "imagesTr").iterdir())[0]
    st = image.stat()
    os.utime(image, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # reconverted, same bytes: the case is re-linked
    assert cli(env, *merge, 701, 702, "--holdout", 1)[0] == 0
    new_bytes = image.with_name(".new.nii.gz")
    _write(new_bytes, np.ones((6, 8, 8), np.float32))
    os.replace(new_bytes, image)  # reconverted with other bytes
    rc, err = cli(env, *merge, 701, 702, "--holdout", 1)
    assert rc == 2 and "1 case(s) with new content" in err, err
    rc, err = cli(env, *merge, 701, 702, "--holdout", 2)
    assert rc == 2, err
    assert "new content" not in err  # option changes are named first
    for phrase in (str(pre), "nnUNetUniversalPlans.json", "option holdout: 1 -> 2", "held-out cases",
                   f"nnunet-universal plan -d {did}", "--force"):
        assert phrase in err, (phrase, err)

    model = Path(env["nnUNet_results"]) / folder.name / "UniversalTrainer__nnUNetUniversalPlans__3d_fullres"
    (model / "fold_0").mkdir(parents=True)
    rc, err = cli(env, *merge, 701, 702, "--holdout", 2)
    assert rc == 2 and "trained models" in err and "fold_0" in err, err
    assert json.loads((folder / "provenance.json").read_text())["options"]["holdout"] == 1  # untouched

    rc, err = cli(env, *merge, 701, 702, "--holdout", 2, "--force")
    assert rc == 0, err
    assert f"nnunet-universal plan -d {did}" in err  # the warning says what to redo
    assert json.loads((folder / "provenance.json").read_text())["options"]["holdout"] == 2


def test_bad_input_dataset_json_names_file_and_key(env):
    src = _raw(env) / "Dataset703_Broken"
    shutil.copytree(_raw(env) / "Dataset701_A", src)
    dj_path = src / "dataset.json"
    good = json.loads(dj_path.read_text())
    merge = ["merge", "-d", 714, "-n", "FromBroken", 703, "-j", 1]
    try:
        dj_path.write_text(json.dumps(good)[:-20])  # truncated
        rc, err = cli(env, *merge)
        assert rc == 2 and str(dj_path) in err and "not valid JSON" in err, err

        dj_path.write_text(json.dumps({k: v for k, v in good.items() if k != "file_ending"}))
        rc, err = cli(env, *merge)
        assert rc == 2 and str(dj_path) in err and "'file_ending'" in err, err

        case = sorted(good["universal"]["cases"])[0]
        entry = {"images": [f"imagesTr/{case}_0000.nii.gz"]}  # no 'label'
        dj_path.write_text(json.dumps({**good, "dataset": {case: entry}}))
        rc, err = cli(env, *merge)
        assert rc == 2 and str(dj_path) in err and "'label'" in err and repr(case) in err, err
        assert not (_raw(env) / "Dataset714_FromBroken").exists()
    finally:
        shutil.rmtree(src)


# ---- damaged NIfTI files, symlinks and odd names in 'convert' ---------------------------------------------------

def _truncate(path: Path) -> None:
    """Cut a file short so that SimpleITK still reads it (the tail of a tiny gzip stream; half of a .nii)."""
    data = path.read_bytes()
    path.write_bytes(data[:-20] if path.name.endswith(".gz") else data[: len(data) // 2])


@pytest.mark.parametrize("ending", [".nii.gz", ".nii"])
def test_convert_refuses_truncated_nifti(env, tmp_path, ending):
    """ITK reads a cut-off file with zeros for the missing voxels: the converter must refuse it (gzip trailer /
    header data size), name the file, and with --skip-bad list the case in conversion_report.json."""
    src = _source(tmp_path / "Dataset803_Cut", {"0": "T1c"}, {"background": 0, "ET": 1}, 2)
    if ending == ".nii":
        for p in sorted(src.rglob("*.nii.gz")):
            sitk.WriteImage(sitk.ReadImage(str(p)), str(p.with_name(p.name.replace(".nii.gz", ".nii"))))
            p.unlink()
        dj = json.loads((src / "dataset.json").read_text())
        (src / "dataset.json").write_text(json.dumps({**dj, "file_ending": ".nii"}))
    did = 721 if ending == ".nii.gz" else 722
    cut = src / "labelsTr" / f"c2{ending}"
    _truncate(cut)
    assert not sitk.GetArrayFromImage(sitk.ReadImage(str(cut))).any()  # read without error, labels lost: silent
    rc, err = cli(env, "convert", "nnunet", src, "-d", did, "-j", 1)
    assert rc == 2 and str(cut) in err and "truncated or corrupt" in err and "--skip-bad" in err, err
    rc, err = cli(env, "convert", "nnunet", src, "-d", did, "-j", 1, "--skip-bad")
    assert rc == 0, err
    folder = _raw(env) / f"Dataset{did}_Cut"
    report = json.loads((folder / "conversion_report.json").read_text())
    assert [s["case"] for s in report["skipped"]] == ["c2"] and "truncated" in report["skipped"][0]["problem"]
    assert sorted(json.loads((folder / "dataset.json").read_text())["universal"]["cases"]) == ["c1", "c3"]


def test_skip_bad_with_no_valid_case_points_at_a_written_report(env, tmp_path):
    src = _source(tmp_path / "Dataset804_AllBad", {"0": "T1c"}, {"background": 0, "ET": 1}, 3)
    for c in ("c1", "c2", "c3"):
        _truncate(src / "labelsTr" / f"{c}.nii.gz")
    rc, err = cli(env, "convert", "nnunet", src, "-d", 725, "-j", 1, "--skip-bad")
    report = _raw(env) / "Dataset725_AllBad" / "conversion_report.md"
    assert rc == 2 and "no valid case left" in err and str(report) in err and "truncated" in err, err
    assert report.is_file() and all(c in report.read_text() for c in ("c1", "c2", "c3"))


@pytest.fixture(scope="module")
def native(tmp_path_factory) -> dict[str, Path]:
    """Tiny synthetic native trees (2 cases each) of BraTS-METS, LiTS and UCSF-BMSR."""
    from nnunet_universal.synthetic.api import synthesize

    base = tmp_path_factory.mktemp("native")
    tops = {"brats-mets": "ASNR-MICCAI-BraTS2023-MET-Challenge-TrainingData", "lits": "LiTS",
            "ucsf-bmsr": "UCSF-BMSR"}
    for source in tops:
        synthesize(source, base / source, cases=2, seed=0)
    return {s: base / s / top for s, top in tops.items()}


def _tree(native: dict[str, Path], source: str, dest: Path) -> Path:
    shutil.copytree(native[source], dest, symlinks=True)
    return dest


def _skipped(env, did: int, name: str) -> dict[str, str]:
    report = json.loads((_raw(env) / f"Dataset{did}_{name}" / "conversion_report.json").read_text())
    return {s["case"]: s["problem"] for s in report["skipped"]}


def test_label_symlink_outside_the_input_is_refused_like_an_image(env, native, tmp_path):
    tree = _tree(native, "brats-mets", tmp_path / "brats")
    case = sorted(p.name for p in tree.iterdir())[0]
    seg = tree / case / f"{case}-seg.nii.gz"
    shutil.move(seg, tmp_path / "elsewhere-seg.nii.gz")
    seg.symlink_to(tmp_path / "elsewhere-seg.nii.gz")
    rc, err = cli(env, "convert", "brats-mets", tree, "-d", 726, "-j", 1)
    assert rc == 2 and "symlink pointing outside" in err and str(seg) in err, err
    assert cli(env, "convert", "brats-mets", tree, "-d", 726, "-j", 1, "--skip-bad")[0] == 0
    assert "symlink pointing outside" in _skipped(env, 726, "BraTSMETS")[case]
    inside = tmp_path / "brats" / ".real-seg.nii.gz"  # a symlink inside the input is followed (images and labels)
    shutil.move(tmp_path / "elsewhere-seg.nii.gz", inside)
    seg.unlink()
    seg.symlink_to(inside)
    assert cli(env, "convert", "brats-mets", tree, "-d", 726, "-j", 1)[0] == 0


def test_symlinked_lits_volume_is_listed_not_dropped(env, native, tmp_path):
    tree = _tree(native, "lits", tmp_path / "LiTS")
    vol = sorted(tree.glob("volume-*.nii*"))[0]
    shutil.move(vol, tmp_path / vol.name)
    vol.symlink_to(tmp_path / vol.name)
    rc, err = cli(env, "convert", "lits", tree, "-d", 727, "-j", 1)
    assert rc == 2 and "symlink pointing outside" in err and str(vol) in err, err
    assert cli(env, "convert", "lits", tree, "-d", 727, "-j", 1, "--skip-bad")[0] == 0
    num = int(vol.name.split("-")[1].split(".")[0])
    assert "symlink pointing outside" in _skipped(env, 727, "LiTS")[f"LiTS_{num:04d}"]


def test_ucsf_case_folder_with_a_space_is_listed(env, native, tmp_path):
    tree = _tree(native, "ucsf-bmsr", tmp_path / "UCSF-BMSR")
    train = next(p for p in tree.rglob("UCSF_BrainMetastases_TRAIN") if p.is_dir())
    first = sorted(p for p in train.iterdir() if p.is_dir())[0]
    odd = first.with_name(f"{first.name[:-1]} {first.name[-1]}")
    first.rename(odd)
    rc, err = cli(env, "convert", "ucsf-bmsr", tree, "-d", 728, "-j", 1)
    assert rc == 2 and repr(odd.name) in err and "naming" in err, err
    assert cli(env, "convert", "ucsf-bmsr", tree, "-d", 728, "-j", 1, "--skip-bad")[0] == 0
    assert "naming" in _skipped(env, 728, "UCSFBMSR")[odd.name]
    dj = json.loads((_raw(env) / "Dataset728_UCSFBMSR" / "dataset.json").read_text())
    assert dj["universal"]["provenance"]["skipped_cases"] == [odd.name]


# ---- a received model cannot run code; predict inputs -----------------------------------------------------------

class _Payload:
    """What a malicious checkpoint carries: unpickling it runs a shell command (here: creates a marker file)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> dict:
    """A genuine universal model folder without training: the merged fixture planned with the real planner, a tiny
    UniversalTrainer initialized and saved with nnU-Net's own ``save_checkpoint`` (numpy scalars in its logging,
    as after real epochs). Returns paths and the subprocess environment."""
    import torch
    from merged_fixture import make_merged_dataset

    from nnunet_universal.planners.api import plan_and_preprocess
    from nnunet_universal.trainers.universal_trainer import UniversalTrainer

    root = tmp_path_factory.mktemp("model")
    dirs = {k: root / k for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")}
    with pytest.MonkeyPatch.context() as mp:
        for k, v in dirs.items():
            v.mkdir()
            mp.setenv(k, str(v))
        mp.setenv("NNUNET_UNIVERSAL_FP_SAMPLES", "5000")
        raw = make_merged_dataset(dirs["nnUNet_raw"], 991, cases_per_domain=2, shape=(12, 16, 16))
        plan_and_preprocess(991, configurations=["3d_fullres"], num_processes=1)
        pre = dirs["nnUNet_preprocessed"] / raw.name
        plans = json.loads((pre / "nnUNetUniversalPlans.json").read_text())
        arch = plans["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]
        arch["features_per_stage"] = [4 * 2**i for i in range(arch["n_stages"])]
        dataset_json = json.loads((pre / "dataset.json").read_text())
        tr = UniversalTrainer(plans={**plans, "continue_training": False}, configuration="3d_fullres", fold=0,
                              dataset_json=dataset_json, device=torch.device("cpu"))
        tr.initialize()
        log = tr.logger.local_logger.my_fantastic_logging
        log["mean_fg_dice"], log["ema_fg_dice"] = [np.float64(0.5)], [np.float64(0.5)]
        log["train_losses"], log["dice_per_class_or_region"] = [np.float32(0.7)], [[np.float64(0.1)]]
        model_dir = dirs["nnUNet_results"] / raw.name / "UniversalTrainer__nnUNetUniversalPlans__3d_fullres"
        (model_dir / "fold_0").mkdir(parents=True, exist_ok=True)
        tr.save_checkpoint(str(model_dir / "fold_0" / "checkpoint_final.pth"))
    (model_dir / "plans.json").write_text(json.dumps(plans))
    (model_dir / "dataset.json").write_text(json.dumps(dataset_json))
    inputs = root / "inputs"
    inputs.mkdir()
    for f in (raw / "imagesTr").glob("mr_a_000_*.nii.gz"):
        shutil.copy(f, inputs / f.name)
    env = {**os.environ, **{k: str(v) for k, v in dirs.items()}, "OMP_NUM_THREADS": "1", "nnUNet_compile": "f"}
    return {"dir": model_dir, "inputs": inputs, "env": env, "raw": raw}


def _evil_copy(model: dict, dest: Path) -> tuple[Path, Path]:
    """A copy of the model whose checkpoint also carries a payload; returns (model folder, marker file)."""
    import torch

    shutil.copytree(model["dir"], dest)
    ckpt_path = dest / "fold_0" / "checkpoint_final.pth"
    ckpt = torch.load(ckpt_path, weights_only=False)  # our own genuine file
    marker = dest.parent / f"{dest.name}.PWNED"
    torch.save({**ckpt, "extra": _Payload(marker)}, ckpt_path)
    return dest, marker


def test_check_model_and_predict_refuse_a_checkpoint_with_code(model, tmp_path):
    evil, marker = _evil_copy(model, tmp_path / "evil_model")
    ckpt = evil / "fold_0" / "checkpoint_final.pth"
    rc, err = cli(model["env"], "check-model", evil)
    assert rc == 2 and str(ckpt) in err and "system" in err and "not trusted" in err, err
    rc, err = cli(model["env"], "predict", "-m", evil, "-i", model["inputs"], "-o", tmp_path / "out", "-device", "cpu")
    assert rc == 2 and str(ckpt) in err and "not trusted" in err, err
    assert not marker.exists()
    assert not list((tmp_path / "out").glob("*.nii.gz")) if (tmp_path / "out").exists() else True


def test_genuine_checkpoint_passes_and_predicts_like_nnunets_own_loading(model, tmp_path):
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    from nnunet_universal.discovery import set_ext_trainer_env
    from nnunet_universal.inference.predictor import UniversalPredictor

    found = torch.serialization.get_unsafe_globals_in_checkpoint(str(model["dir"] / "fold_0" / "checkpoint_final.pth"))
    assert "numpy._core.multiarray.scalar" in found  # like a trained model's checkpoint: the allow-list is needed
    proc = subprocess.run([str(EXE), "check-model", str(model["dir"])], env=model["env"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.startswith("OK") and "fold_0/checkpoint_final.pth" in proc.stdout
    rc, err = cli(model["env"], "predict", "-m", model["dir"], "-i", model["inputs"], "-o", tmp_path / "out",
                  "-device", "cpu", "--disable-tta")
    assert rc == 0 and (tmp_path / "out" / "mr_a_000.nii.gz").is_file(), err

    safe = UniversalPredictor(device=torch.device("cpu"), allow_tqdm=False, use_mirroring=False)
    safe.initialize_from_trained_model_folder(str(model["dir"]), [0])
    stock = UniversalPredictor(device=torch.device("cpu"), allow_tqdm=False, use_mirroring=False)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("nnUNet_extTrainer", set_ext_trainer_env())
        nnUNetPredictor.initialize_from_trained_model_folder(stock, str(model["dir"]), [0])  # weights_only=False
    stock._read_universal(model["dir"] / "plans.json")
    assert (safe.trainer_name, safe.allowed_mirroring_axes) == (stock.trainer_name, stock.allowed_mirroring_axes)
    assert safe.configuration_manager.configuration == stock.configuration_manager.configuration
    for a, b in zip(safe.list_of_parameters, stock.list_of_parameters, strict=True):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    x = torch.randn(5, 12, 16, 16)
    torch.testing.assert_close(safe.predict_logits_from_preprocessed_data(x),
                               stock.predict_logits_from_preprocessed_data(x), rtol=0, atol=0)


def test_predict_refuses_bad_inputs_and_unsafe_names(model, tmp_path):
    env, m, inputs = model["env"], model["dir"], model["inputs"]
    rc, err = cli(env, "predict", "-m", m, "-i", inputs, "-o", inputs, "-device", "cpu")
    assert rc == 2 and "is the input folder" in err, err
    image = sorted(inputs.iterdir())[0]
    for bad in ("..", ".hidden", "a/b"):
        rc, err = cli(env, "predict", "-m", m, "--image", f"T1c={image}", "--case-id", bad, "-o", tmp_path, "-device",
                      "cpu")
        assert rc == 2 and repr(bad) in err and "not a safe file name" in err, (bad, err)
    rc, err = cli(env, "predict", "-m", m, "--image", f"T1c={image}", "--case-id", image.name[: -len(".nii.gz")],
                  "-o", inputs, "-device", "cpu")
    assert rc == 2 and "would overwrite the input image" in err, err

    nan = tmp_path / "nan_in"
    nan.mkdir()
    arr = sitk.GetArrayFromImage(sitk.ReadImage(str(image))).astype(np.float32)
    arr.flat[:4] = np.nan
    _write(nan / "p1_0001.nii.gz", arr)
    rc, err = cli(env, "predict", "-m", m, "-i", nan, "-o", tmp_path / "o1", "-device", "cpu")
    assert rc == 2 and str(nan / "p1_0001.nii.gz") in err and "4 NaN/Inf voxels" in err, err

    cut = tmp_path / "cut_in"
    cut.mkdir()
    shutil.copy(image, cut / "p2_0001.nii.gz")
    _truncate(cut / "p2_0001.nii.gz")
    rc, err = cli(env, "predict", "-m", m, "-i", cut, "-o", tmp_path / "o2", "-device", "cpu")
    assert rc == 2 and str(cut / "p2_0001.nii.gz") in err and "truncated or corrupt" in err, err
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()


def test_lits_file_with_an_odd_name_is_listed(env, native, tmp_path):
    tree = _tree(native, "lits", tmp_path / "LiTS")
    vol = sorted(tree.glob("volume-*.nii*"))[0]
    odd = vol.with_name(vol.name.replace("volume-", "volume copy-"))
    shutil.copy(vol, odd)
    rc, err = cli(env, "convert", "lits", tree, "-d", 729, "-j", 1)
    assert rc == 2 and str(odd) in err and "naming" in err, err
    assert cli(env, "convert", "lits", tree, "-d", 729, "-j", 1, "--skip-bad")[0] == 0
    assert "naming" in _skipped(env, 729, "LiTS")[odd.name]


# ---- a model with a missing channel file under stock nnUNetv2_predict ------------------------------------------

def _stock(env: dict[str, str], command: str, *args: object, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run a stock ``nnUNetv2_*`` command with our trainers findable (what ``eval "$(nnunet-universal env)"`` sets)."""
    from nnunet_universal.discovery import ext_trainer_value

    return subprocess.run([str(EXE.parent / command), *map(str, args)], capture_output=True, text=True,
                          env={**env, "nnUNet_extTrainer": ext_trainer_value(""), "nnUNet_n_proc_DA": "0"},
                          timeout=timeout)


def test_stock_predict_with_a_missing_channel_file(model, tmp_path):
    """Stock ``nnUNetv2_predict`` stacks the files it finds: with one missing the network gets 4 channels of 5.
    The error must say what the model takes and the file rule, not ``shape '[-1, 6]' is invalid``."""
    inputs = tmp_path / "in"
    shutil.copytree(model["inputs"], inputs)
    files = sorted(inputs.iterdir())
    assert len(files) == 5
    files[-1].unlink()
    proc = _stock(model["env"], "nnUNetv2_predict", "-i", inputs, "-o", tmp_path / "out", "-d", 991, "-c",
                  "3d_fullres", "-tr", "UniversalTrainer", "-p", "nnUNetUniversalPlans", "-f", 0, "-device", "cpu",
                  "-npp", 1, "-nps", 1, "--disable_tta")
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("ValueError") and "takes (B, 5, *spatial)" in last, proc.stderr[-3000:]
    assert "CASE_0000 ... CASE_0004" in last and "nnunet-universal predict" in last, last
    assert "is invalid for input of size" not in proc.stderr
    assert not list((tmp_path / "out").glob("*.nii.gz")) if (tmp_path / "out").exists() else True


# ---- resuming a training (--c) from a damaged checkpoint; a kill during a checkpoint save -----------------------

#: Runs ``nnunet-universal ARGS`` with a fault injected: ``kill -9`` of the process at the N-th ``os.replace`` (every
#: atomic write ends with one) or in the middle of the first ``torch.save`` (half the bytes written); optionally
#: counts the renames of an uninterrupted run.
_FAULT_RUNNER = r"""
import atexit, io, os, signal, sys
kill_at = int(os.environ.get("FAULT_KILL_AT_RENAME", "0"))
renames = 0
_replace = os.replace
def replace(src, dst, *args, **kwargs):
    global renames
    renames += 1
    if renames == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
    return _replace(src, dst, *args, **kwargs)
os.replace = replace
if os.environ.get("FAULT_COUNT_FILE"):
    atexit.register(lambda: open(os.environ["FAULT_COUNT_FILE"], "w").write(str(renames)))
if os.environ.get("FAULT_KILL_IN_TORCH_SAVE"):
    import torch
    _save = torch.save
    def half_save(obj, f, *args, **kwargs):
        buffer = io.BytesIO()
        _save(obj, buffer, *args, **kwargs)
        with open(f, "wb") as out:
            out.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
        os.kill(os.getpid(), signal.SIGKILL)
    torch.save = half_save
from nnunet_universal.cli import main
sys.exit(main(sys.argv[1:]))
"""


def faulty(env: dict[str, str], *args: object, timeout: int = 300, **fault: str) -> subprocess.CompletedProcess:
    """``nnunet-universal ARGS`` in a subprocess under :data:`_FAULT_RUNNER` (``fault``: its FAULT_* variables)."""
    return subprocess.run([sys.executable, "-c", _FAULT_RUNNER, *map(str, args)], capture_output=True, text=True,
                          env={**env, **fault}, timeout=timeout)


def _damage_inside(path: Path) -> None:
    """Flip bytes inside the largest tensor record of a torch zip: the zip stays valid, torch loads it silently."""
    import struct
    import zipfile

    with zipfile.ZipFile(path) as z:
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    data = bytearray(path.read_bytes())
    name_len, extra_len = struct.unpack("<HH", data[info.header_offset + 26: info.header_offset + 30])
    start = info.header_offset + 30 + name_len + extra_len
    data[start + info.file_size // 2: start + info.file_size // 2 + 8] = bytes(8)
    path.write_bytes(data)


def test_train_c_with_a_damaged_checkpoint_names_it_and_the_fallback(model, tmp_path):
    """``--c`` from a truncated checkpoint_latest.pth or a checkpoint_final.pth with damaged bytes (which torch
    would load silently) stops with the file and the command that resumes from the next checkpoint; following it
    resumes; a kill in the middle of a checkpoint save leaves the previous checkpoint whole."""
    from nnunet_universal.inference.checkpoints import load_checkpoint

    results = tmp_path / "nnUNet_results"
    fold = results / model["dir"].parent.name / model["dir"].name / "fold_0"
    shutil.copytree(model["dir"], fold.parent)
    final, latest, best = (fold / f"checkpoint_{n}.pth" for n in ("final", "latest", "best"))
    shutil.copy(final, latest)
    shutil.copy(final, best)
    pre = tmp_path / "nnUNet_preprocessed" / model["raw"].name  # with the model's (narrowed) plans
    shutil.copytree(Path(model["env"]["nnUNet_preprocessed"]) / model["raw"].name, pre)
    shutil.copy(model["dir"] / "plans.json", pre / "nnUNetUniversalPlans.json")
    env = {**model["env"], "nnUNet_results": str(results), "nnUNet_preprocessed": str(pre.parent),
           "nnUNet_n_proc_DA": "0",
           "NNUNET_UNIVERSAL_SCHEDULE": "2:1:1", "NNUNET_UNIVERSAL_VAL_MIRRORING": "0"}

    _damage_inside(final)
    load_checkpoint(final)  # loads without a word: nnU-Net alone would resume from wrong weights
    proc = _stock(env, "nnUNetv2_train", 991, "3d_fullres", 0, "-tr", "UniversalTrainer", "-p",
                  "nnUNetUniversalPlans", "-device", "cpu", "--c")
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode != 0 and "DamagedCheckpointError" in last, proc.stderr[-3000:]
    for phrase in (f"checkpoint {final} is damaged", "Bad CRC-32", f"mv '{final}' '{final}.damaged'",
                   "continues from checkpoint_latest.pth"):
        assert phrase in last, (phrase, last)
    assert "PytorchStreamReader" not in proc.stderr and "weights_only" not in proc.stderr

    final.rename(final.with_name("checkpoint_final.pth.damaged"))
    latest.write_bytes(latest.read_bytes()[: latest.stat().st_size // 2])  # killed while saving
    rc, err = cli(env, "train", 991, "3d_fullres", 0, "-device", "cpu", "--c")
    assert rc == 2 and f"checkpoint {latest} is damaged (not a complete zip archive" in err, err
    assert f"mv '{latest}' '{latest}.damaged'" in err and "continues from checkpoint_best.pth" in err, err

    latest.rename(latest.with_name("checkpoint_latest.pth.damaged"))  # the advice
    best_bytes = best.read_bytes()
    proc = faulty(env, "train", 991, "3d_fullres", 0, "-device", "cpu", "--c", FAULT_KILL_IN_TORCH_SAVE="1")
    assert proc.returncode == -9, proc.stderr[-3000:]
    assert "Epoch 1" in proc.stdout  # resumed from checkpoint_best.pth (saved as epoch 0 + 1) and trained epoch 1,
    assert best.read_bytes() == best_bytes  # then was killed while writing the new checkpoint_best.pth: intact
    assert [p.name for p in fold.glob(".checkpoint_best.pth.*.tmp")] and not final.exists()


def test_checkpoint_save_is_renamed_into_place(tmp_path):
    """In process, the cases a kill cannot show: a failing save leaves the old file and no temp; a save that
    writes nothing (DDP rank > 0, checkpointing disabled) leaves the old file; temps of killed saves are removed."""
    from nnunet_universal.trainers.checkpoint_io import save_atomically

    final = tmp_path / "checkpoint_best.pth"
    final.write_bytes(b"old")
    stale = tmp_path / ".checkpoint_best.pth.1.tmp"
    stale.write_bytes(b"half")

    def failing(name: str) -> None:
        Path(name).write_bytes(b"ha")
        raise OSError("No space left on device")

    with pytest.raises(OSError, match="No space"):
        save_atomically(failing, final)
    save_atomically(lambda name: None, final)
    assert final.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == [final.name]
    save_atomically(lambda name: Path(name).write_bytes(b"new"), final)
    assert final.read_bytes() == b"new" and sorted(p.name for p in tmp_path.iterdir()) == [final.name]


# ---- the probes that already passed: convert's validation, sources untouched, reruns identical ------------------

def _digest(root: Path) -> dict[str, bytes]:
    """Every visible file's bytes under ``root`` (symlinks not followed; no hidden bookkeeping or temp files)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and not p.is_symlink() and not any(n.startswith(".") for n in p.relative_to(root).parts)}


def _rewrite(path: Path, fn) -> None:
    img = sitk.ReadImage(str(path))
    out = fn(img)
    sitk.WriteImage(out, str(path), True)


def _with_values(fn):
    def apply(img: sitk.Image) -> sitk.Image:
        out = sitk.GetImageFromArray(fn(sitk.GetArrayFromImage(img)))
        out.CopyInformation(img)
        return out
    return apply


def _moved(spacing: float = 0.0, origin: float = 0.0):
    def apply(img: sitk.Image) -> sitk.Image:
        img.SetSpacing(tuple(s + spacing for s in img.GetSpacing()))
        img.SetOrigin(tuple(o + origin for o in img.GetOrigin()))
        return img
    return apply


def _four_d(img: sitk.Image) -> sitk.Image:
    a = sitk.GetArrayFromImage(img)
    return sitk.GetImageFromArray(np.stack([a, a]), isVector=False)  # (2, z, y, x): a 4D image


def _nan(a: np.ndarray) -> np.ndarray:
    a = a.astype(np.float32)
    a.flat[:3] = np.nan
    return a


#: case -> (file to damage: "label" or channel index, damage, phrase of the reported problem)
CONVERT_FAULTS = {
    "label_values": ("label", _with_values(lambda a: np.where(a > 0, 7, 0).astype(np.uint8)), "label values [7]"),
    "label_interpolated": ("label", _with_values(lambda a: (a * 0.6).astype(np.float32)), "of an integer"),
    "label_spacing": ("label", _moved(spacing=0.5), "spacing mismatch"),
    "sequence_origin": (1, _moved(origin=2.0), "origin mismatch"),
    "four_d": (0, _four_d, "is 4D"),
    "nan": (0, _with_values(_nan), "3 NaN"),
    "inf": (1, _with_values(lambda a: np.where(a > 1, np.inf, a).astype(np.float32)), "Inf voxels"),
    "constant": (0, _with_values(np.zeros_like), "is constant"),
    "unreadable": (1, None, "cannot be read"),
    "missing_sequence": (1, None, "missing image/label file"),
    "../escape": (None, None, "not a safe file name"),
    ".hidden": (None, None, "not a safe file name"),
}


@pytest.fixture(scope="module")
def convert_faults(env, tmp_path_factory) -> dict:
    """An nnU-Net raw source with one case per fault of :data:`CONVERT_FAULTS` and two good ones, converted once
    without ``--skip-bad`` (refused), twice with it (the second a no-op rerun). Returns what each run gave."""
    base = tmp_path_factory.mktemp("convert_faults")
    src = base / "Dataset805_Faults"
    rng = np.random.default_rng(5)
    entries = {}
    for case in ["good1", "good2", *CONVERT_FAULTS]:
        stem = case.replace("/", "_").replace(".", "_")
        lab = np.zeros((6, 8, 8), np.uint8)
        lab[2:5, 2:5, 2:5] = 1
        files = [src / "imagesTr" / f"{stem}_{i:04d}.nii.gz" for i in range(2)]
        for f in files:
            _write(f, rng.normal(2, 1, size=lab.shape).astype(np.float32))
        _write(src / "labelsTr" / f"{stem}.nii.gz", lab)
        entries[case] = {"images": [str(f.relative_to(src)) for f in files], "label": f"labelsTr/{stem}.nii.gz"}
        target, damage, _ = CONVERT_FAULTS.get(case, (None, None, ""))
        path = src / (entries[case]["label"] if target == "label" else entries[case]["images"][target or 0])
        if damage is not None:
            _rewrite(path, damage)
        elif case == "unreadable":
            path.write_bytes(b"\x1f\x8b not really a gzip stream")
        elif case == "missing_sequence":
            path.unlink()
    (src / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "T1c", "1": "FLAIR"}, "labels": {"background": 0, "ET": 1},
        "numTraining": len(entries), "file_ending": ".nii.gz", "dataset": entries}))
    before = _digest(src)
    refused = cli(env, "convert", "nnunet", src, "-d", 730, "-j", 1)
    skipped = cli(env, "convert", "nnunet", src, "-d", 730, "-j", 1, "--skip-bad")
    folder = _raw(env) / "Dataset730_Faults"
    first = _digest(folder)
    rerun = cli(env, "convert", "nnunet", src, "-d", 730, "-j", 1, "--skip-bad")
    return {"src": src, "before": before, "after": _digest(src), "refused": refused, "skipped": skipped,
            "rerun": rerun, "folder": folder, "first": first, "second": _digest(folder),
            "report": {s["case"]: s for s in json.loads((folder / "conversion_report.json").read_text())["skipped"]}}


@pytest.mark.parametrize("case", list(CONVERT_FAULTS))
def test_convert_rejects(convert_faults, case):
    """Each damaged case is refused (the first one stops a run without --skip-bad) and listed with its problem and
    file; the good cases are converted."""
    rc, err = convert_faults["refused"]
    assert rc == 2 and "What to do" in err and "--skip-bad" in err, err
    assert convert_faults["skipped"][0] == 0, convert_faults["skipped"][1]
    entry = convert_faults["report"].get(case)
    assert entry is not None and CONVERT_FAULTS[case][2] in entry["problem"], (case, convert_faults["report"])
    if CONVERT_FAULTS[case][0] is not None:  # a file-level problem names its file
        assert Path(entry["file"]).name.startswith(case.replace("/", "_").replace(".", "_")), entry
    dj = json.loads((convert_faults["folder"] / "dataset.json").read_text())
    assert sorted(dj["universal"]["cases"]) == ["good1", "good2"]


def test_convert_leaves_sources_untouched_and_reruns_identically(env, convert_faults):
    """The source tree is byte-identical after three runs; a rerun rewrites nothing; no file escaped the output
    folder or was written hidden."""
    assert convert_faults["after"] == convert_faults["before"]
    assert convert_faults["rerun"][0] == 0 and convert_faults["second"] == convert_faults["first"]
    assert not [p for p in (_raw(env), _raw(env).parent) for p in p.glob("escape*")]
    assert not list(convert_faults["folder"].rglob(".hidden*"))


# ---- kill -9 at a file rename: no half-written file, the rerun equals an uninterrupted run ----------------------

def _incomplete(folder: Path) -> list[str]:
    """Visible files under ``folder`` that are not whole: a gzip stream cut or damaged, a JSON that does not parse."""
    bad = []
    for p in _digest(folder):
        path = folder / p
        try:
            if p.endswith(".gz"):
                gzip.decompress(path.read_bytes())
            elif p.endswith(".json"):
                json.loads(path.read_text())
        except (OSError, EOFError, ValueError) as e:
            bad.append(f"{path}: {e}")
    return bad


def _kill_and_rerun(env: dict[str, str], args: list[object], out: Path, where: str, last_file: str | None) -> None:
    """Run ``args`` uninterrupted (counting its renames), then again from scratch killed at the first, middle or
    last rename, then rerun: every visible file is whole after the kill (``last_file``, written last, absent before
    the last rename) and the rerun's files equal the uninterrupted run's, byte for byte."""
    count = out.parent / f"{out.name}.renames"
    proc = faulty(env, *args, FAULT_COUNT_FILE=str(count))
    assert proc.returncode == 0, proc.stderr[-3000:]
    renames, clean = int(count.read_text()), _digest(out)
    assert renames >= 3 and clean
    shutil.rmtree(out)
    kill_at = {"first": 1, "middle": (renames + 1) // 2, "last": renames}[where]
    proc = faulty(env, *args, FAULT_KILL_AT_RENAME=str(kill_at))
    assert proc.returncode == -9, proc.stderr[-3000:]
    assert not _incomplete(out)
    if last_file is not None:
        assert not (out / last_file).exists()  # a partial folder never looks complete
    rc, err = cli(env, *args)
    assert rc == 0, err
    assert _digest(out) == clean
    orphans = [p for p in out.rglob(".*.tmp") if ".nnunet_universal" not in p.relative_to(out).parts]
    assert not orphans, f"temp files of the killed run left beside the outputs: {orphans}"


@pytest.mark.parametrize("where", ["first", "middle", "last"])
def test_interrupted_convert(env, tmp_path, where):
    src = _source(tmp_path / "Dataset806_Kill", {"0": "T1c", "1": "FLAIR"}, {"background": 0, "ET": 1}, 6)
    _kill_and_rerun(env, ["convert", "nnunet", src, "-d", 731, "-j", 1], _raw(env) / "Dataset731_Kill", where,
                    "dataset.json")


@pytest.mark.parametrize("where", ["middle", "last"])
def test_interrupted_merge(env, where):
    _kill_and_rerun(env, ["merge", "-d", 732, "-n", "Kill", 701, 702, "-j", 1, "--holdout", 1],
                    _raw(env) / "Dataset732_Kill", where, "dataset.json")


def test_interrupted_predict(model, tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    for f in (model["raw"] / "imagesTr").glob("*_000_*.nii.gz"):
        if f.name.startswith("mr_b"):  # two cases: an MR and a CT one
            continue
        shutil.copy(f, inputs / f.name)
    _kill_and_rerun(model["env"], ["predict", "-m", model["dir"], "-i", inputs, "-o", tmp_path / "out", "-device",
                                   "cpu", "--disable-tta"], tmp_path / "out", "middle", None)


# ---- evaluate: predictions in another geometry, truncated predictions -------------------------------------------

def test_evaluate_refuses_misplaced_or_truncated_predictions(env, tmp_path):
    """Same shape is not enough: a prediction stored flipped (direction and origin adjusted, so it shows the same
    anatomy in a viewer) or shifted by 40 mm would be scored against the wrong voxels; a truncated file reads as
    valid with zeros appended. ``evaluate`` refuses all three, naming the file; the genuine one is scored."""
    gt = _raw(env) / "Dataset701_A" / "labelsTr" / "c1.nii.gz"
    ref = sitk.ReadImage(str(gt))
    g = sitk.GetArrayFromImage(ref)
    assert g.any()

    def evaluate(pred: sitk.Image | bytes) -> tuple[int, str, Path]:
        folder = tmp_path / f"p{len(list(tmp_path.iterdir()))}"
        folder.mkdir()
        if isinstance(pred, bytes):
            (folder / "c1.nii.gz").write_bytes(pred)
        else:
            sitk.WriteImage(pred, str(folder / "c1.nii.gz"))
        return *cli(env, "evaluate", folder, "-d", 701), folder / "c1.nii.gz"

    same = sitk.GetImageFromArray(g)
    same.CopyInformation(ref)
    assert evaluate(same)[0] == 0
    flipped = sitk.GetImageFromArray(g[:, :, ::-1].copy())  # x flipped in storage, direction and origin adjusted
    flipped.SetSpacing(ref.GetSpacing())
    flipped.SetDirection((-1.0, 0, 0, 0, 1, 0, 0, 0, 1))
    flipped.SetOrigin((ref.GetOrigin()[0] + (g.shape[2] - 1) * ref.GetSpacing()[0], *ref.GetOrigin()[1:]))
    shifted = sitk.GetImageFromArray(g)
    shifted.CopyInformation(ref)
    shifted.SetOrigin((ref.GetOrigin()[0] + 40.0, *ref.GetOrigin()[1:]))
    for img, what in ((flipped, "direction"), (shifted, "origin")):
        rc, err, path = evaluate(img)
        assert rc != 0 and "does not lie where its ground truth" in err and what in err and "c1" in err, err
    whole = gt.read_bytes()
    rc, err, path = evaluate(whole[: len(whole) // 2])
    assert rc != 0 and "truncated" in err and str(path) in err, err


def test_atomic_writes_remove_only_dead_writers_temp_files(tmp_path):
    """A temp file whose writer was killed is removed by the next write into its folder; a live writer's is not."""
    from nnunet_universal.atomic_io import atomic_write_json

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    orphan = tmp_path / f".a.json.pid{dead.pid}.k3x9_q2z.tmp"
    alive = tmp_path / f".a.json.pid{os.getppid()}.m1n2b3v4.tmp"
    other = tmp_path / ".notes.tmp"  # not ours: no writer tag
    for p in (orphan, alive, other):
        p.write_text("partial")
    atomic_write_json({"x": 1}, tmp_path / "b.json")
    assert not orphan.exists() and alive.exists() and other.exists()
    assert json.loads((tmp_path / "b.json").read_text()) == {"x": 1}


def test_plan_verify_refuses_a_truncated_file(env):
    """A file truncated after merge (e.g. a partial copy to a cluster): `plan --verify` names it before nnU-Net's
    own integrity check, which reads it as valid (SimpleITK fills the missing voxels with zeros)."""
    did, name = 714, "PlanCut"
    assert cli(env, "merge", "-d", did, "-n", name, 701, 702, "-j", 1, "--holdout", 1)[0] == 0
    cut = sorted((_raw(env) / f"Dataset{did}_{name}" / "labelsTr").glob("*.nii.gz"))[0]
    _truncate(cut)
    sitk.ReadImage(str(cut))  # ITK still reads it without an error
    rc, err = cli(env, "plan", "-d", did, "-c", "3d_fullres", "-np", 1, "--verify")
    assert rc != 0 and str(cut) in err and "truncated or corrupt" in err, err[-2000:]
    assert not (Path(env["nnUNet_preprocessed"]) / f"Dataset{did}_{name}").exists() or not list(
        (Path(env["nnUNet_preprocessed"]) / f"Dataset{did}_{name}").glob("*Plans*.json"))


# ---- issue 20 item 8: killing `convert -j 2` (SIGTERM or SIGKILL of the main process) leaves no process behind ----
# The CLI runs in a subprocess with its per-case job slowed down (_SLOW_JOB, so that the kill lands while both
# workers are busy); every descendant (forkserver, workers, resource tracker) is recorded from /proc before the
# kill and must be gone shortly after it. A rerun then converts every case, and no visible file is half written.

#: Imported by the main process and, as the job's module, preloaded by the forkserver: each case sleeps first.
_SLOW_JOB = '''
import os, time
from nnunet_universal.dataset_conversion import writer

_real = writer.convert_case


def convert_case(job):
    time.sleep(float(os.environ.get("SLOW_JOB_S", "0")))
    return _real(job)


writer.convert_case = convert_case
'''
_RUNNER = "import sys, slow_job\nfrom nnunet_universal.cli import main\nsys.exit(main(sys.argv[1:]))"


def _stat(pid: int) -> tuple[int, str, int] | None:
    """(parent pid, state, start time) of ``pid`` from ``/proc/PID/stat``, or None once it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rindex(")") + 2:].split()  # after "pid (comm) ": state, ppid, ..., starttime (field 22)
    return int(fields[1]), fields[0], int(fields[19])


def _descendants(root: int) -> dict[int, int]:
    """Every living descendant of ``root``: pid -> start time (so that a reused pid is not mistaken for it)."""
    children: dict[int, list[int]] = {}
    starts: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (st := _stat(int(entry.name))) is not None and st[1] != "Z":
            children.setdefault(st[0], []).append(int(entry.name))
            starts[int(entry.name)] = st[2]
    out, todo = {}, [root]
    while todo:
        for c in children.get(todo.pop(), []):
            out[c] = starts[c]
            todo.append(c)
    return out


def _alive(procs: dict[int, int]) -> list[int]:
    """The pids of ``procs`` still running (not exited, not a zombie, not reused)."""
    return [p for p, start in procs.items() if (st := _stat(p)) is not None and st[1] != "Z" and st[2] == start]


def _interrupt_source(root: Path, cases: int) -> Path:
    rng = np.random.default_rng(0)
    for c in range(cases):
        lab = np.zeros((8, 10, 10), np.uint8)
        lab[2:5, 3:6, 3:6] = 1
        for i in range(2):
            img = sitk.GetImageFromArray(rng.normal(size=lab.shape).astype(np.float32))
            (root / "imagesTr").mkdir(parents=True, exist_ok=True)
            sitk.WriteImage(img, str(root / "imagesTr" / f"c{c}_{i:04d}.nii.gz"))
        (root / "labelsTr").mkdir(exist_ok=True)
        sitk.WriteImage(sitk.GetImageFromArray(lab), str(root / "labelsTr" / f"c{c}.nii.gz"))
    (root / "dataset.json").write_text(json.dumps({"channel_names": {"0": "T1c", "1": "FLAIR"},
                                                   "labels": {"background": 0, "ET": 1}, "numTraining": cases,
                                                   "file_ending": ".nii.gz"}))
    return root


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads the process tree from /proc")
def test_killed_convert_leaves_no_process_and_reruns(sig, tmp_path):
    src = _interrupt_source(tmp_path / "Dataset790_Kill", cases=4)
    (tmp_path / "hook").mkdir()
    (tmp_path / "hook" / "slow_job.py").write_text(_SLOW_JOB)
    raw = tmp_path / "raw"
    raw.mkdir()
    env = {**os.environ, "nnUNet_raw": str(raw), "OMP_NUM_THREADS": "1", "SLOW_JOB_S": "60",
           "PYTHONPATH": os.pathsep.join([str(tmp_path / "hook"), *filter(None, [os.environ.get("PYTHONPATH")])])}
    args = ["convert", "nnunet", str(src), "-d", "790", "-j", "2"]
    proc = subprocess.Popen([sys.executable, "-c", _RUNNER, *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    seen: dict[int, int] = {}
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:  # forkserver + 2 workers + resource tracker
            seen.update(_descendants(proc.pid))
            workers = [p for p in seen if (st := _stat(p)) is not None and st[0] != proc.pid]
            if len(workers) >= 2 and len(seen) >= 4:
                break
            time.sleep(0.05)
        assert proc.poll() is None and len(seen) >= 4, (proc.poll(), seen, proc.stderr.read() if proc.stderr else "")
        time.sleep(0.3)  # the workers are inside their jobs
        seen.update(_descendants(proc.pid))
        proc.send_signal(sig)
        proc.wait(timeout=20)
        deadline = time.monotonic() + 10
        while _alive(seen) and time.monotonic() < deadline:
            time.sleep(0.1)
        left = _alive(seen)
        assert not left, f"still running after the main process was killed: {left}"
    finally:
        for p in _alive(seen):  # never leave a process behind, even when the test fails
            os.kill(p, signal.SIGKILL)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if sig == signal.SIGTERM:
        err = proc.stderr.read()
        assert proc.returncode == 128 + signal.SIGTERM and "Traceback" not in err, (proc.returncode, err)
    folder = raw / "Dataset790_Kill"
    assert not (folder / "dataset.json").exists()
    assert not [p for p in folder.rglob("*") if p.is_file() and ".nnunet_universal" not in p.parts
                and not p.name.endswith(".nii.gz")]  # nothing but whole outputs (renamed into place when complete)
    rerun = subprocess.run([sys.executable, "-c", _RUNNER, *args[:-1], "1"], env={**env, "SLOW_JOB_S": "0"},
                           capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stderr
    assert len(json.loads((folder / "dataset.json").read_text())["universal"]["cases"]) == 4
    assert not (folder / ".nnunet_universal" / "tmp").exists()
