"""``nnUNetTrainerScheduled``: stock ``nnUNetTrainer`` that obeys ``NNUNET_UNIVERSAL_SCHEDULE``.

The benchmarks train single-dataset and plain joint nnU-Net baselines for exactly the same epochs and
iterations as the universal arms; nnU-Net's own ``nnUNetTrainer_Xepochs`` variants keep 250 iterations per
epoch. Nothing else differs from ``nnUNetTrainer`` (network, loss, sampling, validation are nnU-Net's).
"""

from __future__ import annotations

from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunet_universal.trainers.schedule import apply_schedule, apply_seed, validation_mirroring_from_env


class nnUNetTrainerScheduled(nnUNetTrainer):  # noqa: N801 (nnU-Net's naming)
    """nnU-Net's trainer, unchanged except for the schedule read from ``NNUNET_UNIVERSAL_SCHEDULE``."""

    def initialize(self) -> None:
        apply_schedule(self)  # before super(): the poly LR scheduler is built from num_epochs
        apply_seed(self)  # before super() builds the network
        super().initialize()

    def perform_actual_validation(self, save_probabilities: bool = False) -> None:
        """nnU-Net's final validation; without test-time mirroring when the environment asks for it."""
        axes = self.inference_allowed_mirroring_axes
        if not validation_mirroring_from_env():
            self.inference_allowed_mirroring_axes = None  # nnU-Net's predictor then runs no mirrored passes
        try:
            super().perform_actual_validation(save_probabilities)
        finally:
            self.inference_allowed_mirroring_axes = axes
