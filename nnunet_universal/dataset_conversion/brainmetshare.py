"""BrainMetShare (Stanford) reader: the original PNG-slice release and the NIfTI re-release (auto-detected).

PNG release: ``stanford_release_brainmask/mets_stanford_releaseMask_train/Mets_005/{0,1,2,3,seg}/*.png``.
Slices are stacked along z in numeric order of their file names (``10.png`` after ``9.png``); PNG has no
geometry, so spacing comes from ``--spacing X Y Z``, else from a ``spacing_mm.json`` next to the case folders
(per case; ``nnunet-universal synth brainmetshare`` writes one, since its cases are not on the real release's grid),
else the real release's 0.94 x 0.94 x 1.0 mm; which one was used and why is recorded in provenance. Identity
direction and zero origin. Folders: 0 BRAVO (gradient-echo T1 post) -> ``T1c_GRE``, 1 T1 spin-echo pre ->
``T1``, 2 T1 spin-echo post -> ``T1c``, 3 FLAIR -> ``FLAIR`` (registry comment: no channel is dropped).
NIfTI re-release: ``train/Mets_XXX/{bravo,t1_pre,t1_gd,flair,seg}.nii.gz`` (geometry from the files).
Label: any non-zero value is a metastasis, written as class ``ET`` = 1 (the U-Harmony paper evaluates it as ET).
The test folders have no labels and are not read.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

from nnunet_universal.dataset_conversion.common import ConversionError, find_nifti, inside, is_hidden
from nnunet_universal.dataset_conversion.layouts import SPACING_FILE
from nnunet_universal.dataset_conversion.spec import CaseSpec, ImageRef, LabelTable, SourceSpec, parse_label_map
from nnunet_universal.registry import SOURCES

logger = logging.getLogger(__name__)

DEFAULT_SPACING = (0.94, 0.94, 1.0)
PNG_FOLDERS: dict[str, str] = {"0": "T1c_GRE", "1": "T1", "2": "T1c", "3": "FLAIR"}
NIFTI_FILES: dict[str, str] = {"bravo": "T1c_GRE", "t1_pre": "T1", "t1_gd": "T1c", "flair": "FLAIR"}
SLOTS = ["T1", "T1c", "T1c_GRE", "FLAIR"]
_PNG_RE = re.compile(r"^(\d+)\.png$", re.IGNORECASE)


def _subdirs(p: Path) -> list[Path]:
    return [d for d in sorted(p.iterdir()) if d.is_dir() and not is_hidden(d.name)] if p.is_dir() else []


def _find_layout(input_dir: Path) -> tuple[str, Path]:
    """Return ("png" | "nifti", folder holding the training case folders)."""
    candidates = [input_dir / "mets_stanford_releaseMask_train",
                  input_dir / "stanford_release_brainmask" / "mets_stanford_releaseMask_train",
                  input_dir / "train", input_dir]
    for root in candidates:
        for d in _subdirs(root):
            if (d / "0").is_dir() and (d / "seg").is_dir():
                return "png", root
            if find_nifti(d, "bravo") or find_nifti(d, "t1_gd"):
                return "nifti", root
    raise ConversionError(
        f"{input_dir} holds neither the PNG release (Mets_XXX/0..3/seg) nor the NIfTI re-release "
        "(train/Mets_XXX/bravo.nii.gz, …)", file=input_dir,
        fix="point the converter at stanford_release_brainmask (or its mets_stanford_releaseMask_train folder)")


def _png_slices(folder: Path, case: str, input_dir: Path) -> list[Path]:
    """The slice files of ``folder`` in index order; raise if one is stray or a symlink pointing outside."""
    with os.scandir(folder) as it:  # one directory read; DirEntry caches the file type (no stat per slice)
        entries = [e for e in it if not is_hidden(e.name) and e.is_file()]
    bad = [e.name for e in entries if not _PNG_RE.match(e.name)]
    if bad:
        raise ConversionError(f"unexpected files {bad[:5]} (slices must be named by index, e.g. 12.png)",
                              case=case, file=folder, fix="remove the stray files or rename the slices")
    folder_inside = inside(folder, input_dir)  # then a slice is inside unless it is itself a symlink
    outside = [Path(e.path) for e in entries
               if not folder_inside or (e.is_symlink() and not inside(e.path, input_dir))]
    if outside:
        raise ConversionError("is a symlink pointing outside the input folder", case=case, file=outside[0],
                              fix="copy the real file into the dataset folder")
    return [Path(e.path) for e in sorted(entries, key=lambda e: int(_PNG_RE.match(e.name).group(1)))]


def _png_case(d: Path, input_dir: Path, spacing: tuple[float, float, float]) -> CaseSpec:
    cid = d.name
    missing = [f"{k}/" for k in [*PNG_FOLDERS, "seg"] if not (d / k).is_dir()]
    if missing:
        raise ConversionError(f"missing sequence/label folder(s) {missing}", case=cid, file=d,
                              fix="restore them or remove the case folder")
    refs: dict[str, ImageRef] = {}
    index_sets = {}
    for k in [*PNG_FOLDERS, "seg"]:
        slices = _png_slices(d / k, cid, input_dir)
        if not slices:
            raise ConversionError("has no PNG slices", case=cid, file=d / k,
                                  fix="restore the slices or remove the case")
        index_sets[k] = [int(_PNG_RE.match(f.name).group(1)) for f in slices]
        refs[k] = ImageRef("png", str(d / k), spacing=spacing, files=tuple(str(f) for f in slices))
    if any(v != index_sets["seg"] for v in index_sets.values()):
        counts = {k: len(v) for k, v in index_sets.items()}
        raise ConversionError(f"the slice folders hold different slice indices (counts {counts})", case=cid,
                              file=d, fix="restore the missing slices so every folder has the same indices")
    return CaseSpec(case_id=cid, source_id=cid, group=cid,
                    images={PNG_FOLDERS[k]: refs[k] for k in PNG_FOLDERS}, label=refs["seg"])


def _nifti_case(d: Path, input_dir: Path) -> CaseSpec:
    cid = d.name
    files = {stem: find_nifti(d, stem) for stem in [*NIFTI_FILES, "seg"]}
    missing = [f"{k}.nii.gz" for k, f in files.items() if f is None]
    if missing:
        raise ConversionError(f"missing sequence/label file(s) {missing}", case=cid, file=d,
                              fix="restore them or remove the case folder")
    outside = [f for f in files.values() if not inside(f, input_dir)]
    if outside:
        raise ConversionError("is a symlink pointing outside the input folder", case=cid, file=outside[0],
                              fix="copy the real file into the dataset folder")
    return CaseSpec(case_id=cid, source_id=cid, group=cid,
                    images={slot: ImageRef("file", str(files[k])) for k, slot in NIFTI_FILES.items()},
                    label=ImageRef("file", str(files["seg"])))


def read_spacing_file(path: Path) -> dict[str, tuple[float, float, float]]:
    """Per-case spacing (mm) from a :data:`SPACING_FILE`; raise a ConversionError naming the file if it is bad."""
    try:
        table = json.loads(path.read_text())["spacing_mm"]
        out = {str(c): tuple(float(v) for v in s) for c, s in table.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise ConversionError(f"unreadable spacing file ({type(e).__name__}: {e})", file=path,
                              fix='it must hold {"spacing_mm": {"CASE": [x, y, z], ...}}; fix or delete it, or pass '
                                  "--spacing X Y Z") from None
    bad = [c for c, s in out.items() if len(s) != 3 or not all(0 < v < 100 for v in s)]
    if bad:
        raise ConversionError(f"spacing of {bad[:5]} is not three positive sizes in mm", file=path,
                              fix="fix or delete the file, or pass --spacing X Y Z")
    return out  # type: ignore[return-value]


def _png_spacings(root: Path, spacing: tuple[float, float, float] | None,
                  ) -> tuple[tuple[float, float, float] | dict[str, tuple[float, float, float]], str]:
    """The PNG cases' spacing (one for all, or per case) and where it came from: --spacing, the spacing file, or
    the real release's default."""
    if spacing is not None:
        return tuple(float(s) for s in spacing), "option --spacing"  # type: ignore[return-value]
    sidecar = root / SPACING_FILE
    if sidecar.is_file():
        return read_spacing_file(sidecar), f"per case from {sidecar}; --spacing X Y Z overrides it"
    return DEFAULT_SPACING, ("default: the real release's spacing, as PNG slices carry no geometry; pass "
                             "--spacing X Y Z for data on another grid")


def discover(source: str, input_dir: Path, label_map: dict[str, str] | None = None,
             spacing: tuple[float, float, float] | None = None, **_: object) -> SourceSpec:
    """List the training cases of either BrainMetShare release."""
    layout, root = _find_layout(input_dir)
    if layout == "nifti" and spacing:
        logger.warning("--spacing is ignored for the NIfTI re-release of BrainMetShare (the files carry geometry)")
    table = parse_label_map(label_map, LabelTable.from_pairs([(1, "ET")], binary=True), str(input_dir))
    options: dict[str, object] = {"layout": layout}
    spacings: tuple[float, float, float] | dict[str, tuple[float, float, float]] | None = None
    if layout == "png":
        spacings, why = _png_spacings(root, spacing)
        options.update(spacing_mm={c: list(s) for c, s in spacings.items()} if isinstance(spacings, dict)
                       else list(spacings), spacing_source=why)
    spec = SourceSpec(source=source, title=SOURCES[source].title, domain="brainmetshare",
                      default_name="BrainMetShare", slots=list(SLOTS), required=list(SLOTS), labels=table,
                      input_dir=input_dir, lesion_wise=True, options=options)
    spec.options["direction"] = "identity" if layout == "png" else "from files"
    for d in _subdirs(root):
        try:
            if layout == "nifti":
                spec.add_case(_nifti_case(d, input_dir))
                continue
            case_spacing = spacings.get(d.name) if isinstance(spacings, dict) else spacings
            if case_spacing is None:
                raise ConversionError(f"not listed in {SPACING_FILE}", case=d.name, file=root / SPACING_FILE,
                                      fix="add its spacing there (or re-run 'nnunet-universal synth'), or pass "
                                          "--spacing X Y Z for every case")
            spec.add_case(_png_case(d, input_dir, case_spacing))
        except ConversionError as e:
            spec.bad.append(e)
    spec.finalize()
    return spec
