"""Head anatomy from the MNI152 2009 template, randomly deformed per subject and resampled onto any grid.

The template files are the ones shipped *inside* the ``nilearn`` wheel (T1, GM and WM maps of the ICBM 2009a
symmetric template, 1 mm); nilearn's network fetchers are never used. The shipped T1 is already brain-masked,
so the tissues outside the brain cannot be taken from it: CSF is (brain mask − GM − WM), and a subarachnoid CSF
layer, the skull and the scalp are shells at fixed distances outside the brain mask (distance transform),
which is what a non-skull-stripped source shows.

Tissue fractions come back as ``(5, X, Y, Z)`` float32 arrays in the order of :data:`TISSUES`.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from nnunet_universal.synthetic.grid import Grid

logger = logging.getLogger(__name__)

TISSUES: tuple[str, ...] = ("csf", "gm", "wm", "skull", "scalp")
_MNI_FILES = {k: f"mni_icbm152_{k}_tal_nlin_sym_09a_converted.nii.gz" for k in ("t1", "gm", "wm")}
#: Shells outside the brain mask, in mm from its surface: (start, end) of CSF, skull and scalp.
_SHELLS_MM = {"csf": (0.0, 2.5), "skull": (2.5, 8.5), "scalp": (8.5, 14.0)}
_PAD_MM = 20.0  # room for the shells around the template's brain
_BOTTOM_PAD_MM = 46.0  # the template stops at the medulla: continue it downwards (spinal cord) instead of a "cap"
_WARP_BOX_MM = 110.0  # half-size of the box carrying a subject's deformation control points


def mni_path(kind: str) -> Path:
    """Path of the MNI152 2009 ``t1``/``gm``/``wm`` file inside the installed nilearn package."""
    # locate the package without importing it: ``import nilearn.datasets`` pulls in pandas/sklearn (~1 s, 100 MB)
    spec = importlib.util.find_spec("nilearn")
    roots = list(spec.submodule_search_locations or []) if spec else []
    path = Path(roots[0] if roots else "nilearn") / "datasets" / "data" / _MNI_FILES[kind]
    if not path.is_file():
        raise FileNotFoundError(
            f"MNI152 template file {path} is missing from the nilearn installation; the synthetic brain data is "
            "built from it. Reinstall nilearn (pip install --force-reinstall 'nilearn>=0.10').")
    return path


@functools.lru_cache(maxsize=1)
def _raw_template() -> dict[str, np.ndarray]:
    """The three template volumes as uint8 arrays, 1 mm, RAS voxel order, cropped to even sizes (196, 232, 188)."""
    import nibabel as nib

    out = {}
    for kind in _MNI_FILES:
        img = nib.load(mni_path(kind))
        if not np.allclose(img.affine[:3, :3], np.eye(3)):
            raise RuntimeError(f"unexpected orientation of {mni_path(kind)}: affine {img.affine.tolist()}")
        data = np.asarray(img.dataobj.get_unscaled(), dtype=np.uint8)
        out[kind] = data[: data.shape[0] // 2 * 2, : data.shape[1] // 2 * 2, : data.shape[2] // 2 * 2]
    out["origin"] = np.asarray(nib.load(mni_path("t1")).affine[:3, 3], dtype=np.float64)
    return out


@dataclass(frozen=True)
class Template:
    """Tissue fractions of the template at ``spacing`` mm: ``maps`` (5, X, Y, Z) uint8 (0..255 = 0..1)."""

    maps: np.ndarray
    spacing: float
    origin: np.ndarray  # MNI world (mm) of voxel (0, 0, 0)
    brain_center: np.ndarray  # MNI world (mm) of the centre of the brain's bounding box


def _pool(vol: np.ndarray, f: int) -> np.ndarray:
    """Block mean over f×f×f voxels (anti-aliased down-sampling); sizes must be multiples of ``f``."""
    v = vol.astype(np.float32)
    if f == 1:
        return v
    s = v.shape
    return v.reshape(s[0] // f, f, s[1] // f, f, s[2] // f, f).mean(axis=(1, 3, 5))


def _band(d: np.ndarray, lo: float, hi: float, width: float) -> np.ndarray:
    """Soft indicator of ``lo < d < hi`` with linear edges ``width`` mm wide."""
    return np.clip((d - lo) / width + 0.5, 0, 1) * np.clip((hi - d) / width + 0.5, 0, 1)


def _u8(v: np.ndarray) -> np.ndarray:
    return np.rint(np.clip(v, 0.0, 1.0) * 255.0).astype(np.uint8)


def _brain_fractions(pool: int) -> tuple[np.ndarray, np.ndarray]:
    """Padded (4, X, Y, Z) float32 CSF/GM/WM/brain-mask fractions at ``pool`` mm and the brain centre (MNI mm).

    Pooling happens before the tissue arithmetic (it is linear) to keep memory low; below the template's last
    slice the brainstem is continued downwards (spinal cord) instead of ending in a cap of skull.
    """
    raw = _raw_template()
    inside = raw["t1"] > 0
    mask = _pool(inside, pool)
    gm = _pool(np.where(inside, raw["gm"], 0), pool) / 255.0
    wm = _pool(np.where(inside, raw["wm"], 0), pool) / 255.0
    over = np.maximum(gm + wm, np.maximum(mask, 1e-6))
    gm, wm = gm * mask / over, wm * mask / over
    csf = np.clip(mask - gm - wm, 0.0, 1.0)
    idx = np.argwhere(mask > 0.5)
    center = raw["origin"] + (pool - 1) / 2.0 + (idx.min(0) + idx.max(0)) / 2.0 * pool
    pad, bottom = int(_PAD_MM) // pool, int(_BOTTOM_PAD_MM) // pool
    shape = (mask.shape[0] + 2 * pad, mask.shape[1] + 2 * pad, mask.shape[2] + 2 * pad + bottom)
    out = np.zeros((4, *shape), np.float32)
    for t, vol in enumerate((csf, gm, wm, mask)):
        out[t, pad:-pad, pad:-pad, pad + bottom: -pad] = vol
        out[t, pad:-pad, pad:-pad, pad: pad + bottom] = vol[:, :, :1]
    return out, center


def _outside_distance(pool: int, brain: np.ndarray | None = None) -> np.ndarray:
    """Distance (mm, float32) from the brain surface outwards on the padded ``pool`` grid (0 inside).

    The 1 mm version is the 2 mm one up-sampled: an exact transform of the 1 mm grid costs ~2 GB of memory,
    and the shells built from it are smooth bands, insensitive to sub-millimetre error.
    """
    if pool == 1:
        return ndimage.zoom(_outside_distance(2), 2, order=1, mode="nearest", grid_mode=True) - 0.5
    if brain is None:
        brain = _brain_fractions(pool)[0][3] > 0.5
    return ndimage.distance_transform_edt(~brain, sampling=float(pool)).astype(np.float32) - pool / 2.0


@functools.lru_cache(maxsize=2)
def load_template(pool: int) -> Template:
    """Template tissue maps at ``pool`` mm (1 or 2) with CSF/skull/scalp shells; cached per pool."""
    if pool not in (1, 2):
        raise ValueError(f"template pooling must be 1 or 2 mm, got {pool}")
    fr, center = _brain_fractions(pool)
    dist = _outside_distance(pool, fr[3] > 0.5 if pool == 2 else None)
    outside = 1.0 - fr[3]
    maps = np.empty((len(TISSUES), *fr.shape[1:]), np.uint8)
    maps[0] = _u8(fr[0] + _band(dist, *_SHELLS_MM["csf"], float(pool)) * outside)
    maps[1], maps[2] = _u8(fr[1]), _u8(fr[2])
    maps[3] = _u8(_band(dist, *_SHELLS_MM["skull"], float(pool)) * outside)
    maps[4] = _u8(_band(dist, *_SHELLS_MM["scalp"], float(pool)) * outside)
    pad, bottom = int(_PAD_MM) // pool, int(_BOTTOM_PAD_MM) // pool
    origin = _raw_template()["origin"] + (pool - 1) / 2.0 - pool * np.array([pad, pad, pad + bottom], float)
    logger.debug("MNI template at %d mm: maps %s, brain centre %s", pool, maps.shape[1:], center)
    return Template(maps, float(pool), origin, center)


@dataclass(frozen=True)
class Subject:
    """One person's anatomy: per-axis head scale and a smooth displacement field on control points (mm)."""

    scale: tuple[float, float, float]
    warp: np.ndarray  # (3, C, C, C) displacements in mm over the box [-_WARP_BOX_MM, _WARP_BOX_MM]^3


@dataclass(frozen=True)
class Pose:
    """Placement of the head in the scanner: rotation (3×3) then translation (mm), both in RAS."""

    rotation: np.ndarray
    shift: np.ndarray


def random_subject(rng: np.random.Generator, scale_sd: float = 0.06, warp_mm: float = 4.0,
                   n_ctrl: int = 6) -> Subject:
    """Draw a subject: head size ±``scale_sd`` per axis and a random smooth warp of about ``warp_mm``."""
    scale = tuple(float(s) for s in np.clip(1.0 + rng.normal(0, scale_sd, 3), 0.85, 1.15))
    warp = rng.normal(0.0, warp_mm, (3, n_ctrl, n_ctrl, n_ctrl)).astype(np.float32)
    return Subject(scale, warp)  # type: ignore[arg-type]


def rotation_matrix(angles_rad: np.ndarray) -> np.ndarray:
    """Rotation (3×3) about x, then y, then z by the given angles (radians)."""
    cx, cy, cz = np.cos(angles_rad)
    sx, sy, sz = np.sin(angles_rad)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def random_pose(rng: np.random.Generator, max_rot_deg: float, max_shift_mm: float) -> Pose:
    """Uniform random rotation about each axis (±``max_rot_deg``) and shift (±``max_shift_mm``)."""
    angles = np.deg2rad(rng.uniform(-max_rot_deg, max_rot_deg, 3))
    return Pose(rotation_matrix(angles), rng.uniform(-max_shift_mm, max_shift_mm, 3))


def choose_pool(grid: Grid) -> int:
    """Template resolution for a grid: 2 mm (cheap, already anti-aliased) for coarse grids, else 1 mm."""
    return 2 if min(grid.spacing) >= 2.5 else 1


def sample_tissues(grid: Grid, subject: Subject, pose: Pose, center_offset_mm: np.ndarray | None = None,
                   chunk_voxels: int = 2_000_000) -> np.ndarray:
    """Tissue fractions (5, X, Y, Z) float32 of ``subject`` placed with ``pose`` in a grid centred on the brain.

    ``center_offset_mm`` moves the grid centre away from the brain centre (e.g. up, for boxes that cut the
    brainstem). Sampling is trilinear from the cached template, chunked over Z to bound memory.
    """
    tpl = load_template(choose_pool(grid))
    nx, ny, nz = grid.shape
    xs, ys, zs = (grid.axis_mm(a) for a in range(3))
    offset = np.zeros(3) if center_offset_mm is None else np.asarray(center_offset_mm, float)
    inv_rot = pose.rotation.T.astype(np.float32)
    scale = np.asarray(subject.scale, np.float32)
    disp = _displacement(grid, subject, inv_rot, (offset - pose.shift).astype(np.float32))  # (3, X, Y, Z) mm
    out = np.empty((len(TISSUES), nx, ny, nz), np.float32)
    step = max(1, chunk_voxels // (nx * ny))
    for z0 in range(0, nz, step):
        gx, gy, gz = np.meshgrid(xs, ys, zs[z0: z0 + step], indexing="ij")
        p = np.stack([gx.ravel(), gy.ravel(), gz.ravel()]) + (offset - pose.shift)[:, None].astype(np.float32)
        q = (inv_rot @ p) / scale[:, None] + disp[:, :, :, z0: z0 + step].reshape(3, -1)
        vox = (q + (tpl.brain_center - tpl.origin)[:, None].astype(np.float32)) / np.float32(tpl.spacing)
        for t in range(len(TISSUES)):
            vals = ndimage.map_coordinates(tpl.maps[t], vox, order=1, mode="constant", cval=0.0, output=np.float32)
            out[t, :, :, z0: z0 + step] = vals.reshape(gx.shape) / np.float32(255.0)
    return out


def _displacement(grid: Grid, subject: Subject, inv_rot: np.ndarray, shift: np.ndarray,
                  step_mm: float = 6.0) -> np.ndarray:
    """The subject's warp (3, X, Y, Z) in mm at every voxel of ``grid``.

    Cubic B-spline through the control points, evaluated on a coarse copy of the grid (every ``step_mm``) and
    linearly up-sampled: the field varies over ~40 mm, so this is exact to a fraction of a voxel and keeps
    1 mm grids fast.
    """
    coarse = [np.linspace(grid.axis_mm(a)[0], grid.axis_mm(a)[-1],
                          min(grid.shape[a], int(np.ceil(grid.fov[a] / step_mm)) + 1), dtype=np.float32)
              for a in range(3)]
    cx, cy, cz = np.meshgrid(*coarse, indexing="ij")
    subj = inv_rot @ (np.stack([cx.ravel(), cy.ravel(), cz.ravel()]) + shift[:, None])
    n_ctrl = subject.warp.shape[1]
    ctrl = (subj + _WARP_BOX_MM) / (2 * _WARP_BOX_MM) * (n_ctrl - 1)
    out = np.empty((3, *grid.shape), np.float32)
    for a in range(3):
        coeffs = ndimage.spline_filter(subject.warp[a], order=3, mode="nearest")
        d = ndimage.map_coordinates(coeffs, ctrl, order=3, mode="nearest", prefilter=False).reshape(cx.shape)
        out[a] = ndimage.zoom(d, [n / m for n, m in zip(grid.shape, cx.shape, strict=True)], order=1,
                              mode="nearest", grid_mode=False)
    return out
