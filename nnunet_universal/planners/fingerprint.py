"""Availability-aware dataset fingerprint: each slot's intensity statistics come only from cases that have it.

A merged dataset zero-fills the slots a case lacks. nnU-Net's stock fingerprint would sample those zeros inside
the foreground and pollute the statistics (for CT: the clipping percentiles and the mean/std that
``CTNormalization`` uses). Here nnU-Net's own per-case analysis (``crop_to_nonzero`` and
``collect_foreground_intensities``) runs only on the channels a case has (``universal.cases[case].slots``), and
each slot's sample budget (nnU-Net's ``num_foreground_voxels_for_intensitystats``) is spread over the cases that
have that slot. For a slot present in every case this is nnU-Net's rule; for a CT-only subset of cases it gives
exactly the fingerprint stock nnU-Net computes on a CT-only dataset made of those cases.

Spacings, shapes and the cropping ratio still come from every case.
The environment variable ``NNUNET_UNIVERSAL_FP_SAMPLES`` lowers the per-slot sample budget (tests, quick runs);
its old name ``nnUNet_universal_fp_samples`` still works, with a deprecation warning.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
from nnunetv2.experiment_planning.dataset_fingerprint.fingerprint_extractor import DatasetFingerprintExtractor
from nnunetv2.imageio.base_reader_writer import BaseReaderWriter
from nnunetv2.imageio.reader_writer_registry import determine_reader_writer_from_dataset_json
from nnunetv2.paths import nnUNet_preprocessed
from nnunetv2.preprocessing.cropping.cropping import crop_to_nonzero
from nnunetv2.utilities.json_export import recursive_fix_for_json_export
from tqdm import tqdm

from nnunet_universal.atomic_io import atomic_write_json
from nnunet_universal.metadata import MetadataError, load_universal
from nnunet_universal.planners.plans_block import check_channel_names

logger = logging.getLogger(__name__)

#: Per-slot intensity sample budget override (nnU-Net's default: 1e8 foreground voxels).
SAMPLES_ENV = "NNUNET_UNIVERSAL_FP_SAMPLES"
#: Its name before all variables of this package were spelled ``NNUNET_UNIVERSAL_*``; read with a warning.
DEPRECATED_SAMPLES_ENV = "nnUNet_universal_fp_samples"
_PERCENTILES = np.array((0.5, 50.0, 99.5))


def sample_budget_from_env() -> float | None:
    """The sample budget set by ``NNUNET_UNIVERSAL_FP_SAMPLES`` (or its deprecated old name), None when unset."""
    value = os.environ.get(SAMPLES_ENV)
    old = os.environ.get(DEPRECATED_SAMPLES_ENV)
    if old:
        msg = (f"{DEPRECATED_SAMPLES_ENV} is deprecated, use {SAMPLES_ENV}"
               + (f" (it is set and wins: {SAMPLES_ENV}={value})" if value else f"={old}"))
        warnings.warn(msg, DeprecationWarning, stacklevel=2)
        logger.warning(msg)
    value = value or old
    return float(value) if value else None


def analyze_case_available(image_files: list[str], label_file: str, reader_writer_class: type[BaseReaderWriter],
                           samples_per_channel: list[int]) -> dict[str, Any]:
    """nnU-Net's per-case analysis restricted to the channels with ``samples_per_channel[c] > 0``.

    Each present channel gets nnU-Net's foreground sampling (same seed, with replacement); absent channels get
    no samples. Also reports which channels hold any non-zero voxel, to check the metadata against the files.
    """
    rw = reader_writer_class()
    images, props = rw.read_images(image_files)  # (C, *spatial)
    seg, _ = rw.read_seg(label_file)  # (1, *spatial)
    nonzero = [bool(np.any(images[c] != 0)) for c in range(len(images))]
    data_cropped, seg_cropped, _ = crop_to_nonzero(images, seg)
    samples: list[np.ndarray | None] = []
    for c, n in enumerate(samples_per_channel):
        if n <= 0:
            samples.append(None)
            continue
        s, _ = DatasetFingerprintExtractor.collect_foreground_intensities(seg_cropped, data_cropped[c:c + 1],
                                                                         num_samples=n)
        samples.append(np.asarray(s[0], dtype=data_cropped.dtype))
    return {
        "shape_after_crop": [int(i) for i in data_cropped.shape[1:]],
        "spacing": [float(i) for i in props["spacing"]],
        "samples": samples,
        "relative_size": float(np.prod(data_cropped.shape[1:]) / np.prod(images.shape[1:])),
        "nonzero": nonzero,
    }


def intensity_statistics(samples: np.ndarray) -> dict[str, float]:
    """The statistics nnU-Net stores per channel (CTNormalization uses mean, std and the 0.5/99.5 percentiles)."""
    p005, median, p995 = np.percentile(samples, _PERCENTILES)
    return {"mean": float(np.mean(samples)), "median": float(median), "std": float(np.std(samples)),
            "min": float(np.min(samples)), "max": float(np.max(samples)),
            "percentile_99_5": float(p995), "percentile_00_5": float(p005)}


class UniversalFingerprintExtractor(DatasetFingerprintExtractor):
    """Drop-in ``DatasetFingerprintExtractor`` for merged datasets (pass the class to nnU-Net's API)."""

    def __init__(self, dataset_name_or_id: str | int, num_processes: int = 8, verbose: bool = False) -> None:
        super().__init__(dataset_name_or_id, num_processes, verbose)
        where = os.path.join(self.input_folder, "dataset.json")
        self.meta = load_universal(self.dataset_json, where=where)
        check_channel_names(self.dataset_json, self.meta, where)
        override = sample_budget_from_env()
        if override is not None:
            self.num_foreground_voxels_for_intensitystats = override
        # availability[case][c]: does case hold real data in channel c (slot self.meta.slots[c])
        self.availability = {k: self.meta.slot_mask(self.meta.case(k).slots) for k in self.dataset}

    def samples_per_channel(self) -> list[int]:
        """Per-case sample count of each channel: the budget spread over the cases that have that slot."""
        counts = np.sum([self.availability[k] for k in self.dataset], axis=0)
        empty = [s for s, n in zip(self.meta.slots, counts, strict=True) if n == 0]
        if empty:
            raise MetadataError(
                f"{self.dataset_name}: slots {empty} are present in no training case, so they have no intensity "
                "statistics; drop them from universal.slots (re-run 'nnunet-universal merge')"
            )
        return [int(self.num_foreground_voxels_for_intensitystats // n) for n in counts]

    def _analyze_all(self, reader_writer_class: type[BaseReaderWriter]) -> dict[str, dict[str, Any]]:
        per_channel = self.samples_per_channel()
        jobs = {k: (v["images"], v["label"], reader_writer_class,
                    [n if a else 0 for n, a in zip(per_channel, self.availability[k], strict=True)])
                for k, v in self.dataset.items()}
        bar = tqdm(total=len(jobs), desc="Extracting universal fingerprint",
                   disable=not getattr(self, "show_progress_bar", True))
        results = {}
        with bar:
            if self.num_processes <= 1:
                for k, args in jobs.items():
                    results[k] = analyze_case_available(*args)
                    bar.update()
            else:
                with ProcessPoolExecutor(self.num_processes, mp_context=get_context("spawn")) as pool:
                    futures = {pool.submit(analyze_case_available, *args): k for k, args in jobs.items()}
                    for f in as_completed(futures):
                        results[futures[f]] = f.result()
                        bar.update()
        return {k: results[k] for k in self.dataset}  # dataset order

    def _check_missing_slots_are_empty(self, results: dict[str, dict[str, Any]]) -> None:
        """Missing slots must be zero-filled (a slot with data listed as missing would be silently ignored)."""
        bad, empty = [], []
        for k, r in results.items():
            for slot, available, nonzero in zip(self.meta.slots, self.availability[k], r["nonzero"], strict=True):
                if nonzero and not available:
                    bad.append((str(k), slot))
                elif available and not nonzero:
                    empty.append((str(k), slot))
        if bad:
            raise MetadataError(
                f"{self.dataset_name}: channels listed as missing hold non-zero data ({bad[:5]}"
                f"{' ...' if len(bad) > 5 else ''}); universal.cases[case].slots must list every slot with data "
                "and missing slots must be zero-filled. Re-run 'nnunet-universal merge'."
            )
        if empty:
            logger.warning("%s: %d available slots are all zero, e.g. %s", self.dataset_name, len(empty), empty[:3])

    def run(self, overwrite_existing: bool = False) -> dict:
        """Compute (or load) the fingerprint and write ``nnUNet_preprocessed/<dataset>/dataset_fingerprint.json``."""
        out_file = Path(nnUNet_preprocessed) / self.dataset_name / "dataset_fingerprint.json"
        if out_file.is_file() and not overwrite_existing:
            return json.loads(out_file.read_text())
        first = next(iter(self.dataset.values()))["images"][0]
        results = self._analyze_all(determine_reader_writer_from_dataset_json(self.dataset_json, first))
        self._check_missing_slots_are_empty(results)
        stats, n_cases = {}, {}
        for c, slot in enumerate(self.meta.slots):
            chunks = [r["samples"][c] for r in results.values() if r["samples"][c] is not None]
            samples = np.concatenate(chunks) if chunks else np.empty(0)
            if samples.size == 0:
                raise MetadataError(
                    f"{self.dataset_name}: no labelled (foreground) voxel in any training case that has slot "
                    f"{slot!r}; nnU-Net's intensity statistics need some. Check the labels of that domain."
                )
            stats[str(c)] = intensity_statistics(samples)
            n_cases[slot] = len(chunks)
            del chunks, samples
            for r in results.values():  # free this slot's samples (nnU-Net's budget is 1e8 voxels per slot)
                r["samples"][c] = None
        fingerprint = {
            "spacings": [r["spacing"] for r in results.values()],
            "shapes_after_crop": [r["shape_after_crop"] for r in results.values()],
            "foreground_intensity_properties_per_channel": stats,
            "median_relative_size_after_cropping": float(np.median([r["relative_size"] for r in results.values()])),
            "universal_cases_per_slot": n_cases,
        }
        recursive_fix_for_json_export(fingerprint)
        atomic_write_json(fingerprint, out_file)
        return fingerprint
