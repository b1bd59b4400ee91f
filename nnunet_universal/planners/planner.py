"""UniversalPlanner: nnU-Net's experiment planning for a merged dataset, plus the plans' ``universal`` block.

Architecture, patch size, batch size, spacing, normalization and resampling are nnU-Net's own decisions for the
merged dataset; the planned architecture keeps its stock class (``PlainConvUNet`` / ``ResidualEncoderUNet``) so
that every stock name in the plans resolves. The universal network is named by dotted path in
``plans['universal']['network_class']``; the trainer builds it from that block.

nnU-Net only finds planners inside ``nnunetv2``, so these classes are passed to its API
(``plan_experiment_dataset(..., experiment_planner_class=UniversalPlanner)``), as ``nnunet-universal plan`` does.
"""

from __future__ import annotations

import os
from typing import Any

from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner
from nnunetv2.experiment_planning.experiment_planners.residual_unets.residual_encoder_unet_planners import (
    nnUNetPlannerResEncL,
    nnUNetPlannerResEncM,
)

from nnunet_universal.metadata import PLANS_NAME, load_universal
from nnunet_universal.planners.plans_block import check_channel_names, universal_block


class UniversalPlannerMixin:
    """Adds the ``universal`` block to the plans an nnU-Net planner writes (put it first in the bases).

    ``default_plans_name`` replaces the stock planner's plans name unless ``plans_name=`` is given.
    """

    default_plans_name: str = PLANS_NAME

    def __init__(self, dataset_name_or_id: str | int, *args: Any, plans_name: str | None = None,
                 **kwargs: Any) -> None:
        super().__init__(dataset_name_or_id, *args, plans_name=plans_name or self.default_plans_name, **kwargs)
        # fail before planning if the dataset is not a merged dataset with consistent channels
        where = os.path.join(self.raw_dataset_folder, "dataset.json")
        check_channel_names(self.dataset_json, load_universal(self.dataset_json, where=where), where)

    def save_plans(self, plans: dict[str, Any]) -> None:
        """Add the ``universal`` block to the freshly planned dict, then let nnU-Net save it.

        nnU-Net rebuilds the top-level plans on every run (keeping only old configurations), so the block is
        recomputed here each time rather than merged.
        """
        plans["universal"] = universal_block(plans, self.dataset_json,
                                             where=os.path.join(self.raw_dataset_folder, "dataset.json"))
        super().save_plans(plans)

    def generate_data_identifier(self, configuration_name: str) -> str:
        """``{plans name}_{configuration}``: the preprocessed data of every plans file in its own folder.

        nnU-Net's ResEnc planners return ``nnUNetPlans_2d`` / ``nnUNetPlans_3d_fullres`` to reuse stock nnU-Net's
        data; ours must not share it: the availability-aware fingerprint gives other normalization statistics
        (CT), so stock ``nnUNetPlans`` data of the same dataset would be silently mixed with ours.
        """
        return f"{self.plans_identifier}_{configuration_name}"


class UniversalPlanner(UniversalPlannerMixin, ExperimentPlanner):
    """nnU-Net's default planner (PlainConvUNet); plans ``nnUNetUniversalPlans``."""

    default_plans_name = PLANS_NAME


class UniversalPlannerResEncM(UniversalPlannerMixin, nnUNetPlannerResEncM):
    """nnU-Net's ResEnc-M preset (~9-11 GB VRAM); plans ``nnUNetUniversalResEncUNetMPlans``."""

    default_plans_name = "nnUNetUniversalResEncUNetMPlans"


class UniversalPlannerResEncL(UniversalPlannerMixin, nnUNetPlannerResEncL):
    """nnU-Net's ResEnc-L preset (~24 GB VRAM); plans ``nnUNetUniversalResEncUNetLPlans``."""

    default_plans_name = "nnUNetUniversalResEncUNetLPlans"


#: ``--preset`` value -> planner class.
PRESETS: dict[str, type[ExperimentPlanner]] = {
    "default": UniversalPlanner,
    "resenc-m": UniversalPlannerResEncM,
    "resenc-l": UniversalPlannerResEncL,
}
