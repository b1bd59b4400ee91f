"""``nnUNetTrainerScheduled``: stock ``nnUNetTrainer`` that obeys ``NNUNET_UNIVERSAL_SCHEDULE``.

The benchmarks train single-dataset and plain joint nnU-Net baselines for exactly the same epochs and
iterations as the universal arms; nnU-Net's own ``nnUNetTrainer_Xepochs`` variants keep 250 iterations per
epoch. Nothing else differs from ``nnUNetTrainer`` (network, loss, sampling, validation are nnU-Net's).
"""

from __future__ import annotations

from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunet_universal.trainers.schedule import ENV_VAR, schedule_from_env


class nnUNetTrainerScheduled(nnUNetTrainer):  # noqa: N801 (nnU-Net's naming)
    """nnU-Net's trainer, unchanged except for the schedule read from ``NNUNET_UNIVERSAL_SCHEDULE``."""

    def initialize(self) -> None:
        schedule = schedule_from_env()
        if schedule is not None:  # before super(): the poly LR scheduler is built from num_epochs
            self.num_epochs, self.num_iterations_per_epoch, self.num_val_iterations_per_epoch = schedule
            self.print_to_log_file(f"{ENV_VAR}: {schedule.num_epochs} epochs x {schedule.num_iterations_per_epoch}"
                                   f" iterations, {schedule.num_val_iterations_per_epoch} validation iterations")
        super().initialize()
