"""What a source reader hands to the writer: the domain, its label table and one :class:`CaseSpec` per case.

Readers only look at names on disk (no voxel is read at discovery); the writer loads, validates and writes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nnunet_universal.dataset_conversion.common import ConversionError, check_case_id, stat_fingerprint
from nnunet_universal.dataset_conversion.layouts import expected_layout


@dataclass(frozen=True)
class ImageRef:
    """Where one 3D volume of a case comes from.

    kind: ``"file"`` (a 3D image file), ``"channel"`` (channel ``index`` of a 4D file, last axis),
    ``"png"`` (a folder of 2D slices stacked along z with ``spacing``, identity direction, zero origin).
    """

    kind: str
    path: str
    index: int = 0
    spacing: tuple[float, float, float] | None = None
    files: tuple[str, ...] = ()  # every file read (fingerprints/provenance); defaults to (path,)

    @property
    def source_files(self) -> tuple[str, ...]:
        return self.files or (self.path,)


@dataclass
class CaseSpec:
    """One case: its images by modality slot and its label."""

    case_id: str
    source_id: str
    group: str
    images: dict[str, ImageRef]
    label: ImageRef

    def source_files(self) -> list[str]:
        files = [f for ref in self.images.values() for f in ref.source_files] + list(self.label.source_files)
        return list(dict.fromkeys(files))

    def fingerprint(self) -> list[Any]:
        return [[f, *stat_fingerprint(f)] for f in self.source_files()]


@dataclass
class LabelTable:
    """Source label values -> output classes. Output id of ``classes[k]`` is ``k + 1``; 0 is background.

    ``binary``: every non-zero source value is class 1 (BrainMetShare masks stored as 0/255).
    """

    classes: list[str]
    values: dict[int, int]  # source value -> output id
    binary: bool = False

    @classmethod
    def from_pairs(cls, pairs: list[tuple[int, str]], binary: bool = False) -> LabelTable:
        """Build from (source value, class name) pairs; classes ordered by their smallest source value."""
        classes: list[str] = []
        values: dict[int, int] = {0: 0}
        for value, name in sorted(pairs):
            if name.strip().lower() == "background":
                values[value] = 0
                continue
            if name not in classes:
                classes.append(name)
            values[value] = classes.index(name) + 1
        return cls(classes=classes, values=values, binary=binary)

    def output_labels(self) -> dict[str, int]:
        """dataset.json ``labels``: background + classes with consecutive ids."""
        return {"background": 0, **{c: i + 1 for i, c in enumerate(self.classes)}}

    def describe(self) -> str:
        if self.binary:
            return f"0 = background, any non-zero value = {self.classes[0]}"
        return ", ".join(f"{v} = {self.output_name(o)}" for v, o in sorted(self.values.items()))

    def output_name(self, out_id: int) -> str:
        return "background" if out_id == 0 else self.classes[out_id - 1]

    def is_identity(self) -> bool:
        return not self.binary and all(k == v for k, v in self.values.items())


def parse_label_map(label_map: dict[str, str] | None, default: LabelTable, where: str) -> LabelTable:
    """Apply ``--label-map VALUE=CLASS`` (replaces the source's table; 0 stays background unless mapped)."""
    if not label_map:
        return default
    pairs = []
    for k, v in label_map.items():
        try:
            value = int(float(k))
        except ValueError:
            raise ConversionError(f"--label-map key {k!r} is not a label value", file=where,
                                  fix="write it as VALUE=CLASS, e.g. --label-map 1=ET 2=NETC") from None
        if not v or not re.match(r"^[^.\s][^.]*$", v):
            raise ConversionError(f"--label-map class name {v!r} is empty or contains '.'", file=where,
                                  fix="use plain class names such as ET, NETC, liver")
        pairs.append((value, v))
    return LabelTable.from_pairs(pairs)


@dataclass
class SourceSpec:
    """A discovered source: domain description, cases, and cases rejected at discovery."""

    source: str  # registry key, e.g. "brats-mets"
    title: str  # DomainInfo.source
    domain: str
    default_name: str
    slots: list[str]  # channels of the converted dataset, canonical order
    required: list[str]  # slots every case must have (others are zero-filled where absent)
    labels: LabelTable
    input_dir: Path
    cases: list[CaseSpec] = field(default_factory=list)
    bad: list[ConversionError] = field(default_factory=list)
    regions: dict[str, list[str]] = field(default_factory=dict)
    lesion_wise: bool = False
    modality: str = "MR"
    options: dict[str, Any] = field(default_factory=dict)

    def add_case(self, case: CaseSpec) -> None:
        """Add a case after checking its id; an unsafe id or a case without label is recorded as bad."""
        try:
            check_case_id(case.case_id, case.label.path or self.input_dir)
        except ConversionError as e:
            self.bad.append(e)
            return
        self.cases.append(case)

    def finalize(self) -> None:
        """Reject duplicate case ids (every copy: which one is right is the user's call) and sort cases."""
        seen: dict[str, list[CaseSpec]] = {}
        for c in self.cases:
            seen.setdefault(c.case_id, []).append(c)
        for cid, copies in seen.items():
            if len(copies) > 1:
                sources = [next(iter(c.images.values())).path for c in copies]
                self.bad.append(ConversionError(
                    f"duplicate case id: {len(copies)} cases map to it ({', '.join(sources)})", case=cid,
                    file=sources[0], fix="remove or rename the duplicate so that each case id occurs once"))
        self.cases = sorted((c for c in self.cases if len(seen[c.case_id]) == 1), key=lambda c: c.case_id)
        self.regions = {r: m for r, m in self.regions.items() if all(x in self.labels.classes for x in m)}
        if not self.cases and not self.bad:
            raise ConversionError(f"no cases found in {self.input_dir} for source {self.source!r}",
                                  file=self.input_dir,
                                  fix="point the converter at the dataset's top-level folder as downloaded; "
                                      f"expected: {expected_layout(self.source)} ('nnunet-universal convert "
                                      "--help' lists every source's layout)")
