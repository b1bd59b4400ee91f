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
