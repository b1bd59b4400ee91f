"""Another institution's scanner for a known source: the same patients, label protocol and file layout, but a
contrast curve, bias field, noise level, blur and voxel size that the source's own profile never produces.

A source's profile (:data:`.institutions.MR_SOURCES`) fixes what its training cases look like. An
:class:`InstitutionShift` rewrites that profile (a pure function; profiles are frozen) so that
``synthesize(source, ..., institution=...)`` writes cases that the source's converter reads as usual, but that
come from an institution no model trained on the source's own cases has seen: the "new scans" of a deployment.

Usage::

    from nnunet_universal.synthetic.api import synthesize
    synthesize("ucsf-bmsr", out, cases=10, seed=100, institution="unseen")          # the named shift below
    synthesize("ucsf-bmsr", out, cases=10, seed=100,
               institution=InstitutionShift("noisy", "twice the noise", noise=2.0))  # explicit overrides

Deterministic like every synthetic case: the same (source, seed, case, shift) gives the same bytes. With the
training cases' seed the shifted cases show the same subjects (their anatomy and lesions are drawn from the same
random streams; only the grid follows the shifted voxel size), which is what the tests compare; a test set of new
patients uses another seed.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

from nnunet_universal.synthetic.institutions import BASE_CONTRAST, MR_SOURCES, MRSourceProfile, SequenceProfile

#: The compartments whose contrast :attr:`InstitutionShift.tissue_contrast` scales (normal brain tissue).
TISSUE = ("csf", "gm", "wm")


@dataclass(frozen=True)
class InstitutionShift:
    """How an institution's acquisitions differ from a source's own, applied to every sequence of the source.

    Factors are relative to the source's profile, so the shift moves every source away from its own training
    appearance in the same direction; ``bias`` is absolute (the source's own when None).
    """

    name: str
    description: str = ""
    gamma: float = 1.0  # multiplies each sequence's contrast-curve exponent (signal ** gamma)
    tissue_contrast: float = 1.0  # scales the spread of CSF/GM/WM around their mean (< 1: flatter, e.g. low field)
    deltas: tuple[tuple[str, float], ...] = ()  # added per-compartment offsets (keys of BASE_CONTRAST's tables)
    bias: float | None = None  # amplitude of the log bias field of every sequence (None: the source's)
    noise: float = 1.0  # multiplies the Rician noise sigma
    blur_mm: tuple[float, float, float] = (0.0, 0.0, 0.0)  # added to the Gaussian blur sigma (mm; x, y, z)
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)  # multiplies the voxel size (same field of view)
    scale: float = 1.0  # multiplies the stored intensity of signal 1.0 (scanner units)

    def __post_init__(self) -> None:
        bad = [k for k, _ in self.deltas if k not in BASE_CONTRAST["T1"]]
        if bad:
            raise ValueError(f"institution {self.name!r}: unknown compartment(s) {bad} in deltas; "
                             f"valid: {sorted(BASE_CONTRAST['T1'])}")
        positive = {"gamma": self.gamma, "tissue_contrast": self.tissue_contrast, "noise": self.noise,
                    "scale": self.scale, **{f"spacing[{i}]": s for i, s in enumerate(self.spacing)}}
        if any(v <= 0 for v in positive.values()) or (self.bias is not None and self.bias < 0) or min(
                self.blur_mm) < 0 or len(self.spacing) != 3 or len(self.blur_mm) != 3:
            raise ValueError(f"institution {self.name!r}: factors must be positive, bias and blur_mm non-negative, "
                             f"spacing and blur_mm three values: {self}")

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON-able parameters (for results files and provenance)."""
        d = asdict(self)
        d["deltas"] = [list(x) for x in self.deltas]
        return d


#: The training profiles' largest bias-field amplitude: the named shift goes beyond it.
TRAINING_MAX_BIAS = max(seq.bias for p in MR_SOURCES.values() for seq in p.sequences)

#: Named shifts (``institution="unseen"``). ``unseen``: every parameter outside the source's own range, and the
#: bias field stronger than any training profile's: a steeper contrast curve (gamma x1.4), flatter grey/white
#: contrast (x0.75), bias amplitude 0.45 (training profiles: 0.05-0.3), noise x1.7, thicker and blurrier slices
#: (voxels x1.15 in plane, x1.35 through plane, +1 mm blur through plane) and other scanner units (x0.6).
INSTITUTION_SHIFTS: dict[str, InstitutionShift] = {
    "unseen": InstitutionShift(
        "unseen", "a scanner never seen in training: steeper contrast curve, flatter grey/white contrast, strong "
                  "bias field, more noise, thicker slices, other intensity units",
        gamma=1.4, tissue_contrast=0.75, bias=0.45, noise=1.7, blur_mm=(0.0, 0.0, 1.0),
        spacing=(1.15, 1.15, 1.35), scale=0.6),
}


def resolve_institution(institution: str | InstitutionShift | None) -> InstitutionShift | None:
    """A name of :data:`INSTITUTION_SHIFTS`, a shift, or None (the source's own institution)."""
    if institution is None or isinstance(institution, InstitutionShift):
        return institution
    try:
        return INSTITUTION_SHIFTS[institution]
    except KeyError:
        raise ValueError(f"unknown institution {institution!r}; named institutions: "
                         f"{', '.join(INSTITUTION_SHIFTS)} (or pass an InstitutionShift)") from None


def _shift_sequence(seq: SequenceProfile, shift: InstitutionShift) -> SequenceProfile:
    base = dict(BASE_CONTRAST[seq.contrast])
    for name, delta in seq.deltas:
        base[name] += delta
    mean = sum(base[t] for t in TISSUE) / len(TISSUE)
    flatten = tuple((t, (base[t] - mean) * (shift.tissue_contrast - 1.0)) for t in TISSUE
                    if shift.tissue_contrast != 1.0)
    return replace(seq, gamma=seq.gamma * shift.gamma, deltas=(*seq.deltas, *flatten, *shift.deltas),
                   noise=seq.noise * shift.noise, bias=seq.bias if shift.bias is None else shift.bias,
                   blur_mm=tuple(b + a for b, a in zip(seq.blur_mm, shift.blur_mm, strict=True)),
                   scale=seq.scale * shift.scale)


def shifted_profile(profile: MRSourceProfile, shift: InstitutionShift | None) -> MRSourceProfile:
    """``profile`` as acquired at ``shift``'s institution (a new profile; ``profile`` is unchanged).

    Sequences, their names and order, skull stripping, geometry rules and lesions stay the source's: the files
    keep the source's layout and label protocol. The voxel size is applied by :func:`shifted_shape`.
    """
    if shift is None:
        return profile
    return replace(profile, sequences=tuple(_shift_sequence(s, shift) for s in profile.sequences),
                   notes=f"{profile.notes}; institution {shift.name}")


def shifted_shape(shape: tuple[int, int, int], shift: InstitutionShift | None,
                  min_side: int = 16) -> tuple[int, int, int]:
    """Voxels per axis over the same field of view with the voxel size times ``shift.spacing`` (at least
    ``min_side``)."""
    if shift is None:
        return tuple(shape)  # type: ignore[return-value]
    return tuple(max(min_side, round(n / f)) for n, f in zip(shape, shift.spacing, strict=True))  # type: ignore
