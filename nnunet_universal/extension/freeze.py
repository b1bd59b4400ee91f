"""Which weights an extension trains: everything, or only what the extension added (plus U-Harmony's parameters).

``extend`` grows the old network (:mod:`.weights`); this module says, per parameter of the grown network, which
entries are *new*:

* the first convolution's columns of the new slots ``(F0, C_new, *k)``;
* the head channels of new domains and of new classes of old domains (rows of ``heads.heads.{s}``);
* the gate's rows of new domains, and its columns of the new slots in the old rows (phi ends in the slot-availability
  vector, which is zero there for every old-domain input);
* the prototypes of new domains (a buffer: old rows are put back after every step).

Everything else is frozen (``requires_grad`` off); a tensor that is partly new gets a gradient mask (its frozen
entries get zero gradient, it sits in an optimizer group without weight decay, so SGD with momentum leaves them
exactly unchanged). For an old-domain input the new slots are zero, so the frozen network computes exactly the old
network's function on it, whatever the new entries become: no forgetting by construction (tested), except for an
old domain that gained a class (its softmax has a new channel). With ``harmony`` the parameters U-Harmony adds
(``trainers/optim.py::harmony_parameters``: polynomial coefficients, HarmonyRestore) train too, as the U-Harmony
paper adapts to new modalities; they are shared by all domains, so old domains' outputs then drift (measured by
``scripts/benchmark_extension.py``, not exact).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.nn.modules.conv import _ConvNd

from nnunet_universal.extension.weights import GrowthMap
from nnunet_universal.metadata import UniversalMeta

#: what an extension trainer trains (class attribute ``trainable``)
TRAINABLE = ("all", "new", "new+harmony")


@dataclass
class TrainablePlan:
    """Per parameter of the network: trained fully, partly (bool mask, True = trained) or not at all."""

    full: list[nn.Parameter] = field(default_factory=list)
    partial: list[tuple[nn.Parameter, Tensor]] = field(default_factory=list)
    harmony: list[nn.Parameter] = field(default_factory=list)
    frozen: list[nn.Parameter] = field(default_factory=list)
    #: old-domain rows of the prototype buffer (restored after each step): indices (long)
    frozen_prototype_rows: Tensor | None = None
    description: list[str] = field(default_factory=list)

    def num_trained(self) -> int:
        return (sum(p.numel() for p in self.full + self.harmony)
                + sum(int(m.sum()) for _, m in self.partial))


def _first_conv(net: nn.Module) -> _ConvNd:
    return next(m for m in net.encoder.modules() if isinstance(m, _ConvNd))


def trainable_plan(net: nn.Module, old: UniversalMeta, new: UniversalMeta, mode: str) -> TrainablePlan:
    """What ``mode`` (one of :data:`TRAINABLE`) trains in ``net`` (a UniversalUNet built from the extended plans)."""
    from nnunet_universal.trainers.optim import harmony_parameters

    if mode not in TRAINABLE:
        raise ValueError(f"trainable={mode!r}; choose one of {TRAINABLE}")
    plan = TrainablePlan()
    if mode == "all":
        plan.full = [p for p in net.parameters()]
        plan.description.append("everything")
        return plan
    g = GrowthMap.between(old, new)
    masks: dict[int, Tensor] = {}
    conv = _first_conv(net)
    new_slots = [i for i in range(g.num_slots[1]) if i not in g.slots]
    if new_slots:
        m = torch.zeros_like(conv.weight, dtype=torch.bool)
        m[:, new_slots] = True
        masks[id(conv.weight)] = m
        plan.description.append(f"first convolution: columns of the new slots {[new.slots[i] for i in new_slots]}")
    if getattr(net, "heads", None) is not None:
        new_ch = [c for c in range(g.num_head_channels[1]) if c not in g.head_channels]
        for head in net.heads.heads:
            for p in (head.weight, head.bias):
                m = torch.zeros_like(p, dtype=torch.bool)
                m[new_ch] = True
                masks[id(p)] = m
        plan.description.append(f"heads: {len(new_ch)} new channels (new domains, new classes of old domains)")
    router = getattr(net, "router", None)
    new_domains = [i for i in range(g.num_domains[1]) if i not in g.domains]
    if router is not None:
        w = torch.zeros_like(router.gate.weight, dtype=torch.bool)
        w[new_domains] = True
        prefix = router.gate.weight.shape[1] - g.num_slots[1]  # phi ends in the slot-availability vector
        w[:, [prefix + i for i in new_slots]] = True
        b = torch.zeros_like(router.gate.bias, dtype=torch.bool)
        b[new_domains] = True
        masks[id(router.gate.weight)], masks[id(router.gate.bias)] = w, b
        plan.frozen_prototype_rows = torch.tensor(g.domains, dtype=torch.long)
        plan.description.append("gate: rows of the new domains, new slots' columns; prototypes of the new domains")
    harmony = {id(p) for p in harmony_parameters(net)} if mode == "new+harmony" else set()
    if harmony:
        plan.description.append("U-Harmony's parameters (shared by all domains: old domains drift)")
    for p in net.parameters():
        if id(p) in harmony:
            plan.harmony.append(p)
        elif id(p) in masks and bool(masks[id(p)].any()):
            plan.partial.append((p, masks[id(p)]))
        else:
            plan.frozen.append(p)
    return plan


def apply_plan(plan: TrainablePlan) -> list:
    """Turn ``requires_grad`` off for the frozen parameters and mask the gradients of the partial ones; returns the
    hook handles."""
    for p in plan.frozen:
        p.requires_grad_(False)
    handles = []
    for p, mask in plan.partial:
        mask = mask.to(p.device)
        handles.append(p.register_hook(lambda grad, m=mask: grad * m.to(grad.dtype)))
    return handles


def optimizer_groups(plan: TrainablePlan, weight_decay: float, harmony_lr_scale: float) -> list[dict]:
    """SGD parameter groups: the fully trained parameters, the partly trained ones without weight decay (decay would
    move their frozen entries), U-Harmony's at ``harmony_lr_scale`` times the rate (``lr_scale``, read by
    ``trainers/optim.py::ScaledPolyLRScheduler``)."""
    groups = []
    if plan.full:
        groups.append({"params": plan.full, "lr_scale": 1.0, "weight_decay": weight_decay})
    if plan.partial:
        groups.append({"params": [p for p, _ in plan.partial], "lr_scale": 1.0, "weight_decay": 0.0})
    if plan.harmony:
        groups.append({"params": plan.harmony, "lr_scale": float(harmony_lr_scale), "weight_decay": weight_decay})
    return groups
