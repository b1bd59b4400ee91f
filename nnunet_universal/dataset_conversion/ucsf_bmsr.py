"""UCSF-BMSR reader (DATASETS.md "UCSF-BMSR").

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

from nnunet_universal.dataset_conversion.common import ConversionError, find_nifti, inside, is_hidden
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
    dirs = [p for p in sorted(root.iterdir()) if p.is_dir() and not is_hidden(p.name) and _CASE_RE.match(p.name)]
    if dirs and not any(find_nifti(d, f"{d.name}_seg") for d in dirs):
        raise ConversionError(f"no exam in {root} has a '_seg' label file: this looks like the TEST release",
                              file=root, fix=f"convert the {TRAIN_FOLDER} folder")
    slots: set[str] = set()
    for d in dirs:
        cid = d.name
        images: dict[str, ImageRef] = {}
        missing, outside = [], []
        for suffix, slot in SEQUENCES.items():
            f = find_nifti(d, f"{cid}_{suffix}")
            if f is None:
                if slot in REQUIRED:
                    missing.append(f"{cid}_{suffix}.nii.gz")
            elif not inside(f, input_dir):
                outside.append(f)
            else:
                images[slot] = ImageRef("file", str(f))
        seg = find_nifti(d, f"{cid}_seg")
        if seg is None:
            missing.append(f"{cid}_seg.nii.gz")
        if outside:
            spec.bad.append(ConversionError("is a symlink pointing outside the input folder", case=cid,
                                            file=outside[0], fix="copy the real file into the dataset folder"))
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
