"""Medical Segmentation Decathlon reader (any of Task01-Task10).

Channel names and labels come from the task's ``dataset.json`` (``modality``, ``labels``, ``training``); 4D
images are split into one file per channel (the last axis is the channel); macOS ``._*`` files are ignored.
Channel names map to slots through :data:`registry.SLOT_ALIASES` (``--slot-map NAME=SLOT`` overrides).
Domain ``msd_<task name lower-case>`` (``Task01_BrainTumour`` -> ``msd_braintumour``). Task01 regions (BraTS
2016/17 numbering: 1 oedema, 2 non-enhancing tumour, 3 enhancing tumour): WT = {1,2,3}, TC = {2,3}, ET = {3}.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from nnunet_universal.dataset_conversion.common import (
    ConversionError,
    inside,
    is_hidden,
    strip_nifti_ending,
)
from nnunet_universal.dataset_conversion.spec import CaseSpec, ImageRef, LabelTable, SourceSpec, parse_label_map
from nnunet_universal.registry import SOURCES, order_slots, slot_for_alias

#: task name (lower case) -> region name -> source label values
TASK_REGIONS: dict[str, dict[str, list[int]]] = {"braintumour": {"WT": [1, 2, 3], "TC": [2, 3], "ET": [3]}}


def _task_name(input_dir: Path, dj: dict) -> str:
    m = re.match(r"^Task\d+_(.+)$", input_dir.name)
    name = m.group(1) if m else str(dj.get("name", input_dir.name))
    return re.sub(r"[^A-Za-z0-9]+", "", name)


def _channel_slots(dj: dict, slot_map: dict[str, str] | None, where: Path) -> list[str]:
    mod = dj.get("modality") or dj.get("channel_names")
    if not isinstance(mod, dict) or not mod:
        raise ConversionError("has no 'modality' table", file=where, fix="use the task's original dataset.json")
    names = [mod[k] for k in sorted(mod, key=int)]
    slots = []
    for n in names:
        try:
            slots.append(slot_for_alias(n, slot_map))
        except KeyError as e:
            raise ConversionError(e.args[0], file=where, fix=f"pass --slot-map '{n}=SLOT'") from None
    if len(set(slots)) != len(slots):
        raise ConversionError(f"channels {names} map to slots {slots}, which repeat", file=where,
                              fix="give each channel its own slot with --slot-map NAME=SLOT")
    return slots


def _label_table(dj: dict, where: Path) -> LabelTable:
    labels = dj.get("labels")
    if not isinstance(labels, dict):
        raise ConversionError("has no 'labels' table", file=where, fix="use the task's original dataset.json")
    try:
        pairs = [(int(k), str(v)) for k, v in labels.items()]
    except ValueError:
        raise ConversionError(f"'labels' keys must be label values, got {list(labels)}", file=where,
                              fix="use the Decathlon format {\"0\": \"background\", \"1\": …}") from None
    return LabelTable.from_pairs(pairs)


def _training_pairs(input_dir: Path, dj: dict) -> list[tuple[str, str]]:
    entries = dj.get("training")
    if isinstance(entries, list) and entries:
        return [(e["image"], e["label"]) for e in entries]
    pairs = []
    for f in sorted((input_dir / "imagesTr").iterdir()) if (input_dir / "imagesTr").is_dir() else []:
        if not is_hidden(f.name) and strip_nifti_ending(f.name):
            pairs.append((f"./imagesTr/{f.name}", f"./labelsTr/{f.name}"))
    return pairs


def discover(source: str, input_dir: Path, label_map: dict[str, str] | None = None,
             slot_map: dict[str, str] | None = None, **_: object) -> SourceSpec:
    """Read the task's dataset.json and list its training cases."""
    dj_path = input_dir / "dataset.json"
    if not dj_path.is_file():
        raise ConversionError("not found", file=dj_path,
                              fix="point the converter at a Decathlon task folder (e.g. Task01_BrainTumour)")
    try:
        dj = json.loads(dj_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConversionError(f"is not valid JSON ({e})", file=dj_path, fix="restore the task's dataset.json") from None
    channel_slots = _channel_slots(dj, slot_map, dj_path)
    default = _label_table(dj, dj_path)
    table = parse_label_map(label_map, default, str(dj_path))
    task = _task_name(input_dir, dj)
    regions = {}
    if table is default:
        for r, values in TASK_REGIONS.get(task.lower(), {}).items():
            regions[r] = [table.output_name(table.values[v]) for v in values if v in table.values]
    spec = SourceSpec(source=source, title=f"Medical Segmentation Decathlon {input_dir.name}",
                      domain=f"msd_{task.lower()}", default_name=task, slots=order_slots(channel_slots),
                      required=list(channel_slots), labels=table, input_dir=input_dir, regions=regions,
                      modality="CT" if set(channel_slots) == {"CT"} else "MR",
                      options={"channels": dict(enumerate(channel_slots))})
    if source != "msd":
        spec.title = SOURCES[source].title
    for image, label in _training_pairs(input_dir, dj):
        img, lab = (input_dir / image).resolve(), (input_dir / label).resolve()
        cid = strip_nifti_ending(Path(image).name) or Path(image).name
        if is_hidden(Path(image).name):
            continue
        outside = [p for p in (input_dir / image, input_dir / label) if not inside(p, input_dir)]
        if outside:
            spec.bad.append(ConversionError("points outside the task folder", case=cid, file=outside[0],
                                            fix="keep images and labels inside the task folder"))
            continue
        missing = [str(p) for p in (img, lab) if not p.is_file()]
        if missing:
            spec.bad.append(ConversionError(f"missing image/label file(s) {missing}", case=cid, file=missing[0],
                                            fix="restore the file(s) or remove the case from dataset.json"))
            continue
        if len(channel_slots) == 1:
            images = {channel_slots[0]: ImageRef("file", str(img))}
        else:
            images = {slot: ImageRef("channel", str(img), index=i) for i, slot in enumerate(channel_slots)}
        spec.add_case(CaseSpec(case_id=cid, source_id=cid, group=cid, images=images,
                               label=ImageRef("file", str(lab))))
    spec.finalize()
    return spec
