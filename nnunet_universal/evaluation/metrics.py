"""Voxel-level segmentation metrics on binary masks: Dice and HD95 (95th-percentile Hausdorff distance).

Conventions (chosen so that every per-case number is defined and means stay comparable):

* **Dice** = 2|P ∩ G| / (|P| + |G|); both masks empty → **1.0** (the prediction is right: nothing there).
  Never NaN.
* **HD95** (mm) = max(P95 of distances from P's surface to G's surface, P95 of the reverse): the symmetric
  robust Hausdorff distance **as MONAI computes it** (``compute_hausdorff_distance(percentile=95)``, voxel
  centres). Surfaces are mask voxels with a 6-neighbour (face) outside the mask; distances are exact Euclidean
  distances in mm from each surface voxel centre to the nearest surface voxel centre of the other mask
  (``scipy.spatial.cKDTree``); each surface voxel counts once and P95 is numpy's linear percentile.
  This is **not** the BraTS 2023 definition: the BraTS 2023 evaluation uses DeepMind's ``surface-distance``
  package (``compute_surface_distances`` + ``compute_robust_hausdorff``), whose surface elements lie on the
  voxel *boundaries* and whose percentile is weighted by each element's surface area; values differ by up to
  about a voxel, and BraTS scores a one-side-empty case 374 mm. Here: both empty → **0.0**; exactly one empty →
  **NaN** (undefined: there is no surface to measure to); summaries exclude NaN values and report how many
  cases were excluded ("n/a"), so a missed structure shows up in Dice (0) and in that count rather than as an
  arbitrary distance.

``spacing`` is always the voxel size **per array axis**. Arrays read with SimpleITK are ``(z, y, x)``
while ``image.GetSpacing()`` is ``(x, y, z)``: pass ``image.GetSpacing()[::-1]``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree


def dice(pred: np.ndarray, gt: np.ndarray) -> float:
    """Dice coefficient of two boolean masks of equal shape; 1.0 when both are empty."""
    pred = np.asarray(pred, dtype=bool)
    gt = np.asarray(gt, dtype=bool)
    _check_shapes(pred, gt)
    denom = int(pred.sum()) + int(gt.sum())
    if denom == 0:
        return 1.0
    return 2.0 * int(np.logical_and(pred, gt).sum()) / denom


def hd95(pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float]) -> float:
    """Symmetric 95th-percentile Hausdorff distance in mm, MONAI's voxel-centre definition (module docstring; not
    BraTS 2023's surface-distance one); 0.0 if both empty, NaN if exactly one is empty.

    Args:
        pred, gt: boolean masks of equal shape (2D or 3D).
        spacing: voxel size per array axis, in mm.
    """
    pred = np.asarray(pred, dtype=bool)
    gt = np.asarray(gt, dtype=bool)
    _check_shapes(pred, gt)
    if len(spacing) != pred.ndim:
        raise ValueError(f"spacing {tuple(spacing)} has {len(spacing)} values for a {pred.ndim}-D mask")
    has_p, has_g = bool(pred.any()), bool(gt.any())
    if not has_p and not has_g:
        return 0.0
    if has_p != has_g:
        return math.nan
    pred, gt = crop_to_union(pred, gt)
    scale = np.asarray(spacing, dtype=float)
    pts_p = np.argwhere(surface(pred)) * scale  # surface voxel centres in mm
    pts_g = np.argwhere(surface(gt)) * scale
    # exact nearest-neighbour distances between the two surfaces (same values as a distance transform with
    # ``sampling=spacing``, but the cost grows with the surface size, not with the bounding box volume)
    d_pg = cKDTree(pts_g).query(pts_p)[0]
    d_gp = cKDTree(pts_p).query(pts_g)[0]
    return float(max(np.percentile(d_pg, 95), np.percentile(d_gp, 95)))


def surface(mask: np.ndarray) -> np.ndarray:
    """Voxels of ``mask`` with at least one face neighbour outside it (outside the array counts as outside)."""
    struct = ndimage.generate_binary_structure(mask.ndim, 1)
    return mask & ~ndimage.binary_erosion(mask, structure=struct, border_value=0)


def crop_to_union(*masks: np.ndarray, margin: int = 1) -> tuple[np.ndarray, ...]:
    """Crop masks to the bounding box of their union, padded by ``margin`` zero voxels on every side.

    Surfaces of the crops equal those of the full arrays (the pad plays the role of the array border), while
    erosions run on the bounding box instead of the whole image.
    """
    union = np.logical_or.reduce([np.asarray(m, dtype=bool) for m in masks])
    if not union.any():
        return tuple(np.asarray(m, dtype=bool) for m in masks)
    box = bounding_box(union)
    return tuple(np.pad(np.asarray(m, dtype=bool)[box], margin) for m in masks)


def bounding_box(mask: np.ndarray) -> tuple[slice, ...]:
    """Tightest slices containing every nonzero voxel of a non-empty mask."""
    box = []
    for ax in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != ax)
        idx = np.flatnonzero(np.any(mask, axis=other))
        box.append(slice(int(idx[0]), int(idx[-1]) + 1))
    return tuple(box)


def stats(values: Iterable[float | None]) -> dict[str, float | int | None]:
    """Mean, std (population), median, min, max and count of the finite values; ``n_excluded`` counts the rest
    (NaN, inf or ``None``: e.g. HD95 where exactly one mask was empty).

    The statistics are ``None`` when no value is finite (JSON has no NaN).
    """
    vals = list(values)
    arr = np.asarray([float(v) for v in vals if v is not None and math.isfinite(float(v))], dtype=float)
    out: dict[str, float | int | None] = {"n": int(arr.size), "n_excluded": len(vals) - int(arr.size)}
    if arr.size == 0:
        out.update(mean=None, std=None, median=None, min=None, max=None)
    else:
        out.update(mean=float(arr.mean()), std=float(arr.std()), median=float(np.median(arr)),
                   min=float(arr.min()), max=float(arr.max()))
    return out


def _check_shapes(a: np.ndarray, b: np.ndarray) -> None:
    if a.shape != b.shape:
        raise ValueError(f"prediction and ground truth differ in shape: {a.shape} vs {b.shape}")
