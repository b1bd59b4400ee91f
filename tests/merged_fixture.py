"""A tiny merged nnU-Net raw dataset written by hand, for planner/trainer tests.

Three domains with different slot sets in one dataset with the channels ``T1, T1c, T2, FLAIR, CT``:

* ``mr_a``: slots T1c, FLAIR; labels {ET: 1} (one enhancing blob, bright on T1c and FLAIR);
* ``mr_b``: slots T1, T1c, T2, FLAIR; labels {NETC: 2, SNFH: 3, ET: 4} (necrotic core dark on T1c,
  enhancing shell bright on T1c, oedema bright on T2/FLAIR), regions TC and WT;
* ``ct``: slot CT in HU (air, body, contrast-enhanced liver, hypodense tumour); labels {liver: 5, tumor: 6},
  z spacing 1.5 mm (MR is 1 mm isotropic) so that preprocessing resamples it.

Missing slots are zero-filled, as a merge writes them. Labels follow the intensities, so a tiny network can
learn something. Everything is deterministic in ``seed``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from nnunet_universal.metadata import CaseInfo, DomainInfo, UniversalMeta

SLOTS = ["T1", "T1c", "T2", "FLAIR", "CT"]
DOMAINS = {
    "mr_a": DomainInfo(source="synthetic MR A", slots=["T1c", "FLAIR"], labels={"ET": 1}, lesion_wise=True),
    "mr_b": DomainInfo(source="synthetic MR B", slots=["T1", "T1c", "T2", "FLAIR"],
                       labels={"NETC": 2, "SNFH": 3, "ET": 4},
                       regions={"TC": ["NETC", "ET"], "WT": ["NETC", "SNFH", "ET"]}),
    "ct": DomainInfo(source="synthetic CT", slots=["CT"], labels={"liver": 5, "tumor": 6}, modality="CT"),
}
MR_SPACING = (1.0, 1.0, 1.0)  # SimpleITK order (x, y, z)
CT_SPACING = (1.0, 1.0, 1.5)
MR_BASE = {"T1": 300.0, "T1c": 320.0, "T2": 250.0, "FLAIR": 280.0}


def _grid(shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Voxel coordinates (z, y, x), each of ``shape``."""
    return np.meshgrid(*[np.arange(s, dtype=np.float32) for s in shape], indexing="ij")


def _ellipsoid(grid, center, radii) -> np.ndarray:
    return sum(((g - c) / r) ** 2 for g, c, r in zip(grid, center, radii, strict=True)) <= 1.0


def _dist(grid, center) -> np.ndarray:
    return np.sqrt(sum((g - c) ** 2 for g, c in zip(grid, center, strict=True)))


def _mr_case(domain: str, shape, rng: np.random.Generator) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Head ellipsoid (background exactly 0) with one lesion; returns {slot: (z, y, x) float32}, label."""
    grid = _grid(shape)
    c = np.array(shape, dtype=np.float32) / 2 + rng.uniform(-1, 1, 3)
    head = _ellipsoid(grid, c, np.array(shape) * 0.42)
    radius = rng.uniform(3.0, 4.5)
    lc = c + rng.uniform(-2, 2, 3)
    d = _dist(grid, lc)
    label = np.zeros(shape, np.uint8)
    scale = rng.uniform(0.7, 1.4)  # MR intensities are arbitrary per scan; z-scoring removes this
    images = {}
    for slot in DOMAINS[domain].slots:
        img = np.full(shape, MR_BASE[slot], np.float32)
        if domain == "mr_a":
            blob = d <= radius
            img[blob] += {"T1c": 250.0, "FLAIR": 180.0}[slot]
        else:
            core, shell, edema = d <= 0.4 * radius, (d > 0.4 * radius) & (d <= 0.7 * radius), (d > 0.7 * radius) & (
                d <= radius * 1.4)
            img[core] *= {"T1": 0.8, "T1c": 0.4, "T2": 1.6, "FLAIR": 0.9}[slot]
            img[shell] += {"T1": 0.0, "T1c": 280.0, "T2": 80.0, "FLAIR": 100.0}[slot]
            img[edema] += {"T1": -40.0, "T1c": 0.0, "T2": 160.0, "FLAIR": 220.0}[slot]
        img = (img + rng.normal(0, 12, shape)).clip(1, None) * scale
        img[~head] = 0
        images[slot] = img.astype(np.float32)
    if domain == "mr_a":
        label[d <= radius] = 1
    else:
        label[d <= radius * 1.4] = 3
        label[d <= 0.7 * radius] = 4
        label[d <= 0.4 * radius] = 2
    label[~head] = 0
    return images, label


def _ct_case(shape, rng: np.random.Generator) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Abdomen phantom in HU: air -1000, body 40, liver 100, hypodense tumour 50 (+ noise)."""
    grid = _grid(shape)
    c = np.array(shape, dtype=np.float32) / 2
    body = _ellipsoid(grid, c, np.array(shape) * np.array([0.6, 0.42, 0.46]))
    liver_c = c + np.array([0, -2, 3]) + rng.uniform(-1, 1, 3)
    liver = _ellipsoid(grid, liver_c, np.array(shape) * np.array([0.4, 0.22, 0.25])) & body
    tumor = (_dist(grid, liver_c + rng.uniform(-1.5, 1.5, 3)) <= rng.uniform(2.0, 3.0)) & liver
    hu = np.full(shape, -1000.0, np.float32)
    hu[body] = 40.0
    hu[liver] = 100.0
    hu[tumor] = 50.0
    hu += rng.normal(0, 8, shape)
    label = np.zeros(shape, np.uint8)
    label[liver] = 5
    label[tumor] = 6
    return {"CT": hu.astype(np.float32)}, label


def _write(arr: np.ndarray, path: Path, spacing: tuple[float, float, float]) -> None:
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(spacing)
    sitk.WriteImage(img, str(path), useCompression=True)


def make_merged_dataset(raw_root: Path, dataset_id: int = 990, cases_per_domain: int = 3,
                        shape: tuple[int, int, int] = (20, 24, 24), seed: int = 0) -> Path:
    """Write ``raw_root/Dataset{id}_MergedFixture`` (imagesTr, labelsTr, dataset.json with ``universal``).

    ``shape`` is the numpy (z, y, x) shape of every volume. Case ids are ``{domain}_{i:03d}``.
    Returns the dataset folder.
    """
    folder = Path(raw_root) / f"Dataset{dataset_id:03d}_MergedFixture"
    (folder / "imagesTr").mkdir(parents=True, exist_ok=True)
    (folder / "labelsTr").mkdir(parents=True, exist_ok=True)
    cases: dict[str, CaseInfo] = {}
    for d_idx, domain in enumerate(DOMAINS):
        for i in range(cases_per_domain):
            rng = np.random.default_rng([seed, d_idx, i])
            case = f"{domain}_{i:03d}"
            if domain == "ct":
                images, label = _ct_case(shape, rng)
                spacing = CT_SPACING
            else:
                images, label = _mr_case(domain, shape, rng)
                spacing = MR_SPACING
            for ch, slot in enumerate(SLOTS):
                arr = images.get(slot, np.zeros(shape, np.float32))  # missing slot: zero-filled
                _write(arr, folder / "imagesTr" / f"{case}_{ch:04d}.nii.gz", spacing)
            _write(label, folder / "labelsTr" / f"{case}.nii.gz", spacing)
            cases[case] = CaseInfo(domain=domain, slots=list(DOMAINS[domain].slots), source_id=f"src-{case}")
    meta = UniversalMeta(slots=list(SLOTS), domains=dict(DOMAINS), cases=cases)
    meta.validate()
    labels = {"background": 0}
    for domain, info in DOMAINS.items():
        for name, uid in info.labels.items():
            labels[f"{domain}.{name}"] = uid
    dataset_json = {
        "name": "MergedFixture",
        "channel_names": {str(i): s for i, s in enumerate(SLOTS)},
        "labels": labels,
        "numTraining": len(cases),
        "file_ending": ".nii.gz",
        "universal": meta.to_dict(),
    }
    (folder / "dataset.json").write_text(json.dumps(dataset_json, indent=2))
    return folder
