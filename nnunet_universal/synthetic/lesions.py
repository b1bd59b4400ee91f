"""Brain lesions (metastases or a glioma) with sub-regions: necrotic core, enhancing rim, surrounding oedema.

Lesions are soft (partial-volume) fraction maps on the case grid; labels are the majority compartment of each
voxel. Canonical classes (BraTS 2023 numbering; writers map them to each source's own protocol):
0 background, 1 necrosis / non-enhancing core, 2 oedema, 3 enhancing tumour.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from nnunet_universal.synthetic.anatomy import TISSUES, rotation_matrix

NEC, EDEMA, ET = 1, 2, 3


@dataclass(frozen=True)
class LesionProfile:
    """How many lesions a case has and how they look (per source: metastases vs. gliomas, screening size)."""

    count: tuple[int, int]  # inclusive range
    radius_mm: tuple[float, float]  # tumour radius, drawn log-uniformly (a few mm to a few cm in diameter)
    necrosis_prob: float  # probability that a lesion large enough for a core has one
    necrosis_frac: tuple[float, float]  # core radius / tumour radius
    edema_prob: float
    edema_factor: tuple[float, float]  # oedema radius / tumour radius
    irregularity: float  # relative amplitude of the smooth radius perturbation
    supratentorial: bool = False  # seed only above the lower third of the brain (adult gliomas; not metastases)


@dataclass
class LesionMaps:
    """Soft fractions (X, Y, Z) float32 of the three compartments; their sum is at most 1."""

    nec: np.ndarray
    et: np.ndarray
    edema: np.ndarray

    def total(self) -> np.ndarray:
        return self.nec + self.et + self.edema


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Zero-mean smooth noise in about [-1, 1] on ``shape`` (4³ random control values, trilinear)."""
    ctrl = rng.uniform(-1.0, 1.0, (4, 4, 4)).astype(np.float32)
    return ndimage.zoom(ctrl, [s / 4.0 for s in shape], order=1, mode="nearest", grid_mode=True)[
        : shape[0], : shape[1], : shape[2]]


def _occupancy(rho: np.ndarray, radius_mm: float, edge_mm: float) -> np.ndarray:
    """Soft inside-ness of the surface rho = 1 (rho: radius-normalised distance), edges ``edge_mm`` wide."""
    return np.clip(0.5 + (1.0 - rho) * radius_mm / edge_mm, 0.0, 1.0)


def place_lesions(rng: np.random.Generator, tissues: np.ndarray, spacing: tuple[float, float, float],
                  profile: LesionProfile, radius_scale: float = 1.0) -> LesionMaps:
    """Draw and paint lesions into brain tissue.

    Args:
        tissues: (5, X, Y, Z) fractions in :data:`TISSUES` order (from ``anatomy.sample_tissues``).
        spacing: voxel size in mm; tumours are never smaller than about one voxel so that each is labelled.
        radius_scale: multiplies the profile's radius range (``synth --lesion-scale``: larger lesions make a
            task learnable within a short CPU training budget; 1 keeps the source's population).
    """
    gm, wm = tissues[TISSUES.index("gm")], tissues[TISSUES.index("wm")]
    brain = np.clip(gm + wm + tissues[TISSUES.index("csf")] * (gm + wm > 0.2), 0, 1)
    shape = gm.shape
    sp = np.asarray(spacing, np.float32)
    edge = float(sp.mean())
    maps = LesionMaps(*(np.zeros(shape, np.float32) for _ in range(3)))
    # metastases seed at the grey/white junction or in white matter, away from the brain surface
    deep = ndimage.binary_erosion(gm + wm > 0.6, iterations=1)
    weight = (np.minimum(gm, wm) > 0.2) * 2.0 + (wm > 0.5) * 1.0
    if profile.supratentorial:
        zs = np.flatnonzero((gm + wm > 0.5).any(axis=(0, 1)))
        if zs.size:
            weight[:, :, : int(zs[0] + 0.35 * (zs[-1] - zs[0]))] = 0.0
    cand = np.flatnonzero(deep.ravel() & (weight.ravel() > 0))
    if cand.size == 0:
        raise RuntimeError(f"no brain tissue to place lesions in a grid of shape {shape}; use a larger --shape")
    prob = weight.ravel()[cand] / weight.ravel()[cand].sum()
    n = int(rng.integers(profile.count[0], profile.count[1] + 1))
    r_min = max(profile.radius_mm[0] * radius_scale, 0.9 * float(sp.max()))
    r_max = max(profile.radius_mm[1] * radius_scale, r_min * 1.5)
    centers: list[tuple[np.ndarray, float]] = []
    for _ in range(n):
        r = float(np.exp(rng.uniform(np.log(r_min), np.log(r_max))))
        for _try in range(20):
            c = np.array(np.unravel_index(cand[rng.choice(cand.size, p=prob)], shape), np.float32)
            if all(np.linalg.norm((c - c2) * sp) > (r + r2) * 1.2 for c2, r2 in centers):
                break
        centers.append((c, r))
        _paint(rng, maps, c, r, sp, edge, profile, wm, gm)
    for m in (maps.nec, maps.et, maps.edema):
        m *= brain
    over = np.maximum(maps.total(), 1.0)
    for m in (maps.nec, maps.et, maps.edema):
        m /= over
    return maps


def _paint(rng: np.random.Generator, maps: LesionMaps, c: np.ndarray, r: float, sp: np.ndarray, edge: float,
           profile: LesionProfile, wm: np.ndarray, gm: np.ndarray) -> None:
    """Add one lesion centred at voxel ``c`` with tumour radius ``r`` mm (max-combined with earlier ones)."""
    has_edema = rng.random() < profile.edema_prob
    r_e = r * float(rng.uniform(*profile.edema_factor)) if has_edema else r
    has_core = r >= 2.0 * float(sp.max()) and rng.random() < profile.necrosis_prob
    k = float(rng.uniform(*profile.necrosis_frac)) if has_core else 0.0
    half = np.ceil(r_e * 1.5 / sp).astype(int) + 1
    lo = np.maximum(np.floor(c).astype(int) - half, 0)
    hi = np.minimum(np.floor(c).astype(int) + half + 1, wm.shape)
    box = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
    axes = [(np.arange(a, b, dtype=np.float32) - ci) * s for a, b, ci, s in zip(lo, hi, c, sp, strict=True)]
    d = np.stack(np.meshgrid(*axes, indexing="ij"))  # (3, bx, by, bz) mm from the centre
    rot = rotation_matrix(rng.uniform(-np.pi, np.pi, 3)).astype(np.float32)
    d = np.tensordot(rot, d, axes=1) / rng.uniform(0.8, 1.25, 3).astype(np.float32)[:, None, None, None]
    dist = np.sqrt((d**2).sum(0))
    bshape = dist.shape
    rho_t = dist / r * (1.0 + profile.irregularity * _smooth_noise(rng, bshape))
    tumour = _occupancy(rho_t, r, edge)
    core = _occupancy(rho_t / k, r * k, edge) if has_core else np.zeros_like(tumour)
    et = np.clip(tumour - core, 0, 1)
    if has_edema:
        rho_e = dist / r_e * (1.0 + 2.0 * profile.irregularity * _smooth_noise(rng, bshape))
        spread = np.clip(wm[box] * 1.2 + 0.35 * gm[box], 0, 1)  # oedema follows the white matter
        edema = np.clip(_occupancy(rho_e, r_e, edge) * spread - tumour, 0, 1)
    else:
        edema = np.zeros_like(tumour)
    maps.nec[box] = np.maximum(maps.nec[box], core)
    maps.et[box] = np.maximum(maps.et[box], et)
    maps.edema[box] = np.maximum(maps.edema[box], edema) * (1.0 - maps.nec[box] - maps.et[box]).clip(0, 1)


def lesion_classes(maps: LesionMaps) -> np.ndarray:
    """Canonical label map (X, Y, Z) uint8: the majority lesion compartment where lesions fill > half a voxel."""
    stack = np.stack([maps.nec, maps.edema, maps.et])  # order = classes 1, 2, 3
    labels = (np.argmax(stack, axis=0) + 1).astype(np.uint8)
    labels[maps.total() <= 0.5] = 0
    return labels
