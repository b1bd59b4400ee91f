"""BraTS 2023 readers (METS, GLI, MEN, PED, SSA share one naming).

``BraTS-{MET|GLI|MEN|PED|SSA}-NNNNN-TTT/BraTS-…-TTT-{t1n,t1c,t2w,t2f,seg}.nii.gz`` (``.nii`` accepted too).
Labels 1 NETC, 2 SNFH, 3 ET (2023 numbering; BraTS <= 2021 used 4 for ET: pass ``--label-map 1=NETC 2=SNFH 4=ET``;
BraTS-PED 2024 uses other classes: map them with ``--label-map``). Regions ET = {ET}, TC = {NETC, ET},
WT = {NETC, SNFH, ET}. Time points of one patient (``-TTT``) form one group (same fold).
"""

from __future__ import annotations

import re
from pathlib import Path

from nnunet_universal.dataset_conversion.common import (
    ConversionError,
    find_nifti,
    first_outside,
    is_hidden,
    outside_error,
    unexpected_folder,
)
from nnunet_universal.dataset_conversion.spec import CaseSpec, ImageRef, LabelTable, SourceSpec, parse_label_map
from nnunet_universal.registry import SOURCES

#: source key -> (challenge tag in case ids, default dataset name)
CHALLENGES: dict[str, tuple[str, str]] = {
    "brats-mets": ("MET", "BraTSMETS"),
    "brats-gli": ("GLI", "BraTSGLI"),
    "brats-men": ("MEN", "BraTSMEN"),
    "brats-ped": ("PED", "BraTSPED"),
    "brats-ssa": ("SSA", "BraTSSSA"),
}
#: file suffix -> modality slot
SEQUENCES: dict[str, str] = {"t1n": "T1", "t1c": "T1c", "t2w": "T2", "t2f": "FLAIR"}
LABELS = [(1, "NETC"), (2, "SNFH"), (3, "ET")]
REGIONS = {"ET": ["ET"], "TC": ["NETC", "ET"], "WT": ["NETC", "SNFH", "ET"]}
_CASE_RE = re.compile(r"^BraTS-([A-Za-z]+)-(\d+)-(\d+)$")


def _case_dirs(root: Path) -> tuple[list[Path], list[Path]]:
    """(case folders, other folders beside them)."""
    subs = [p for p in sorted(root.iterdir()) if p.is_dir() and not is_hidden(p.name)]
    dirs = [p for p in subs if _CASE_RE.match(p.name)]
    if not dirs and len(subs) == 1:  # the user may have pointed at the folder above the release folder
        return _case_dirs(subs[0])
    return dirs, [p for p in subs if not _CASE_RE.match(p.name)] if dirs else []


def discover(source: str, input_dir: Path, label_map: dict[str, str] | None = None, **_: object) -> SourceSpec:
    """List the cases of a BraTS 2023 training release (no voxel is read here)."""
    tag, default_name = CHALLENGES[source]
    spec = SourceSpec(source=source, title=SOURCES[source].title, domain=source.replace("-", "_"),
                      default_name=default_name, slots=["T1", "T1c", "T2", "FLAIR"],
                      required=["T1", "T1c", "T2", "FLAIR"],
                      labels=parse_label_map(label_map, LabelTable.from_pairs(LABELS), str(input_dir)),
                      input_dir=input_dir, regions=dict(REGIONS), lesion_wise=SOURCES[source].metastasis)
    dirs, others = _case_dirs(input_dir)
    spec.bad += [unexpected_folder(d, "BraTS-XXX-NNNNN-TTT") for d in others]
    other = sorted({_CASE_RE.match(d.name).group(1).upper() for d in dirs} - {tag})
    if other:
        guess = [k for k, (t, _) in CHALLENGES.items() if t in other]
        raise ConversionError(
            f"found BraTS-{other[0]} case folders in {input_dir}, but source {source!r} expects BraTS-{tag}-…",
            file=input_dir, fix=f"use source {guess[0] if guess else 'brats-…'} for these cases, or keep one "
                                "challenge per input folder")
    labelled = [d for d in dirs if find_nifti(d, f"{d.name}-seg")]
    if dirs and not labelled:
        raise ConversionError(f"no case in {input_dir} has a '-seg' label file: this looks like a validation or "
                              "test release", file=input_dir, fix="convert the training release (with labels)")
    for d in dirs:
        cid = d.name
        m = _CASE_RE.match(cid)
        images: dict[str, ImageRef] = {}
        missing = []
        for suffix, slot in SEQUENCES.items():
            f = find_nifti(d, f"{cid}-{suffix}")
            if f is None:
                missing.append(f"{cid}-{suffix}.nii.gz")
            else:
                images[slot] = ImageRef("file", str(f))
        seg = find_nifti(d, f"{cid}-seg")
        if seg is None:
            missing.append(f"{cid}-seg.nii.gz")
        if (out := first_outside([*(r.path for r in images.values()), seg], input_dir)) is not None:
            spec.bad.append(outside_error(cid, out))
            continue
        if missing:
            spec.bad.append(ConversionError(f"missing sequence/label file(s) {missing}", case=cid, file=d,
                                            fix="restore the missing file(s) or remove the case folder"))
            continue
        spec.add_case(CaseSpec(case_id=cid, source_id=cid, group=f"BraTS-{m.group(1)}-{m.group(2)}",
                               images=images, label=ImageRef("file", str(seg))))
    spec.finalize()
    return spec
