"""Ablation and baseline trainers: each one class attribute away from :class:`UniversalTrainer`.

Ablations follow the U-Harmony paper's Table 3 (which harmonization parts and which head); baselines are
the joint-training objectives a universal model is compared with. The fully plain baseline, nnU-Net's own
network and loss on the merged dataset, is stock ``nnUNetTrainer`` (no class needed).
"""

from __future__ import annotations

from typing import Any, ClassVar

from nnunet_universal.trainers.universal_trainer import UniversalTrainer


class UniversalTrainer_NoHarmony(UniversalTrainer):
    """U-Harmony off: nnU-Net's InstanceNorm everywhere, no restoration (Table 3, "IN"); heads and gate kept."""

    network_overrides: ClassVar[dict[str, Any]] = {"harmony": False}


class UniversalTrainer_FirstStageHarmony(UniversalTrainer):
    """HarmonyNorm only in the first encoder stage (the paper's Fig. 3: fewer U-Harmony layers)."""

    network_overrides: ClassVar[dict[str, Any]] = {"harmony_stages": "first"}


class UniversalTrainer_NoPolyAffine(UniversalTrainer):
    """HarmonyNorm with the linear affine only, no polynomial terms (Eq. 2 with λ = 0; Table 3)."""

    network_overrides: ClassVar[dict[str, Any]] = {"polynomial": False}


class UniversalTrainer_NoRestore(UniversalTrainer):
    """First stage only: no HarmonyRestore after the decoder stages (Eq. 3 off; Table 3)."""

    network_overrides: ClassVar[dict[str, Any]] = {"restore": False}


class UniversalTrainer_FullRateHarmony(UniversalTrainer):
    """U-Harmony's own parameters (polynomial coefficients, restoration) at nnU-Net's full learning rate, as in
    the paper (UniversalTrainer's default was this until it lost 30 Dice points; ``trainers/optim.py``)."""

    harmony_lr_scale: ClassVar[float] = 1.0


class UniversalTrainer_NoGate(UniversalTrainer):
    """Oracle heads without gate or prototypes (Table 3's oracle baseline: needs the domain at inference)."""

    network_overrides: ClassVar[dict[str, Any]] = {"gate": False}


class UniversalTrainer_Prompts(UniversalTrainer):
    """With the prompts: bounded per-slot FiLM from the slot availability at the input and a bounded FiLM of the
    bottleneck from the domain weights (``nn/prompts.py``; off in the default after the accuracy benchmark)."""

    network_overrides: ClassVar[dict[str, Any]] = {"modality_prompt": True, "task_prompt": True}


class UniversalTrainer_NoModalityDropout(UniversalTrainer):
    """Training without modality dropout (available slots are never hidden)."""

    modality_dropout_p: ClassVar[float] = 0.0


class UniversalTrainer_NaiveJoint(UniversalTrainer):
    """Naive joint baseline: one union head, nnU-Net's Dice + CE on the union labels (unknown = background)."""

    objective: ClassVar[str] = "naive"


class UniversalTrainer_MarginalJoint(UniversalTrainer):
    """Marginal-loss joint baseline: one union head, unannotated classes merged into background (Shi et al. 2021)."""

    objective: ClassVar[str] = "marginal"


#: Every variant, in a stable order (the registry used by the shim, the docs and the tests).
VARIANTS: tuple[type[UniversalTrainer], ...] = (
    UniversalTrainer_NoHarmony,
    UniversalTrainer_FirstStageHarmony,
    UniversalTrainer_NoPolyAffine,
    UniversalTrainer_NoRestore,
    UniversalTrainer_FullRateHarmony,
    UniversalTrainer_NoGate,
    UniversalTrainer_Prompts,
    UniversalTrainer_NoModalityDropout,
    UniversalTrainer_NaiveJoint,
    UniversalTrainer_MarginalJoint,
)
