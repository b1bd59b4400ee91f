"""Per-source "institution" profiles as plain data: sequences, contrast curves, bias, noise, blur, geometry, lesions.

Each brain source behaves like a different hospital so that the domain shift between them is real: its own
sequence set, its own tissue contrast (a gamma curve plus per-tissue offsets on top of the canonical contrast
of the sequence), bias-field strength, noise level, through-plane blur (thick 2D slices resampled to the
3D grid), field of view, head pose freedom, skull stripping and lesion population.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from nnunet_universal.synthetic.grid import LPS_FLIPS, NO_FLIPS, Flips
from nnunet_universal.synthetic.lesions import LesionProfile

#: Compartments an MR voxel is made of: anatomy (anatomy.TISSUES), air, and the three lesion compartments.
CLASSES: tuple[str, ...] = ("air", "csf", "gm", "wm", "skull", "scalp", "nec", "et", "edema")

#: Canonical relative signal (0..1) of each compartment per contrast, keyed by modality slot
#: (registry.SLOTS). Enhancing tumour is bright on post-contrast T1, oedema bright on T2/FLAIR, necrosis dark
#: on T1/T1c and bright on T2, CSF suppressed on FLAIR, cortical bone dark everywhere, scalp fat bright on T1.
BASE_CONTRAST: dict[str, dict[str, float]] = {
    "T1": dict(air=0, csf=0.22, gm=0.55, wm=0.78, skull=0.08, scalp=0.92, nec=0.20, et=0.50, edema=0.52),
    "T1c": dict(air=0, csf=0.22, gm=0.55, wm=0.78, skull=0.08, scalp=0.92, nec=0.18, et=1.00, edema=0.52),
    "T1c_GRE": dict(air=0, csf=0.14, gm=0.45, wm=0.72, skull=0.05, scalp=0.95, nec=0.12, et=1.00, edema=0.48),
    "T2": dict(air=0, csf=1.00, gm=0.62, wm=0.45, skull=0.05, scalp=0.60, nec=0.95, et=0.62, edema=0.85),
    "FLAIR": dict(air=0, csf=0.10, gm=0.62, wm=0.48, skull=0.05, scalp=0.70, nec=0.55, et=0.72, edema=0.98),
}


@dataclass(frozen=True)
class SequenceProfile:
    """One sequence of one institution: native name, contrast (slot) and the acquisition's look."""

    name: str  # as the native release names it (file suffix, folder or Decathlon modality name)
    contrast: str  # key of BASE_CONTRAST (a registry slot)
    gamma: float = 1.0  # contrast curve: signal ** gamma
    deltas: tuple[tuple[str, float], ...] = ()  # per-compartment offsets on BASE_CONTRAST
    noise: float = 0.03  # Rician noise sigma relative to the white-matter-ish signal range (0..1)
    bias: float = 0.1  # amplitude of the log bias field
    blur_mm: tuple[float, float, float] = (0.5, 0.5, 0.5)  # Gaussian sigma in mm (x, y, z)
    scale: float = 1000.0  # stored intensity of signal 1.0


@dataclass(frozen=True)
class MRSourceProfile:
    """A brain MR source: sequences in native channel order and the acquisition geometry."""

    source: str
    sequences: tuple[SequenceProfile, ...]
    skull_stripped: bool
    fov_mm: tuple[tuple[float, float], tuple[float, float], tuple[float, float]]  # (lo, hi) per axis
    default_shape: tuple[int, int, int]
    flips: Flips  # storage orientation relative to RAS voxel order
    max_rot_deg: float  # head pose freedom (atlas-registered sources: residual only)
    max_shift_mm: float
    center_offset_mm: tuple[float, float, float]
    lesions: LesionProfile
    native_shape: tuple[int, int, int]  # size of the real release's volumes (documentation, benchmarks)
    origin_rule: str = "zero"  # "sri24" (BraTS headers), "scanner" (random scanner position) or "zero"
    subtraction: str | None = None  # name of a T1post − T1pre image the source ships (UCSF-BMSR)
    notes: str = field(default="")


METASTASES = LesionProfile(count=(1, 5), radius_mm=(1.5, 16.0), necrosis_prob=0.7, necrosis_frac=(0.3, 0.6),
                           edema_prob=0.85, edema_factor=(1.6, 3.2), irregularity=0.12)
#: Radiosurgery patients: more and smaller metastases (screening-size lesions are the point of SRS).
SRS_METASTASES = LesionProfile(count=(1, 7), radius_mm=(1.5, 12.0), necrosis_prob=0.5, necrosis_frac=(0.3, 0.55),
                               edema_prob=0.7, edema_factor=(1.5, 3.0), irregularity=0.1)
#: Decathlon Task01 holds BraTS 2016/17 gliomas: one large irregular tumour with a necrotic core.
GLIOMA = LesionProfile(count=(1, 1), radius_mm=(12.0, 26.0), necrosis_prob=0.9, necrosis_frac=(0.35, 0.7),
                       edema_prob=1.0, edema_factor=(1.4, 2.1), irregularity=0.25, supratentorial=True)

_BRAIN_BOX = ((240.0, 240.0), (240.0, 240.0), (155.0, 155.0))

MR_SOURCES: dict[str, MRSourceProfile] = {
    "brats-mets": MRSourceProfile(
        source="brats-mets",
        sequences=(
            SequenceProfile("t1n", "T1", 1.0, noise=0.025, bias=0.05, blur_mm=(0.6, 0.6, 0.8), scale=800),
            SequenceProfile("t1c", "T1c", 1.0, noise=0.025, bias=0.05, blur_mm=(0.6, 0.6, 0.6), scale=1400),
            SequenceProfile("t2w", "T2", 1.0, noise=0.025, bias=0.05, blur_mm=(0.6, 0.6, 1.0), scale=1800),
            SequenceProfile("t2f", "FLAIR", 1.0, noise=0.03, bias=0.06, blur_mm=(0.6, 0.6, 1.5), scale=700),
        ),
        skull_stripped=True, fov_mm=_BRAIN_BOX, default_shape=(60, 60, 39), flips=LPS_FLIPS,
        max_rot_deg=3.0, max_shift_mm=3.0, center_offset_mm=(0.0, 0.0, 2.0), lesions=METASTASES,
        native_shape=(240, 240, 155), origin_rule="sri24",
        notes="1 mm SRI24 atlas space, skull-stripped, int16 images, uint8 seg"),
    "ucsf-bmsr": MRSourceProfile(
        source="ucsf-bmsr",
        sequences=(
            SequenceProfile("T1pre", "T1", 0.8, (("gm", 0.06), ("csf", 0.05)), noise=0.05, bias=0.25,
                            blur_mm=(0.4, 0.4, 0.8), scale=900.0),
            SequenceProfile("T1post", "T1c", 1.15, (("wm", 0.05), ("csf", -0.06), ("et", 0.15)), noise=0.04,
                            bias=0.25, blur_mm=(0.4, 0.4, 0.5), scale=1300.0),
            SequenceProfile("FLAIR", "FLAIR", 1.3, (("csf", 0.06), ("edema", -0.05)), noise=0.06, bias=0.3,
                            blur_mm=(0.5, 0.5, 2.5), scale=1000.0),
        ),
        skull_stripped=False, fov_mm=((230.0, 256.0), (230.0, 256.0), (150.0, 190.0)), default_shape=(56, 56, 44),
        flips=LPS_FLIPS, max_rot_deg=12.0, max_shift_mm=10.0, center_offset_mm=(0.0, 0.0, 0.0),
        lesions=SRS_METASTASES, native_shape=(256, 256, 160), origin_rule="scanner", subtraction="subtraction",
        notes="scanner space (not atlas-registered), co-registered to T1post, not skull-stripped"),
    "brainmetshare": MRSourceProfile(
        source="brainmetshare",
        sequences=(
            SequenceProfile("0", "T1c_GRE", 1.2, noise=0.03, bias=0.15, blur_mm=(0.4, 0.4, 0.5), scale=1.0),
            SequenceProfile("1", "T1", 0.9, (("gm", 0.04),), noise=0.04, bias=0.15, blur_mm=(0.5, 0.5, 1.5),
                            scale=1.0),
            SequenceProfile("2", "T1c", 0.95, (("et", 0.1),), noise=0.04, bias=0.15, blur_mm=(0.5, 0.5, 1.5),
                            scale=1.0),
            SequenceProfile("3", "FLAIR", 0.8, (("csf", 0.08),), noise=0.045, bias=0.18, blur_mm=(0.5, 0.5, 2.0),
                            scale=1.0),
        ),
        skull_stripped=True, fov_mm=((240.0, 240.0), (240.0, 240.0), (130.0, 165.0)), default_shape=(64, 64, 40),
        flips=LPS_FLIPS, max_rot_deg=6.0, max_shift_mm=6.0, center_offset_mm=(0.0, 0.0, 8.0),
        lesions=SRS_METASTASES, native_shape=(256, 256, 150),
        notes="PNG slices (8-bit), skull-stripped, no geometry in the files"),
    "msd-braintumour": MRSourceProfile(
        source="msd-braintumour",
        sequences=(
            SequenceProfile("FLAIR", "FLAIR", 1.1, noise=0.035, bias=0.1, blur_mm=(0.8, 0.8, 2.5), scale=600.0),
            SequenceProfile("T1w", "T1", 0.85, noise=0.035, bias=0.1, blur_mm=(0.8, 0.8, 2.5), scale=900.0),
            SequenceProfile("t1gd", "T1c", 1.0, noise=0.03, bias=0.1, blur_mm=(0.7, 0.7, 1.0), scale=1500.0),
            SequenceProfile("T2w", "T2", 1.2, noise=0.035, bias=0.1, blur_mm=(0.8, 0.8, 2.5), scale=1800.0),
        ),
        skull_stripped=True, fov_mm=_BRAIN_BOX, default_shape=(60, 60, 39), flips=NO_FLIPS,
        max_rot_deg=3.0, max_shift_mm=3.0, center_offset_mm=(0.0, 0.0, 2.0), lesions=GLIOMA,
        native_shape=(240, 240, 155), notes="BraTS 2016/17 gliomas as 4D float32 NIfTI, identity affine (assumed)"),
}
