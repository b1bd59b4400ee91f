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

Domain heads, one function over all domains (host time on a GPU): given the network's full head outputs
``(B, sum_d (1 + K_d), *spatial)``, each sample's own channels are gathered into ``(B, max_d (1 + K_d), *spatial)``
(channels a domain lacks masked to -inf: probability 0), its target mapped to local ids by one table lookup, and
nnU-Net's Dice + CE evaluated once with per-(sample, class) weights that make it the sum over domains of
``n_d / B`` times nnU-Net's loss on that domain's samples (:func:`_dc_ce_grouped`). Per deep-supervision scale
that dispatches the same operations whatever the number of domains in the batch; the per-domain loop over
nnU-Net's ``DC_and_CE_loss`` (kept for outputs that carry only per-domain logits, e.g. the extension trainers'
pseudo-domains) gives the same values to float round-off (tested).
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
        self.batch_dice = bool(batch_dice)
        self.ignore_label = ignore_label
        self._grouped = _GroupedTables(self.label_ids, self.num_union, ignore_label)
        for name, t in self._grouped.buffers().items():
            self.register_buffer(f"_grouped_{name}", t, persistent=False)

    def _tables(self) -> dict[str, Tensor]:
        return {name: getattr(self, f"_grouped_{name}") for name in self._grouped.buffers()}

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

    def forward(self, out: Any, targets: Sequence[Tensor], domain: Tensor, keys: Sequence[str] = (),
                gate_target: Tensor | None = None) -> Tensor:
        """Loss of one step.

        Args:
            out: the network's ``TrainOutput`` (``heads``/``samples``/``gate_logits`` or ``union``).
            targets: per DS scale, the union-id target ``(B, 1, *spatial_s)``.
            domain: ``(B,)`` long, each sample's domain index.
            keys: case ids of the batch (error messages).
            gate_target: ``(B,)`` the gate loss's targets where they differ from ``domain``: ``IGNORE_GATE`` for
                samples the gate must not learn from (extension training); None: ``domain``.
        """
        if self.objective == "domain_heads" and getattr(out, "logits", None) is not None:
            return self._forward_grouped(out, targets, domain, keys, gate_target)
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
            total = total + self.gate_weight * _gate_term(gate, domain, gate_target)
        return total

    def _forward_grouped(self, out: Any, targets: Sequence[Tensor], domain: Tensor, keys: Sequence[str],
                         gate_target: Tensor | None = None) -> Tensor:
        """The domain-head loss from the full head outputs ``out.logits`` (module docstring): the per-domain loop's
        value, one pass over all domains per scale."""
        tab = self._tables()
        g = self._grouped
        domain = domain.to(out.logits[0].device)
        batch = domain.shape[0]
        # per step, shared by every scale (same ndim): (B, S, 1, ...) tables of each sample's domain
        view = (batch, -1, *([1] * (out.logits[0].ndim - 2)))
        index = tab["gather"].index_select(0, domain).view(view)  # each sample's own head channels
        pad = tab["pad"].index_select(0, domain).view(view) if g.padded else None  # True where the domain has none
        domain_v = domain.view(view)
        weights = _dice_weights(domain, tab["dice_weight"], self.batch_dice)
        last = tab["lut"].shape[1] - 1
        total: Tensor | float = 0.0
        for s, (w, target) in enumerate(zip(self.ds_weights, targets, strict=True)):
            if w == 0.0:
                continue
            logits = out.logits[s]
            x = torch.gather(logits, 1, index.expand(-1, -1, *logits.shape[2:]))
            if pad is not None:
                x = x.masked_fill(pad, float("-inf"))
            t = target if target.dtype == torch.long else target.long()
            local = tab["lut"][domain_v, t.clamp(-1, last)]  # (B, 1, *s); -1: a label the domain lacks
            if s == 0 and bool((local < 0).any()):  # one host synchronization per step, as the loop's check
                self._checked_local_targets(out, target, domain, keys)  # raises, naming the cases
            total = total + w * _dc_ce_grouped(x, local, weights, domain, len(self.label_ids), self.batch_dice,
                                               LOCAL_IGNORE if self.ignore_label is not None else None)
        gate = getattr(out, "gate_logits", None)
        if gate is not None and self.gate_weight > 0:
            total = total + self.gate_weight * _gate_term(gate, domain, gate_target)
        return total if isinstance(total, Tensor) else targets[0].new_zeros((), dtype=torch.float32)


#: gate-loss target of a sample the gate must not learn from (``F.cross_entropy``'s default ignore index)
IGNORE_GATE = -100


def _gate_term(gate: Tensor, domain: Tensor, gate_target: Tensor | None) -> Tensor:
    """The gate's cross-entropy (B, D) logits vs each sample's domain; with ``gate_target`` its targets, averaged over
    the samples not marked ``IGNORE_GATE`` (0 when all are: no NaN, no host synchronization)."""
    if gate_target is None:
        return F.cross_entropy(gate.float(), domain.to(gate.device))
    target = gate_target.to(gate.device)
    ce = F.cross_entropy(gate.float(), target, ignore_index=IGNORE_GATE, reduction="sum")
    return ce / (target != IGNORE_GATE).sum().clamp_min(1)


class _GroupedTables:
    """Constant index tables of the grouped domain-head loss, made once (buffers of :class:`PartialLabelLoss`).

    * ``gather`` (D, S) long: head channel of each domain's local class (S = max_d (1 + K_d); padding repeats the
      domain's background channel, masked by ``pad``);
    * ``pad`` (D, S) bool: local classes the domain does not have;
    * ``lut`` (D, L + 1) long: union id -> local id per domain, -1 for ids the domain lacks; its last column (also
      reached by index -1) is -1, so that a target clamped to [-1, L] maps every out-of-range id to -1;
    * ``dice_weight`` (D, S - 1) float: 1 / K_d on the domain's foreground classes, 0 on padding.
    """

    def __init__(self, label_ids: Sequence[Sequence[int]], num_union: int, ignore_label: int | None) -> None:
        sizes = [1 + len(ids) for ids in label_ids]
        width = max(sizes)
        self.padded = min(sizes) != width
        d = len(sizes)
        gather = torch.zeros(d, width, dtype=torch.long)
        pad = torch.zeros(d, width, dtype=torch.bool)
        dice_weight = torch.zeros(d, width - 1, dtype=torch.float32)
        luts = [local_label_lut(ids, num_union, ignore_label) for ids in label_ids]
        lut = torch.full((d, luts[0].numel() + 1), -1, dtype=torch.long)
        offset = 0
        for i, size in enumerate(sizes):
            gather[i] = offset
            gather[i, :size] = torch.arange(offset, offset + size)
            pad[i, size:] = True
            dice_weight[i, :size - 1] = 1.0 / (size - 1)
            lut[i, :-1] = luts[i]
            offset += size
        self._buffers = {"gather": gather, "pad": pad, "lut": lut, "dice_weight": dice_weight}

    def buffers(self) -> dict[str, Tensor]:
        return self._buffers


def _dice_weights(domain: Tensor, domain_weights: Tensor, batch_dice: bool) -> Tensor:
    """The weights of :func:`_dc_ce_grouped`'s Dice terms, negative (the loss is -Dice), made once per step:
    (B, S - 1) ``-1 / (B K_d)`` per sample, or with batch Dice (D, S - 1) ``-n_d / (B K_d)`` per domain.
    domain_weights: (D, S - 1) ``1 / K_d`` on each domain's foreground classes, 0 elsewhere."""
    batch = domain.shape[0]
    if not batch_dice:
        return domain_weights.index_select(0, domain) * (-1.0 / batch)
    counts = torch.zeros(domain_weights.shape[0], 1, dtype=domain_weights.dtype, device=domain.device)
    counts.index_add_(0, domain, torch.ones(batch, 1, dtype=domain_weights.dtype, device=domain.device))
    return domain_weights * (counts * (-1.0 / batch))


def _dc_ce_grouped(x: Tensor, target: Tensor, weights: Tensor, domain: Tensor, num_domains: int, batch_dice: bool,
                   ignore: int | None) -> Tensor:
    """``sum_d (n_d / B) DC_and_CE_d`` in one pass: nnU-Net's Dice + CE (``MemoryEfficientSoftDiceLoss``, no
    background, smooth 1e-5) of each domain's samples, weighted by the domain's share of the batch.

    Args:
        x: (B, S, *spatial) each sample's own head logits (channels it lacks at -inf).
        target: (B, 1, *spatial) long local ids (``ignore`` where nnU-Net's ignore label is).
        weights: :func:`_dice_weights`: (B, S - 1), or (D, S - 1) with batch Dice.
        domain: (B,) long; num_domains: D.
        batch_dice: nnU-Net's batch Dice (sums over the samples of a domain before the ratio).
        ignore: local id of the ignore label, or None.

    Per sample Dice: ``(n_d / B) mean_{b in d, c} dc_bc = sum_{b in d, c} dc_bc / (B K_d)``; cross-entropy:
    ``(n_d / B) sum_{b in d} ce_b / (n_d N) = sum_b ce_b / (B N)``, the mean over the batch (without ignore label).
    """
    batch = x.shape[0]
    axes = tuple(range(2, x.ndim))
    mask = None
    if ignore is not None:
        mask = target != ignore
        target_dice = torch.where(mask, target, 0)
    else:
        target_dice = target
    probs = torch.softmax(x, 1)
    with torch.no_grad():
        y = torch.zeros(x.shape, device=x.device, dtype=torch.float32)
        y.scatter_(1, target_dice, 1)
        y = y[:, 1:]
        sum_gt = y.sum(axes, dtype=torch.float32) if mask is None else (y * mask).sum(axes, dtype=torch.float32)
    p = probs[:, 1:]
    if mask is None:
        intersect = (p * y).sum(axes, dtype=torch.float32)
        sum_pred = p.sum(axes, dtype=torch.float32)
    else:
        intersect = (p * y * mask).sum(axes, dtype=torch.float32)
        sum_pred = (p * mask).sum(axes, dtype=torch.float32)
    if batch_dice:  # sums over each domain's samples: (D, S - 1)
        stats = torch.stack([intersect, sum_pred, sum_gt], 1).flatten(1)  # (B, 3 (S - 1))
        grouped = torch.zeros(num_domains, stats.shape[1], dtype=stats.dtype, device=stats.device)
        intersect, sum_pred, sum_gt = grouped.index_add(0, domain, stats).chunk(3, dim=1)
    dc = (2 * intersect + 1e-5) / (sum_gt + sum_pred + 1e-5).clamp_min(1e-8)
    dice = (dc * weights).sum()
    if mask is None:
        ce = F.cross_entropy(x, target[:, 0])
    else:  # per domain: mean over its non-ignored voxels (0 when it has none), times n_d / B
        ce_map = F.cross_entropy(x, target[:, 0], ignore_index=ignore, reduction="none")
        per_sample = torch.stack([ce_map.flatten(1).sum(1), mask.flatten(1).sum(1).to(ce_map.dtype)], 1)  # (B, 2)
        sums = torch.zeros(num_domains, 3, dtype=per_sample.dtype, device=x.device)
        sums.index_add_(0, domain, torch.cat([per_sample, torch.ones_like(per_sample[:, :1])], 1))
        ce = torch.where(sums[:, 1] > 0, sums[:, 0] / sums[:, 1].clamp_min(1.0), 0.0).mul(sums[:, 2] / batch).sum()
    return ce + dice
