"""Adopt an existing nnU-Net v2 raw dataset.

Reads ``dataset.json`` (``channel_names`` or legacy ``modality``, ``labels``, ``file_ending``, optional ``dataset``
key) and ``imagesTr``/``labelsTr``. Channel names map to slots through :data:`registry.SLOT_ALIASES`
(``--slot-map NAME=SLOT`` overrides). Integer labels are taken as they are; region-based datasets (label values
given as lists) need ``--label-map VALUE=CLASS`` for the integer values stored in the files, and their regions are
kept. The ignore label is refused (its voxels are unknown, which a converted dataset cannot express).
Paths of the ``dataset`` key may point outside the folder (nnU-Net allows that); files found in ``imagesTr`` /
``labelsTr`` follow the converters' symlink rule (:data:`common.OUTSIDE`); case ids may not escape.
Domain: the dataset name lower-cased (``Dataset123_MyLiver`` -> ``myliver``), unless ``--domain``.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from nnunet_universal.dataset_conversion.common import ConversionError, first_outside, is_hidden, outside_error
from nnunet_universal.dataset_conversion.spec import CaseSpec, ImageRef, LabelTable, SourceSpec, parse_label_map
from nnunet_universal.registry import SOURCES, order_slots, slot_for_alias

READABLE_ENDINGS = (".nii.gz", ".nii", ".mha", ".mhd", ".nrrd", ".nhdr")


def _name(input_dir: Path) -> str:
    m = re.match(r"^Dataset\d+_(.+)$", input_dir.name)
    return re.sub(r"[^A-Za-z0-9_\-]+", "", m.group(1) if m else input_dir.name) or "nnUNet"


def _labels(dj: dict, label_map: dict[str, str] | None, where: str) -> tuple[LabelTable, dict[str, list[str]]]:
    labels = dj.get("labels")
    if not isinstance(labels, dict) or "background" not in labels:
        raise ConversionError("'labels' must be a table with 'background'", file=where,
                              fix="fix dataset.json (nnU-Net format: {\"background\": 0, \"class\": 1, …})")
    if "ignore" in labels:
        raise ConversionError("has an ignore label, which a converted dataset cannot represent", file=where,
                              fix="map it explicitly, e.g. --label-map VALUE=background, or drop those voxels")
    region_based = any(isinstance(v, (list, tuple)) for v in labels.values())
    if region_based and not label_map:
        raise ConversionError("is region-based (label values given as lists)", file=where,
                              fix="name the integer values stored in the label files with --label-map VALUE=CLASS")
    if region_based:
        table = parse_label_map(label_map, LabelTable([], {0: 0}), where)
        regions = {}
        for name, values in labels.items():
            vals = values if isinstance(values, (list, tuple)) else [values]
            members = sorted({table.output_name(table.values[v]) for v in vals if v in table.values} - {"background"})
            if name != "background" and members:
                regions[name] = members
        return table, regions
    pairs = [(int(v), str(k)) for k, v in labels.items()]
    return parse_label_map(label_map, LabelTable.from_pairs(pairs), where), {}


def _cases_from_folders(root: Path, ending: str, n_channels: int) -> dict[str, tuple[list[Path | None], Path]]:
    pat = re.compile(r"^(.+)_(\d{4})" + re.escape(ending) + "$")
    found: dict[str, dict[int, Path]] = {}
    for f in sorted((root / "imagesTr").iterdir()) if (root / "imagesTr").is_dir() else []:
        if is_hidden(f.name) or not (m := pat.match(f.name)):
            continue
        found.setdefault(m.group(1), {})[int(m.group(2))] = f
    return {cid: ([chans.get(i) for i in range(n_channels)], root / "labelsTr" / f"{cid}{ending}")
            for cid, chans in found.items()}


def _cases_from_key(root: Path, dataset: dict) -> dict[str, tuple[list[Path | None], Path]]:
    def resolve(p: str) -> Path:
        p = os.path.expandvars(p)
        return Path(p) if os.path.isabs(p) else root / p

    return {str(cid): ([resolve(i) for i in entry["images"]], resolve(entry["label"]))
            for cid, entry in dataset.items()}


def discover(source: str, input_dir: Path, label_map: dict[str, str] | None = None,
             slot_map: dict[str, str] | None = None, **_: object) -> SourceSpec:
    """Read an nnU-Net raw dataset's dataset.json and list its training cases."""
    dj_path = input_dir / "dataset.json"
    if not dj_path.is_file():
        raise ConversionError("not found", file=dj_path, fix="point the converter at an nnU-Net raw dataset folder")
    dj = json.loads(dj_path.read_text())
    channels = dj.get("channel_names") or dj.get("modality")
    ending = dj.get("file_ending")
    if not isinstance(channels, dict) or not channels or not ending:
        raise ConversionError("needs 'channel_names' and 'file_ending'", file=dj_path,
                              fix="fix dataset.json (nnU-Net v2 format)")
    if ending not in READABLE_ENDINGS:
        raise ConversionError(f"file_ending {ending!r} is not a 3D format this converter reads", file=dj_path,
                              fix=f"convert the images to one of {READABLE_ENDINGS}")
    names = [channels[k] for k in sorted(channels, key=int)]
    try:
        slots = [slot_for_alias(n, slot_map) for n in names]
    except KeyError as e:
        raise ConversionError(e.args[0], file=dj_path, fix="pass --slot-map CHANNEL=SLOT for each channel") from None
    if len(set(slots)) != len(slots):
        raise ConversionError(f"channels {names} map to slots {slots}, which repeat", file=dj_path,
                              fix="give each channel its own slot with --slot-map CHANNEL=SLOT")
    table, regions = _labels(dj, label_map, str(dj_path))
    name = _name(input_dir)
    spec = SourceSpec(source=source, title=f"{SOURCES[source].title}: {input_dir.name}",
                      domain=re.sub(r"[^a-z0-9_]+", "_", name.lower()).strip("_") or "nnunet", default_name=name,
                      slots=order_slots(slots), required=list(slots), labels=table, input_dir=input_dir,
                      regions=regions, modality="CT" if set(slots) == {"CT"} else "MR",
                      options={"channels": dict(enumerate(slots)), "file_ending": ending})
    by_key = isinstance(dj.get("dataset"), dict)
    cases = _cases_from_key(input_dir, dj["dataset"]) if by_key else _cases_from_folders(input_dir, ending, len(slots))
    for cid, (images, label) in cases.items():
        # files listed in imagesTr/labelsTr follow the converters' symlink rule; paths the 'dataset' key names
        # explicitly may lie anywhere (nnU-Net's own feature)
        if not by_key and (out := first_outside([*images, label], input_dir)) is not None:
            spec.bad.append(outside_error(cid, out))
            continue
        missing = [f"channel {i:04d}" for i, f in enumerate(images) if f is None or not f.is_file()]
        if len(images) != len(slots):
            missing.append(f"{len(images)} images listed for {len(slots)} channels")
        if not label.is_file():
            missing.append(str(label))
        if missing:
            spec.bad.append(ConversionError(f"missing image/label file(s): {missing}", case=cid, file=label,
                                            fix="restore the file(s) or remove the case"))
            continue
        spec.add_case(CaseSpec(case_id=cid, source_id=cid, group=cid,
                               images={s: ImageRef("file", str(f)) for s, f in zip(slots, images, strict=True)},
                               label=ImageRef("file", str(label))))
    spec.finalize()
    return spec
