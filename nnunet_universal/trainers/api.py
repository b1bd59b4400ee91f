"""``nnunet-universal train``: nnU-Net's own training entry point with our trainers made findable."""

from __future__ import annotations

import logging

from nnunet_universal.metadata import PLANS_NAME

logger = logging.getLogger(__name__)


def train(dataset: str, configuration: str, fold: str, trainer: str = "UniversalTrainer", plans: str = PLANS_NAME,
          device: str = "cuda", continue_training: bool = False, validation_only: bool = False) -> None:
    """Train (or continue, or only validate) exactly like ``nnUNetv2_train DATASET CONFIG FOLD -tr … -p …``.

    Sets ``nnUNet_extTrainer`` to include our trainer folder (so the stock name lookup, DDP workers and later
    ``nnUNetv2_predict`` calls in this process find the trainer), then calls nnU-Net's ``run_training``.

    Args:
        dataset: dataset id or name (``"990"`` or ``"Dataset990_Name"``).
        configuration: nnU-Net configuration, e.g. ``"3d_fullres"``.
        fold: ``"0"``-``"4"`` or ``"all"``.
        trainer: trainer class name (``UniversalTrainer`` or a variant, or any nnU-Net trainer).
        plans: plans identifier (default ``nnUNetUniversalPlans``).
        device: ``"cuda"``, ``"cpu"`` or ``"mps"``.
        continue_training: ``--c``: resume from the latest checkpoint of the fold.
        validation_only: ``--val``: only run the final validation from ``checkpoint_final.pth``.
    """
    import torch
    from nnunetv2.run.run_training import run_training

    from nnunet_universal.discovery import set_ext_trainer_env

    if continue_training and validation_only:
        raise ValueError("--c (continue training) and --val (validation only) exclude each other")
    if device not in ("cuda", "cpu", "mps"):
        raise ValueError(f"device must be 'cuda', 'cpu' or 'mps', got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' requested but no CUDA GPU is available; use '-device cpu'")
    if str(fold) != "all":
        try:
            int(fold)
        except ValueError:
            raise ValueError(f"fold must be an integer or 'all', got {fold!r}") from None
    set_ext_trainer_env()
    if device == "cuda":  # same as nnUNetv2_train: torch threads do not help a GPU run
        torch.set_num_threads(1)
        try:
            torch.set_num_interop_threads(1)
        except RuntimeError:  # only possible before any parallel work; harmless to skip afterwards
            pass
    logger.info("training %s %s fold %s with %s (%s) on %s", dataset, configuration, fold, trainer, plans, device)
    run_training(str(dataset), configuration, fold, trainer_class_name=trainer, plans_identifier=plans,
                 continue_training=continue_training, only_run_validation=validation_only,
                 device=torch.device(device))
