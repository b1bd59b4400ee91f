"""MR signal from tissue fractions: contrast table, contrast curve, blur, bias field and Rician noise."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from nnunet_universal.synthetic.anatomy import TISSUES
from nnunet_universal.synthetic.institutions import BASE_CONTRAST, CLASSES, SequenceProfile
from nnunet_universal.synthetic.lesions import LesionMaps


def compartments(tissues: np.ndarray, lesions: LesionMaps) -> dict[str, np.ndarray]:
    """Fractions of every compartment in :data:`CLASSES` (sum 1 per voxel): lesions displace brain tissue.

    Args:
        tissues: (5, X, Y, Z) from ``anatomy.sample_tissues``.
    """
    les = lesions.total()
    keep = 1.0 - les
    out = {t: tissues[i] * keep if t in ("csf", "gm", "wm") else tissues[i] for i, t in enumerate(TISSUES)}
    out.update(nec=lesions.nec, et=lesions.et, edema=lesions.edema)
    out["air"] = np.clip(1.0 - sum(out.values()), 0.0, 1.0)
    return out


def smooth_field(rng: np.random.Generator, shape: tuple[int, ...], n_ctrl: int = 3) -> np.ndarray:
    """Very smooth random field (about [-1, 1]) on ``shape``: ``n_ctrl``³ random values, cubic then linear up-sampling.

    The cubic step goes to at most 16 points per axis, the linear one to the full grid (cheap on 1 mm grids).
    """
    ctrl = rng.uniform(-1.0, 1.0, (n_ctrl,) * 3)
    mid = tuple(min(s, 16) for s in shape)
    f = ndimage.zoom(ctrl, [m / n_ctrl for m in mid], order=3, mode="nearest", grid_mode=True)
    if f.shape != tuple(shape):
        f = ndimage.zoom(f, [s / m for s, m in zip(shape, f.shape, strict=True)], order=1, mode="nearest",
                         grid_mode=True)
    return f[: shape[0], : shape[1], : shape[2]].astype(np.float32)


def render(rng: np.random.Generator, comp: dict[str, np.ndarray], seq: SequenceProfile,
           spacing: tuple[float, float, float], brain_mask: np.ndarray | None = None) -> np.ndarray:
    """One sequence (X, Y, Z) float32 in the institution's intensity units.

    Per case the tissue values, noise level and global scale are jittered a little around the institution's
    profile, so cases differ while institutions stay recognisable. ``brain_mask`` (if given) zeroes everything
    outside it after noise, like a skull-stripped release.
    """
    base = dict(BASE_CONTRAST[seq.contrast])
    for name, delta in seq.deltas:
        base[name] += delta
    jitter = rng.normal(0.0, 0.015, len(CLASSES))
    signal = np.zeros(next(iter(comp.values())).shape, np.float32)
    for c, j in zip(CLASSES, jitter, strict=True):
        if c != "air":
            signal += comp[c] * np.float32(max(base[c] + j, 0.0))
    signal = np.power(np.clip(signal, 0.0, None), np.float32(seq.gamma))
    sigma = [b / s for b, s in zip(seq.blur_mm, spacing, strict=True)]
    if max(sigma) >= 0.25:
        signal = ndimage.gaussian_filter(signal, [s if s >= 0.25 else 0.0 for s in sigma], mode="nearest")
    signal *= np.exp(np.float32(seq.bias) * smooth_field(rng, signal.shape))
    noise = np.float32(seq.noise * rng.uniform(0.75, 1.3))
    n1 = rng.standard_normal(signal.shape, dtype=np.float32) * noise
    n2 = rng.standard_normal(signal.shape, dtype=np.float32) * noise
    image = np.sqrt((signal + n1) ** 2 + n2**2)  # magnitude image: Rician noise
    if brain_mask is not None:
        image *= brain_mask
    return image * np.float32(seq.scale * rng.uniform(0.85, 1.15))
