"""Input cases for ``nnunet-universal predict``: slot-named images or a folder in nnU-Net naming.

A case maps channel indices of the model (its slot order) to image files. Slots that are not given are
filled with zeros of the case's geometry, exactly like missing slots in training (DESIGN §4.3), so the
network sees them as missing. The images of one case must share their geometry: a mismatch means they are
not co-registered, and silently resampling them would hide that, so it is an error naming both files.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import SimpleITK as sitk

from nnunet_universal.nifti_integrity import count_nonfinite, is_nifti, verify_nifti

if TYPE_CHECKING:
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

logger = logging.getLogger(__name__)

#: Tolerances for comparing spacing, origin and direction (nnU-Net compares with ``np.allclose``; the absolute
#: term absorbs float32 rounding of NIfTI headers).
GEOMETRY_RTOL = 1e-5
GEOMETRY_ATOL = 1e-4


@dataclass
class CaseInput:
    """One case to predict: output name and channel index -> image file (only the given channels)."""

    case_id: str
    files: dict[int, Path]
    #: channels the case's dataset says it lacks (zero-filled files of a merged ``imagesTs``): no warning for them
    known_missing: frozenset[int] = frozenset()

    def slots(self, model_slots: list[str]) -> list[str]:
        """Names of the given slots, in the model's channel order."""
        return [model_slots[i] for i in sorted(self.files)]


def cases_from_images(images: dict[str, str], model_slots: list[str], case_id: str = "case") -> list[CaseInput]:
    """One case from ``{slot: file}`` (``--image SLOT=FILE``); unknown slots and missing files are errors."""
    if not images:
        raise ValueError("no --image given; pass one or more SLOT=FILE pairs, e.g. --image T1c=a.nii.gz")
    by_lower = {s.lower(): i for i, s in enumerate(model_slots)}
    files: dict[int, Path] = {}
    for slot, fname in images.items():
        idx = by_lower.get(slot.lower())
        if idx is None:
            raise ValueError(f"unknown slot {slot!r} in --image {slot}={fname}; this model's slots are "
                             f"{', '.join(model_slots)}")
        if idx in files:
            raise ValueError(f"slot {model_slots[idx]} is given twice (--image {slot}={fname} and {files[idx]})")
        path = Path(fname)
        if not path.is_file():
            raise FileNotFoundError(f"image for slot {model_slots[idx]} not found: {path}")
        files[idx] = path
    check_case_id(case_id, "--case-id")
    return [CaseInput(case_id, files)]


def check_case_id(case_id: str, where: str) -> str:
    """Return ``case_id`` if it is a safe output name: not empty, no folder separator, no leading '.', no '..',
    no control character (it names ``{case}{ending}`` and ``{case}.routing.json`` in the output folder)."""
    if (not case_id or case_id.startswith(".") or ".." in case_id or re.search(r"[/\\\x00-\x1f]", case_id)):
        raise ValueError(f"{where}: case id {case_id!r} is not a safe file name (it must not be empty, start with "
                         "'.', contain '..', '/' or '\\'); pick a plain name such as patient7")
    return case_id


def check_case_files(case: CaseInput) -> None:
    """Refuse truncated/corrupt NIfTI inputs and float inputs with NaN/Inf voxels (``ValueError`` naming the file).

    nnU-Net's SimpleITK reader would read a cut-off file with zeros in place of the missing voxels and turn NaN/Inf
    into 0, so such inputs would be predicted silently wrong.
    """
    for path in case.files.values():
        if not is_nifti(path):
            continue
        info = verify_nifti(path, keep="float")
        bad = count_nonfinite(info)
        if bad:
            raise ValueError(f"case {case.case_id}: {path} has {bad} NaN/Inf voxels; replace them with a valid value "
                             "(e.g. 0 or the background intensity) in a copy of the file and predict that")


def cases_from_folder(folder: Path, num_channels: int, file_ending: str) -> list[CaseInput]:
    """Cases of a folder in nnU-Net naming ``{CASE}_{XXXX}{file_ending}``; missing channel files are allowed.

    ``XXXX`` indexes the model's channels (its slots). Files with the right ending that do not follow the
    naming, or that name a channel the model does not have, are errors (a wrong folder or a wrong model).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"input folder not found: {folder}")
    pattern = re.compile(rf"^(?P<case>.+)_(?P<ch>\d{{4}}){re.escape(file_ending)}$")
    cases: dict[str, dict[int, Path]] = {}
    for path in sorted(folder.iterdir()):
        if not path.name.endswith(file_ending) or path.name.startswith("."):
            continue
        m = pattern.match(path.name)
        if m is None:
            raise ValueError(f"{path} does not follow nnU-Net naming CASE_XXXX{file_ending} (XXXX = channel index); "
                             "rename it or use --image SLOT=FILE")
        ch = int(m["ch"])
        if ch >= num_channels:
            raise ValueError(f"{path} names channel {ch}, but this model has {num_channels} channels "
                             f"(_0000 to _{num_channels - 1:04d})")
        check_case_id(m["case"], str(path))
        cases.setdefault(m["case"], {})[ch] = path
    if not cases:
        raise FileNotFoundError(f"no images named CASE_XXXX{file_ending} in {folder}")
    missing = _known_missing_channels(folder)
    return [CaseInput(c, files, missing.get(c, frozenset())) for c, files in sorted(cases.items())]


def _known_missing_channels(folder: Path) -> dict[str, frozenset[int]]:
    """Case -> channels it lacks, from the ``universal`` block of the dataset.json beside ``folder`` (a merged
    dataset's ``imagesTs``/``imagesTr``, whose missing slots are zero-filled files); empty when there is none."""
    try:
        dj = json.loads((folder.parent / "dataset.json").read_text())
        channels = {str(v): int(k) for k, v in dj["channel_names"].items()}
        cases = dj["universal"]["cases"]
        return {c: frozenset(i for name, i in channels.items() if name not in info["slots"])
                for c, info in cases.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}


def _geometry(path: Path) -> dict[str, tuple] | None:
    """Size, spacing, origin and direction from the image header (None if SimpleITK cannot read it)."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        return None
    return {"size": reader.GetSize(), "spacing": reader.GetSpacing(), "origin": reader.GetOrigin(),
            "direction": reader.GetDirection()}


def check_geometry(case: CaseInput, model_slots: list[str]) -> None:
    """Raise ``ValueError`` naming both files if the given images of ``case`` differ in size/spacing/origin/direction.

    Headers SimpleITK cannot read are left to nnU-Net's reader, which checks shapes and spacings itself.
    """
    items = sorted(case.files.items())
    ref_ch, ref_path = items[0]
    ref = _geometry(ref_path)
    if ref is None:
        return
    for ch, path in items[1:]:
        geo = _geometry(path)
        if geo is None:
            continue
        for key in ("size", "spacing", "origin", "direction"):
            a, b = ref[key], geo[key]
            same = a == b if key == "size" else (
                len(a) == len(b) and np.allclose(a, b, rtol=GEOMETRY_RTOL, atol=GEOMETRY_ATOL))
            if not same:
                raise ValueError(
                    f"case {case.case_id}: geometry mismatch ({key}) between {ref_path} ({model_slots[ref_ch]}: "
                    f"{_fmt(a)}) and {path} ({model_slots[ch]}: {_fmt(b)}). The images of one case must be "
                    "co-registered on the same grid; resample them to one reference image first"
                )


def _fmt(v: tuple) -> str:
    return "(" + ", ".join(f"{x:g}" if isinstance(x, float) else str(x) for x in v) + ")"


def read_case(case: CaseInput, plans_manager: PlansManager, num_channels: int,
              verify: bool = True) -> tuple[np.ndarray, dict]:
    """Read the given images with the plans' reader and zero-fill the missing channels.

    Returns (data (num_channels, *spatial) float32, nnU-Net image properties) ready for the preprocessor's
    ``run_case_npy`` - the same array nnU-Net's ``run_case`` would have read if the zero images were on disk.
    ``verify``: run :func:`check_case_files` first (False when the caller already did).
    """
    if verify:
        check_case_files(case)
    rw = plans_manager.image_reader_writer_class()
    channels = sorted(case.files)
    given, properties = rw.read_images([str(case.files[c]) for c in channels])
    data = np.zeros((num_channels, *given.shape[1:]), dtype=np.float32)
    data[channels] = given
    for c, img in zip(channels, given, strict=True):
        if np.ptp(img) == 0 and c not in case.known_missing:
            logger.warning("case %s: image %s is constant; the network treats that slot as missing",
                           case.case_id, case.files[c])
    return data, properties
