"""Lesion-wise scores by the official BraTS 2024+ evaluation (``brats-evaluation`` on ``panoptica``), optional.

``nnunet-universal evaluate --protocol brats2024`` scores the lesion-wise part of every ``lesion_wise`` domain
with the package the BraTS 2024/2025 challenges use, instead of this project's BraTS 2023-style rules
(:mod:`~nnunet_universal.evaluation.lesions`). The two are **not comparable**: BraTS 2024+ matches lesions one
to one (maximum bipartite matching on Dice > 1e-6, connected components without dilation), and, with the
``mets`` parser, lesions < 20 mm³ count for detection only (TP if matched with Dice ≥ 0.1) and a case without a
(large) GT lesion has no lesion-wise Dice/NSD/HD95 (NaN, left out of the means), while missed lesions and false
positives score Dice 0, NSD 0, HD95 373 mm.

How the package is called, per case and per domain:

1. the settings of a bundled config (``brats_evaluation.config_path``; ``mets`` for the ``mets`` parser,
   ``gli`` otherwise; the configs differ only in their label groups) are kept, and the label groups replaced by
   the domain's classes (``LabelGroup``) and regions (``LabelMergeGroup``) in union ids;
2. ``panoptica.Panoptica_Evaluator.evaluate`` runs on the arrays with the spacing per array axis (union ids of
   other domains, the cross-domain false positives reported separately, are set to background first: panoptica
   refuses labels outside its groups, and they belong to none of the domain's targets);
3. the result dict (``to_dict(True)``, what ``brats_evaluation.evaluate_single_exam`` returns) goes through the
   official parser, ``parse_mets_results(…, vol_threshold=20, overlap_threshold=0.1)`` or ``parse_seg_results``,
   whose CSV row is read back: those numbers are what is recorded.

Parser choice (``parser="auto"``): ``mets`` for a domain whose name or ``source`` contains "met" (BraTS-METS,
metastasis datasets), ``seg`` (lesion-wise means straight from panoptica, no size threshold) otherwise.

Files are not passed to the package because panoptica (2.1.7) reads NIfTI with SimpleITK when it is installed and
then pairs the (z, y, x) array with the (x, y, z) spacing; on BraTS's 1 mm isotropic images that makes no
difference, on anisotropic ones it would.

The package needs numpy < 2.3, pandas < 3 and rich < 14: install ``nnunet-universal[brats2024]`` in an
environment of its own.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import tempfile
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

VOL_THRESHOLD_MM3 = 20.0  #: brats-parse-metrics mets --vol_threshold default (BraTS-METS 2024+)
OVERLAP_THRESHOLD = 0.1  #: brats-parse-metrics mets --overlap_threshold default
PARSERS = ("auto", "mets", "seg")
INSTALL_HINT = ("the brats2024 protocol needs the official BraTS evaluation package: pip install "
                "'nnunet-universal[brats2024]' (brats-evaluation, on panoptica). It requires numpy<2.3, pandas<3 "
                "and rich<14, so install it in an environment of its own (python -m venv ...), not next to a "
                "newer numpy")


class Brats2024Unavailable(RuntimeError):
    """``brats-evaluation`` (or ``panoptica``) cannot be imported."""


def available() -> bool:
    try:
        _import()
    except Brats2024Unavailable:
        return False
    return True


def versions() -> dict[str, str]:
    """Installed versions of the official packages (for the reports)."""
    out = {}
    for dist in ("brats-evaluation", "panoptica"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out


def describe(parser: str = "auto") -> str:
    """One line naming the protocol, package versions and parser settings (every report carries it)."""
    v = versions()
    return (f"brats2024 (official brats-evaluation {v['brats-evaluation']} on panoptica {v['panoptica']}; parser "
            f"{parser}: mets = lesions < {VOL_THRESHOLD_MM3:g} mm³ detection only with Dice ≥ {OVERLAP_THRESHOLD:g}, "
            "seg = panoptica lesion-wise means; one-to-one matching, no dilation)")


def _import():
    try:
        import brats_evaluation  # noqa: F401
        from brats_evaluation import config_path
        from brats_evaluation.metrics_parser import parse_mets_results, parse_seg_results
        from panoptica import Panoptica_Evaluator
        from panoptica.utils.label_group import LabelGroup, LabelMergeGroup
        from panoptica.utils.segmentation_class import SegmentationClassGroups
    except ImportError as e:  # numpy/pandas too new for it raises ImportError as well
        raise Brats2024Unavailable(f"{INSTALL_HINT} ({type(e).__name__}: {e})") from e
    return (config_path, parse_mets_results, parse_seg_results, Panoptica_Evaluator, LabelGroup, LabelMergeGroup,
            SegmentationClassGroups)


def parser_for(domain: str, source: str | None, parser: str = "auto") -> str:
    """``mets`` or ``seg`` for a domain (see the module docstring)."""
    if parser not in PARSERS:
        raise ValueError(f"brats2024 parser {parser!r} is not one of {PARSERS}")
    if parser != "auto":
        return parser
    return "mets" if "met" in f"{domain} {source or ''}".lower() else "seg"


_EVALUATORS: dict[tuple, Any] = {}


def _evaluator(parser: str, targets: dict[str, tuple[list[int], bool]]):
    key = (parser, tuple((k, tuple(v), m) for k, (v, m) in targets.items()))
    if key not in _EVALUATORS:
        config_path, _, _, Evaluator, LabelGroup, LabelMergeGroup, Groups = _import()
        with contextlib.redirect_stdout(io.StringIO()):
            base = Evaluator.load_from_config(str(config_path("mets" if parser == "mets" else "gli")))
            settings = Evaluator._yaml_repr(base)  # the bundled settings, label groups replaced by ours
            # (a region shares its labels with its classes: panoptica prints a notice about that)
            settings["segmentation_class_groups"] = Groups(
                {f"t{i}": (LabelMergeGroup if merge else LabelGroup)(ids) for i, (ids, merge) in
                 enumerate(targets.values())})
        _EVALUATORS[key] = Evaluator(**settings)
    return _EVALUATORS[key]


def lesion_wise_brats2024(pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float],
                          targets: dict[str, tuple[list[int], bool]], domain_ids: Sequence[int],
                          parser: str) -> dict[str, dict[str, Any]]:
    """Official BraTS 2024+ lesion-wise scores of one case, per target.

    Args:
        pred, gt: integer label maps (union ids) of equal shape.
        spacing: voxel size per array axis, mm.
        targets: name -> (union ids, merged region?) for the domain's classes and regions.
        domain_ids: the union ids the domain annotates (others are set to background first).
        parser: ``mets`` or ``seg``.

    Returns:
        name -> the official parser's columns for that target without the ``_{group}`` suffix (e.g.
        ``lesionwise_dsc_mean``, ``lesionwise_nsd_mean``, ``lesionwise_hd95_mean``, ``all_instance_tp``, …,
        ``large_instance_f1``, ``small_instance_tp``, ``global_dsc``; NaN where the parser writes none), plus
        ``parser``.
    """
    _, parse_mets, parse_seg, *_ = _import()
    keep = np.asarray([0, *domain_ids])
    pred = np.where(np.isin(pred, keep), pred, 0).astype(np.int32)
    gt = np.where(np.isin(gt, keep), gt, 0).astype(np.int32)
    ev = _evaluator(parser, targets)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        groups = ev.evaluate(pred, gt, voxelspacing=tuple(float(s) for s in spacing))
        # what brats_evaluation.evaluate_single_exam returns for a subject
        subject = {k: r.to_dict(True) for k, r in groups.items()}
        subject["subject_name"] = "case"
        with tempfile.TemporaryDirectory(prefix="brats2024_") as tmp:
            js, out = Path(tmp) / "summary.json", Path(tmp) / "parsed.csv"
            js.write_text(json.dumps({"metrics": [subject], "missings": []}, default=_plain))
            if parser == "mets":
                parse_mets(str(js), VOL_THRESHOLD_MM3, OVERLAP_THRESHOLD, str(out))
            else:
                parse_seg(str(js), str(out))
            with open(out, newline="") as f:
                row = next(csv.DictReader(f))
    result = {}
    for i, name in enumerate(targets):
        suffix = f"_t{i}"
        result[name] = {k[: -len(suffix)]: _num(v) for k, v in row.items() if k.endswith(suffix)}
        result[name]["parser"] = parser
    return result


def _plain(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def _num(v: str) -> float:
    if v is None or v == "":
        return math.nan
    return float(v)
