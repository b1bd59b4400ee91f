"""LiTS reader: ``volume-N.nii`` + ``segmentation-N.nii``, paired by number.

Files may sit in one folder or in "Training Batch 1/2" sub-folders (searched recursively; symlinked files and
folders are followed inside the input folder, one pointing outside is refused and its case listed);
``.nii.gz`` is accepted too; ``test-volume-N`` files have no labels and are not read. Ids are not zero-padded:
the case id is ``LiTS_{N:04d}``, so ``volume-3`` and ``volume-003`` collide and are reported as duplicates.
Labels 1 liver, 2 tumor (float label files are rounded when within 1e-3 of those values); regions
liver = {liver, tumor}, tumor = {tumor}. Slot ``CT``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from nnunet_universal.dataset_conversion.common import ConversionError, inside, is_hidden, outside_error
from nnunet_universal.dataset_conversion.spec import CaseSpec, ImageRef, LabelTable, SourceSpec, parse_label_map
from nnunet_universal.registry import SOURCES

_VOL_RE = re.compile(r"^volume-(\d+)\.nii(\.gz)?$")
_SEG_RE = re.compile(r"^segmentation-(\d+)\.nii(\.gz)?$")
_TEST_RE = re.compile(r"^test-volume-(\d+)\.nii(\.gz)?$")


def discover(source: str, input_dir: Path, label_map: dict[str, str] | None = None, **_: object) -> SourceSpec:
    """Pair LiTS volumes and segmentations by their number."""
    spec = SourceSpec(source=source, title=SOURCES[source].title, domain="lits", default_name="LiTS",
                      slots=["CT"], required=["CT"],
                      labels=parse_label_map(label_map, LabelTable.from_pairs([(1, "liver"), (2, "tumor")]),
                                             str(input_dir)),
                      input_dir=input_dir, regions={"liver": ["liver", "tumor"], "tumor": ["tumor"]}, modality="CT")
    volumes: list[tuple[int, Path]] = []
    segs: dict[int, list[Path]] = {}
    seen = {os.path.realpath(input_dir)}
    refused: set[int] = set()  # case numbers with a file refused above: already listed
    for dirpath, dirnames, filenames in os.walk(input_dir, followlinks=True):
        keep = []
        for d in sorted(d for d in dirnames if not is_hidden(d)):  # symlinked folders: followed inside the input
            sub = Path(dirpath) / d
            real = os.path.realpath(sub)
            if not inside(sub, input_dir):
                spec.bad.append(outside_error(d, sub))
            elif real not in seen:  # a link back to a folder already listed would repeat (or loop)
                seen.add(real)
                keep.append(d)
        dirnames[:] = keep
        for name in sorted(filenames):
            path = Path(dirpath) / name
            if is_hidden(name):
                continue
            if (m := _VOL_RE.match(name) or _SEG_RE.match(name)) and not inside(path, input_dir):
                refused.add(int(m.group(1)))
                spec.bad.append(outside_error(f"LiTS_{int(m.group(1)):04d}", path))
                continue
            if m := _VOL_RE.match(name):
                volumes.append((int(m.group(1)), path))
            elif m := _SEG_RE.match(name):
                segs.setdefault(int(m.group(1)), []).append(path)
            elif name.endswith((".nii", ".nii.gz")) and not _TEST_RE.match(name):  # listed, never ignored
                spec.bad.append(ConversionError(
                    "file name does not follow the LiTS naming volume-N / segmentation-N, so it is not read",
                    case=name, file=path, fix="rename it (e.g. volume-12.nii), or move it out of the input folder"))
    if volumes and not segs:
        raise ConversionError(f"no segmentation-N.nii files in {input_dir}: this looks like the test batch",
                              file=input_dir, fix="convert the training batches (volume-N + segmentation-N)")
    for num, vol in volumes:
        cid = f"LiTS_{num:04d}"
        if num in refused:
            continue
        found = segs.get(num, [])
        if not found:
            spec.bad.append(ConversionError(f"no segmentation-{num}.nii for this volume", case=cid, file=vol,
                                            fix="restore the segmentation or remove the volume"))
            continue
        if len(found) > 1:
            spec.bad.append(ConversionError(f"several segmentations for one volume: {[str(f) for f in found]}",
                                            case=cid, file=found[0], fix="keep exactly one segmentation-N file"))
            continue
        spec.add_case(CaseSpec(case_id=cid, source_id=vol.name.split(".")[0], group=cid,
                               images={"CT": ImageRef("file", str(vol))}, label=ImageRef("file", str(found[0]))))
    spec.finalize()
    return spec
