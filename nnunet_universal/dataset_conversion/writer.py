"""Write a discovered source as an nnU-Net raw dataset: validate each case, write it atomically, resume.

Per case: every volume is loaded and checked first (readable, finite, not constant, one geometry, known label
values), then written; a case is complete once its marker exists (``.nnunet_universal/cases/<case>.json``, with
the size and mtime of every source file and the conversion options). A rerun skips complete cases whose marker
still matches and redoes the rest. dataset.json is removed while cases are being (re)written and written last.
Outputs copy the source bytes where nothing changes (a ``.nii.gz`` on the case's reference grid; labels that
already hold the output ids) and are re-encoded otherwise; optional sequences a case lacks are zero-filled.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import SimpleITK as sitk

from nnunet_universal.atomic_io import atomic_write_json
from nnunet_universal.dataset_conversion.common import (
    FILE_ENDING,
    SKIP_HINT,
    ConversionError,
    Layout,
    array_to_image,
    atomic_copy,
    atomic_link_or_copy,
    atomic_write_image,
    digest,
    sha256_file,
    zero_template,
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
from nnunet_universal.metadata import CaseInfo, DomainInfo, UniversalMeta

logger = logging.getLogger(__name__)
CONVERTER_VERSION = 1


@dataclass
class ConvertJob:
    """Everything a worker needs for one case (picklable)."""

    case: CaseSpec
    root: str
    input_dir: str
    slots: list[str]
    labels: LabelTable
    key: str


def _copyable(ref: ImageRef, exact: bool) -> bool:
    return ref.kind == "file" and ref.path.endswith(FILE_ENDING) and exact


def convert_case(job: ConvertJob) -> Outcome:
    """Load, validate and write one case; return its marker."""
    case, layout, cid = job.case, Layout(Path(job.root)), job.case.case_id
    cache: dict[str, list[sitk.Image]] = {}
    present = [s for s in job.slots if s in case.images]
    images: dict[str, sitk.Image] = {}
    exact: dict[str, bool] = {}
    ref_slot = present[0]
    for slot in present:
        ref = case.images[slot]
        img = load_ref(ref, cid, cache)
        check_voxels(img, cid, ref.path, f"{slot} image")
        images[slot] = img
        exact[slot] = check_geometry(images[ref_slot], case.images[ref_slot].path, img, ref.path, cid)
    ref_img, ref_path = images[ref_slot], case.images[ref_slot].path
    seg = load_ref(case.label, cid, cache)
    label_exact = check_geometry(ref_img, ref_path, seg, case.label.path, cid)
    label_arr, label_unchanged = normalize_label(seg, job.labels, cid, case.label.path)
    del cache

    outputs: dict[str, str] = {}
    for i, slot in enumerate(job.slots):
        rel = f"imagesTr/{cid}_{i:04d}{FILE_ENDING}"
        final = layout.root / rel
        if slot not in images:
            outputs[rel] = "zeros:" + atomic_link_or_copy(zero_template(ref_img, layout), final, layout.tmp)
        elif _copyable(case.images[slot], exact[slot]):
            atomic_copy(Path(case.images[slot].path), final, layout.tmp)
            outputs[rel] = "copy"
        else:
            img = images[slot]
            if not exact[slot]:
                img = sitk.Image(img)
                img.CopyInformation(ref_img)
            atomic_write_image(img, final, layout.tmp)
            outputs[rel] = "written"
    rel = f"labelsTr/{cid}{FILE_ENDING}"
    if label_unchanged and _copyable(case.label, label_exact):
        atomic_copy(Path(case.label.path), layout.root / rel, layout.tmp)
        outputs[rel] = "copy"
    else:
        atomic_write_image(array_to_image(label_arr, ref_img), layout.root / rel, layout.tmp)
        outputs[rel] = "written"

    root_in = Path(job.input_dir)
    marker = {"key": job.key, "case": cid, "source_id": case.source_id, "group": case.group,
              "slots": [s for s in job.slots if s in images], "outputs": list(outputs),
              "provenance": {"sources": {relpath_or_abs(f, root_in): sha256_file(f) for f in case.source_files()},
                             "outputs": outputs, "reference_grid": relpath_or_abs(ref_path, root_in)}}
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
