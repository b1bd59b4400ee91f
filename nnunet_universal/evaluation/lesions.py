"""Lesion-wise Dice, HD95 and detection scores, following the BraTS 2023 lesion-wise metrics.

Definitions (BraTS 2023 lesion-wise evaluation as described by its organisers; BraTS-METS parameters by default):

1. **GT lesions**: connected components (26-connectivity in 3D, 8 in 2D, via ``cc3d``) of the ground-truth
   mask, where components whose *dilations* touch are merged into one lesion (the GT mask is dilated
   ``dilation`` times with the 18-neighbourhood structuring element; each dilated component is one lesion,
   holding the GT voxels inside it). The GT voxels themselves never change.
2. **Predicted lesions**: connected components of the predicted mask (same connectivity).
3. **Matching**: a predicted lesion *matches* a GT lesion if it overlaps that GT lesion dilated ``dilation``
   times. A GT lesion with at least one match is **detected** (TP), otherwise **missed** (FN). A predicted
   lesion that matches no GT lesion is a **false positive** (FP). One predicted lesion may match several
   GT lesions (it then counts in each of them, as in BraTS).
4. **Per-lesion scores**: Dice and HD95 between the GT lesion and the union of its matched predicted lesions
   (whole components, not cut to the dilated region, as in BraTS). A missed lesion scores Dice 0 and HD95
   ``hd95_penalty_mm``.
5. **Small GT lesions**: a GT lesion of at most ``min_volume_mm3`` is ignored (neither TP nor FN, not in the
   means); predicted lesions matching it are not FPs.
6. **Case scores**: lesion-wise Dice = Σ Dice(kept GT lesions) / (#kept GT lesions + #FP);
   lesion-wise HD95 = (Σ HD95(kept GT lesions) + #FP · penalty) / (#kept GT lesions + #FP).
   No GT lesion and no FP → Dice 1.0, HD95 0.0.
7. **Detection**: precision = matched predicted lesions / predicted lesions (1.0 when nothing is predicted);
   recall = detected GT lesions / kept GT lesions (1.0 when there is nothing to find); F1 = 2PR/(P+R)
   (0.0 when P + R = 0). Domain summaries pool the counts over cases instead of averaging these ratios.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import cc3d
import numpy as np
from scipy import ndimage

from nnunet_universal.evaluation.metrics import bounding_box, hd95


@dataclass(frozen=True)
class LesionConfig:
    """Parameters of the lesion-wise evaluation (defaults: BraTS-METS 2023)."""

    dilation: int = 1  # dilation iterations for merging and matching GT lesions (BraTS-METS: 1; GLI/PED/SSA: 3)
    min_volume_mm3: float = 2.0  # GT lesions of at most this volume are ignored (BraTS-METS: 2)
    hd95_penalty_mm: float = 374.0  # HD95 of a missed lesion or a false positive (BraTS: 374)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def connectivity(ndim: int) -> int:
    """Full connectivity for ``cc3d``: 26 in 3D, 8 in 2D."""
    if ndim not in (2, 3):
        raise ValueError(f"lesion-wise metrics need a 2D or 3D mask, got {ndim}-D")
    return 26 if ndim == 3 else 8


def count_components(mask: np.ndarray) -> int:
    """Number of connected components (full connectivity) of a boolean mask."""
    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        return 0
    return int(cc3d.connected_components(mask, connectivity=connectivity(mask.ndim), return_N=True)[1])


def gt_lesions(gt: np.ndarray, dilation: int) -> tuple[np.ndarray, int]:
    """Label map of GT lesions (components merged when their ``dilation``-fold dilations touch) and their number."""
    conn = connectivity(gt.ndim)
    if dilation <= 0:
        labels, n = cc3d.connected_components(gt, connectivity=conn, return_N=True)
        return labels, int(n)
    labels = np.zeros(gt.shape, dtype=np.uint32)
    if not gt.any():
        return labels, 0
    roi = _grow(bounding_box(gt), dilation, gt.shape)  # dilation cannot reach beyond this box
    dilated = ndimage.binary_dilation(gt[roi], structure=_dilation_struct(gt.ndim), iterations=dilation)
    sub, n = cc3d.connected_components(dilated, connectivity=conn, return_N=True)
    sub[~gt[roi]] = 0  # every dilated component contains GT voxels, so ids stay 1..n
    labels[roi] = sub
    return labels, int(n)


def lesion_wise(pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float],
                config: LesionConfig | None = None) -> dict[str, Any]:
    """Lesion-wise Dice/HD95 and detection counts of one binary target (see the module docstring).

    Args:
        pred, gt: boolean masks of equal shape (2D or 3D).
        spacing: voxel size per array axis, in mm.
        config: matching parameters (default: BraTS-METS).

    Returns:
        dict with ``lesion_dice``, ``lesion_hd95``, ``precision``, ``recall``, ``f1``, the counts ``n_gt``
        (kept GT lesions), ``n_gt_ignored``, ``tp``, ``fn``, ``fp``, ``n_pred``, ``pred_matched`` and
        ``lesions``: one entry per GT lesion (``volume_mm3``, ``dice``, ``hd95``, ``detected``, ``ignored``).
    """
    cfg = config or LesionConfig()
    pred = np.asarray(pred, dtype=bool)
    gt = np.asarray(gt, dtype=bool)
    if pred.shape != gt.shape:
        raise ValueError(f"prediction and ground truth differ in shape: {pred.shape} vs {gt.shape}")
    if len(spacing) != gt.ndim:
        raise ValueError(f"spacing {tuple(spacing)} has {len(spacing)} values for a {gt.ndim}-D mask")
    voxel_mm3 = float(np.prod(spacing))

    les, n_les = gt_lesions(gt, cfg.dilation)
    pred_cc, n_pred = cc3d.connected_components(pred, connectivity=connectivity(pred.ndim), return_N=True)
    n_pred = int(n_pred)
    pred_sizes = np.bincount(pred_cc.ravel(), minlength=n_pred + 1)
    pred_boxes = ndimage.find_objects(pred_cc, max_label=n_pred) if n_pred else []
    les_boxes = ndimage.find_objects(les, max_label=n_les) if n_les else []

    matched_all: set[int] = set()
    per_lesion: list[dict[str, Any]] = []
    for i, box in enumerate(les_boxes, start=1):
        roi = _grow(box, cfg.dilation, gt.shape)
        lesion = les[roi] == i
        reach = lesion if cfg.dilation <= 0 else ndimage.binary_dilation(
            lesion, structure=_dilation_struct(gt.ndim), iterations=cfg.dilation)
        matched = np.unique(pred_cc[roi][reach])
        matched = [int(m) for m in matched if m != 0]
        matched_all.update(matched)
        n_vox = int(lesion.sum())
        if matched:
            inter = int((np.isin(pred_cc[roi], matched) & lesion).sum())
            les_dice = 2.0 * inter / (n_vox + int(pred_sizes[matched].sum()))
            les_hd = _lesion_hd95(les, i, pred_cc, matched, [box] + [pred_boxes[m - 1] for m in matched], spacing)
        else:
            les_dice, les_hd = 0.0, cfg.hd95_penalty_mm
        volume = n_vox * voxel_mm3
        per_lesion.append({"volume_mm3": volume, "dice": les_dice, "hd95": les_hd, "detected": bool(matched),
                           "n_pred_matched": len(matched), "ignored": volume <= cfg.min_volume_mm3})

    kept = [x for x in per_lesion if not x["ignored"]]
    tp = sum(x["detected"] for x in kept)
    fp = n_pred - len(matched_all)
    denom = len(kept) + fp
    lesion_dice = sum(x["dice"] for x in kept) / denom if denom else 1.0
    lesion_hd = (sum(x["hd95"] for x in kept) + fp * cfg.hd95_penalty_mm) / denom if denom else 0.0
    precision = len(matched_all) / n_pred if n_pred else 1.0
    recall = tp / len(kept) if kept else 1.0
    return {
        "lesion_dice": lesion_dice, "lesion_hd95": lesion_hd,
        "precision": precision, "recall": recall, "f1": f1_score(precision, recall),
        "n_gt": len(kept), "n_gt_ignored": len(per_lesion) - len(kept), "tp": tp, "fn": len(kept) - tp, "fp": fp,
        "n_pred": n_pred, "pred_matched": len(matched_all), "lesions": per_lesion,
    }


def detection_scores(tp: int, fn: int, pred_matched: int, n_pred: int) -> dict[str, float]:
    """Precision/recall/F1 from (pooled) counts, with the conventions of :func:`lesion_wise`."""
    precision = pred_matched / n_pred if n_pred else 1.0
    recall = tp / (tp + fn) if tp + fn else 1.0
    return {"precision": precision, "recall": recall, "f1": f1_score(precision, recall)}


def f1_score(precision: float, recall: float) -> float:
    """Harmonic mean of precision and recall; 0.0 when both are 0."""
    return 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0


def _lesion_hd95(les: np.ndarray, i: int, pred_cc: np.ndarray, matched: list[int], boxes: list[tuple[slice, ...]],
                 spacing: Sequence[float]) -> float:
    """HD95 between GT lesion ``i`` and the union of predicted components ``matched``, on their joint bounding box."""
    roi = tuple(slice(min(b[a].start for b in boxes), max(b[a].stop for b in boxes)) for a in range(les.ndim))
    return hd95(np.isin(pred_cc[roi], matched), les[roi] == i, spacing)


def _grow(box: tuple[slice, ...], by: int, shape: tuple[int, ...]) -> tuple[slice, ...]:
    """Enlarge a bounding box by ``by`` voxels per side, clipped to the array."""
    return tuple(slice(max(s.start - by, 0), min(s.stop + by, n)) for s, n in zip(box, shape, strict=True))


def _dilation_struct(ndim: int) -> np.ndarray:
    """18-neighbourhood in 3D (faces + edges), 8-neighbourhood in 2D: the BraTS structuring element."""
    return ndimage.generate_binary_structure(ndim, 2)
