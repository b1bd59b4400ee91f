"""Write a discovered source as an nnU-Net raw dataset: validate each case, write it atomically, resume.

Per case: every file is read once and every volume checked first (readable, not truncated, finite, not constant,
one geometry, known label values), then written; a case is complete once its marker exists
(``.nnunet_universal/cases/<case>.json``, with the size and mtime of every source file and the conversion
options). A rerun skips complete cases whose marker still matches and redoes the rest. dataset.json is removed
while cases are being (re)written and written last.
Outputs are the source bytes where nothing changes (a 3D NIfTI on the case's reference grid; labels that already
hold the output ids: a ``.nii.gz`` copied, a ``.nii`` gzipped) and are re-encoded otherwise (deflate level 1,
:mod:`.volume_write`); optional sequences a case lacks are zero-filled. The marker and ``provenance.json`` record
the sha256 of every source file and of every output (merge uses the latter to skip re-checking unchanged files).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nnunet_universal.atomic_io import atomic_write_json
from nnunet_universal.dataset_conversion.common import (
    FILE_ENDING,
    SKIP_HINT,
    ConversionError,
    Layout,
    digest,
    sha256_file,
)
from nnunet_universal.dataset_conversion.runner import (
    Outcome,
    finish_case,
    is_complete,
    remove_orphans,
    run_jobs,
    write_report,
)
from nnunet_universal.dataset_conversion.spec import CaseSpec, ImageRef, LabelTable, SourceSpec
from nnunet_universal.dataset_conversion.validation import (
    check_geometry,
    check_voxels,
    load_ref,
    normalize_label,
    relpath_or_abs,
)
from nnunet_universal.dataset_conversion.volume_read import SourceFile, Volume
from nnunet_universal.dataset_conversion.volume_write import file_state, write_image, write_source, write_zeros
from nnunet_universal.metadata import CaseInfo, DomainInfo, UniversalMeta
from nnunet_universal.nifti_integrity import is_nifti

logger = logging.getLogger(__name__)
CONVERTER_VERSION = 2  # 2: outputs deflated at level 1, zero-filled slots copied (not linked)


@dataclass
class ConvertJob:
    """Everything a worker needs for one case (picklable)."""

    case: CaseSpec
    root: str
    input_dir: str
    slots: list[str]
    labels: LabelTable
    key: str


def _unchanged(ref: ImageRef, exact: bool) -> bool:
    """Whether the output is the source file itself: one 3D NIfTI on the case's reference grid."""
    return ref.kind == "file" and is_nifti(ref.path) and exact


def convert_case(job: ConvertJob) -> Outcome:
    """Load, validate and write one case; return its marker."""
    case, layout, cid = job.case, Layout(Path(job.root)), job.case.case_id
    files: dict[str, SourceFile] = {}  # every file read, once (bytes, sha256, volumes)
    present = [s for s in job.slots if s in case.images]
    images: dict[str, Volume] = {}
    exact: dict[str, bool] = {}
    ref_slot = present[0]
    for slot in present:
        ref = case.images[slot]
        img = load_ref(ref, cid, files, layout.tmp)
        check_voxels(img, cid, ref.path, f"{slot} image")
        images[slot] = img
        exact[slot] = check_geometry(images[ref_slot], case.images[ref_slot].path, img, ref.path, cid)
    ref_img, ref_path = images[ref_slot], case.images[ref_slot].path
    seg = load_ref(case.label, cid, files, layout.tmp)
    label_exact = check_geometry(ref_img, ref_path, seg, case.label.path, cid)
    label_arr, label_unchanged = normalize_label(seg, job.labels, cid, case.label.path)

    outputs: dict[str, str] = {}
    sha: dict[str, str] = {}
    for i, slot in enumerate(job.slots):
        rel = f"imagesTr/{cid}_{i:04d}{FILE_ENDING}"
        final = layout.root / rel
        if slot not in images:
            like = files.get(case.label.path) if label_exact else None  # a uint8 label on the grid: its header
            outputs[rel], sha[rel] = "zeros", write_zeros(ref_img, final, layout, like=like)
        elif _unchanged(case.images[slot], exact[slot]):
            outputs[rel], sha[rel] = write_source(files[case.images[slot].path], final, layout.tmp)
        else:  # a channel of a 4D file, a PNG stack, another format, or a grid within tolerance of the reference
            outputs[rel], sha[rel] = "written", write_image(images[slot].array, ref_img, final, layout.tmp)
    rel = f"labelsTr/{cid}{FILE_ENDING}"
    if label_unchanged and _unchanged(case.label, label_exact):
        outputs[rel], sha[rel] = write_source(files[case.label.path], layout.root / rel, layout.tmp, label=True)
    else:
        outputs[rel], sha[rel] = "written", write_image(label_arr, ref_img, layout.root / rel, layout.tmp,
                                                         label=True)

    root_in = Path(job.input_dir)
    sources = {relpath_or_abs(f, root_in): files[f].sha256 if f in files else sha256_file(f)
               for f in case.source_files()}
    marker = {"key": job.key, "case": cid, "source_id": case.source_id, "group": case.group,
              "slots": [s for s in job.slots if s in images], "outputs": list(outputs),
              "state": {rel: file_state(os.stat(layout.root / rel)) for rel in outputs},  # for merge's trust check
              "provenance": {"sources": sources, "outputs": outputs, "sha256": sha,
                             "reference_grid": relpath_or_abs(ref_path, root_in)}}
    return finish_case(layout, cid, marker)


def _case_key(spec: SourceSpec, case: CaseSpec) -> str:
    return digest([CONVERTER_VERSION, case.fingerprint(), spec.slots, sorted(spec.labels.values.items()),
                   spec.labels.classes, spec.labels.binary, case.source_id, case.group,
                   {k: list(v.__dict__.values()) for k, v in case.images.items()}, list(case.label.__dict__.values())])


def write_dataset(spec: SourceSpec, root: Path, name: str, workers: int, skip_bad: bool,
                  options: dict[str, Any]) -> Path:
    """Convert every case of ``spec`` into ``root`` (resuming), then write dataset.json and the reports."""
    layout = Layout(root)
    skipped = [e.as_dict() for e in spec.bad]
    if spec.bad and not skip_bad:
        e = spec.bad[0]
        raise ConversionError(e.problem, case=e.case, file=e.file, fix=f"{e.fix}; {SKIP_HINT}")
    layout.prepare()
    jobs, done = [], {}
    for case in spec.cases:
        key = _case_key(spec, case)
        marker = is_complete(layout, case.case_id, key)
        if marker is not None:
            done[case.case_id] = marker
        else:
            layout.marker(case.case_id).unlink(missing_ok=True)
            jobs.append(ConvertJob(case, str(root), str(spec.input_dir), spec.slots, spec.labels, key))
    logger.info("%s: %d case(s) up to date, %d to convert", root.name, len(done), len(jobs))
    if jobs:
        (root / "dataset.json").unlink(missing_ok=True)  # never leave a dataset.json describing a partial folder
    for o in run_jobs(convert_case, jobs, workers, f"convert {spec.source}", skip_bad):
        if o.error:
            skipped.append(o.error)
        else:
            done[o.case_id] = o.marker
    if not done:
        write_report(root, skipped, f"convert {spec.source} {spec.input_dir}")  # the message points at it
        reasons = "; ".join(f"{s['case'] or s['file']}: {s['problem']}" for s in skipped[:3])
        raise ConversionError(f"no valid case left to convert in {spec.input_dir} ({len(skipped)} skipped: "
                              f"{reasons}{'; …' if len(skipped) > 3 else ''}; all listed in "
                              f"{root / 'conversion_report.md'})", file=spec.input_dir, fix="fix the reported cases")
    cases = sorted(done)
    remove_orphans(layout, set(cases), {o for c in cases for o in done[c]["outputs"]})
    write_report(root, skipped, f"convert {spec.source} {spec.input_dir}")
    atomic_write_json({"source": spec.source, "input_dir": str(spec.input_dir.resolve()), "options": options,
                       "cases": {c: done[c]["provenance"] for c in cases}}, root / "provenance.json")
    meta = UniversalMeta(
        slots=list(spec.slots),
        domains={spec.domain: DomainInfo(source=spec.title, slots=list(spec.slots),
                                         labels={c: i + 1 for i, c in enumerate(spec.labels.classes)},
                                         regions=dict(spec.regions), lesion_wise=spec.lesion_wise,
                                         modality=spec.modality)},
        cases={c: CaseInfo(domain=spec.domain, slots=done[c]["slots"], source_id=done[c]["source_id"],
                           group=done[c]["group"], split="train") for c in cases},
        provenance={"tool": "nnunet-universal convert", "converter_version": CONVERTER_VERSION,
                    "source": spec.source, "input_dir": str(spec.input_dir.resolve()), "options": options,
                    "label_table": spec.labels.describe(), "manifest": "provenance.json",
                    "skipped_cases": [s["case"] for s in skipped]},
    )
    dataset_json = {
        "name": name,
        "description": f"{spec.title}, converted by nnunet-universal",
        "channel_names": {str(i): s for i, s in enumerate(spec.slots)},
        "labels": spec.labels.output_labels(),
        "numTraining": len(cases),
        "file_ending": FILE_ENDING,
        "universal": meta.to_dict(),
    }
    meta.validate(str(root / "dataset.json"), label_names=dataset_json["labels"])
    atomic_write_json(dataset_json, root / "dataset.json")
    return root
