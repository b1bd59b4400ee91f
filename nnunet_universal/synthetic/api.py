"""``nnunet-universal synth``: synthetic datasets in the native layouts of the public sources.

Usage::

    from nnunet_universal.synthetic.api import synthesize
    top = synthesize("brats-mets", Path("synth"), cases=3, seed=0)  # -> synth/ASNR-MICCAI-BraTS2023-MET-...

Deterministic: the same (source, cases, seed, shape) gives byte-identical files. Case ``i`` depends only on
(seed, source, i), so asking for more cases keeps the first ones unchanged.

``institution`` (brain MR sources) writes the source's cases as another institution's scanner would acquire them
(:mod:`.shifts`): same layout, label protocol and converter, other contrast curve, bias field, noise and voxel size.
``institution="unseen"`` is the accuracy benchmark's unseen-institution test set::

    synthesize("brats-mets", Path("unseen"), cases=10, seed=100, institution="unseen")
"""

from __future__ import annotations

import logging
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from nnunet_universal.registry import SYNTH_SOURCES
from nnunet_universal.synthetic.anatomy import random_subject
from nnunet_universal.synthetic.case import CaseData
from nnunet_universal.synthetic.ct_phantom import make_ct_case
from nnunet_universal.synthetic.grid import LPS_FLIPS, NO_FLIPS
from nnunet_universal.synthetic.institutions import MR_SOURCES
from nnunet_universal.synthetic.mr_case import make_mr_case
from nnunet_universal.synthetic.shifts import InstitutionShift, resolve_institution, shifted_profile, shifted_shape
from nnunet_universal.synthetic.writers import WRITERS

logger = logging.getLogger(__name__)

_MIN_SIDE = 16  # smaller grids cannot hold a brain with lesions


@dataclass(frozen=True)
class CasePlan:
    """Identity of one case: its native id, the person it images (exams of a patient share one) and its index."""

    index: int
    case_id: str
    subject_key: int


def _source_key(source: str) -> int:
    return zlib.crc32(source.encode())


def plan_cases(source: str, cases: int, seed: int) -> list[CasePlan]:
    """Native case ids for ``source``, realistic in format and with the gaps real releases have."""
    rng = np.random.default_rng([seed, _source_key(source), 0xC0DE])
    if source == "ucsf-bmsr":  # 6-digit patient number + exam letter; some patients have a follow-up exam
        plans, patient, number = [], 0, 100000 + int(rng.integers(100, 200))
        while len(plans) < cases:
            exams = 2 if (patient == 0 and cases >= 2) or rng.random() < 0.3 else 1
            for e in range(min(exams, cases - len(plans))):
                plans.append(CasePlan(len(plans), f"{number}{'AB'[e]}", patient))
            patient, number = patient + 1, number + int(rng.integers(1, 40))
        return plans
    if source == "lits":  # volume-0 … volume-N, not zero-padded
        return [CasePlan(i, str(i), i) for i in range(cases)]
    if source == "msd-braintumour":
        return [CasePlan(i, f"BRATS_{i + 1:03d}", i) for i in range(cases)]
    first = {"brats-mets": 1, "brainmetshare": 5}[source]
    gaps = 1 + (rng.random(cases - 1) < 0.3) * rng.integers(1, 3, cases - 1)  # ids skip numbers now and then
    numbers = first + np.concatenate([[0], np.cumsum(gaps)])
    fmt = {"brats-mets": "BraTS-MET-{:05d}-000", "brainmetshare": "Mets_{:03d}"}[source]
    return [CasePlan(i, fmt.format(int(n)), i) for i, n in enumerate(numbers)]


def make_case(source: str, plan: CasePlan, seed: int, shape: tuple[int, int, int] | None = None,
              lesion_scale: float = 1.0, institution: InstitutionShift | None = None) -> CaseData:
    """Generate one case of ``source`` in memory (RAS voxel order; see ``CaseData``); ``institution``: acquired
    with that shift of the source's profile (brain MR sources only; see :mod:`.shifts`)."""
    key = _source_key(source)
    rng = np.random.default_rng([seed, key, plan.index])
    if source == "lits":
        # most volumes are stored like DICOM (LPS); some have a flipped z axis or a RAS (positive) diagonal
        if plan.index == 1:
            flips = (True, True, True)
        else:
            flips = [LPS_FLIPS, (True, True, True), NO_FLIPS][int(rng.choice(3, p=[0.6, 0.25, 0.15]))]
        case = make_ct_case(plan.case_id, rng, shape, flips, lesion_scale)
        case.extras["seg_dtype"] = "uint8" if plan.index % 4 == 3 else "float32"
        return case
    profile = shifted_profile(MR_SOURCES[source], institution)
    if institution is not None:
        shape = shifted_shape(shape or profile.default_shape, institution, _MIN_SIDE)
    subject = random_subject(np.random.default_rng([seed, key, 0x5EB, plan.subject_key]))
    # UCSF-BMSR ships the subtraction image for most exams only: leave it out of every third exam
    with_sub = profile.subtraction is not None and plan.index % 3 != 2
    return make_mr_case(profile, plan.case_id, subject, rng, shape, with_subtraction=with_sub,
                        lesion_scale=lesion_scale)


def _check_args(source: str, cases: int, shape: tuple[int, int, int] | None, lesion_scale: float = 1.0,
                institution: InstitutionShift | None = None) -> None:
    if source not in SYNTH_SOURCES:
        raise ValueError(f"unknown synthetic source {source!r}; valid sources: {', '.join(SYNTH_SOURCES)}")
    if institution is not None and source not in MR_SOURCES:
        raise ValueError(f"institution shifts apply to the brain MR sources ({', '.join(MR_SOURCES)}), not {source!r}")
    if cases < 1:
        raise ValueError(f"--cases must be at least 1, got {cases}")
    if shape is not None and (len(shape) != 3 or min(shape) < _MIN_SIDE):
        raise ValueError(f"--shape needs three sizes of at least {_MIN_SIDE} voxels, got {shape}")
    if not 0.25 <= lesion_scale <= 4.0:
        raise ValueError(f"--lesion-scale must be between 0.25 and 4, got {lesion_scale}")


def png_slice_spacing(shape: tuple[int, int, int] | None = None) -> tuple[float, float, float]:
    """Voxel spacing (mm) of synthetic BrainMetShare PNG slices written at ``shape`` (default: the small shape).

    PNG slices carry no geometry; synthetic cases keep the real field of view on fewer voxels, so they are not on
    the real release's 0.94 x 0.94 x 1 mm grid. ``synthesize`` records each case's true spacing in a spacing file
    that ``convert brainmetshare`` reads; this one spacing for all cases (the slice thickness varies per case; this
    is the mean) is for callers that pass ``convert --spacing``, which overrides the file.
    """
    profile = MR_SOURCES["brainmetshare"]
    shape = tuple(shape or profile.default_shape)
    fov = [(lo + hi) / 2 for lo, hi in profile.fov_mm]
    return tuple(round(f / n, 4) for f, n in zip(fov, shape, strict=True))  # type: ignore[return-value]


@dataclass(frozen=True)
class SynthResult:
    """What :func:`synthesize_dataset` wrote: the native top folder, each case's voxel spacing (x, y, z mm), the
    file recording them where the format has no geometry (BrainMetShare PNG) and the preview."""

    top: Path
    spacings: dict[str, tuple[float, float, float]]
    spacing_file: Path | None = None
    preview: Path | None = None

    def spacing_text(self) -> str:
        """``4 x 4 x 3.3-4.2 mm``: the range over cases per axis."""
        lo = np.min(list(self.spacings.values()), axis=0)
        hi = np.max(list(self.spacings.values()), axis=0)
        return " x ".join(f"{a:g}" if a == b else f"{a:g}-{b:g}" for a, b in zip(lo, hi, strict=True)) + " mm"


def synthesize(source: str, out_dir: Path, cases: int = 4, seed: int = 0,
               shape: tuple[int, int, int] | None = None, preview: Path | None = None,
               lesion_scale: float = 1.0, institution: str | InstitutionShift | None = None) -> Path:
    """Write ``cases`` synthetic cases of ``source`` in its native layout inside ``out_dir``; return the top folder
    (:func:`synthesize_dataset` with the same arguments also returns the spacings and the preview path).

    Args:
        source: one of ``registry.SYNTH_SOURCES``.
        shape: voxels per axis (X, Y, Z); default: a small per-source shape (a case in a fraction of a second).
            The field of view stays the source's, so the spacing follows (e.g. 240 240 155 gives BraTS' 1 mm).
        preview: if given, also write a PNG with one slice per sequence and the labels overlaid.
        lesion_scale: multiplies every lesion radius range (default 1: the source's lesion population). The
            accuracy benchmark uses 2 so that lesions span several voxels at the small default shapes.
        institution: None (the source's own institution), a name of ``shifts.INSTITUTION_SHIFTS`` (``"unseen"``)
            or an ``InstitutionShift``: the cases as another institution's scanner acquires them (brain MR
            sources). The voxel size follows the shift (``shape`` or the default shape, divided by
            ``shift.spacing``); everything the converter reads (layout, names, label protocol) stays the source's.

    Returns:
        The dataset's top-level native folder, e.g. ``out_dir/ASNR-MICCAI-BraTS2023-MET-Challenge-TrainingData``,
        ``out_dir/UCSF-BMSR``, ``out_dir/stanford_release_brainmask``, ``out_dir/LiTS``,
        ``out_dir/Task01_BrainTumour``. All cases go to the training part (with labels).
    """
    return synthesize_dataset(source, out_dir, cases, seed, shape, preview, lesion_scale, institution).top


def synthesize_dataset(source: str, out_dir: Path, cases: int = 4, seed: int = 0,
                       shape: tuple[int, int, int] | None = None, preview: Path | None = None,
                       lesion_scale: float = 1.0, institution: str | InstitutionShift | None = None) -> SynthResult:
    """:func:`synthesize`, returning what was written (top folder, spacings, spacing file, preview)."""
    shift = resolve_institution(institution)
    _check_args(source, cases, shape, lesion_scale, shift)
    shape = tuple(int(s) for s in shape) if shape is not None else None  # type: ignore[assignment]
    writer = WRITERS[source]
    top = Path(out_dir) / writer.top
    top.mkdir(parents=True, exist_ok=True)
    kept: list[CaseData] = []
    spacings: dict[str, tuple[float, float, float]] = {}
    for plan in tqdm(plan_cases(source, cases, seed), desc=f"synth {source}", unit="case", disable=None):
        case = make_case(source, plan, seed, shape, lesion_scale, shift)
        writer.write_case(top, case)
        spacings[case.case_id] = tuple(float(s) for s in case.grid.spacing)  # type: ignore[assignment]
        if len(kept) < 2:
            kept.append(case)
    writer.finish(top, kept)
    spacing_file = writer.write_spacing(top, spacings)
    logger.info("wrote %d synthetic %s cases%s to %s", cases, source,
                f" (institution {shift.name})" if shift is not None else "", top)
    if preview is not None:
        from nnunet_universal.synthetic.preview import write_preview

        write_preview(Path(preview), source, kept, writer)
        logger.info("wrote preview %s", preview)
    return SynthResult(top, spacings, spacing_file, Path(preview) if preview is not None else None)
