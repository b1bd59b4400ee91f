"""The merge's inputs: converted datasets in $nnUNet_raw, their universal metadata and each case's files."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from nnunet_universal.dataset_conversion.common import ConversionError, raw_root
from nnunet_universal.metadata import UniversalMeta, load_universal

logger = logging.getLogger(__name__)


def resolve_dataset(ref: str) -> Path:
    """A dataset id (``"501"``), name (``"Dataset501_BraTSMETS"``) or folder -> its folder in $nnUNet_raw."""
    raw = raw_root()
    if ref.isdigit():
        hits = sorted(p for p in raw.glob(f"Dataset{int(ref):03d}_*") if p.is_dir())
        if len(hits) != 1:
            raise ConversionError(f"dataset id {ref} matches {len(hits)} folders in {raw}: {[h.name for h in hits]}",
                                  fix="convert it first ('nnunet-universal convert … -d ID') or pass its folder name")
        return hits[0]
    for cand in (raw / ref, Path(ref)):
        if (cand / "dataset.json").is_file():
            return cand
    raise ConversionError(f"dataset {ref!r} not found in {raw}", fix="pass an id or folder name of a converted dataset")


def case_files(folder: Path, dj: dict[str, Any], meta: UniversalMeta, case: str) -> tuple[dict[str, str], str]:
    """Source images by slot and the label file of one input case."""
    if isinstance(dj.get("dataset"), dict) and case in dj["dataset"]:
        entry = dj["dataset"][case]

        def res(p: str) -> str:
            p = os.path.expandvars(p)
            return p if os.path.isabs(p) else str(folder / p)

        images, label = [res(p) for p in entry["images"]], res(entry["label"])
    else:
        img_dir, lab_dir = ("imagesTr", "labelsTr") if meta.cases[case].split == "train" else ("imagesTs", "labelsTs")
        ending = dj["file_ending"]
        images = [str(folder / img_dir / f"{case}_{i:04d}{ending}") for i in range(len(meta.slots))]
        label = str(folder / lab_dir / f"{case}{ending}")
    return dict(zip(meta.slots, images, strict=True)), label


def load_inputs(datasets: list[str]) -> list[tuple[Path, dict[str, Any], UniversalMeta]]:
    inputs = []
    for ref in datasets:
        folder = resolve_dataset(str(ref))
        dj = json.loads((folder / "dataset.json").read_text())
        meta = load_universal(dj, where=str(folder / "dataset.json"))
        channels = [dj["channel_names"][k] for k in sorted(dj["channel_names"], key=int)]
        if channels != meta.slots:
            raise ConversionError(f"channel_names {channels} differ from universal.slots {meta.slots}",
                                  file=folder / "dataset.json", fix="reconvert the dataset with nnunet-universal")
        listed = {c for c, i in meta.cases.items() if i.split == "train"}
        on_disk = {p.name[: -len(dj["file_ending"])] for p in (folder / "labelsTr").glob(f"*{dj['file_ending']}")}
        if on_disk - listed:
            logger.warning("%s: %d label file(s) in labelsTr are not listed in universal.cases and are ignored "
                           "(e.g. %s)", folder.name, len(on_disk - listed), sorted(on_disk - listed)[0])
        inputs.append((folder, dj, meta))
    seen: dict[str, Path] = {}
    for folder, _, meta in inputs:
        for d in meta.domains:
            if d in seen:
                raise ConversionError(f"domain {d!r} occurs in {seen[d].name} and {folder.name}", file=folder,
                                      fix="merge each dataset once, or convert one of them with --domain OTHER")
            seen[d] = folder
    return inputs
