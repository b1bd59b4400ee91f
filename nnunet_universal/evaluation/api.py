"""``nnunet-universal evaluate``: score a folder of union-space predictions against ground truth, per domain.

Which cases are scored: every prediction ``{case}{file_ending}`` in ``pred_dir`` whose ground truth exists in
``gt_dir``. Ground-truth cases without a prediction are **not** an error (a validation fold or a subset is a
normal thing to evaluate) but are listed under ``missing_predictions`` in the JSON and the Markdown, and
logged as a warning; predictions without ground truth are listed under ``unmatched_predictions``. It is an
error when no prediction has a ground truth. Each case's domain comes from the merged dataset's
``universal.cases``; a ``{case}.routing.json`` next to a prediction adds routing accuracy and a confusion
matrix (dataset-free records only).
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
from tqdm import tqdm

from nnunet_universal.atomic_io import atomic_write_json, atomic_write_text
from nnunet_universal.evaluation.lesions import LesionConfig
from nnunet_universal.evaluation.plots import dice_boxplots, routing_confusion_plot
from nnunet_universal.evaluation.report import LESION_PROTOCOLS, PROTOCOL, evaluate_case, summarize, to_markdown
from nnunet_universal.metadata import load_universal
from nnunet_universal.nifti_integrity import check_file

logger = logging.getLogger(__name__)

ROUTING_SUFFIX = ".routing.json"
ROUTING_MODES = ("dataset-free", "oracle")


def evaluate(pred_dir: Path, gt_dir: Path | None = None, *, dataset_id: int | str, output_dir: Path | None = None,
             lesion_config: LesionConfig | None = None, lesion_protocol: str = "brats2023",
             brats2024_parser: str = "auto") -> dict[str, Any]:
    """Evaluate the union-space label maps in ``pred_dir`` against ``gt_dir``.

    Args:
        pred_dir: predictions named ``{case}{file_ending}`` (nnU-Net naming), optionally ``{case}.routing.json``.
        gt_dir: ground-truth label maps; default ``$nnUNet_raw/DatasetXXX_*/labelsTs`` if it exists, else
            ``labelsTr``.
        dataset_id: the merged dataset (id or name): its dataset.json gives domains, classes and each case's domain.
        output_dir: report folder (default ``pred_dir/evaluation``); receives ``metrics.json``, ``metrics.md``,
            ``dice_boxplots.png`` and, when routing JSONs are present, ``routing_confusion.png``.
        lesion_config: lesion-wise matching parameters of the brats2023 protocol (default: BraTS-METS).
        lesion_protocol: ``brats2023`` (this project's BraTS 2023-style lesion-wise rules) or ``brats2024`` (the
            official ``brats-evaluation`` package, optional extra ``nnunet-universal[brats2024]``; raises
            :class:`~nnunet_universal.evaluation.brats2024.Brats2024Unavailable` when it cannot be imported).
        brats2024_parser: the official parser for ``brats2024``: ``auto`` (``mets`` for metastasis domains,
            ``seg`` otherwise), ``mets`` or ``seg``.

    Returns:
        The metrics dict written to ``metrics.json`` (NaN written as ``null``).
    """
    pred_dir = Path(pred_dir)
    if lesion_protocol not in LESION_PROTOCOLS:
        raise ValueError(f"lesion protocol {lesion_protocol!r} is not one of {LESION_PROTOCOLS}")
    if lesion_protocol == "brats2024":
        from nnunet_universal.evaluation import brats2024

        brats2024._import()  # Brats2024Unavailable (with the install hint) before any work
        brats2024.parser_for("", None, brats2024_parser)  # validates the parser name
        protocol_detail = brats2024.describe(brats2024_parser)
    else:
        protocol_detail = ""
    if not pred_dir.is_dir():
        raise FileNotFoundError(f"prediction folder {pred_dir} does not exist")
    name, dataset_json, raw_dir = _locate_dataset(dataset_id)
    meta = load_universal(dataset_json, where=f"{name}/dataset.json")
    ending = dataset_json.get("file_ending", ".nii.gz")
    gt_dir = Path(gt_dir) if gt_dir is not None else _default_gt_dir(raw_dir, name)
    if not gt_dir.is_dir():
        raise FileNotFoundError(f"ground-truth folder {gt_dir} does not exist; pass --gt FOLDER")
    output_dir = Path(output_dir) if output_dir is not None else pred_dir / "evaluation"
    cfg = lesion_config or LesionConfig()
    if lesion_protocol == "brats2023":
        protocol_detail = (f"brats2023 (nnunet-universal BraTS 2023-style rules: GT lesions dilated {cfg.dilation}x "
                           f"for merging and matching, GT lesions ≤ {cfg.min_volume_mm3:g} mm³ ignored, penalty "
                           f"{cfg.hd95_penalty_mm:g} mm)")

    preds, gts = _cases_in(pred_dir, ending), _cases_in(gt_dir, ending)
    if not preds:
        raise FileNotFoundError(f"no predictions (*{ending}) in {pred_dir}")
    cases = sorted(set(preds) & set(gts))
    missing = sorted(set(gts) - set(preds))
    unmatched = sorted(set(preds) - set(gts))
    if not cases:
        raise FileNotFoundError(f"none of the {len(preds)} predictions in {pred_dir} has a ground truth in {gt_dir} "
                                f"(e.g. {preds[0]}{ending}); pass the right folder with --gt")
    if missing:
        logger.warning("%d ground-truth case(s) in %s have no prediction and are not scored: %s", len(missing),
                       gt_dir, ", ".join(missing[:10]) + (" ..." if len(missing) > 10 else ""))
    if unmatched:
        logger.warning("%d prediction(s) have no ground truth in %s and are skipped: %s", len(unmatched), gt_dir,
                       ", ".join(unmatched[:10]) + (" ..." if len(unmatched) > 10 else ""))
    domains = {c: meta.case(c).domain for c in cases}  # raises, naming the case, if metadata lacks it

    results = []
    for case in tqdm(cases, desc="evaluate", unit="case"):
        pred, p_geom = read_label_map(pred_dir / f"{case}{ending}", with_geometry=True)
        gt, g_geom = read_label_map(gt_dir / f"{case}{ending}", with_geometry=True)
        if pred.shape != gt.shape:
            raise ValueError(f"case {case}: prediction {pred_dir / (case + ending)} has shape {pred.shape} (z, y, x) "
                             f"but its ground truth has {gt.shape}; predictions must be in the original geometry")
        check_same_geometry(pred_dir / f"{case}{ending}", p_geom, gt_dir / f"{case}{ending}", g_geom)
        spacing = g_geom.spacing
        stray = sorted(set(np.unique(gt).tolist()) - set(meta.annotated_labels(case)))
        if stray:
            logger.warning("case %s: ground truth contains union ids %s that domain %s does not annotate", case,
                           stray, domains[case])
        res = {"case": case, **evaluate_case(pred, gt, spacing, domains[case], meta, lesion_config=cfg,
                                             lesion_protocol=lesion_protocol, brats2024_parser=brats2024_parser)}
        routing_file = pred_dir / f"{case}{ROUTING_SUFFIX}"
        if routing_file.is_file():
            res["routing"] = read_routing(routing_file, case, domains[case])
        results.append(res)

    summary = summarize(results, meta)
    summary = {"dataset": name, "protocol": PROTOCOL, "lesion_protocol": lesion_protocol,
               "lesion_protocol_detail": protocol_detail, "pred_dir": str(pred_dir), "gt_dir": str(gt_dir),
               "file_ending": ending,
               **({"lesion_config": cfg.to_dict()} if lesion_protocol == "brats2023" else
                  {"brats2024": {"parser": brats2024_parser, **brats2024.versions()}}),
               **summary, "missing_predictions": missing, "unmatched_predictions": unmatched, "cases": results}
    summary = _jsonable(summary)
    _write_reports(summary, output_dir, meta.domain_names)
    return summary


@dataclass(frozen=True)
class Geometry:
    """Where a label map lies in space: spacing (z, y, x), origin and direction as SimpleITK gives them (x, y, z)."""

    spacing: tuple[float, ...]
    origin: tuple[float, ...]
    direction: tuple[float, ...]


def check_same_geometry(pred_path: Path, pred: Geometry, gt_path: Path, gt: Geometry) -> None:
    """Refuse a prediction that does not lie where its ground truth lies (same shape is not enough: a map stored
    flipped, with direction and origin adjusted, or shifted, would be scored voxel by voxel against the wrong
    anatomy). Tolerances: spacing 0.1 %, direction 1e-3, origin a tenth of a voxel."""
    problems = []
    if not np.allclose(pred.spacing, gt.spacing, rtol=1e-3, atol=1e-5):
        problems.append(f"spacing {pred.spacing} vs {gt.spacing}")
    if not np.allclose(pred.direction, gt.direction, atol=1e-3):
        problems.append(f"direction {tuple(round(v, 4) for v in pred.direction)} vs "
                        f"{tuple(round(v, 4) for v in gt.direction)}")
    if not np.allclose(pred.origin, gt.origin, atol=0.1 * min(gt.spacing)):
        problems.append(f"origin {tuple(round(v, 3) for v in pred.origin)} vs {tuple(round(v, 3) for v in gt.origin)}")
    if problems:
        raise ValueError(f"prediction {pred_path} does not lie where its ground truth {gt_path} lies ("
                         + "; ".join(problems) + "): it would be scored against the wrong voxels. Export predictions "
                         "in the ground truth's geometry (nnUNetv2_predict and nnunet-universal predict do), or "
                         "resample them onto it first")


def read_label_map(path: Path, with_geometry: bool = False) -> tuple[np.ndarray, tuple[float, ...] | Geometry]:
    """Read a label image with SimpleITK: integer array in (z, y, x) order and spacing in the same axis order
    (``with_geometry``: a :class:`Geometry` instead of the spacing). Truncated NIfTI files are refused."""
    check_file(path)  # a cut-off .nii(.gz) reads as valid with zeros appended
    try:
        img = sitk.ReadImage(str(path))
    except RuntimeError as e:
        raise ValueError(f"cannot read label map {path}: {e}") from e
    arr = sitk.GetArrayFromImage(img)
    if np.issubdtype(arr.dtype, np.floating):
        rounded = np.rint(arr)
        if not np.allclose(arr, rounded):
            raise ValueError(f"{path} holds non-integer values; expected a label map")
        arr = rounded
    spacing = tuple(float(s) for s in img.GetSpacing()[::-1])
    if with_geometry:
        return arr.astype(np.int32, copy=False), Geometry(spacing, tuple(float(v) for v in img.GetOrigin()),
                                                          tuple(float(v) for v in img.GetDirection()))
    return arr.astype(np.int32, copy=False), spacing


def read_routing(path: Path, case: str, true_domain: str) -> dict[str, Any]:
    """Read ``{case}.routing.json`` (``mode``, ``inferred_domain``, ``routing``) into a per-case routing record."""
    try:
        rec = json.loads(path.read_text())
        mode, inferred = rec["mode"], rec["inferred_domain"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: not a routing record with 'mode' and 'inferred_domain' ({e!r}); "
                         "re-run 'nnunet-universal predict' or delete the file") from e
    if mode not in ROUTING_MODES:
        raise ValueError(f"{path}: mode {mode!r} is not one of {ROUTING_MODES}")
    if rec.get("case", case) != case:
        raise ValueError(f"{path}: describes case {rec['case']!r}, expected {case!r}")
    out = {"mode": mode, "inferred_domain": None if inferred is None else str(inferred),
           "correct": inferred == true_domain,
           "weights": {str(k): float(v) for k, v in (rec.get("routing") or {}).items()}}
    out.update({k: rec[k] for k in ("rule", "given_domain", "confidence", "runner_up", "uncertain", "conflicting")
                if k in rec})
    return out


def _locate_dataset(dataset_id: int | str) -> tuple[str, dict[str, Any], Path | None]:
    """(dataset name, dataset.json dict, raw folder or None) from $nnUNet_raw, else $nnUNet_preprocessed."""
    from nnunetv2.paths import nnUNet_preprocessed, nnUNet_raw
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    name = maybe_convert_to_dataset_name(dataset_id)
    raw = Path(nnUNet_raw.get()) / name if nnUNet_raw.is_set() else None
    candidates = [d / "dataset.json" for d in (raw, Path(nnUNet_preprocessed.get()) / name
                                               if nnUNet_preprocessed.is_set() else None) if d is not None]
    for dj in candidates:
        if dj.is_file():
            with open(dj) as f:
                return name, json.load(f), raw if raw is not None and raw.is_dir() else None
    raise FileNotFoundError(f"no dataset.json for {name}; looked at {', '.join(map(str, candidates)) or 'nothing'} "
                            "(set nnUNet_raw)")


def _default_gt_dir(raw_dir: Path | None, name: str) -> Path:
    if raw_dir is None:
        raise FileNotFoundError(f"{name} has no raw folder under $nnUNet_raw; pass the ground truth with --gt")
    return raw_dir / "labelsTs" if (raw_dir / "labelsTs").is_dir() else raw_dir / "labelsTr"


def _cases_in(folder: Path, ending: str) -> list[str]:
    return sorted(p.name[: -len(ending)] for p in folder.iterdir()
                  if p.is_file() and p.name.endswith(ending) and not p.name.startswith("."))


def _write_reports(summary: dict[str, Any], output_dir: Path, domain_order: list[str]) -> None:
    output_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(summary, output_dir / "metrics.json")
    title = (f"# Evaluation of {summary['dataset']}: {summary['n_cases']} cases\n\n"
             f"Protocol: {summary['protocol']}; lesion-wise protocol: "
             f"{summary.get('lesion_protocol_detail') or summary.get('lesion_protocol', 'brats2023')}. "
             f"Predictions: `{summary['pred_dir']}`, ground truth: `{summary['gt_dir']}`.\n\n")
    atomic_write_text(title + to_markdown(summary), output_dir / "metrics.md")
    written = [output_dir / "metrics.json", output_dir / "metrics.md",
               dice_boxplots(summary["cases"], domain_order, output_dir / "dice_boxplots.png")]
    if summary.get("routing") and summary["routing"]["n"]:
        written.append(routing_confusion_plot(summary["routing"], output_dir / "routing_confusion.png"))
    logger.info("wrote %s", ", ".join(map(str, written)))


def _jsonable(obj: Any) -> Any:
    """Plain JSON types: numpy scalars to Python, NaN/inf to None (strict JSON has no NaN)."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    return obj
