"""UCSF-BMSR reader.

``UCSF-BMSR/UCSF_BrainMetastases_TRAIN/100101A/100101A_{T1pre,T1post,FLAIR,subtraction,seg}.nii.gz``; the
input may be the top folder or the TRAIN folder itself (the TEST folder has no labels and is not read).
Slots: T1pre -> T1, T1post -> T1c, FLAIR -> FLAIR (required), subtraction -> SUB (optional: zero-filled and left
out of the case's slots where absent; the SUB channel exists only if some case has it).
Labels: binary, 1 = ET (the enhancing lesion). Label files with values 2/3 are refused unless ``--label-map``
names them (e.g. ``--label-map 1=ET 2=ET 3=ET``), because their meaning is unverified.
Exams of one patient (``100101A``, ``100101B``) share the group ``100101`` and stay in one fold.
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
from nnunet_universal.registry import SOURCES, order_slots

SEQUENCES: dict[str, str] = {"T1pre": "T1", "T1post": "T1c", "FLAIR": "FLAIR", "subtraction": "SUB"}
REQUIRED = ["T1", "T1c", "FLAIR"]
_CASE_RE = re.compile(r"^(\d+)([A-Za-z]*)$")
TRAIN_FOLDER = "UCSF_BrainMetastases_TRAIN"


def _train_root(input_dir: Path) -> Path:
    for cand in (input_dir / TRAIN_FOLDER, input_dir / "UCSF-BMSR" / TRAIN_FOLDER):
        if cand.is_dir():
            return cand
    return input_dir


def discover(source: str, input_dir: Path, label_map: dict[str, str] | None = None, **_: object) -> SourceSpec:
    """List the exams of the UCSF-BMSR training release."""
    root = _train_root(input_dir)
    spec = SourceSpec(source=source, title=SOURCES[source].title, domain="ucsf_bmsr", default_name="UCSFBMSR",
                      slots=[], required=REQUIRED,
                      labels=parse_label_map(label_map, LabelTable.from_pairs([(1, "ET")]), str(input_dir)),
                      input_dir=input_dir, lesion_wise=True)
    subs = [p for p in sorted(root.iterdir()) if p.is_dir() and not is_hidden(p.name)]
    dirs = [p for p in subs if _CASE_RE.match(p.name)]
    if dirs:  # folders beside the exams (e.g. '100101 A'): listed, never silently ignored
        spec.bad += [unexpected_folder(p, "NNNNNN[A-Z] (e.g. 100101A)") for p in subs if not _CASE_RE.match(p.name)]
    if dirs and not any(find_nifti(d, f"{d.name}_seg") for d in dirs):
        raise ConversionError(f"no exam in {root} has a '_seg' label file: this looks like the TEST release",
                              file=root, fix=f"convert the {TRAIN_FOLDER} folder")
    slots: set[str] = set()
    for d in dirs:
        cid = d.name
        images: dict[str, ImageRef] = {}
        missing = []
        for suffix, slot in SEQUENCES.items():
            f = find_nifti(d, f"{cid}_{suffix}")
            if f is None:
                if slot in REQUIRED:
                    missing.append(f"{cid}_{suffix}.nii.gz")
            else:
                images[slot] = ImageRef("file", str(f))
        seg = find_nifti(d, f"{cid}_seg")
        if seg is None:
            missing.append(f"{cid}_seg.nii.gz")
        if (out := first_outside([*(r.path for r in images.values()), seg], input_dir)) is not None:
            spec.bad.append(outside_error(cid, out))
            continue
        if missing:
            spec.bad.append(ConversionError(f"missing sequence/label file(s) {missing}", case=cid, file=d,
                                            fix="restore the missing file(s) or remove the exam folder"))
            continue
        slots |= set(images)
        spec.add_case(CaseSpec(case_id=cid, source_id=cid, group=_CASE_RE.match(cid).group(1), images=images,
                               label=ImageRef("file", str(seg))))
    spec.slots = order_slots(slots | set(REQUIRED))
    spec.finalize()
    return spec
