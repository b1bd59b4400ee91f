"""Faults of ``nnunet-universal merge``, each driven through the real CLI in a subprocess: chained ``--identical``
declarations, file modes under the umask, a negative ``--holdout``, re-merging over a planned/trained or different
dataset, and unreadable input dataset.json files. Every error is one message naming the problem and the fix, with
exit code 2 and no traceback.

Inputs: two tiny nnU-Net raw datasets (3 cases of 6x8x8 voxels each) converted once per module.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
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
