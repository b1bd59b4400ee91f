"""``nnunet-universal convert``: every source, every validation rule, resume after interruption, sources untouched.

Native trees come from ``nnunet_universal.synthetic`` (generated once per session, cached on disk); the sources
it does not write (BraTS GLI/MEN/PED/SSA, other Decathlon tasks, nnU-Net raw datasets, the BrainMetShare NIfTI
re-release) are derived from those trees or written by hand here.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from nnunet_universal.cli import main
from nnunet_universal.dataset_conversion import writer
from nnunet_universal.metadata import load_universal
from nnunet_universal.registry import SYNTH_SOURCES

SYNTH_CASES = 3
TOPS = {"brats-mets": "ASNR-MICCAI-BraTS2023-MET-Challenge-TrainingData", "ucsf-bmsr": "UCSF-BMSR",
        "brainmetshare": "stanford_release_brainmask", "lits": "LiTS", "msd-braintumour": "Task01_BrainTumour"}


# ---- helpers (test_merge.py imports these) -----------------------------------------------------------

def make_synth_trees(base: Path) -> dict[str, Path]:
    """Synthetic native trees of every synthetic source, generated once into ``base``."""
    from nnunet_universal.synthetic.api import synthesize

    out = {}
    for source in SYNTH_SOURCES:
        done = base / f".{source}.done"
        if not done.exists():
            synthesize(source, base / source, cases=SYNTH_CASES, seed=0)
            done.touch()
        out[source] = base / source / TOPS[source]
    return out


@pytest.fixture(scope="session")
def synth_trees(tmp_path_factory) -> dict[str, Path]:
    return make_synth_trees(tmp_path_factory.getbasetemp() / "synth_native")


def tree_digest(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root`` (symlinks not followed): proves sources are byte-identical."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and not p.is_symlink()}


def run(capsys, *args: str) -> tuple[int, str]:
    """Run the CLI in-process; return (exit code, stderr)."""
    capsys.readouterr()
    rc = main([str(a) for a in args])
    return rc, capsys.readouterr().err


def read(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def write(path: Path, arr: np.ndarray, spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0), direction=None) -> None:
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    if direction is not None:
        img.SetDirection(direction)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(img, str(path))


def check_dataset(folder: Path, n_cases: int) -> dict:
    """Structural checks every converted dataset must pass; returns dataset.json."""
    dj = json.loads((folder / "dataset.json").read_text())
    meta = load_universal(dj, where=str(folder))
    assert dj["numTraining"] == n_cases == len(meta.cases) == len(list((folder / "labelsTr").iterdir()))
    assert list(dj["labels"].values()) == list(range(len(dj["labels"])))
    assert [dj["channel_names"][str(i)] for i in range(len(meta.slots))] == meta.slots
    assert not (folder / ".nnunet_universal" / "tmp").exists()
    for case in meta.cases:
        lab = sitk.ReadImage(str(folder / "labelsTr" / f"{case}.nii.gz"))
        assert set(np.unique(sitk.GetArrayViewFromImage(lab))) <= set(dj["labels"].values())
        for i in range(len(meta.slots)):
            img = sitk.ReadImage(str(folder / "imagesTr" / f"{case}_{i:04d}.nii.gz"))
            assert img.GetSize() == lab.GetSize() and img.GetSpacing() == lab.GetSpacing()
            assert np.allclose(img.GetOrigin(), lab.GetOrigin()) and np.allclose(img.GetDirection(),
                                                                                 lab.GetDirection())
    return dj


def rename_brats(src: Path, dst: Path, tag: str) -> Path:
    """A BraTS-METS tree re-labelled as another 2023 challenge (same naming, other tag)."""
    for f in sorted(src.rglob("*.nii.gz")):
        rel = str(f.relative_to(src)).replace("-MET-", f"-{tag}-")
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(f, dst / rel)
    return dst


# ---- every source --------------------------------------------------------------------------------------

EXPECTED = {  # source -> (cli source, domain, labels, lesion_wise, modality, region names)
    "brats-mets": ("brats-mets", "brats_mets", {"NETC": 1, "SNFH": 2, "ET": 3}, True, "MR", {"ET", "TC", "WT"}),
    "ucsf-bmsr": ("ucsf-bmsr", "ucsf_bmsr", {"ET": 1}, True, "MR", set()),
    "brainmetshare": ("brainmetshare", "brainmetshare", {"ET": 1}, True, "MR", set()),
    "lits": ("lits", "lits", {"liver": 1, "tumor": 2}, False, "CT", {"liver", "tumor"}),
    "msd-braintumour": ("msd", "msd_braintumour", {"edema": 1, "non-enhancing tumor": 2, "enhancing tumour": 3},
                        False, "MR", {"WT", "TC", "ET"}),
}


@pytest.mark.parametrize("source", list(EXPECTED))
def test_convert_synthetic_source(source, synth_trees, nnunet_dirs, capsys):
    cli_source, domain, labels, lesion_wise, modality, regions = EXPECTED[source]
    src = synth_trees[source]
    before = tree_digest(src)
    rc, err = run(capsys, "convert", cli_source, src, "-d", 501, "-j", 1)
    assert rc == 0, err
    assert tree_digest(src) == before
    folder = next(nnunet_dirs["nnUNet_raw"].glob("Dataset501_*"))
    dj = check_dataset(folder, SYNTH_CASES)
    meta = load_universal(dj)
    dom = meta.domains[domain]
    assert (dom.labels, dom.lesion_wise, dom.modality, set(dom.regions)) == (labels, lesion_wise, modality, regions)
    prov = json.loads((folder / "provenance.json").read_text())
    for case, entry in prov["cases"].items():
        for rel, sha in entry["sources"].items():
            assert hashlib.sha256((src / rel).read_bytes()).hexdigest() == sha, (case, rel)

    if source == "ucsf-bmsr":  # optional subtraction: zero-filled and not in the case's slots where absent
        sub = meta.slots.index("SUB")
        lacking = [c for c, i in meta.cases.items() if "SUB" not in i.slots]
        assert lacking and all("SUB" in i.slots for c, i in meta.cases.items() if c not in lacking)
        assert not read(folder / "imagesTr" / f"{lacking[0]}_{sub:04d}.nii.gz").any()
        assert len({i.group for i in meta.cases.values()}) < len(meta.cases)  # two exams of one patient
    if source == "msd-braintumour":  # 4D channel k of the source -> the slot's channel file
        case = sorted(meta.cases)[0]
        vol4d = sitk.GetArrayFromImage(sitk.ReadImage(str(src / "imagesTr" / f"{case}.nii.gz")))  # (C, z, y, x)
        for k, slot in enumerate(["FLAIR", "T1", "T1c", "T2"]):
            ch = read(folder / "imagesTr" / f"{case}_{meta.slots.index(slot):04d}.nii.gz")
            assert np.array_equal(ch, vol4d[k])
    if source == "brainmetshare":  # PNG slices -> LPS volume; label = any non-zero
        from nnunet_universal.synthetic.api import make_case, plan_cases

        plan = plan_cases("brainmetshare", SYNTH_CASES, 0)[0]
        truth = make_case("brainmetshare", plan, 0).labels  # RAS voxel order (x, y, z)
        expected = np.flip(np.isin(truth, (1, 3)), axis=(0, 1))  # -> LPS, the ITK identity direction
        lab = sitk.ReadImage(str(folder / "labelsTr" / f"{plan.case_id}.nii.gz"))
        assert np.array_equal(sitk.GetArrayFromImage(lab).transpose(2, 1, 0), expected.astype(np.uint8))
        # PNG has no geometry: the synthetic case's true spacing, from the spacing file synth wrote
        spacing = make_case("brainmetshare", plan, 0).grid.spacing
        assert np.allclose(lab.GetSpacing(), spacing) and lab.GetDirection() == tuple(np.eye(3).ravel())


@pytest.mark.parametrize("tag", ["GLI", "MEN", "PED", "SSA"])
def test_convert_brats_family(tag, synth_trees, nnunet_dirs, tmp_path, capsys):
    src = rename_brats(synth_trees["brats-mets"], tmp_path / f"BraTS-{tag}", tag)
    rc, err = run(capsys, "convert", f"brats-{tag.lower()}", src, "-d", 502, "-j", 1)
    assert rc == 0, err
    dj = check_dataset(nnunet_dirs["nnUNet_raw"] / f"Dataset502_BraTS{tag}", SYNTH_CASES)
    dom = load_universal(dj).domains[f"brats_{tag.lower()}"]
    assert dom.lesion_wise is False and set(dom.regions) == {"ET", "TC", "WT"}
    if tag == "GLI":  # wrong challenge for the tree: clear error naming the right source
        rc, err = run(capsys, "convert", "brats-mets", src, "-d", 503)
        assert rc == 2 and "use source brats-gli" in err


def test_convert_msd_ct_task(nnunet_dirs, tmp_path, capsys):
    task = tmp_path / "Task09_Spleen"
    rng = np.random.default_rng(0)
    entries = []
    for i in (1, 2):
        lab = np.zeros((8, 12, 10), np.uint8)
        lab[2:5, 3:7, 3:6] = 1
        write(task / "imagesTr" / f"spleen_{i}.nii.gz", rng.normal(0, 100, lab.shape).astype(np.int16), (0.8, 0.8, 5))
        write(task / "labelsTr" / f"spleen_{i}.nii.gz", lab, (0.8, 0.8, 5))
        (task / "imagesTr" / f"._spleen_{i}.nii.gz").write_bytes(b"\x00\x05\x16\x07junk")
        entries.append({"image": f"./imagesTr/spleen_{i}.nii.gz", "label": f"./labelsTr/spleen_{i}.nii.gz"})
    (task / "dataset.json").write_text(json.dumps({"name": "Spleen", "modality": {"0": "CT"}, "training": entries,
                                                   "labels": {"0": "background", "1": "spleen"}}))
    rc, err = run(capsys, "convert", "msd", task, "-d", 509, "-j", 1)
    assert rc == 0, err
    dj = check_dataset(nnunet_dirs["nnUNet_raw"] / "Dataset509_Spleen", 2)
    assert dj["channel_names"] == {"0": "CT"} and dj["labels"] == {"background": 0, "spleen": 1}
    dom = load_universal(dj).domains["msd_spleen"]
    assert dom.modality == "CT" and dom.slots == ["CT"]


def _nnunet_dataset(root: Path, channels: dict[str, str], labels: dict, cases=("a", "b")) -> Path:
    rng = np.random.default_rng(1)
    for c in cases:
        lab = np.zeros((6, 8, 8), np.uint8)
        lab[2:4, 2:5, 2:5] = 1
        for i in range(len(channels)):
            write(root / "imagesTr" / f"{c}_{i:04d}.nii.gz", rng.normal(size=lab.shape).astype(np.float32))
        write(root / "labelsTr" / f"{c}.nii.gz", lab)
    (root / "dataset.json").write_text(json.dumps({"channel_names": channels, "labels": labels,
                                                   "numTraining": len(cases), "file_ending": ".nii.gz"}))
    return root


def test_convert_nnunet_dataset(nnunet_dirs, tmp_path, capsys):
    src = _nnunet_dataset(tmp_path / "Dataset777_MyTumour", {"0": "t1ce", "1": "FLAIR"}, {"background": 0, "tumour": 1})
    before = tree_digest(src)
    rc, err = run(capsys, "convert", "nnunet", src, "-d", 510, "-j", 1)
    assert rc == 0, err
    dj = check_dataset(nnunet_dirs["nnUNet_raw"] / "Dataset510_MyTumour", 2)
    assert dj["channel_names"] == {"0": "T1c", "1": "FLAIR"} and "mytumour" in dj["universal"]["domains"]
    # the source's channel 0 is now slot T1c = channel 0, FLAIR channel 1: same voxels
    assert np.array_equal(read(src / "imagesTr" / "a_0001.nii.gz"),
                          read(nnunet_dirs["nnUNet_raw"] / "Dataset510_MyTumour" / "imagesTr" / "a_0001.nii.gz"))
    # an unknown channel name needs --slot-map; --domain overrides the derived name
    odd = _nnunet_dataset(tmp_path / "Dataset778_Odd", {"0": "weird"}, {"background": 0, "x": 1})
    rc, err = run(capsys, "convert", "nnunet", odd, "-d", 511)
    assert rc == 2 and "--slot-map" in err and "weird" in err
    rc, err = run(capsys, "convert", "nnunet", odd, "-d", 511, "--slot-map", "weird=T2", "--domain", "odd_site")
    assert rc == 0, err
    dj = json.loads((nnunet_dirs["nnUNet_raw"] / "Dataset511_Odd" / "dataset.json").read_text())
    assert dj["channel_names"] == {"0": "T2"} and list(dj["universal"]["domains"]) == ["odd_site"]
    # region-based datasets need the integer classes named
    reg = _nnunet_dataset(tmp_path / "Dataset779_Reg", {"0": "CT"},
                          {"background": 0, "whole": [1, 2], "core": 2}, cases=("a",))
    rc, err = run(capsys, "convert", "nnunet", reg, "-d", 512)
    assert rc == 2 and "region-based" in err
    rc, err = run(capsys, "convert", "nnunet", reg, "-d", 512, "--label-map", "1=edge", "2=core")
    assert rc == 0, err
    dom = load_universal(nnunet_dirs["nnUNet_raw"] / "Dataset512_Reg" / "dataset.json").domains["reg"]
    assert dom.labels == {"edge": 1, "core": 2} and dom.regions == {"whole": ["core", "edge"], "core": ["core"]}
    assert tree_digest(src) == before


def test_convert_brainmetshare_nifti_rerelease(nnunet_dirs, tmp_path, capsys):
    rng = np.random.default_rng(2)
    for c in ("Mets_001", "Mets_002"):
        seg = np.zeros((6, 10, 10), np.uint8)
        seg[2:4, 3:6, 3:6] = 255
        for stem in ("bravo", "t1_pre", "t1_gd", "flair"):
            write(tmp_path / "bms" / "train" / c / f"{stem}.nii.gz", rng.normal(size=seg.shape).astype(np.float32),
                  (0.9, 0.9, 1.5))
        write(tmp_path / "bms" / "train" / c / "seg.nii.gz", seg, (0.9, 0.9, 1.5))
    rc, err = run(capsys, "convert", "brainmetshare", tmp_path / "bms", "-d", 513, "-j", 1)
    assert rc == 0, err
    folder = nnunet_dirs["nnUNet_raw"] / "Dataset513_BrainMetShare"
    dj = check_dataset(folder, 2)
    assert dj["channel_names"] == {"0": "T1", "1": "T1c", "2": "T1c_GRE", "3": "FLAIR"}
    assert np.array_equal(np.unique(read(folder / "labelsTr" / "Mets_001.nii.gz")), [0, 1])
    assert np.allclose(sitk.ReadImage(str(folder / "labelsTr" / "Mets_001.nii.gz")).GetSpacing(), (0.9, 0.9, 1.5))


# ---- validation: one bad-input fixture per rule --------------------------------------------------------

def _brats_copy(synth_trees, dst: Path) -> tuple[Path, str, str]:
    """A two-case copy of the synthetic BraTS tree; returns (tree, bad case id, good case id)."""
    src = synth_trees["brats-mets"]
    cases = sorted(p.name for p in src.iterdir() if p.is_dir())[:2]
    for c in cases:
        shutil.copytree(src / c, dst / c)
    return dst, cases[0], cases[1]


def _rewrite(path: Path, fn) -> None:
    img = sitk.ReadImage(str(path))
    out = fn(img)
    sitk.WriteImage(out, str(path))


def _shifted(img: sitk.Image, **kw) -> sitk.Image:
    img = sitk.Image(img)
    if "spacing" in kw:
        img.SetSpacing(tuple(s * 1.5 for s in img.GetSpacing()))
    if "origin" in kw:
        img.SetOrigin(tuple(o + 3.0 for o in img.GetOrigin()))
    if "direction" in kw:
        d = np.array(img.GetDirection()).reshape(3, 3)
        img.SetDirection(tuple((d @ np.diag([-1, -1, 1])).ravel()))
    return img


def _padded(img: sitk.Image) -> sitk.Image:
    return sitk.ConstantPad(img, (0, 0, 0), (0, 0, 2), 0)


def _values(img: sitk.Image, fn) -> sitk.Image:
    arr = fn(sitk.GetArrayFromImage(img))
    out = sitk.GetImageFromArray(arr)
    out.CopyInformation(img)
    return out


def _with_nan(a: np.ndarray) -> np.ndarray:
    a = a.astype(np.float32)
    a.flat[:3] = np.nan
    return a


def _with_bad_label(a: np.ndarray) -> np.ndarray:
    a = a.copy()
    a.flat[0] = 5
    return a


def _interpolated(a: np.ndarray) -> np.ndarray:
    a = a.astype(np.float32)
    a.flat[0] = 0.4
    return a


RULES = {  # rule -> (file suffix to corrupt, corruption, expected phrase)
    "unreadable": ("t1c", lambda p: p.write_bytes(b"\x1f\x8b not really a gzip file"), "cannot be read"),
    "label_size": ("seg", lambda p: _rewrite(p, _padded), "size mismatch"),
    "label_spacing": ("seg", lambda p: _rewrite(p, lambda i: _shifted(i, spacing=1)), "spacing mismatch"),
    "label_origin": ("seg", lambda p: _rewrite(p, lambda i: _shifted(i, origin=1)), "origin mismatch"),
    "label_direction": ("seg", lambda p: _rewrite(p, lambda i: _shifted(i, direction=1)), "direction mismatch"),
    "sequence_geometry": ("t2w", lambda p: _rewrite(p, lambda i: _shifted(i, origin=1)), "origin mismatch"),
    "label_values": ("seg", lambda p: _rewrite(p, lambda i: _values(i, _with_bad_label)), "label values [5]"),
    "label_interpolated": ("seg", lambda p: _rewrite(p, lambda i: _values(i, _interpolated)), "within 0.001"),
    "nan": ("t1n", lambda p: _rewrite(p, lambda i: _values(i, _with_nan)), "3 NaN"),
    "inf": ("t1n", lambda p: _rewrite(p, lambda i: _values(i, lambda a: np.where(a > 0, np.inf, a)
                                                           .astype(np.float32))), "Inf voxels"),
    "constant": ("t2f", lambda p: _rewrite(p, lambda i: _values(i, np.zeros_like)), "is constant"),
    "missing_sequence": ("t2f", lambda p: p.unlink(), "missing sequence"),
}


@pytest.mark.parametrize("rule", list(RULES))
def test_validation_rule(rule, synth_trees, nnunet_dirs, tmp_path, capsys):
    tree, bad, good = _brats_copy(synth_trees, tmp_path / "brats")
    suffix, corrupt, phrase = RULES[rule]
    target = tree / bad / f"{bad}-{suffix}.nii.gz"
    corrupt(target)
    before = tree_digest(tree)
    rc, err = run(capsys, "convert", "brats-mets", tree, "-d", 520, "-j", 1)
    assert rc == 2
    assert bad in err and phrase in err and "What to do" in err and "--skip-bad" in err, err
    if rule != "missing_sequence":
        assert target.name in err
    assert not (nnunet_dirs["nnUNet_raw"] / "Dataset520_BraTSMETS" / "dataset.json").exists()
    rc, err = run(capsys, "convert", "brats-mets", tree, "-d", 520, "-j", 1, "--skip-bad")
    assert rc == 0, err
    folder = nnunet_dirs["nnUNet_raw"] / "Dataset520_BraTSMETS"
    check_dataset(folder, 1)
    report = json.loads((folder / "conversion_report.json").read_text())
    assert [s["case"] for s in report["skipped"]] == [bad] and phrase in report["skipped"][0]["problem"]
    assert bad in (folder / "conversion_report.md").read_text()
    assert tree_digest(tree) == before


def test_validation_duplicate_case_ids(synth_trees, nnunet_dirs, tmp_path, capsys):
    tree = tmp_path / "LiTS"
    shutil.copytree(synth_trees["lits"], tree)
    (tree / "Training Batch 2").mkdir()
    shutil.copyfile(tree / "volume-1.nii", tree / "Training Batch 2" / "volume-001.nii")
    before = tree_digest(tree)
    rc, err = run(capsys, "convert", "lits", tree, "-d", 521, "-j", 1)
    assert rc == 2 and "duplicate case id" in err and "LiTS_0001" in err and "volume-001.nii" in err
    rc, err = run(capsys, "convert", "lits", tree, "-d", 521, "-j", 1, "--skip-bad")
    assert rc == 0, err
    report = json.loads((nnunet_dirs["nnUNet_raw"] / "Dataset521_LiTS" / "conversion_report.json").read_text())
    assert [s["case"] for s in report["skipped"]] == ["LiTS_0001"]
    check_dataset(nnunet_dirs["nnUNet_raw"] / "Dataset521_LiTS", SYNTH_CASES - 1)
    assert tree_digest(tree) == before


def test_validation_case_id_escaping_output(nnunet_dirs, tmp_path, capsys):
    src = _nnunet_dataset(tmp_path / "Dataset780_Esc", {"0": "T1"}, {"background": 0, "x": 1})
    dj = json.loads((src / "dataset.json").read_text())
    dj["dataset"] = {"a": {"images": ["imagesTr/a_0000.nii.gz"], "label": "labelsTr/a.nii.gz"},
                     "../../evil": {"images": ["imagesTr/b_0000.nii.gz"], "label": "labelsTr/b.nii.gz"}}
    (src / "dataset.json").write_text(json.dumps(dj))
    before = tree_digest(src)
    rc, err = run(capsys, "convert", "nnunet", src, "-d", 522, "-j", 1)
    assert rc == 2 and "'../../evil'" in err and "escape the output folder" in err
    rc, err = run(capsys, "convert", "nnunet", src, "-d", 522, "-j", 1, "--skip-bad")
    assert rc == 0, err
    assert not list(tmp_path.rglob("evil*"))
    check_dataset(nnunet_dirs["nnUNet_raw"] / "Dataset522_Esc", 1)
    assert tree_digest(src) == before


def test_validation_symlink_out_of_input(synth_trees, nnunet_dirs, tmp_path, capsys):
    tree, bad, _ = _brats_copy(synth_trees, tmp_path / "brats")
    outside = tmp_path / "elsewhere.nii.gz"
    f = tree / bad / f"{bad}-t1c.nii.gz"
    shutil.move(f, outside)
    f.symlink_to(outside)
    rc, err = run(capsys, "convert", "brats-mets", tree, "-d", 523, "-j", 1)
    assert rc == 2 and "symlink pointing outside" in err and bad in err


def test_ucsf_multiclass_labels_need_label_map(synth_trees, nnunet_dirs, tmp_path, capsys):
    tree = tmp_path / "UCSF-BMSR"
    shutil.copytree(synth_trees["ucsf-bmsr"], tree)
    seg = sorted(tree.rglob("*_seg.nii.gz"))[0]
    _rewrite(seg, lambda i: _values(i, lambda a: np.where(a > 0, 2, 0).astype(np.uint8)))
    rc, err = run(capsys, "convert", "ucsf-bmsr", tree, "-d", 524, "-j", 1)
    assert rc == 2 and "label values [2]" in err and "--label-map" in err
    rc, err = run(capsys, "convert", "ucsf-bmsr", tree, "-d", 524, "-j", 1, "--label-map", "1=ET", "2=ET", "3=ET")
    assert rc == 0, err
    folder = nnunet_dirs["nnUNet_raw"] / "Dataset524_UCSFBMSR"
    assert check_dataset(folder, SYNTH_CASES)["labels"] == {"background": 0, "ET": 1}
    assert read(folder / "labelsTr" / seg.name.replace("_seg", "")).max() == 1


# ---- resume ----------------------------------------------------------------------------------------------

def _outputs(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and ".nnunet_universal" not in p.parts}


def test_interrupted_convert_resumes(synth_trees, nnunet_dirs, tmp_path, monkeypatch, capsys):
    src = synth_trees["brats-mets"]
    rc, err = run(capsys, "convert", "brats-mets", src, "-d", 530, "-n", "Clean", "-j", 1)
    assert rc == 0, err
    clean = _outputs(nnunet_dirs["nnUNet_raw"] / "Dataset530_Clean")

    real, calls = writer.convert_case, []

    def crash_after_one(job):
        if len(calls) == 1:
            raise RuntimeError("simulated crash")
        calls.append(job.case.case_id)
        return real(job)

    monkeypatch.setattr(writer, "convert_case", crash_after_one)
    rc, err = run(capsys, "convert", "brats-mets", src, "-d", 531, "-n", "Clean", "-j", 1)
    assert rc == 2 and "simulated crash" in err
    folder = nnunet_dirs["nnUNet_raw"] / "Dataset531_Clean"
    assert not (folder / "dataset.json").exists()  # a partial folder never looks complete
    assert [m.stem for m in (folder / ".nnunet_universal" / "cases").glob("*.json")] == calls
    spy = []
    monkeypatch.setattr(writer, "convert_case", lambda job: spy.append(job.case.case_id) or real(job))
    rc, err = run(capsys, "convert", "brats-mets", src, "-d", 531, "-n", "Clean", "-j", 1)
    assert rc == 0, err
    assert len(spy) == SYNTH_CASES - 1 and calls[0] not in spy
    resumed = _outputs(folder)
    assert resumed.keys() == clean.keys()
    for k in clean:
        if k == "dataset.json" or k == "provenance.json":  # differ only by dataset id
            continue
        assert resumed[k] == clean[k], k

    # nothing to do on a rerun; a changed source file or a deleted output redoes just that case
    spy.clear()
    assert run(capsys, "convert", "brats-mets", src, "-d", 531, "-n", "Clean", "-j", 1)[0] == 0 and spy == []
    (folder / "imagesTr" / f"{calls[0]}_0002.nii.gz").unlink()
    assert run(capsys, "convert", "brats-mets", src, "-d", 531, "-n", "Clean", "-j", 1)[0] == 0
    assert spy == [calls[0]] and (folder / "imagesTr" / f"{calls[0]}_0002.nii.gz").exists()


def test_resume_detects_stale_and_removed_cases(synth_trees, nnunet_dirs, tmp_path, capsys):
    tree = tmp_path / "UCSF-BMSR"
    shutil.copytree(synth_trees["ucsf-bmsr"], tree)
    assert run(capsys, "convert", "ucsf-bmsr", tree, "-d", 532, "-j", 2)[0] == 0  # parallel workers
    folder = nnunet_dirs["nnUNet_raw"] / "Dataset532_UCSFBMSR"
    cases = sorted(load_universal(folder / "dataset.json").cases)
    markers = folder / ".nnunet_universal" / "cases"
    mtimes = {p.stem: p.stat().st_mtime_ns for p in markers.iterdir()}
    flair = next((tree / "UCSF_BrainMetastases_TRAIN" / cases[0]).glob("*_FLAIR.nii.gz"))
    _rewrite(flair, lambda i: _values(i, lambda a: a + 1))
    shutil.rmtree(tree / "UCSF_BrainMetastases_TRAIN" / cases[-1])
    assert run(capsys, "convert", "ucsf-bmsr", tree, "-d", 532, "-j", 1)[0] == 0
    after = {p.stem: p.stat().st_mtime_ns for p in markers.iterdir()}
    assert sorted(load_universal(folder / "dataset.json").cases) == sorted(after) == cases[:-1]
    assert not any(p.name.startswith(cases[-1]) for p in (folder / "imagesTr").iterdir())
    assert [c for c in after if after[c] != mtimes[c]] == [cases[0]]  # only the stale case was redone
    assert np.array_equal(read(folder / "imagesTr" / f"{cases[0]}_0002.nii.gz"), read(flair))
    check_dataset(folder, len(cases) - 1)


def test_dataset_id_taken_and_bad_source(synth_trees, nnunet_dirs, capsys):
    (nnunet_dirs["nnUNet_raw"] / "Dataset540_Other").mkdir()
    rc, err = run(capsys, "convert", "lits", synth_trees["lits"], "-d", 540)
    assert rc == 2 and "already used by Dataset540_Other" in err
    rc, err = run(capsys, "convert", "lits", synth_trees["lits"].parent / "nope", "-d", 541)
    assert rc == 2 and "input folder not found" in err
    rc, err = run(capsys, "convert", "ucsf-bmsr", synth_trees["lits"], "-d", 541)
    assert rc == 2 and "no cases found" in err
    assert os.environ["nnUNet_raw"] == str(nnunet_dirs["nnUNet_raw"])


# ---- reading each file once: the voxels from the integrity check's decompression equal ITK's reading ------------

def _nib_file(path: Path, arr: np.ndarray, nifti2: bool = False, big_endian: bool = False,
              slope: float | None = None) -> None:
    import nibabel as nib

    affine = np.array([[-0.9, 0.1, 0, 12], [0.1, 0.9, 0, -7], [0, 0, 2.5, 30], [0, 0, 0, 1]])
    img = (nib.Nifti2Image if nifti2 else nib.Nifti1Image)(arr, affine)
    if big_endian:
        img = img.__class__(arr.astype(arr.dtype.newbyteorder(">")), affine,
                            img.header.as_byteswapped(">") if hasattr(img.header, "as_byteswapped") else None)
    if slope is not None:
        img.header.set_slope_inter(slope, 0.0)
    nib.save(img, str(path))


@pytest.mark.parametrize("kind", ["int16", "uint8", "float32", "float64", "int32_4d", "nifti2", "big_endian",
                                  "scaled", "nii"])
def test_read_file_once_matches_itk(kind, tmp_path):
    from nnunet_universal.dataset_conversion.common import ConversionError
    from nnunet_universal.dataset_conversion.volume_read import read_file

    rng = np.random.default_rng(3)
    shape = (7, 6, 5, 3) if kind.endswith("4d") else (7, 6, 5)  # file (x, y, z[, t]) order
    dtype = {"uint8": np.uint8, "float32": np.float32, "float64": np.float64, "int32_4d": np.int32}.get(kind,
                                                                                                    np.int16)
    arr = (rng.normal(size=shape) * 100).astype(dtype)
    path = tmp_path / ("x.nii" if kind == "nii" else "x.nii.gz")
    _nib_file(path, arr, nifti2=kind == "nifti2", big_endian=kind == "big_endian",
              slope=2.0 if kind == "scaled" else None)
    try:
        ref = sitk.ReadImage(str(path))
    except RuntimeError:  # this ITK does not read the file (NIfTI-2 written by nibabel): neither does read_file
        with pytest.raises(ConversionError, match="cannot be read"):
            read_file(str(path), "c", scratch=tmp_path)
        return
    src = read_file(str(path), "c", scratch=tmp_path)
    assert src.stored == path.read_bytes() and src.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    refs = [ref[:, :, :, k] for k in range(ref.GetSize()[3])] if ref.GetDimension() == 4 else [ref]
    assert len(src.volumes) == len(refs)
    for vol, r in zip(src.volumes, refs, strict=True):
        expected = sitk.GetArrayFromImage(r)
        assert vol.array.dtype == expected.dtype and np.array_equal(vol.array, expected), kind
        assert vol.GetSize() == r.GetSize() and np.allclose(vol.GetSpacing(), r.GetSpacing())
        assert np.allclose(vol.GetOrigin(), r.GetOrigin()) and np.allclose(vol.GetDirection(), r.GetDirection())
    assert (src.header is None) == (kind == "scaled")  # scaled voxels: ITK's full reader, no header reuse
