"""Per-domain pseudo-Dice of the validation iterations (nnU-Net's "green line", made partial-label aware).

nnU-Net's pseudo-Dice argmaxes the union logits and counts every voxel of an unannotated class as a
false positive or negative. Here each sample is scored by its own domain's head (oracle) on its domain's
labels only. Counts are kept as one flat vector over (domain, class) pairs, in domain order and each
domain's class order, so that nnU-Net's ``collate_outputs`` and DDP ``all_gather_object`` handle them
like the stock ``tp_hard``/``fp_hard``/``fn_hard``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from nnunetv2.training.loss.dice import get_tp_fp_fn_tn
from torch import Tensor

from nnunet_universal.trainers.losses import LOCAL_IGNORE


@dataclass(frozen=True)
class DomainLayout:
    """Where each domain's classes sit in the flat (domain, class) vector."""

    domain_names: tuple[str, ...]
    num_classes: tuple[int, ...]  # K_d, foreground classes per domain

    @property
    def offsets(self) -> list[int]:
        return [int(x) for x in np.cumsum((0,) + self.num_classes)[:-1]]

    @property
    def size(self) -> int:
        return int(sum(self.num_classes))

    def slice(self, d: int) -> slice:
        start = self.offsets[d]
        return slice(start, start + self.num_classes[d])


@torch.no_grad()
def domain_confusion(logits: Tensor, local_target: Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Hard tp/fp/fn per foreground class of one domain group.

    Args:
        logits: ``(n, 1 + K, *spatial)`` the domain's head (or marginal) logits.
        local_target: ``(n, 1, *spatial)`` local ids (0 background, k+1 class k; ``LOCAL_IGNORE`` ignored).

    Returns:
        three ``(K,)`` float arrays summed over the group's samples and voxels.
    """
    axes = [0] + list(range(2, logits.ndim))
    seg = logits.argmax(1, keepdim=True)
    onehot = torch.zeros(logits.shape, device=logits.device, dtype=torch.float32).scatter_(1, seg, 1)
    valid = local_target != LOCAL_IGNORE
    mask = valid.float() if not bool(valid.all()) else None
    target = torch.where(valid, local_target, torch.zeros_like(local_target))
    tp, fp, fn, _ = get_tp_fp_fn_tn(onehot, target, axes=axes, mask=mask)
    return tp[1:].cpu().numpy(), fp[1:].cpu().numpy(), fn[1:].cpu().numpy()


def dice_from_counts(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray) -> np.ndarray:
    """Dice per entry; NaN where the class is absent from both prediction and reference."""
    tp, fp, fn = (np.asarray(a, dtype=np.float64) for a in (tp, fp, fn))
    denom = 2 * tp + fp + fn
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, 2 * tp / np.where(denom > 0, denom, 1), np.nan)


def per_domain_mean(dice: Sequence[float], layout: DomainLayout) -> list[float]:
    """Mean foreground Dice of each domain (NaN-aware; NaN if none of its classes was seen)."""
    arr = np.asarray(dice, dtype=np.float64)
    out = []
    for d in range(len(layout.domain_names)):
        part = arr[layout.slice(d)]
        out.append(float(np.nanmean(part)) if part.size and not np.all(np.isnan(part)) else float("nan"))
    return out


def nan_mean(values: Sequence[float]) -> float:
    """Mean ignoring NaN; NaN if every value is NaN (no warning)."""
    arr = np.asarray(values, dtype=np.float64)
    return float(np.nanmean(arr)) if arr.size and not np.all(np.isnan(arr)) else float("nan")
