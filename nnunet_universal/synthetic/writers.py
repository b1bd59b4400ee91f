"""One writer per native layout (the layouts the converters read): folder and file names, label protocol, dtypes.

Where the public layout leaves a detail open, the choice made here is stated next to the code (e.g. image dtypes
that public loaders report but no specification fixes).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from nnunet_universal.dataset_conversion.layouts import SPACING_FILE
from nnunet_universal.synthetic.case import CaseData
from nnunet_universal.synthetic.grid import LPS_FLIPS, storage_affine, to_storage
from nnunet_universal.synthetic.io import write_appledouble, write_json, write_nifti, write_png
from nnunet_universal.synthetic.lesions import EDEMA, ET, NEC


def _int16(image: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(image), -32768, 32767).astype(np.int16)


class NativeWriter:
    """Writes cases of one source in its native layout below ``out_dir / top``."""

    top: str = ""
    #: native label value -> name (what a reader of the real dataset expects)
    label_names: dict[int, str] = {}

    def native_labels(self, labels: np.ndarray) -> np.ndarray:
        """Canonical labels (see ``CaseData``) -> the source's own annotation protocol (same shape)."""
        return labels

    def write_case(self, top: Path, case: CaseData) -> list[Path]:
        raise NotImplementedError

    def finish(self, top: Path, cases: list[CaseData]) -> None:
        """Dataset-level files written after all cases (default: none)."""

    def write_spacing(self, top: Path, spacings: dict[str, tuple[float, float, float]]) -> Path | None:
        """Record the cases' voxel spacing where the format cannot (default: the files carry it; nothing written)."""
        return None


class BratsWriter(NativeWriter):
    """``ASNR-MICCAI-BraTS2023-MET-Challenge-TrainingData/<id>/<id>-{t1n,t1c,t2w,t2f,seg}.nii.gz``.

    Labels 1 NETC, 2 SNFH, 3 ET. Images int16 and seg uint8: the dtypes public loaders report for the 2023
    releases (not fixed by any specification; readers must not rely on them).
    """

    top = "ASNR-MICCAI-BraTS2023-MET-Challenge-TrainingData"
    label_names = {0: "background", 1: "NETC", 2: "SNFH", 3: "ET"}

    def write_case(self, top: Path, case: CaseData) -> list[Path]:
        folder, aff, out = top / case.case_id, storage_affine(case.grid, case.flips), []
        for name, image in case.images.items():
            out.append(folder / f"{case.case_id}-{name}.nii.gz")
            write_nifti(out[-1], to_storage(_int16(image), case.flips), aff, np.int16)
        out.append(folder / f"{case.case_id}-seg.nii.gz")
        write_nifti(out[-1], to_storage(self.native_labels(case.labels), case.flips), aff, np.uint8)
        return out


class UcsfWriter(NativeWriter):
    """``UCSF-BMSR/UCSF_BrainMetastases_TRAIN/<id>/<id>_{T1pre,T1post,FLAIR,subtraction,seg}.nii.gz``.

    ``_seg`` is binary (1 = metastasis: the enhancing lesion with any necrotic centre it encloses, i.e. the
    gross tumour contoured for radiosurgery; oedema is not labelled), as third-party loaders of the TRAIN
    release read it. Images float32 and seg uint8 (assumed: no public description fixes them).
    """

    top = "UCSF-BMSR"
    label_names = {0: "background", 1: "metastasis"}

    def native_labels(self, labels: np.ndarray) -> np.ndarray:
        return ((labels == ET) | (labels == NEC)).astype(np.uint8)

    def write_case(self, top: Path, case: CaseData) -> list[Path]:
        folder = top / "UCSF_BrainMetastases_TRAIN" / case.case_id
        aff, out = storage_affine(case.grid, case.flips), []
        for name, image in case.images.items():
            out.append(folder / f"{case.case_id}_{name}.nii.gz")
            write_nifti(out[-1], to_storage(image, case.flips), aff, np.float32)
        out.append(folder / f"{case.case_id}_seg.nii.gz")
        write_nifti(out[-1], to_storage(self.native_labels(case.labels), case.flips), aff, np.uint8)
        return out


class BrainMetShareWriter(NativeWriter):
    """``stanford_release_brainmask/mets_stanford_releaseMask_train/<Mets_NNN>/{0,1,2,3,seg}/<k>.png``.

    One 8-bit greyscale PNG per axial slice, ``k`` = slice index from 0 (inferior) upwards, not zero-padded
    (0-based numbering assumed; readers sort numerically). Pixel rows run anterior to posterior and columns
    patient right to left (radiological display), so stacking the slices as (z, row, col) gives an LPS array.
    Each volume is scaled to 0..255 by its own 99.8th percentile. Seg: 0 and 255 (whole metastasis).
    """

    top = "stanford_release_brainmask"
    label_names = {0: "background", 255: "metastasis"}

    def native_labels(self, labels: np.ndarray) -> np.ndarray:
        return np.where((labels == ET) | (labels == NEC), 255, 0).astype(np.uint8)

    @staticmethod
    def _uint8(image: np.ndarray) -> np.ndarray:
        hi = float(np.percentile(image[image > 0], 99.8)) if (image > 0).any() else 1.0
        return np.clip(np.rint(image / max(hi, 1e-6) * 255.0), 0, 255).astype(np.uint8)

    def write_case(self, top: Path, case: CaseData) -> list[Path]:
        folder, out = top / "mets_stanford_releaseMask_train" / case.case_id, []
        vols = {name: self._uint8(im) for name, im in case.images.items()}
        vols["seg"] = self.native_labels(case.labels)
        for name, vol in vols.items():
            stored = to_storage(vol, LPS_FLIPS)
            for k in range(stored.shape[2]):
                out.append(folder / name / f"{k}.png")
                write_png(out[-1], np.ascontiguousarray(stored[:, :, k].T))
        return out

    def write_spacing(self, top: Path, spacings: dict[str, tuple[float, float, float]]) -> Path:
        """PNG has no geometry, and synthetic cases are not on the real release's 0.94 x 0.94 x 1 mm grid: write
        their true spacing (x, y, z mm) next to the case folders, where ``convert brainmetshare`` reads it.

        Entries of cases already in the file (an earlier run into the same folder) are kept unless rewritten.
        """
        path = top / "mets_stanford_releaseMask_train" / SPACING_FILE
        try:
            old = json.loads(path.read_text()).get("spacing_mm", {}) if path.is_file() else {}
        except ValueError:
            old = {}
        table = {**old, **{c: [float(v) for v in s] for c, s in spacings.items()}}
        write_json(path, {"note": "synthetic data (nnunet-universal synth): true voxel spacing x, y, z in mm per "
                                  "case; 'nnunet-universal convert brainmetshare' uses it unless --spacing is given",
                          "spacing_mm": dict(sorted(table.items()))})
        return path


class MsdBrainTumourWriter(NativeWriter):
    """Decathlon ``Task01_BrainTumour``: 4D ``imagesTr/BRATS_NNN.nii.gz`` (x, y, z, 4: FLAIR, T1w, t1gd, T2w),
    ``labelsTr`` (1 oedema, 2 non-enhancing tumour, 3 enhancing tumour), dataset.json, ``._*`` junk files.

    Images float32, labels uint8, identity-direction affine (assumed, as the Decathlon files read in nibabel).
    """

    top = "Task01_BrainTumour"
    label_names = {0: "background", 1: "edema", 2: "non-enhancing tumor", 3: "enhancing tumour"}
    modalities = ("FLAIR", "T1w", "t1gd", "T2w")

    def native_labels(self, labels: np.ndarray) -> np.ndarray:
        out = np.zeros_like(labels, dtype=np.uint8)
        out[labels == EDEMA], out[labels == NEC], out[labels == ET] = 1, 2, 3
        return out

    def write_case(self, top: Path, case: CaseData) -> list[Path]:
        if tuple(case.images) != self.modalities:
            raise RuntimeError(f"{case.case_id}: channels {tuple(case.images)} != Decathlon order {self.modalities}")
        aff = storage_affine(case.grid, case.flips)
        image4d = np.stack([case.images[m] for m in self.modalities], axis=-1)  # (x, y, z, 4)
        img = top / "imagesTr" / f"{case.case_id}.nii.gz"
        lab = top / "labelsTr" / f"{case.case_id}.nii.gz"
        write_nifti(img, to_storage(image4d, case.flips), aff, np.float32)
        write_nifti(lab, to_storage(self.native_labels(case.labels), case.flips), aff, np.uint8)
        for p in (img, lab):
            write_appledouble(p)
        return [img, lab]

    def finish(self, top: Path, cases: list[CaseData]) -> None:
        """dataset.json with the Decathlon's keys, listing every labelled case present in imagesTr."""
        (top / "imagesTs").mkdir(parents=True, exist_ok=True)
        ids = sorted(p.name[: -len(".nii.gz")] for p in (top / "imagesTr").glob("BRATS_*.nii.gz")
                     if (top / "labelsTr" / p.name).is_file())
        ids.sort(key=lambda s: int(re.sub(r"\D", "", s) or 0))
        meta = {
            "name": "BRATS",
            "description": "Gliomas segmentation tumour and oedema in on brain images (synthetic, nnunet-universal)",
            "reference": "https://www.med.upenn.edu/sbia/brats2017.html",
            "licence": "CC-BY-SA 4.0",
            "release": "2.0 04/05/2018",
            "tensorImageSize": "4D",
            "modality": {str(i): m for i, m in enumerate(self.modalities)},
            "labels": {str(k): v for k, v in self.label_names.items()},
            "numTraining": len(ids),
            "numTest": 0,
            "training": [{"image": f"./imagesTr/{i}.nii.gz", "label": f"./labelsTr/{i}.nii.gz"} for i in ids],
            "test": [],
        }
        write_json(top / "dataset.json", meta)
        write_appledouble(top / "dataset.json")


class LitsWriter(NativeWriter):
    """``LiTS/volume-N.nii`` (int16 HU) + ``LiTS/segmentation-N.nii`` (0 background, 1 liver, 2 tumour).

    Uncompressed. Segmentations are float32 except for cases the generator marks ``seg_dtype = uint8`` (both
    occur in the public release as loaders report it); the direction matrix is whatever the case's flips say.
    """

    top = "LiTS"
    label_names = {0: "background", 1: "liver", 2: "tumor"}

    def write_case(self, top: Path, case: CaseData) -> list[Path]:
        n = case.case_id
        aff = storage_affine(case.grid, case.flips)
        vol, seg = top / f"volume-{n}.nii", top / f"segmentation-{n}.nii"
        write_nifti(vol, to_storage(_int16(case.images["volume"]), case.flips), aff, np.int16)
        seg_dtype = np.dtype(str(case.extras.get("seg_dtype", "float32")))
        write_nifti(seg, to_storage(case.labels, case.flips), aff, seg_dtype)
        return [vol, seg]


WRITERS: dict[str, NativeWriter] = {
    "brats-mets": BratsWriter(),
    "ucsf-bmsr": UcsfWriter(),
    "brainmetshare": BrainMetShareWriter(),
    "msd-braintumour": MsdBrainTumourWriter(),
    "lits": LitsWriter(),
}
