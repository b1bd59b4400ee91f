"""Synthetic native-layout datasets: golden layout checks per source (DATASETS.md), determinism, CLI, speed.

The readers here are written independently of ``synthetic/writers.py``: they read the tree the way a user of
the real dataset would (SimpleITK for geometry, nibabel for on-disk dtypes, Pillow for slice PNGs).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from PIL import Image

from nnunet_universal.registry import SYNTH_SOURCES
from nnunet_universal.synthetic.api import synthesize

CASES = 3
TOPS = {
    "brats-mets": "ASNR-MICCAI-BraTS2023-MET-Challenge-TrainingData",
    "ucsf-bmsr": "UCSF-BMSR",
    "brainmetshare": "stanford_release_brainmask",
    "lits": "LiTS",
    "msd-braintumour": "Task01_BrainTumour",
}


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> dict[str, Path]:
    """Each source written once (3 cases, default shape), shared by the golden tests."""
    root = tmp_path_factory.mktemp("synth")
    return {s: synthesize(s, root / s, cases=CASES, seed=7) for s in SYNTH_SOURCES}


def _geometry(path: Path) -> tuple:
    img = sitk.ReadImage(str(path))
    return img.GetSize(), img.GetSpacing(), img.GetOrigin(), img.GetDirection()


def _same_geometry(paths: list[Path]) -> tuple:
    geoms = [_geometry(p) for p in paths]
    ref = geoms[0]
    for p, g in zip(paths, geoms, strict=True):
        assert g[0] == ref[0], f"{p}: size {g[0]} != {ref[0]}"
        np.testing.assert_allclose(g[1], ref[1], rtol=1e-5, err_msg=f"spacing of {p}")
        np.testing.assert_allclose(g[2], ref[2], atol=1e-3, err_msg=f"origin of {p}")
        np.testing.assert_allclose(g[3], ref[3], atol=1e-6, err_msg=f"direction of {p}")
    return ref


def _disk_dtype(path: Path) -> np.dtype:
    return nib.load(str(path)).get_data_dtype()


def _array(path: Path) -> np.ndarray:
    return np.asarray(nib.load(str(path)).dataobj)


def _visible(files: list[Path]) -> list[Path]:
    return [f for f in files if not f.name.startswith(".")]


def _contrast(image: np.ndarray, seg: np.ndarray, label: int) -> float:
    """Mean signal in ``label`` over the median of the non-lesion foreground (how bright a compartment looks)."""
    fg = (image > 0) & (seg == 0)
    return float(image[seg == label].mean() / np.median(image[fg]))


def test_top_level_folder_names(written):
    assert {s: p.name for s, p in written.items()} == TOPS


def test_brats_mets_layout(written):
    top = written["brats-mets"]
    cases = sorted(p for p in top.iterdir())
    assert len(cases) == CASES and all(re.fullmatch(r"BraTS-MET-\d{5}-\d{3}", p.name) for p in cases)
    ets, snfh = [], []
    for case in cases:
        names = {f"{case.name}-{s}.nii.gz" for s in ("t1n", "t1c", "t2w", "t2f", "seg")}
        assert {f.name for f in case.iterdir()} == names
        files = [case / f"{case.name}-{s}.nii.gz" for s in ("t1n", "t1c", "t2w", "t2f", "seg")]
        size, spacing, origin, direction = _same_geometry(files)
        assert size == (60, 60, 39)
        np.testing.assert_allclose(spacing, (4.0, 4.0, 155 / 39), rtol=1e-3)  # the 240x240x155 mm SRI24 box
        np.testing.assert_allclose(direction, np.eye(3).ravel(), atol=1e-6)  # identity in ITK (LPS)
        np.testing.assert_allclose(origin, (0.0, -(size[1] - 1) * spacing[1], 0.0), atol=1e-3)
        assert all(_disk_dtype(f) == np.int16 for f in files[:4]) and _disk_dtype(files[4]) == np.uint8
        seg = _array(files[4])
        assert set(np.unique(seg)) <= {0, 1, 2, 3} and seg.max() > 0
        t1c, t2f = _array(files[1]).astype(float), _array(files[3]).astype(float)
        assert t1c[0, 0, 0] == 0 and (t1c[seg > 0] > 0).all(), "skull-stripped: zero outside, lesions inside brain"
        if (seg == 3).any():
            ets.append(_contrast(t1c, seg, 3))
        if (seg == 2).any():
            snfh.append(_contrast(t2f, seg, 2))
    assert ets and min(ets) > 1.15, f"ET must enhance on t1c: {ets}"
    assert snfh and min(snfh) > 1.1, f"SNFH must be bright on t2f: {snfh}"


def test_ucsf_bmsr_layout(written):
    train = written["ucsf-bmsr"] / "UCSF_BrainMetastases_TRAIN"
    assert [p.name for p in written["ucsf-bmsr"].iterdir()] == ["UCSF_BrainMetastases_TRAIN"]
    cases = sorted(train.iterdir())
    ids = [p.name for p in cases]
    assert len(ids) == CASES and all(re.fullmatch(r"\d{6}[A-Z]", i) for i in ids)
    patients = [i[:6] for i in ids]
    assert any(patients.count(p) == 2 for p in patients), f"some patient must have a follow-up exam: {ids}"
    with_sub, spacings = 0, set()
    for case in cases:
        required = [case / f"{case.name}_{s}.nii.gz" for s in ("T1pre", "T1post", "FLAIR", "seg")]
        sub = case / f"{case.name}_subtraction.nii.gz"
        assert {f.name for f in case.iterdir()} - {sub.name} == {f.name for f in required}
        files = required + ([sub] if sub.exists() else [])
        with_sub += sub.exists()
        size, spacing, _, _ = _same_geometry(files)
        spacings.add(tuple(round(s, 3) for s in spacing))
        assert all(_disk_dtype(f) == np.float32 for f in files if "_seg" not in f.name)
        assert _disk_dtype(required[3]) == np.uint8
        seg = _array(required[3])
        assert set(np.unique(seg)) == {0, 1}, "UCSF-BMSR _seg is binary"
        t1pre = _array(required[0])
        assert (t1pre > 0).mean() > 0.95, "not skull-stripped: signal (scalp, noise floor) everywhere"
        assert _contrast(_array(required[1]), seg, 1) > 1.1, "metastases enhance on T1post"
    assert 0 < with_sub < CASES, "the subtraction image exists for some exams, not all"
    assert len(spacings) == CASES, "voxel size varies between exams (scanner space, not an atlas)"


def _png_stack(folder: Path) -> np.ndarray:
    names = [p.name for p in folder.iterdir()]
    assert all(re.fullmatch(r"\d+\.png", n) for n in names), names
    idx = sorted(int(n[:-4]) for n in names)
    assert idx == list(range(len(idx))), "slices numbered 0..n-1"
    slices = []
    for i in idx:
        with Image.open(folder / f"{i}.png") as im:
            assert im.mode == "L", f"{folder}/{i}.png: 8-bit greyscale expected, got {im.mode}"
            slices.append(np.asarray(im))
    return np.stack(slices)  # (z, rows, cols)


def test_brainmetshare_layout(written):
    top = written["brainmetshare"]
    assert [p.name for p in top.iterdir()] == ["mets_stanford_releaseMask_train"]
    cases = sorted(p for p in (top / "mets_stanford_releaseMask_train").iterdir() if p.is_dir())
    assert len(cases) == CASES and all(re.fullmatch(r"Mets_\d{3}", p.name) for p in cases)
    # PNG has no geometry: the true spacing of every case is written next to the case folders (convert reads it)
    train = top / "mets_stanford_releaseMask_train"
    spacing = json.loads((train / "spacing_mm.json").read_text())["spacing_mm"]
    assert sorted(spacing) == [p.name for p in cases]
    assert all(len(v) == 3 and min(v) > 1 for v in spacing.values())
    assert sorted(train.iterdir()) == [*cases, train / "spacing_mm.json"]
    for case in cases:
        assert sorted(p.name for p in case.iterdir()) == ["0", "1", "2", "3", "seg"]
        vols = {name: _png_stack(case / name) for name in ("0", "1", "2", "3", "seg")}
        shapes = {v.shape for v in vols.values()}
        assert shapes == {(40, 64, 64)}, shapes
        seg = vols["seg"]
        assert set(np.unique(seg)) == {0, 255}
        brain = vols["2"] > 0
        assert not brain[:, 0, 0].any() and brain[seg > 0].all(), "skull-stripped and lesions inside the brain"
        lesion = seg > 0
        for name in ("0", "2"):  # both post-contrast T1s show the metastases bright
            img = vols[name].astype(float)
            assert img[lesion].mean() > 1.15 * np.median(img[brain & ~lesion]), f"{case.name}/{name}"


def test_lits_layout(written):
    top = written["lits"]
    names = sorted(p.name for p in top.iterdir())
    assert names == sorted([f"volume-{i}.nii" for i in range(CASES)] + [f"segmentation-{i}.nii" for i in range(CASES)])
    flipped_z, spacings = 0, set()
    for i in range(CASES):
        vol, seg = top / f"volume-{i}.nii", top / f"segmentation-{i}.nii"
        for f in (vol, seg):
            head = f.read_bytes()[:348]
            assert head[344:348] == b"n+1\x00", f"{f} must be an uncompressed single-file NIfTI"
        size, spacing, _, direction = _same_geometry([vol, seg])
        spacings.add(tuple(round(s, 3) for s in spacing))
        flipped_z += direction[8] < 0
        assert _disk_dtype(vol) == np.int16 and _disk_dtype(seg) in (np.float32, np.uint8)
        hu, lab = _array(vol).astype(float), _array(seg)
        assert set(np.unique(lab)) <= {0.0, 1.0, 2.0} and (lab == 1).any()
        assert hu.min() >= -1024 and np.median(hu[0, 0, :]) < -900, "air around the body"
        liver = hu[lab == 1].mean()
        assert 40 < liver < 160, f"liver HU {liver}"
        if (lab == 2).any():
            assert hu[lab == 2].mean() < liver - 10, "tumours are hypodense"
    assert flipped_z >= 1, "some LiTS volumes have a flipped z direction"
    assert len(spacings) == CASES, "slice thickness / pixel size vary between volumes"


def test_msd_braintumour_layout(written):
    top = written["msd-braintumour"]
    assert sorted(p.name for p in top.iterdir()) == ["._dataset.json", "dataset.json", "imagesTr", "imagesTs",
                                                      "labelsTr"]
    meta = json.loads((top / "dataset.json").read_text())
    assert meta["modality"] == {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"}
    assert meta["labels"] == {"0": "background", "1": "edema", "2": "non-enhancing tumor", "3": "enhancing tumour"}
    assert meta["tensorImageSize"] == "4D" and meta["numTraining"] == CASES == len(meta["training"])
    for folder in ("imagesTr", "labelsTr"):
        files = sorted((top / folder).iterdir())
        junk = [f for f in files if f.name.startswith("._")]
        assert len(junk) == CASES and len(_visible(files)) == CASES
        for j in junk:  # AppleDouble resource forks: not NIfTI, not even gzip
            assert j.read_bytes()[:4] == b"\x00\x05\x16\x07"
            with pytest.raises(OSError), gzip.open(j) as fh:
                fh.read()
    for entry in meta["training"]:
        img, lab = top / entry["image"], top / entry["label"]
        assert re.fullmatch(r"BRATS_\d{3}\.nii\.gz", img.name) and img.name == lab.name
        im4, seg = nib.load(str(img)), nib.load(str(lab))
        assert im4.shape == (60, 60, 39, 4) and seg.shape == im4.shape[:3]
        assert im4.get_data_dtype() == np.float32 and seg.get_data_dtype() == np.uint8
        np.testing.assert_allclose(im4.affine, seg.affine)
        data, s = np.asarray(im4.dataobj), np.asarray(seg.dataobj)
        assert set(np.unique(s)) <= {0, 1, 2, 3} and (s == 3).any()
        flair, t1w, t1gd = data[..., 0], data[..., 1], data[..., 2]
        assert _contrast(flair, s, 1) > 1.1, "channel 0 (FLAIR): oedema bright"
        assert _contrast(t1gd, s, 3) > 1.15 > _contrast(t1w, s, 3), "channel 2 (t1gd) enhances, channel 1 does not"


@pytest.mark.parametrize("source", SYNTH_SOURCES)
def test_deterministic(tmp_path, source):
    """Same seed, same bytes; another seed, other bytes; more cases keep the first ones."""

    def digest(top: Path) -> dict[str, str]:
        return {str(p.relative_to(top)): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted(top.rglob("*")) if p.is_file()}

    a = digest(synthesize(source, tmp_path / "a", cases=1, seed=3))
    b = digest(synthesize(source, tmp_path / "b", cases=1, seed=3))
    c = digest(synthesize(source, tmp_path / "c", cases=1, seed=4))
    assert a == b
    data = [h for k, h in a.items() if not k.endswith(".json") and "._" not in k]
    changed = set(data) - set(c.values())
    assert len(changed) >= 0.6 * len(data), "another seed must change the data (empty PNG slices may repeat)"
    if source == "brats-mets":
        d = digest(synthesize(source, tmp_path / "d", cases=2, seed=3))
        assert {k: v for k, v in d.items() if k in a} == a


def test_custom_shape_keeps_field_of_view(tmp_path):
    top = synthesize("brats-mets", tmp_path, cases=1, seed=0, shape=(48, 40, 31))
    f = next(top.rglob("*-t1c.nii.gz"))
    size, spacing, _, _ = _geometry(f)
    assert size == (48, 40, 31)
    np.testing.assert_allclose(np.array(size) * spacing, (240, 240, 155), rtol=1e-3)


@pytest.mark.parametrize("source", ["ucsf-bmsr", "lits"])
def test_lesion_scale_grows_lesions(tmp_path, source):
    """--lesion-scale multiplies the radius range: same seed, more lesion voxels (MR metastases, CT tumours)."""
    def lesion_voxels(scale: float) -> int:
        top = synthesize(source, tmp_path / str(scale), cases=2, seed=1, lesion_scale=scale)
        segs = [f for f in top.rglob("*") if f.is_file() and ("seg" in f.name.lower()) and ".nii" in f.name]
        assert len(segs) == 2
        lesion = 2 if source == "lits" else 1  # LiTS: 1 liver, 2 tumour; UCSF: 1 enhancing tumour
        return sum(int((np.rint(np.asarray(nib.load(f).dataobj)) == lesion).sum()) for f in segs)

    assert lesion_voxels(2.5) > 2 * lesion_voxels(1.0) > 0


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="brats-mets.*ucsf-bmsr"):
        synthesize("brats-gli", tmp_path)
    with pytest.raises(ValueError, match="cases"):
        synthesize("lits", tmp_path, cases=0)
    with pytest.raises(ValueError, match="shape"):
        synthesize("lits", tmp_path, shape=(8, 64, 64))
    with pytest.raises(ValueError, match="lesion-scale"):
        synthesize("lits", tmp_path, lesion_scale=10)


def test_cli_with_preview(tmp_path):
    preview = tmp_path / "p.png"
    exe = Path(sys.executable).with_name("nnunet-universal")
    r = subprocess.run([str(exe), "synth", "brainmetshare", "-o", str(tmp_path / "out"), "--cases", "2",
                        "--seed", "1", "--preview", str(preview)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "stanford_release_brainmask" in r.stdout
    assert f"preview: {preview}" in r.stdout and "voxel spacing: 3.75 x 3.75 x " in r.stdout
    assert "spacing_mm.json" in r.stdout, "where the PNG cases' spacing was recorded"
    assert len(list((tmp_path / "out" / TOPS["brainmetshare"] / "mets_stanford_releaseMask_train").glob("Mets_*"))) == 2
    with Image.open(preview) as im:
        assert im.format == "PNG" and im.width > 400 and im.height > 400
        px = np.asarray(im.convert("RGB")).astype(int)
    reddish = (px[..., 0] > 150) & (px[..., 1] < 140) & (px[..., 2] < 140)
    assert reddish.sum() > 20, "the label overlay must be visible in the preview"
    r = subprocess.run([str(exe), "synth", "brainmetshare", "-o", str(tmp_path), "--shape", "4", "4", "4"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "shape" in r.stderr


def test_default_cases_reuse_the_cached_template(tmp_path):
    """What kept a default-size case under a second: the MNI template is read and shelled once per process and
    per pooling, never per case (a wall-clock bound would fail on a busy machine and pass a slow change on a
    fast one, so the work is counted instead)."""
    from nnunet_universal.synthetic import anatomy

    synthesize("brats-mets", tmp_path / "warm", cases=1)  # loads and caches the template
    raw, pooled = anatomy._raw_template.cache_info(), anatomy.load_template.cache_info()
    for source in SYNTH_SOURCES:
        synthesize(source, tmp_path / source, cases=2, seed=1)
    assert anatomy._raw_template.cache_info().misses == raw.misses  # the template files: never read again
    after = anatomy.load_template.cache_info()
    assert after.misses - pooled.misses <= 1  # at most the other pooling (1 or 2 mm) is built, once
    assert after.hits - pooled.hits >= len(SYNTH_SOURCES)  # the later cases reused a cached template


# ---- another institution's scans of a known source (synthetic/shifts.py) ---------------------------------------

def _render_phantom(seq, seed: int = 0) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """``render`` on a controlled phantom: halves of WM and GM (with a CSF slab), no lesions; 2 mm voxels."""
    from nnunet_universal.synthetic.appearance import render
    from nnunet_universal.synthetic.institutions import CLASSES

    shape = (48, 48, 24)
    comp = {c: np.zeros(shape, np.float32) for c in CLASSES}
    comp["wm"][:24], comp["gm"][24:44], comp["csf"][44:] = 1, 1, 1
    return render(np.random.default_rng(seed), comp, seq, (2.0, 2.0, 2.0)), comp


def _noise(image: np.ndarray, mask: np.ndarray) -> float:
    """Noise sigma relative to the signal: MAD of in-plane neighbour differences (the bias field is too smooth to
    contribute) over the median, inside ``mask``."""
    d = np.diff(image, axis=1)[mask[:, 1:]]
    return float(np.median(np.abs(d - np.median(d))) / np.median(image[mask]))


def _bias(image: np.ndarray, mask: np.ndarray) -> float:
    """Spread of the smooth multiplicative field inside a uniform ``mask``: std of the log of the heavily
    smoothed image."""
    from scipy import ndimage

    smooth = ndimage.gaussian_filter(image, 3.0)
    return float(np.std(np.log(smooth[ndimage.binary_erosion(mask, iterations=4)])))


@pytest.mark.parametrize("source", ["brats-mets", "ucsf-bmsr", "brainmetshare", "msd-braintumour"])
def test_unseen_institution_parameters_are_outside_the_training_ones(source):
    """Every sequence of the shifted profile: other contrast curve, more noise, stronger bias than any training
    profile, more blur; names, contrasts, order, lesions and geometry rules stay the source's (the converter's
    view); the source's own profile is unchanged."""
    from dataclasses import replace

    from nnunet_universal.synthetic.institutions import MR_SOURCES
    from nnunet_universal.synthetic.shifts import INSTITUTION_SHIFTS, TRAINING_MAX_BIAS, shifted_profile

    own = MR_SOURCES[source]
    before = repr(own)
    new = shifted_profile(own, INSTITUTION_SHIFTS["unseen"])
    assert repr(own) == before and shifted_profile(own, None) is own
    assert [(s.name, s.contrast) for s in new.sequences] == [(s.name, s.contrast) for s in own.sequences]
    assert replace(new, sequences=own.sequences, notes=own.notes) == own
    for a, b in zip(own.sequences, new.sequences, strict=True):
        assert b.gamma == pytest.approx(1.4 * a.gamma) and b.noise == pytest.approx(1.7 * a.noise)
        assert b.bias > TRAINING_MAX_BIAS >= a.bias
        assert b.blur_mm[2] > a.blur_mm[2] and b.scale < a.scale


def test_unseen_institution_renders_the_intended_differences():
    """Same phantom, same random stream: the shifted sequence is noisier, has a stronger bias field, a flatter
    GM/WM contrast, other intensity units; the source's own rendering is what it was."""
    from nnunet_universal.synthetic.institutions import MR_SOURCES
    from nnunet_universal.synthetic.shifts import INSTITUTION_SHIFTS, InstitutionShift, shifted_profile

    seq = MR_SOURCES["brats-mets"].sequences[1]  # t1c
    unseen = shifted_profile(MR_SOURCES["brats-mets"], INSTITUTION_SHIFTS["unseen"]).sequences[1]
    (a, comp), (b, _) = _render_phantom(seq), _render_phantom(unseen)
    wm, gm = comp["wm"] > 0.5, comp["gm"] > 0.5
    assert _noise(b, wm) > 1.3 * _noise(a, wm)
    assert _bias(b, wm) > 3 * _bias(a, wm)
    assert np.median(b[wm]) < 0.75 * np.median(a[wm]), "other scanner units (x0.6)"

    def wm_gm(shift: InstitutionShift | None) -> float:
        x, _ = _render_phantom(shifted_profile(MR_SOURCES["brats-mets"], shift).sequences[1])
        return float(np.median(x[wm]) / np.median(x[gm]))

    # the contrast curve: flatter tissue contrast alone lowers WM/GM, the steeper gamma alone raises it, and the
    # named shift's WM/GM is what its two parameters predict (t1c: WM 0.78, GM 0.55, CSF 0.22)
    own = wm_gm(None)
    assert wm_gm(InstitutionShift("flat", tissue_contrast=0.5)) < own - 0.1
    assert wm_gm(InstitutionShift("steep", gamma=1.5)) > own + 0.1
    mean = (0.78 + 0.55 + 0.22) / 3
    predicted = ((mean + 0.75 * (0.78 - mean)) / (mean + 0.75 * (0.55 - mean))) ** 1.4
    assert wm_gm(INSTITUTION_SHIFTS["unseen"]) == pytest.approx(predicted, rel=0.05)
    assert own == pytest.approx(0.78 / 0.55, rel=0.05) and abs(predicted - own) > 0.05
    # an explicit override changes what it names only (noise: same field, same contrast)
    (c, _) = _render_phantom(shifted_profile(MR_SOURCES["brats-mets"],
                                             InstitutionShift("noisy", noise=3.0)).sequences[1])
    assert _noise(c, wm) > 2 * _noise(a, wm) and _bias(c, wm) == pytest.approx(_bias(a, wm), rel=0.2)
    assert float(np.median(c[wm]) / np.median(c[gm])) == pytest.approx(own, rel=0.03)


def test_unseen_institution_converts_with_the_domains_converters(tmp_path, nnunet_dirs):
    """Unseen-institution cases of every MR source of the accuracy suites convert with the source's converter,
    keep its label protocol and channels, are deterministic, come on coarser voxels (thicker slices), and differ
    from the same subjects at the source's own institution in noise and intensity units."""
    from nnunet_universal.dataset_conversion.api import convert
    from nnunet_universal.synthetic.api import synthesize_dataset

    converters = {"brats-mets": "brats-mets", "ucsf-bmsr": "ucsf-bmsr", "brainmetshare": "brainmetshare",
                  "msd-braintumour": "msd"}
    labels = {"brats-mets": {"NETC", "SNFH", "ET"}, "ucsf-bmsr": {"ET"}, "brainmetshare": {"ET"},
              "msd-braintumour": {"edema", "non-enhancing tumor", "enhancing tumour"}}
    for i, (source, conv) in enumerate(converters.items()):
        own = synthesize_dataset(source, tmp_path / "own" / source, cases=2, seed=5)
        new = synthesize_dataset(source, tmp_path / "new" / source, cases=2, seed=5, institution="unseen")
        again = synthesize_dataset(source, tmp_path / "again" / source, cases=2, seed=5, institution="unseen")
        def layout(top: Path) -> set[Path]:  # files, PNG slices by their folder (thicker slices: fewer of them)
            return {p.parent if p.suffix == ".png" else p for p in (q.relative_to(top) for q in top.rglob("*"))
                    if (top / p).is_file()}

        assert layout(new.top) == layout(own.top), "same layout and file names as the source's own cases"
        files = sorted(p.relative_to(new.top) for p in new.top.rglob("*") if p.is_file())
        assert all((new.top / f).read_bytes() == (again.top / f).read_bytes() for f in files), "deterministic"
        for case, sp in new.spacings.items():
            ratio = np.array(sp) / np.array(own.spacings[case])
            assert ratio[2] > 1.2 and min(ratio) > 1.05, f"{source} {case}: voxel size x{ratio}"
        a = convert(conv, own.top, 700 + 2 * i, f"Own{i}", workers=1)
        b = convert(conv, new.top, 701 + 2 * i, f"New{i}", workers=1)
        dja, djb = (json.loads((d / "dataset.json").read_text()) for d in (a, b))
        assert djb["labels"] == dja["labels"] and djb["channel_names"] == dja["channel_names"]
        assert set(djb["labels"]) - {"background"} == labels[source]
        assert len(list((b / "labelsTr").glob("*.nii.gz"))) == 2
        ids = set(djb["labels"].values())
        for lab in sorted((b / "labelsTr").glob("*.nii.gz")):
            assert set(np.unique(sitk.GetArrayFromImage(sitk.ReadImage(str(lab))))) <= ids
            img_a = sitk.ReadImage(str(a / "imagesTr" / lab.name.replace(".nii.gz", "_0000.nii.gz")))
            img_b = sitk.ReadImage(str(b / "imagesTr" / lab.name.replace(".nii.gz", "_0000.nii.gz")))
            assert sitk.ReadImage(str(lab)).GetSize() == img_b.GetSize() != img_a.GetSize()
            if source in ("brats-mets", "msd-braintumour"):  # skull-stripped, scanner units kept in the files
                xa, xb = sitk.GetArrayFromImage(img_a).astype(float), sitk.GetArrayFromImage(img_b).astype(float)
                ma, mb = xa > 0.2 * np.median(xa[xa > 0]), xb > 0.2 * np.median(xb[xb > 0])
                assert np.median(xb[mb]) < 0.8 * np.median(xa[ma]), f"{source}: other intensity units"
                assert _noise(xb, mb) > 1.2 * _noise(xa, ma), f"{source}: noisier"


def test_institution_arguments():
    from nnunet_universal.synthetic.shifts import InstitutionShift, resolve_institution

    assert resolve_institution("unseen").name == "unseen" and resolve_institution(None) is None
    with pytest.raises(ValueError, match="unknown institution 'nowhere'.*unseen"):
        resolve_institution("nowhere")
    with pytest.raises(ValueError, match="brain MR sources"):
        synthesize("lits", Path("/nonexistent"), institution="unseen")
    with pytest.raises(ValueError, match="unknown compartment"):
        InstitutionShift("x", deltas=(("bone", 0.1),))
    with pytest.raises(ValueError, match="positive"):
        InstitutionShift("x", noise=0.0)
    assert InstitutionShift("x", deltas=(("wm", -0.1),)).as_dict()["deltas"] == [["wm", -0.1]]


def test_cli_institution_flag(tmp_path):
    """`nnunet-universal synth --institution unseen` writes the source's layout with the unseen institution's
    voxel size (thicker slices than the same subjects at the source's institution); an unknown name is refused."""
    exe = Path(sys.executable).with_name("nnunet-universal")
    for name, extra in (("own", []), ("unseen", ["--institution", "unseen"])):
        r = subprocess.run([str(exe), "synth", "ucsf-bmsr", "-o", str(tmp_path / name), "--cases", "1", *extra],
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
    own, new = (sorted((tmp_path / n).rglob("*.nii.gz")) for n in ("own", "unseen"))
    assert [p.relative_to(tmp_path / "own") for p in own] == [p.relative_to(tmp_path / "unseen") for p in new]
    assert sitk.ReadImage(str(new[0])).GetSpacing()[2] > 1.2 * sitk.ReadImage(str(own[0])).GetSpacing()[2]
    r = subprocess.run([str(exe), "synth", "ucsf-bmsr", "-o", str(tmp_path / "x"), "--institution", "nowhere"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "invalid choice: 'nowhere'" in r.stderr
