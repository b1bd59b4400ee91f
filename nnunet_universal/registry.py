"""Pure-data registry: modality slots, their aliases and the supported native sources.

Importable without torch or nnU-Net; used by ``--help`` texts, validation and parametrized tests.
"""

from __future__ import annotations

from dataclasses import dataclass

#: Canonical modality slots, in the fixed channel order of every merged dataset.
#: A merged dataset keeps the slots that at least one of its domains provides, in this order.
#: ``T1c`` holds every T1-weighted post-contrast acquisition (spin-echo or gradient-echo such as BRAVO):
#: they show the same contrast mechanism (gadolinium enhancement), and one slot lets models trained on
#: BraTS (spin-echo) read BrainMetShare's gradient-echo scans. BrainMetShare's spin-echo post-contrast goes
#: to ``T1c`` and its BRAVO to ``T1c_GRE`` so that no channel is dropped (see DATASETS.md).
SLOTS: tuple[str, ...] = ("T1", "T1c", "T1c_GRE", "T2", "FLAIR", "SUB", "CT", "ADC", "MR")

#: Slot name -> nnU-Net ``channel_names`` value that decides its normalization.
SLOT_NORMALIZATION: dict[str, str] = {slot: ("CT" if slot == "CT" else "zscore") for slot in SLOTS}

#: Lower-cased alias -> slot. Used by the ``nnunet`` and ``msd`` converters; users can override per call.
SLOT_ALIASES: dict[str, str] = {
    **{a.lower(): "T1" for a in ("T1", "t1n", "T1pre", "T1w", "t1_pre", "T1-native", "native T1")},
    **{a.lower(): "T1c" for a in ("T1c", "t1c", "T1post", "t1gd", "T1Gd", "t1ce", "T1ce", "t1_gd", "T1-Gd")},
    **{a.lower(): "T1c_GRE" for a in ("T1c_GRE", "bravo", "BRAVO")},
    **{a.lower(): "T2" for a in ("T2", "t2w", "T2w", "T2-weighted")},
    **{a.lower(): "FLAIR" for a in ("FLAIR", "t2f", "T2-FLAIR", "T2FLAIR", "flair")},
    **{a.lower(): "SUB" for a in ("SUB", "subtraction")},
    **{a.lower(): "CT" for a in ("CT",)},
    **{a.lower(): "ADC" for a in ("ADC",)},
    **{a.lower(): "MR" for a in ("MR", "MRI")},
}


def slot_for_alias(name: str, overrides: dict[str, str] | None = None) -> str:
    """Map a channel name found in a source to a slot; raise ``KeyError`` with the known aliases if unknown."""
    if overrides and name in overrides:
        slot = overrides[name]
    else:
        slot = SLOT_ALIASES.get(name.strip().lower(), "")
    if slot not in SLOTS:
        known = ", ".join(sorted(SLOT_ALIASES))
        raise KeyError(
            f"channel name {name!r} maps to no modality slot. Known aliases: {known}. "
            f"Pass an explicit mapping (e.g. --slot-map '{name}=T1c') to choose one of {', '.join(SLOTS)}."
        )
    return slot


def order_slots(slots: list[str] | set[str] | tuple[str, ...]) -> list[str]:
    """Return ``slots`` in the canonical channel order of :data:`SLOTS`."""
    unknown = set(slots) - set(SLOTS)
    if unknown:
        raise KeyError(f"unknown modality slots {sorted(unknown)}; valid slots are {list(SLOTS)}")
    return [s for s in SLOTS if s in set(slots)]


@dataclass(frozen=True)
class SourceInfo:
    """A native public dataset the converters read and the synthetic generator writes."""

    name: str
    title: str
    modality: str  # "MR" or "CT"
    synthetic: bool  # whether ``nnunet-universal synth`` can write it
    metastasis: bool  # lesion-wise metrics apply (brain metastases)


SOURCES: dict[str, SourceInfo] = {
    s.name: s
    for s in (
        SourceInfo("brats-mets", "BraTS 2023 Brain Metastases (BraTS-METS)", "MR", True, True),
        SourceInfo("brats-gli", "BraTS 2023 Adult Glioma", "MR", False, False),
        SourceInfo("brats-men", "BraTS 2023 Meningioma", "MR", False, False),
        SourceInfo("brats-ped", "BraTS 2023 Pediatric Tumours", "MR", False, False),
        SourceInfo("brats-ssa", "BraTS 2023 Sub-Saharan Africa Glioma", "MR", False, False),
        SourceInfo("ucsf-bmsr", "UCSF Brain Metastases Stereotactic Radiosurgery", "MR", True, True),
        SourceInfo("brainmetshare", "Stanford BrainMetShare (slice images or NIfTI re-release)", "MR", True, True),
        SourceInfo("lits", "Liver Tumor Segmentation challenge (CT)", "CT", True, False),
        SourceInfo("msd", "Medical Segmentation Decathlon, any of Task01-Task10", "MR/CT", False, False),
        SourceInfo("msd-braintumour", "Decathlon Task01_BrainTumour (4D NIfTI)", "MR", True, False),
        SourceInfo("nnunet", "an existing nnU-Net v2 raw dataset", "MR/CT", False, False),
    )
}

#: Sources ``nnunet-universal synth`` writes.
SYNTH_SOURCES: tuple[str, ...] = tuple(n for n, s in SOURCES.items() if s.synthetic)
#: Sources ``nnunet-universal convert`` reads (``msd-braintumour`` is read by the generic ``msd`` converter).
CONVERT_SOURCES: tuple[str, ...] = tuple(n for n in SOURCES if n != "msd-braintumour")
