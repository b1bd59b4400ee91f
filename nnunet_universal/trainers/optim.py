"""nnU-Net's optimizer with the U-Harmony parameters in their own learning-rate group.

nnU-Net trains every parameter with one SGD learning rate (0.01, Nesterov momentum 0.99) under a poly schedule that
writes the same rate into every parameter group. The parameters U-Harmony adds on top of nnU-Net's network (the
polynomial coefficients of HarmonyNorm and every HarmonyRestore parameter) can get a fraction of it here: an
experiment on why the harmonization layers lose accuracy in ``scripts/benchmark_accuracy.py`` (they grew large
with the full rate: Hermite coefficients up to 1.8, restoration mixes up to 1.9, in the small suite's checkpoints;
``scripts/inspect_harmony.py``).
HarmonyNorm's ``weight``/``bias`` are InstanceNorm's affine and keep the full rate.
"""

from __future__ import annotations

import torch
from nnunetv2.training.lr_scheduler.polylr import PolyLRScheduler
from torch import nn

from nnunet_universal.nn.harmony import HarmonyNorm, HarmonyRestore


def harmony_parameters(network: nn.Module) -> list[nn.Parameter]:
    """The parameters U-Harmony adds to nnU-Net's network (HarmonyNorm polynomial, all of HarmonyRestore)."""
    params: dict[int, nn.Parameter] = {}
    for m in network.modules():
        if isinstance(m, HarmonyNorm) and m.poly_weight is not None:
            params[id(m.poly_weight)] = m.poly_weight
        elif isinstance(m, HarmonyRestore):
            params.update((id(p), p) for p in m.parameters())
    return list(params.values())


class ScaledPolyLRScheduler(PolyLRScheduler):
    """nnU-Net's poly schedule; each parameter group's rate is multiplied by its ``lr_scale`` (default 1)."""

    def step(self, current_step: int | None = None) -> None:
        super().step(current_step)
        for group in self.optimizer.param_groups:
            group["lr"] *= group.get("lr_scale", 1.0)
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]


def sgd_with_harmony_scale(network: nn.Module, initial_lr: float, weight_decay: float, num_epochs: int,
                           harmony_lr_scale: float) -> tuple[torch.optim.Optimizer, ScaledPolyLRScheduler]:
    """nnU-Net's SGD + poly schedule, the U-Harmony parameters at ``harmony_lr_scale`` times the rate."""
    slow = harmony_parameters(network)
    slow_ids = {id(p) for p in slow}
    rest = [p for p in network.parameters() if id(p) not in slow_ids]
    groups = [{"params": rest, "lr_scale": 1.0}]
    if slow:
        groups.append({"params": slow, "lr_scale": float(harmony_lr_scale)})
    optimizer = torch.optim.SGD(groups, initial_lr, weight_decay=weight_decay, momentum=0.99, nesterov=True)
    return optimizer, ScaledPolyLRScheduler(optimizer, initial_lr, num_epochs)
