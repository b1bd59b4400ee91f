"""Assemble one synthetic brain MR case of a source: grid, anatomy, lesions, every sequence, labels."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from nnunet_universal.synthetic.anatomy import Subject, random_pose, sample_tissues
from nnunet_universal.synthetic.appearance import compartments, render
from nnunet_universal.synthetic.case import CaseData
from nnunet_universal.synthetic.grid import Grid, grid_from_fov
from nnunet_universal.synthetic.institutions import MRSourceProfile
from nnunet_universal.synthetic.lesions import lesion_classes, place_lesions


def mr_grid(profile: MRSourceProfile, rng: np.random.Generator, shape: tuple[int, int, int] | None) -> Grid:
    """The case's grid: ``shape`` voxels (or the source's small default) over the source's field of view.

    Header origins follow the source: ``sri24`` reproduces the BraTS headers (storage voxel 0 at RAS (0, 239, 0)
    for the 1 mm grid; assumed from the usual SimpleITK reading, origin (-0, -239, 0) with identity direction),
    ``scanner`` puts the box somewhere in scanner space, ``zero`` is the identity-affine convention.
    """
    fov = tuple(float(rng.uniform(lo, hi)) if hi > lo else float(lo) for lo, hi in profile.fov_mm)
    g = grid_from_fov(shape or profile.default_shape, fov)  # type: ignore[arg-type]
    if profile.origin_rule == "sri24":
        origin = (-(g.shape[0] - 1) * g.spacing[0], 0.0, 0.0)
    elif profile.origin_rule == "scanner":
        origin = tuple(float(-f / 2 + rng.uniform(-15.0, 15.0)) for f in g.fov)
    else:
        origin = (0.0, 0.0, 0.0)
    return Grid(g.shape, g.spacing, origin)  # type: ignore[arg-type]


def make_mr_case(profile: MRSourceProfile, case_id: str, subject: Subject, rng: np.random.Generator,
                 shape: tuple[int, int, int] | None = None, with_subtraction: bool = False,
                 lesion_scale: float = 1.0) -> CaseData:
    """Generate one case: ``subject``'s anatomy in a random pose, lesions, each sequence of ``profile``.

    ``with_subtraction`` adds the source's T1post − T1pre image (intensity-matched on white matter), which
    UCSF-BMSR ships for most but not all exams. ``lesion_scale`` multiplies the lesion radius range.
    """
    grid = mr_grid(profile, rng, shape)
    pose = random_pose(rng, profile.max_rot_deg, profile.max_shift_mm)
    tissues = sample_tissues(grid, subject, pose, np.asarray(profile.center_offset_mm))
    lesions = place_lesions(rng, tissues, grid.spacing, profile.lesions, lesion_scale)
    comp = compartments(tissues, lesions)
    mask = None
    if profile.skull_stripped:
        brain = comp["csf"] + comp["gm"] + comp["wm"] + lesions.total() > 0.5
        mask = ndimage.binary_fill_holes(brain).astype(np.float32)
    images = {seq.name: render(rng, comp, seq, grid.spacing, mask) for seq in profile.sequences}
    if with_subtraction and profile.subtraction:
        pre = next(s.name for s in profile.sequences if s.contrast == "T1")
        post = next(s.name for s in profile.sequences if s.contrast == "T1c")
        wm = comp["wm"] > 0.8
        ratio = float(np.median(images[post][wm]) / max(float(np.median(images[pre][wm])), 1e-6))
        images[profile.subtraction] = images[post] - images[pre] * np.float32(ratio)
    return CaseData(case_id, grid, images, lesion_classes(lesions), profile.flips,
                    extras={"rotation": pose.rotation.tolist(), "shift_mm": pose.shift.tolist()})
