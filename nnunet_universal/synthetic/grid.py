"""Voxel grids of synthetic cases and their conversion to each source's on-disk orientation.

Every generator works on arrays in *RAS voxel order* (axis 0 towards patient Right, 1 Anterior, 2 Superior) with
world = origin + index * spacing (RAS millimetres). Writers then flip axes to the source's own convention and
build the matching NIfTI affine, so that every reader that honours the header sees the same anatomy.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

Flips = tuple[bool, bool, bool]

#: The usual DICOM-derived storage (ITK/LPS identity direction): x towards Left, y towards Posterior.
LPS_FLIPS: Flips = (True, True, False)
NO_FLIPS: Flips = (False, False, False)


@dataclass(frozen=True)
class Grid:
    """A case's voxel grid in RAS voxel order: ``shape`` (X, Y, Z), ``spacing`` and ``origin`` in RAS mm."""

    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float] = (0.0, 0.0, 0.0)

    @property
    def fov(self) -> np.ndarray:
        """Field of view in mm per axis."""
        return np.asarray(self.shape, float) * np.asarray(self.spacing, float)

    def axis_mm(self, axis: int, centered: bool = True) -> np.ndarray:
        """Voxel-centre coordinates in mm along ``axis`` (relative to the grid centre if ``centered``)."""
        n, s = self.shape[axis], self.spacing[axis]
        idx = np.arange(n, dtype=np.float32)
        if centered:
            return (idx - (n - 1) / 2.0) * np.float32(s)
        return np.float32(self.origin[axis]) + idx * np.float32(s)


def grid_from_fov(shape: tuple[int, int, int], fov_mm: tuple[float, float, float],
                  origin: tuple[float, float, float] = (0.0, 0.0, 0.0)) -> Grid:
    """A grid of ``shape`` voxels covering ``fov_mm``: spacing = fov / shape (rounded to 1e-4 mm for clean headers)."""
    spacing = tuple(round(float(f) / int(n), 4) for f, n in zip(fov_mm, shape, strict=True))
    return Grid(tuple(int(n) for n in shape), spacing, origin)  # type: ignore[arg-type]


def to_storage(array: np.ndarray, flips: Flips) -> np.ndarray:
    """Flip the first three axes of a RAS-ordered array (trailing channel axes untouched) into storage order."""
    axes = tuple(a for a, f in enumerate(flips) if f)
    return np.ascontiguousarray(np.flip(array, axis=axes) if axes else array)


def storage_affine(grid: Grid, flips: Flips) -> np.ndarray:
    """4×4 RAS affine (NIfTI sform/qform) of the array returned by :func:`to_storage` with the same ``flips``.

    Flipping axis ``a`` makes storage voxel 0 the last RAS voxel, so its world position moves to
    ``origin + (n - 1) * spacing`` and the axis direction becomes negative: the world position of every voxel
    is unchanged.
    """
    aff = np.eye(4)
    for a in range(3):
        n, s, o = grid.shape[a], grid.spacing[a], grid.origin[a]
        if flips[a]:
            aff[a, a], aff[a, 3] = -s, o + (n - 1) * s
        else:
            aff[a, a], aff[a, 3] = s, o
    return aff
