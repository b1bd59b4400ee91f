"""Abdominal CT phantom in Hounsfield units for LiTS-like cases: body, fat, muscle, organs, liver with tumours.

Geometry is in RAS millimetres relative to the grid centre (x to the patient's right, y anterior, z up);
the liver sits in the right upper quadrant below the diaphragm. Objects are painted in order with soft
(partial-volume) edges, so that small objects and thick slices blur like on a scanner. Labels: 0 background,
1 liver (hepatic vessels included, as LiTS annotates them), 2 tumour.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from nnunet_universal.synthetic.anatomy import rotation_matrix
from nnunet_universal.synthetic.appearance import smooth_field
from nnunet_universal.synthetic.case import CaseData
from nnunet_universal.synthetic.grid import Flips, Grid, grid_from_fov

DEFAULT_SHAPE = (64, 64, 40)
NATIVE_SHAPE = (512, 512, 120)
LIVER, TUMOUR = 1, 2


class _Canvas:
    """HU volume with painter's-algorithm helpers on bounding boxes (keeps large grids cheap)."""

    def __init__(self, grid: Grid) -> None:
        self.grid = grid
        self.axes = [grid.axis_mm(a) for a in range(3)]
        self.hu = np.full(grid.shape, -1000.0, np.float32)
        self.edge = float(np.mean(grid.spacing))

    def box(self, center: np.ndarray, half_mm: float) -> tuple[tuple[slice, ...], list[np.ndarray]]:
        """Index box around ``center`` (mm) and its broadcastable coordinate axes (mm)."""
        sl, ax = [], []
        for a, c in enumerate(center):
            lo = int(np.searchsorted(self.axes[a], c - half_mm))
            hi = int(np.searchsorted(self.axes[a], c + half_mm, side="right"))
            sl.append(slice(lo, max(hi, lo)))
            shape = [1, 1, 1]
            shape[a] = max(hi - lo, 0)
            ax.append(self.axes[a][lo:hi].reshape(shape))
        return tuple(sl), ax

    def ellipsoid(self, center: np.ndarray, radii: np.ndarray, rot: np.ndarray | None = None,
                  rough: float = 0.0, rng: np.random.Generator | None = None) -> tuple[tuple[slice, ...], np.ndarray]:
        """Soft occupancy of an (optionally rotated, roughened) ellipsoid in its bounding box."""
        sl, (x, y, z) = self.box(center, float(np.max(radii)) * (1.0 + rough) + 2 * self.edge)
        d = [x - center[0], y - center[1], z - center[2]]
        if rot is not None:
            d = [rot[i, 0] * d[0] + rot[i, 1] * d[1] + rot[i, 2] * d[2] for i in range(3)]
        rho = np.sqrt(sum((di / r) ** 2 for di, r in zip(d, radii, strict=True)))
        rho = np.broadcast_to(rho, tuple(s.stop - s.start for s in sl)).astype(np.float32)
        if rough and rng is not None and rho.size:
            rho = rho * (1.0 + rough * smooth_field(rng, rho.shape, n_ctrl=4))
        occ = np.clip(0.5 + (1.0 - rho) * float(np.min(radii)) / self.edge, 0.0, 1.0)
        return sl, occ

    def paint(self, sl: tuple[slice, ...], occ: np.ndarray, hu: float | np.ndarray) -> None:
        """Blend ``hu`` into the box ``sl`` with weight ``occ`` (soft edges = partial volume)."""
        self.hu[sl] = self.hu[sl] * (1.0 - occ) + np.asarray(hu, np.float32) * occ


def ct_grid(rng: np.random.Generator, shape: tuple[int, int, int] | None) -> Grid:
    """Per-case field of view (in-plane 300–460 mm, 110–260 mm along z) and table position."""
    fxy = float(rng.uniform(300.0, 460.0))
    g = grid_from_fov(shape or DEFAULT_SHAPE, (fxy, fxy, float(rng.uniform(110.0, 260.0))))
    origin = (-g.fov[0] / 2 + rng.uniform(-20, 20), -g.fov[1] / 2 + rng.uniform(-20, 20), rng.uniform(-600, -100))
    return Grid(g.shape, g.spacing, tuple(float(o) for o in origin))  # type: ignore[arg-type]


def make_ct_case(case_id: str, rng: np.random.Generator, shape: tuple[int, int, int] | None,
                 flips: Flips, lesion_scale: float = 1.0) -> CaseData:
    """One contrast-enhanced abdominal CT (HU, float32) with liver/tumour labels (tumour radii × ``lesion_scale``)."""
    grid = ct_grid(rng, shape)
    cv = _Canvas(grid)
    x, y, z = (cv.axes[0][:, None, None], cv.axes[1][None, :, None], cv.axes[2][None, None, :])
    zc = float(rng.uniform(-30.0, 20.0))  # liver centre relative to the grid centre
    ax_, ay_ = min(rng.uniform(125, 165), 0.47 * grid.fov[0]), min(rng.uniform(90, 120), 0.45 * grid.fov[1])
    yb = 0.0
    wobble = 1.0 + 0.04 * np.sin(z / 60.0 + rng.uniform(0, 6))
    full = (slice(None),) * 3

    def ring(inset: float) -> np.ndarray:  # soft elliptic cylinder inset by ``inset`` mm, shape (X, Y, Z)
        rho = np.sqrt((x / (ax_ * wobble - inset)) ** 2 + ((y - yb) / (ay_ * wobble - inset)) ** 2)
        return np.clip(0.5 + (1.0 - rho) * (ay_ - inset) / cv.edge, 0, 1).astype(np.float32)

    cv.paint(full, np.clip(0.5 + ((-ay_ - 12.0) - y) / cv.edge, 0, 1) * np.clip(
        0.5 + (y - (-ay_ - 20.0)) / cv.edge, 0, 1) * np.ones_like(z), 60.0)  # table
    t_fat, t_mus = rng.uniform(8, 35), rng.uniform(8, 14)
    cv.paint(full, ring(0.0), -100.0)  # subcutaneous fat (skin is too thin to matter)
    cv.paint(full, ring(t_fat), 45.0)  # abdominal wall muscle
    cavity = ring(t_fat + t_mus)
    visceral_fat = np.clip(0.5 + 1.5 * smooth_field(rng, grid.shape, 6), 0, 1) * rng.uniform(0.3, 0.8)
    cv.paint(full, cavity, 20.0 * (1 - visceral_fat) - 95.0 * visceral_fat)
    dome = zc + 70.0 + 10.0 * (x > 0) - 40.0 * ((x / ax_) ** 2 + ((y - yb) / ay_) ** 2)
    lung = cavity * np.clip(0.5 + (z - dome) / cv.edge, 0, 1)
    cv.paint(full, lung, -850.0)
    cv.paint(*cv.ellipsoid(np.array([-25.0, 30.0, zc + 110.0]), np.array([55.0, 45.0, 40.0])), 40.0)  # heart
    ys = -ay_ + t_fat + t_mus + 30.0  # vertebral body centre (posterior)
    for side in (-1, 1):  # paraspinal muscles
        cv.paint(full, np.clip(0.5 + (1 - np.sqrt(((x - side * 38) / 28) ** 2 + ((y - ys + 18) / 22) ** 2)) * 22
                               / cv.edge, 0, 1) * np.ones_like(z), 50.0)
    _spine(cv, x, y, z, ys, rng)
    hu_liver = float(rng.uniform(70.0, 120.0))  # phase and scanner dependent
    cv.paint(full, _disk(cv, x, y, -15.0, ys + 28, 11.0) * np.ones_like(z), hu_liver + rng.uniform(40, 120))  # aorta
    cv.paint(full, _disk(cv, x, y, 22.0, ys + 30, 11.0) * np.ones_like(z), hu_liver + 20)  # IVC
    for side in (-1, 1):  # kidneys, spleen
        cv.paint(*cv.ellipsoid(np.array([side * 70.0, ys + 5, zc - 70]), np.array([28.0, 22.0, 50.0])), 150.0)
    cv.paint(*cv.ellipsoid(np.array([-95.0, ys + 35, zc + 15]), np.array([35.0, 40.0, 55.0]), rough=0.1, rng=rng),
             hu_liver + 10)
    sl, st = cv.ellipsoid(np.array([-55.0, 30.0, zc + 25]), np.array([45.0, 35.0, 40.0]))  # stomach, air anterior
    cv.paint(sl, st, 15.0)
    cv.paint(sl, st * (cv.axes[1][sl[1]][None, :, None] > 30.0 + 0.4 * 35.0), -1000.0)
    for _ in range(int(rng.integers(5, 10))):  # bowel loops: gas, fluid or oral contrast
        c = np.array([rng.uniform(-90, 90), rng.uniform(-20, ay_ * 0.6), zc - rng.uniform(40, 110)])
        cv.paint(*cv.ellipsoid(c, rng.uniform(10, 22, 3)), float(rng.choice([-900.0, 20.0, 220.0])))
    liver, tumour = _liver(cv, rng, zc, cavity * (1 - lung), hu_liver, lesion_scale)
    hu = ndimage.gaussian_filter(cv.hu, [0.5, 0.5, 0.35], mode="nearest")
    hu += rng.standard_normal(hu.shape, dtype=np.float32) * np.float32(rng.uniform(6.0, 25.0))
    labels = np.where(liver > 0.5, LIVER, 0).astype(np.uint8)
    labels[(tumour > 0.5) & (liver > 0.5)] = TUMOUR
    return CaseData(case_id, grid, {"volume": np.clip(hu, -1024, 3071)}, labels, flips, {"liver_hu": hu_liver})


def _disk(cv: _Canvas, x: np.ndarray, y: np.ndarray, cx: float, cy: float, r: float) -> np.ndarray:
    return np.clip(0.5 + (r - np.sqrt((x - cx) ** 2 + (y - cy) ** 2)) / cv.edge, 0, 1).astype(np.float32)


def _spine(cv: _Canvas, x: np.ndarray, y: np.ndarray, z: np.ndarray, ys: float, rng: np.random.Generator) -> None:
    """Vertebral bodies (cortical rim, cancellous core, discs), spinal canal, posterior elements."""
    ones = np.ones_like(z)
    disc = (np.cos(2 * np.pi * (z - rng.uniform(0, 30)) / 30.0) > 0.8).astype(np.float32)
    cv.paint((slice(None),) * 3, _disk(cv, x, y, 0.0, ys, 20.0) * ones, 600.0)
    cv.paint((slice(None),) * 3, _disk(cv, x, y, 0.0, ys, 17.0) * ones, 220.0 * (1 - disc) + 90.0 * disc)
    cv.paint((slice(None),) * 3, _disk(cv, x, y, 0.0, ys - 32, 13.0) * ones, 450.0)
    cv.paint((slice(None),) * 3, _disk(cv, x, y, 0.0, ys - 30, 8.0) * ones, 20.0)


def _liver(cv: _Canvas, rng: np.random.Generator, zc: float, room: np.ndarray, hu_liver: float,
           lesion_scale: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Paint liver (two lobes), hepatic vessels and hypodense tumours; return full-size liver/tumour occupancy."""
    shape = cv.grid.shape
    liver = np.zeros(shape, np.float32)
    lobes = [(np.array([65.0, 5.0, zc]), np.array([70.0, 80.0, 75.0])),
             (np.array([-5.0, 45.0, zc + 25.0]), np.array([55.0, 35.0, 35.0]))]
    for c, r in lobes:
        rot = rotation_matrix(rng.uniform(-0.25, 0.25, 3))
        sl, occ = cv.ellipsoid(c + rng.normal(0, 5, 3), r * rng.uniform(0.88, 1.12, 3), rot, rough=0.12, rng=rng)
        liver[sl] = np.maximum(liver[sl], occ)
    liver *= room
    texture = hu_liver + 6.0 * smooth_field(rng, shape, 8)
    cv.paint((slice(None),) * 3, liver, texture)
    hilum = np.array([35.0, -5.0, zc])
    for _ in range(int(rng.integers(4, 8))):  # portal / hepatic veins as bright tubes, part of the liver label
        end = hilum + rng.normal(0, 1, 3) * np.array([45.0, 40.0, 40.0])
        _tube(cv, hilum, end, float(rng.uniform(3, 6)), liver, hu_liver + 50.0)
    tumour = np.zeros(shape, np.float32)
    n = int(rng.choice([0, 1, 1, 2, 2, 3, 4, 6]))
    inside = np.flatnonzero(liver.ravel() > 0.95)
    r_min = 0.9 * max(cv.grid.spacing)
    for _ in range(n if inside.size else 0):
        c = np.array([cv.axes[a][i] for a, i in enumerate(np.unravel_index(rng.choice(inside), shape))])
        lo = max(4.0 * lesion_scale, r_min)
        r = float(np.exp(rng.uniform(np.log(lo), np.log(max(30.0 * lesion_scale, 1.5 * lo)))))
        sl, occ = cv.ellipsoid(c, r * rng.uniform(0.85, 1.15, 3), rough=0.15, rng=rng)
        occ = occ * liver[sl]
        hu_t = hu_liver - float(rng.uniform(30.0, 70.0))
        cv.paint(sl, occ, hu_t)
        if r > 10 and rng.random() < 0.5:  # darker necrotic centre
            sl2, core = cv.ellipsoid(c, np.full(3, r * 0.5))
            cv.paint(sl2, core * liver[sl2], hu_t - 25.0)
        tumour[sl] = np.maximum(tumour[sl], occ)
    return liver, tumour


def _tube(cv: _Canvas, a: np.ndarray, b: np.ndarray, r: float, within: np.ndarray, hu: float) -> None:
    """Paint a cylinder of radius ``r`` mm from ``a`` to ``b`` (mm), clipped to ``within``."""
    mid, half = (a + b) / 2, float(np.linalg.norm(b - a)) / 2 + r
    sl, (x, y, z) = cv.box(mid, half)
    ab = b - a
    t = np.clip(((x - a[0]) * ab[0] + (y - a[1]) * ab[1] + (z - a[2]) * ab[2]) / float(ab @ ab), 0, 1)
    d = np.sqrt((x - a[0] - t * ab[0]) ** 2 + (y - a[1] - t * ab[1]) ** 2 + (z - a[2] - t * ab[2]) ** 2)
    occ = np.clip(0.5 + (r - d) / cv.edge, 0, 1).astype(np.float32) * within[sl]
    cv.paint(sl, occ, hu)
