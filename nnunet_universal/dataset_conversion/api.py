"""``nnunet-universal convert``: one native source -> ``$nnUNet_raw/DatasetID_NAME`` with universal metadata.

The result is a normal nnU-Net raw dataset (stock nnU-Net trains it as a single-dataset baseline) whose
dataset.json carries the ``universal`` block (domain, slots, labels, regions, per-case metadata, provenance).
Sources are never modified; outputs are written atomically and a rerun resumes (see :mod:`.writer`).
"""

from __future__ import annotations

import importlib
import logging
import re
from pathlib import Path

from nnunet_universal.dataset_conversion.common import ConversionError, dataset_folder, inside
from nnunet_universal.dataset_conversion.spec import SourceSpec
from nnunet_universal.dataset_conversion.writer import write_dataset
from nnunet_universal.registry import CONVERT_SOURCES

logger = logging.getLogger(__name__)

#: source -> module with ``discover(source, input_dir, label_map=, slot_map=, spacing=) -> SourceSpec``
READERS: dict[str, str] = {
    **{s: "brats" for s in ("brats-mets", "brats-gli", "brats-men", "brats-ped", "brats-ssa")},
    "ucsf-bmsr": "ucsf_bmsr",
    "brainmetshare": "brainmetshare",
    "lits": "lits",
    "msd": "msd",
    "msd-braintumour": "msd",
    "nnunet": "nnunet_raw",
}
_DOMAIN_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_]*$")


def discover(source: str, input_dir: Path, label_map: dict[str, str] | None = None,
             slot_map: dict[str, str] | None = None,
             spacing: tuple[float, float, float] | None = None) -> SourceSpec:
    """List and check the cases of a native dataset without reading voxels."""
    if source not in READERS:
        raise ConversionError(f"unknown source {source!r}", fix=f"use one of {', '.join(CONVERT_SOURCES)}")
    input_dir = Path(input_dir)
    if not input_dir.is_dir():
        raise ConversionError("input folder not found", file=input_dir, fix="pass the dataset folder as downloaded")
    module = importlib.import_module(f"nnunet_universal.dataset_conversion.{READERS[source]}")
    return module.discover(source, input_dir, label_map=label_map or None, slot_map=slot_map or None,
                           spacing=spacing)


def convert(source: str, input_dir: Path, dataset_id: int, name: str | None = None, workers: int = 2,
            skip_bad: bool = False, label_map: dict[str, str] | None = None, slot_map: dict[str, str] | None = None,
            spacing: tuple[float, float, float] | None = None, domain: str | None = None) -> Path:
    """Convert a native dataset to ``$nnUNet_raw/Dataset{dataset_id:03d}_{name}`` and return that folder.

    Args:
        source: one of :data:`registry.CONVERT_SOURCES` (``msd-braintumour`` is read by ``msd``).
        input_dir: the dataset's folder as downloaded (never modified).
        dataset_id, name: nnU-Net dataset id and name (default name: derived from the source).
        workers: parallel worker processes (1 = in-process).
        skip_bad: skip invalid cases and write ``conversion_report.json``/``.md`` instead of stopping.
        label_map: source label value -> class name (replaces the source's label table).
        slot_map: source channel name -> modality slot (``msd``/``nnunet``).
        spacing: voxel spacing (x, y, z) in mm for sources without geometry (BrainMetShare PNG).
        domain: domain name in the universal metadata (default: derived from the source).
    """
    spec = discover(source, input_dir, label_map=label_map, slot_map=slot_map, spacing=spacing)
    if domain:
        if not _DOMAIN_RE.match(domain):
            raise ConversionError(f"--domain {domain!r} must be letters, digits and '_'", fix="pick another name")
        spec.domain = domain
    root = dataset_folder(dataset_id, name or spec.default_name)
    input_dir = Path(input_dir)
    if inside(root, input_dir) or inside(input_dir, root):
        raise ConversionError(f"output {root} and input {input_dir} overlap", file=input_dir,
                              fix="use another dataset id/name or move the input out of $nnUNet_raw's target")
    options = {"source": source, "dataset_id": int(dataset_id), "domain": spec.domain,
               "label_map": dict(label_map or {}), "slot_map": dict(slot_map or {}),
               "spacing": list(spacing) if spacing else None, "skip_bad": bool(skip_bad), **spec.options}
    logger.info("converting %d %s case(s) from %s into %s", len(spec.cases), source, input_dir, root)
    return write_dataset(spec, root, root.name.split("_", 1)[1], workers, skip_bad, options)
