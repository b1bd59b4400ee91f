"""Partial-label losses: per-domain heads, the marginal joint baseline and the gate loss.

A case annotates only its domain's classes; every other union label is *unknown* there, not
background. The domain-head objective handles that by construction: each sample is scored by its own
domain's head on that domain's labels only (local ids: 0 = background, k+1 = the domain's k-th class).
The marginal objective (Shi et al., "Marginal loss and exclusion loss for partially supervised
multi-organ segmentation", MedIA 2021) keeps one union head and merges the probabilities of the classes
a case does not annotate into background before Dice + CE; both reduce to the same local-label loss on
``(n, 1 + K_d, *spatial)`` logits, which is what :class:`PartialLabelLoss` computes. The naive joint
baseline is nnU-Net's own loss on the union labels (unknown counts as background).

Dice and cross-entropy are nnU-Net's (``DC_and_CE_loss`` with ``MemoryEfficientSoftDiceLoss``);
deep-supervision weights are nnU-Net's (1, 1/2, 1/4, ..., lowest scale 0, normalized).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss
from torch import Tensor, nn

from nnunet_universal.nn.heads import marginal_logits

#: Objectives a trainer can select (class attribute ``objective``).
OBJECTIVES = ("domain_heads", "naive", "marginal")
#: Local id given to nnU-Net's ignore label (never a real local class id).
LOCAL_IGNORE = 255


def deep_supervision_weights(num_scales: int) -> list[float]:
    """nnU-Net's DS weights: 1, 1/2, 1/4, ... with the lowest resolution at 0, normalized to sum 1."""
    if num_scales <= 1:
        return [1.0]
    w = [1.0 / 2**i for i in range(num_scales)]
    w[-1] = 0.0
    s = sum(w)
    return [x / s for x in w]


def local_label_lut(label_ids: Sequence[int], num_union: int, ignore_label: int | None = None) -> Tensor:
    """Lookup table union id -> local id of one domain: ``(num_union,)`` long, -1 for ids the domain lacks.

    ``label_ids`` is the domain's class order (``meta.domain_label_ids``): union id ``label_ids[k]`` -> ``k + 1``.
    """
    size = max(num_union, (ignore_label or 0) + 1)
    lut = torch.full((size,), -1, dtype=torch.long)
    lut[0] = 0
    for k, i in enumerate(label_ids):
        lut[int(i)] = k + 1
    if ignore_label is not None:
        lut[int(ignore_label)] = LOCAL_IGNORE
    return lut


def _map_to_local(target: Tensor, lut: Tensor) -> tuple[Tensor, Tensor]:
    """(local ids, mask of voxels whose union id the domain lacks); no host synchronization."""
    t = target.long()
    lut = lut.to(t.device)
    local = lut[t.clamp(0, lut.numel() - 1)]
    bad = (t < 0) | (t >= lut.numel()) | (local < 0)
    return local.to(target.dtype if target.dtype != torch.int8 else torch.int16), bad


def _local_ids(target: Tensor, lut: Tensor) -> Tensor:
    """The local ids of :func:`_map_to_local` without its check (deep-supervision targets, downsampled from the
    checked full-resolution one, hold no label of their own): four operations fewer per domain and scale."""
    t = target.long()
    local = lut.to(t.device)[t.clamp(0, lut.numel() - 1)]
    return local.to(target.dtype if target.dtype != torch.int8 else torch.int16)


def _label_error(target: Tensor, bad: Tensor, keys: Sequence[str], domain: str) -> ValueError:
    per_sample = bad.flatten(1).any(1).tolist()
    names = [str(k) for k, b in zip(keys, per_sample, strict=True) if b] if keys else ["<unknown>"]
    found = sorted(set(target.long()[bad].unique().tolist()))
    return ValueError(
        f"segmentation of case(s) {names} contains label(s) {found} that domain {domain!r} does not "
        "annotate; the labels and dataset.json's universal block disagree. Re-run 'nnunet-universal merge' "
        "and 'nnunet-universal plan'."
    )


def to_local_target(target: Tensor, lut: Tensor, keys: Sequence[str] = (), domain: str = "") -> Tensor:
    """Map a union-id target ``(n, 1, *spatial)`` to a domain's local ids with ``lut``.

    Raises ValueError naming the cases if the target holds a label the domain does not annotate
    (a merge error: the label file and the universal block disagree).
    """
    local, bad = _map_to_local(target, lut)
    if bool(bad.any()):
        raise _label_error(target, bad, keys, domain)
    return local


def build_dc_ce(batch_dice: bool, ignore_label: int | None = None) -> DC_and_CE_loss:
    """nnU-Net's Dice + CE (foreground Dice, smooth 1e-5).

    ``ddp`` stays False: nnU-Net's batch Dice all-gathers across ranks, and each rank has different domain
    groups per step, so a collective there would deadlock or mix domains.
    """
    return DC_and_CE_loss({"batch_dice": batch_dice, "smooth": 1e-5, "do_bg": False, "ddp": False}, {},
                          weight_ce=1, weight_dice=1, ignore_label=ignore_label,
                          dice_class=MemoryEfficientSoftDiceLoss)


class PartialLabelLoss(nn.Module):
    """Deep-supervised partial-label loss of one training step.

    Args:
        label_ids: per domain (network order), the union ids of its classes (``meta.domain_label_ids``).
        num_union: number of union labels including background.
        ds_weights: one weight per deep-supervision scale (highest resolution first).
        objective: ``"domain_heads"``, ``"naive"`` or ``"marginal"`` (see module docstring).
        batch_dice: nnU-Net's ``batch_dice`` of the configuration.
        gate_weight: weight of the gate's cross-entropy (domain_heads only; ignored when the net has no gate).
        ignore_label: nnU-Net's ignore label of the union label space, if any.
        domain_names: names of the domains (error messages); default their indices.
    """

    def __init__(self, label_ids: Sequence[Sequence[int]], num_union: int, ds_weights: Sequence[float],
                 objective: str = "domain_heads", batch_dice: bool = False, gate_weight: float = 0.1,
                 ignore_label: int | None = None, domain_names: Sequence[str] | None = None) -> None:
        super().__init__()
        if objective not in OBJECTIVES:
            raise ValueError(f"unknown objective {objective!r}; choose one of {OBJECTIVES}")
        self.label_ids = [list(map(int, ids)) for ids in label_ids]
        self.domain_names = list(domain_names) if domain_names is not None else [str(d) for d in range(len(label_ids))]
        self.num_union = int(num_union)
        self.ds_weights = [float(w) for w in ds_weights]
        self.objective = objective
        self.gate_weight = float(gate_weight)
        local_ignore = LOCAL_IGNORE if ignore_label is not None else None
        self.dc_ce = build_dc_ce(batch_dice, local_ignore)
        self.dc_ce_union = build_dc_ce(batch_dice, ignore_label)
        for d, ids in enumerate(self.label_ids):
            self.register_buffer(f"lut_{d}", local_label_lut(ids, self.num_union, ignore_label), persistent=False)

    def lut(self, d: int) -> Tensor:
        return getattr(self, f"lut_{d}")

    def domain_logits(self, out: Any, scale: int, domain: Tensor) -> dict[int, tuple[Tensor, Tensor]]:
        """Per domain present in the batch: (sample indices ``(n_d,)``, logits ``(n_d, 1 + K_d, *spatial)``).

        Domain heads give them directly; a union head gives the marginal logits of each domain.
        """
        if self.objective == "domain_heads":  # empty groups (domains absent from the batch) are skipped
            return {d: (out.samples[d], logits) for d, logits in out.heads[scale].items() if logits.shape[0] > 0}
        union = out.union[scale]
        return {d: (idx, marginal_logits(union[idx], self.label_ids[d])) for d, idx in self.groups(out, domain).items()}

    def groups(self, out: Any, domain: Tensor) -> dict[int, Tensor]:
        """Sample indices ``(n_d,)`` of each domain present in the batch (the network's grouping when it made one)."""
        if self.objective == "domain_heads":
            return {d: out.samples[d] for d, logits in out.heads[0].items() if logits.shape[0] > 0}
        samples = getattr(out, "samples", None)
        if samples is None:  # grouping on the device: a host synchronization
            samples = {d: torch.nonzero(domain == d).flatten() for d in torch.unique(domain).tolist()}
        return samples

    def _checked_local_targets(self, out: Any, target: Tensor, domain: Tensor,
                               keys: Sequence[str]) -> dict[int, Tensor]:
        """Full-resolution local targets per domain, checked with ONE host synchronization (the downsampled
        deep-supervision targets hold no label of their own). Raises ValueError naming the cases."""
        local, bad = {}, {}
        groups = {d: idx.to(target.device) for d, idx in self.groups(out, domain).items()}
        for d, idx in groups.items():
            local[d], bad[d] = _map_to_local(target[idx], self.lut(d))
        if bad and bool(torch.stack([b.any() for b in bad.values()]).any()):
            for d, b in bad.items():
                if bool(b.any()):
                    names = [keys[i] for i in groups[d].tolist()] if keys else ()
                    raise _label_error(target[groups[d]], b, names, self.domain_names[d])
        return local

    def forward(self, out: Any, targets: Sequence[Tensor], domain: Tensor, keys: Sequence[str] = ()) -> Tensor:
        """Loss of one step.

        Args:
            out: the network's ``TrainOutput`` (``heads``/``samples``/``gate_logits`` or ``union``).
            targets: per DS scale, the union-id target ``(B, 1, *spatial_s)``.
            domain: ``(B,)`` long, each sample's domain index.
            keys: case ids of the batch (error messages).
        """
        batch = domain.shape[0]
        total = targets[0].new_zeros((), dtype=torch.float32)
        if self.objective != "naive":
            local0 = self._checked_local_targets(out, targets[0], domain, keys)
        for s, (w, target) in enumerate(zip(self.ds_weights, targets, strict=True)):
            if w == 0.0:
                continue
            if self.objective == "naive":
                total = total + w * self.dc_ce_union(out.union[s], target)
                continue
            for d, (idx, logits) in self.domain_logits(out, s, domain).items():
                idx = idx.to(target.device)
                local = local0[d] if s == 0 else _local_ids(target[idx], self.lut(d))
                total = total + w * (idx.numel() / batch) * self.dc_ce(logits, local)
        gate = getattr(out, "gate_logits", None)
        if self.objective == "domain_heads" and gate is not None and self.gate_weight > 0:
            total = total + self.gate_weight * F.cross_entropy(gate.float(), domain.to(gate.device))
        return total
