"""``nnunet-universal plan``: availability-aware fingerprint, universal plans and stock preprocessing."""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

from nnunet_universal.metadata import load_universal
from nnunet_universal.planners.plans_block import check_channel_names

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def _planning_safe_n_proc_da() -> Iterator[None]:
    """nnU-Net's VRAM estimate calls ``torch.set_num_threads(nnUNet_n_proc_DA)``, which fails for 0 (a value
    people set for training); use 1 while planning and restore the variable afterwards."""
    old = os.environ.get("nnUNet_n_proc_DA")
    if old is not None and old.strip() == "0":
        logger.info("nnUNet_n_proc_DA=0 breaks nnU-Net's planning; using 1 while planning")
        os.environ["nnUNet_n_proc_DA"] = "1"
    try:
        yield
    finally:
        if old is not None:
            os.environ["nnUNet_n_proc_DA"] = old


def check_splits_unchanged(raw_splits: Path, planned_splits: Path) -> None:
    """Refuse to plan when the merged dataset's ``splits_final.json`` differs from the one an earlier planning copied
    to ``nnUNet_preprocessed`` (nnU-Net's planner would stop with a bare ``AssertionError``): the dataset was
    re-merged with other inputs or hold-out after planning, so models trained on the old folds may have seen cases
    that are now validation or test cases."""
    if not (raw_splits.is_file() and planned_splits.is_file()):
        return
    new, old = json.loads(raw_splits.read_text()), json.loads(planned_splits.read_text())
    for i, fold in enumerate(new):
        if i >= len(old) or any(set(fold[k]) != set(old[i][k]) for k in ("train", "val")):
            raise ValueError(
                f"{raw_splits} (fold {i}) differs from {planned_splits}, written when this dataset was planned "
                "before: it was re-merged with other inputs or --holdout since. Models trained on the old folds may "
                "have seen cases that are now validation or test cases. Delete "
                f"{planned_splits} (and the trained models of this dataset) and run the plan again, or re-merge "
                "with the old inputs and options.")


def verify_files_complete(raw_folder: Path) -> int:
    """Check every NIfTI image and label of a raw dataset for truncation or a damaged gzip stream (nnU-Net's
    integrity check reads a cut-off file as valid: SimpleITK fills the rest with zeros); return the files checked.

    Raises :class:`~nnunet_universal.nifti_integrity.CorruptImageError` naming the first bad file."""
    from tqdm import tqdm

    from nnunet_universal.nifti_integrity import check_file

    files = sorted(p for sub in ("imagesTr", "labelsTr", "imagesTs", "labelsTs") if (raw_folder / sub).is_dir()
                   for p in (raw_folder / sub).iterdir() if p.name.endswith((".nii.gz", ".nii")))
    for f in tqdm(files, desc="verify: files complete", unit="file", disable=None):
        check_file(f)
    return len(files)


def plan_and_preprocess(dataset_id: int, configurations: Sequence[str] = ("3d_fullres",), preset: str = "default",
                        num_processes: int = 2, verify: bool = False,
                        target_spacing: tuple[float, ...] | None = None,
                        gpu_memory_gb: float | None = None) -> list[Path]:
    """Fingerprint (availability-aware), plan and preprocess merged dataset ``dataset_id``.

    Plans are named ``nnUNetUniversalPlans`` (``--preset default``) or ``nnUNetUniversalResEncUNet{M,L}Plans``
    and carry a ``universal`` block; preprocessing is nnU-Net's stock ``DefaultPreprocessor`` so that stock
    ``nnUNetv2_predict`` can preprocess new scans. ``target_spacing`` (z, y, x in mm, like nnU-Net's) overrides
    the 3d_fullres target spacing; ``gpu_memory_gb`` is nnU-Net's VRAM target. Returns the written plans files.
    """
    from nnunetv2.experiment_planning.plan_and_preprocess_api import (
        extract_fingerprint_dataset,
        plan_experiment_dataset,
        preprocess_dataset,
    )
    from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity
    from nnunetv2.paths import nnUNet_preprocessed, nnUNet_raw
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    from nnunet_universal.planners.fingerprint import UniversalFingerprintExtractor
    from nnunet_universal.planners.planner import PRESETS

    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    if num_processes < 1:
        raise ValueError(f"num_processes must be >= 1, got {num_processes}")
    if target_spacing is not None:
        target_spacing = tuple(float(s) for s in target_spacing)
        if len(target_spacing) != 3 or any(s <= 0 for s in target_spacing):
            raise ValueError(f"--target-spacing needs three positive values (z y x in mm), got {target_spacing}")

    dataset_name = maybe_convert_to_dataset_name(dataset_id)
    raw_folder = Path(nnUNet_raw) / dataset_name
    where = str(raw_folder / "dataset.json")
    dataset_json = json.loads((raw_folder / "dataset.json").read_text())
    check_channel_names(dataset_json, load_universal(dataset_json, where=where), where)  # fail fast, clear message
    if verify:
        verify_files_complete(raw_folder)
        verify_dataset_integrity(str(raw_folder), num_processes)

    check_splits_unchanged(raw_folder / "splits_final.json", Path(nnUNet_preprocessed) / dataset_name
                           / "splits_final.json")
    with _planning_safe_n_proc_da():
        extract_fingerprint_dataset(dataset_id, UniversalFingerprintExtractor, num_processes,
                                    check_dataset_integrity=False, clean=True, verbose=False)
        _, plans_name = plan_experiment_dataset(dataset_id, PRESETS[preset], gpu_memory_target_in_gb=gpu_memory_gb,
                                                overwrite_target_spacing=target_spacing)
    plans_file = Path(nnUNet_preprocessed) / dataset_name / f"{plans_name}.json"
    planned = set(json.loads(plans_file.read_text())["configurations"])
    missing = [c for c in configurations if c not in planned]
    if missing:
        logger.warning("configurations %s were not planned for %s (planned: %s); they are skipped",
                       missing, dataset_name, sorted(planned))
    todo = [c for c in configurations if c in planned]
    if todo:
        preprocess_dataset(dataset_id, plans_name, todo, [num_processes] * len(todo), verbose=False)
    return [plans_file]
