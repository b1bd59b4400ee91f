"""Per-case evaluation in the union label space and per-domain summaries.

A case is scored only on its own domain's classes (union ids in ``meta.domains[d].labels``), its regions
(union of member classes, e.g. BraTS TC and WT) and, for lesion-wise domains, lesion-wise scores on every
class and region. Voxels predicted with ids of *other* domains are reported as cross-domain false positives
(voxels, mL and connected components), the failure mode of multi-dataset models this project guards against.
The trainer's final validation calls :func:`evaluate_case` on arrays in memory; ``nnunet-universal evaluate``
calls it on files (``evaluation/api.py``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from nnunet_universal.evaluation.lesions import LesionConfig, count_components, detection_scores, lesion_wise
from nnunet_universal.evaluation.metrics import dice, hd95, stats
from nnunet_universal.metadata import DomainInfo, MetadataError, UniversalMeta

_LESION_COUNTS = ("tp", "fn", "fp", "n_pred", "pred_matched", "n_gt_ignored")

#: lesion-wise protocols: this project's BraTS 2023-style rules (``lesions.py``) or the official BraTS 2024+
#: package (``brats2024.py``, optional extra); every report names the one used
LESION_PROTOCOLS = ("brats2023", "brats2024")

#: the protocol of this module's metrics (every report names it)
PROTOCOL = "nnunet-universal"
TABLE_NOTE = (
    "Protocol: {protocol}. Dice and HD95: mean ± std over cases of the mean over the domain's classes. "
    "HD95 is MONAI's definition (95th percentile of distances between surface-voxel centres, each surface voxel "
    "counted once), not BraTS 2023's (DeepMind surface-distance: voxel-boundary surface elements, area-weighted "
    "percentile); a case where exactly one of prediction and ground truth is empty has no HD95: it is left out "
    "of the mean and counted as \"n/a\" (BraTS would score it 374 mm); both empty: 0 mm. Lesion-wise: protocol "
    "brats2023, BraTS 2023 style (GT lesions dilated for matching, lesions ≤ 2 mm³ ignored); a missed GT lesion "
    "(FN) or a false positive lesion (FP) scores Dice 0 and HD95 374 mm (per-lesion HD95 with the same MONAI "
    "definition); F1 pooled over cases. Cross-domain FP: voxels and connected components predicted with labels of "
    "other domains."
)
BRATS2024_NOTE = (
    "Protocol: {protocol}. Dice and HD95 (voxel level): mean ± std over cases of the mean over the domain's classes, "
    "HD95 MONAI's definition (one side empty: n/a). Lesion-wise columns: **{lesion_protocol}**, the official BraTS "
    "2024+ package: lesions are connected components matched one to one (no dilation). mets parser: a missed "
    "GT lesion or a false positive scores Dice 0, NSD 0, HD95 373 mm, GT lesions < 20 mm³ count for detection "
    "only (TP if matched with Dice ≥ 0.1), a case without a (large) GT lesion has no lesion-wise score (left out "
    "of the mean, counted n/a); seg parser: panoptica's means over matched lesions (misses and false positives "
    "count in TP/FN/FP only). Lesion-wise Dice/NSD/HD95: mean ± std over cases of the package's per-case values; "
    "TP/FN/FP (all lesion sizes) pooled over cases, precision/recall/F1 from the pooled counts. Not comparable "
    "with the brats2023 protocol's numbers. Cross-domain FP: voxels and connected components predicted with "
    "labels of other domains."
)


def domain_targets(dom: DomainInfo) -> tuple[dict[str, list[int]], dict[str, list[int]]]:
    """(classes, regions) of a domain as name -> union ids; a region is the union of its member classes."""
    classes = {name: [int(uid)] for name, uid in dom.labels.items()}
    regions = {name: sorted({int(dom.labels[c]) for c in members}) for name, members in dom.regions.items()}
    return classes, regions


def headline_lesion_target(dom: DomainInfo) -> str | None:
    """The lesion-wise target shown in the domain table: the class or region covering the most union ids
    (a binary metastasis domain: its class; BraTS-like: WT). ``None`` for domains without lesion-wise metrics."""
    if not dom.lesion_wise:
        return None
    classes, regions = domain_targets(dom)
    targets = {**classes, **regions}
    return max(targets, key=lambda k: len(targets[k])) if targets else None


def union_label_names(meta: UniversalMeta) -> dict[int, str]:
    """Union id -> ``domain.class`` (ids shared by identical classes list every owner, joined by ``=``)."""
    names: dict[int, list[str]] = {}
    for dname, dom in meta.domains.items():
        for cname, uid in dom.labels.items():
            names.setdefault(int(uid), []).append(f"{dname}.{cname}")
    return {uid: "=".join(v) for uid, v in sorted(names.items())}


def cross_domain_fp(pred: np.ndarray, domain: str, meta: UniversalMeta, spacing: Sequence[float]) -> dict[str, Any]:
    """Voxels, volume (mL) and connected components predicted with union ids that ``domain`` does not annotate.

    ``by_label`` breaks the voxels down by union label (``domain.class`` names; unknown ids as ``id:N``).
    """
    foreign = ~np.isin(pred, [0, *meta.domain_label_ids(domain)])
    n_vox = int(foreign.sum())
    by_label: dict[str, int] = {}
    if n_vox:
        names = union_label_names(meta)
        ids, counts = np.unique(pred[foreign], return_counts=True)
        by_label = {names.get(int(i), f"id:{int(i)}"): int(c) for i, c in zip(ids, counts, strict=True)}
    return {"voxels": n_vox, "ml": n_vox * float(np.prod(spacing)) / 1000.0,
            "lesions": count_components(foreign), "by_label": by_label}


def evaluate_case(pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float], domain: str, meta: UniversalMeta,
                  lesion_config: LesionConfig | None = None, lesion_protocol: str = "brats2023",
                  brats2024_parser: str = "auto") -> dict[str, Any]:
    """Score one case's union-space label map against its ground truth.

    Args:
        pred, gt: integer label maps of equal shape ``(*spatial)`` (2D or 3D), union label ids.
        spacing: voxel size per array axis in mm (SimpleITK arrays are (z, y, x): pass ``GetSpacing()[::-1]``).
        domain: the case's domain in ``meta``.
        meta: the merged dataset's universal metadata.
        lesion_config: lesion-wise matching parameters of the brats2023 protocol (default: BraTS-METS).
        lesion_protocol: ``brats2023`` (:func:`lesion_wise`) or ``brats2024`` (the official package, see
            :mod:`~nnunet_universal.evaluation.brats2024`; raises ``Brats2024Unavailable`` when not installed).
        brats2024_parser: the official parser for brats2024 (``auto``, ``mets``, ``seg``).

    Returns:
        ``{"domain", "spacing", "classes": {name: {"ids", "dice", "hd95"}}, "regions": {…same…},
        "lesions": {target: lesion_wise(...) or the official columns}, "mean_dice", "mean_hd95",
        "cross_domain_fp": {...}}``.
        Dice follows :func:`~nnunet_universal.evaluation.metrics.dice` (1.0 when both empty), HD95 is NaN where
        exactly one side is empty.
    """
    if domain not in meta.domains:
        raise MetadataError(f"unknown domain {domain!r}; this dataset has {meta.domain_names}")
    if lesion_protocol not in LESION_PROTOCOLS:
        raise ValueError(f"lesion protocol {lesion_protocol!r} is not one of {LESION_PROTOCOLS}")
    pred, gt = np.asarray(pred), np.asarray(gt)
    if pred.shape != gt.shape:
        raise ValueError(f"prediction and ground truth differ in shape: {pred.shape} vs {gt.shape}")
    if len(spacing) != pred.ndim:
        raise ValueError(f"spacing {tuple(spacing)} has {len(spacing)} values for a {pred.ndim}-D label map")
    dom = meta.domains[domain]
    classes, regions = domain_targets(dom)
    out: dict[str, Any] = {"domain": domain, "spacing": [float(s) for s in spacing]}
    masks: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for kind, targets in (("classes", classes), ("regions", regions)):
        out[kind] = {}
        for name, ids in targets.items():
            p, g = np.isin(pred, ids), np.isin(gt, ids)
            masks[name] = (p, g)
            out[kind][name] = {"ids": ids, "dice": dice(p, g), "hd95": hd95(p, g, spacing)}
    out["lesions"] = {}
    if dom.lesion_wise and lesion_protocol == "brats2024":
        from nnunet_universal.evaluation.brats2024 import lesion_wise_brats2024, parser_for

        targets = {**{n: (ids, False) for n, ids in classes.items()}, **{n: (ids, True) for n, ids in regions.items()}}
        out["lesions"] = lesion_wise_brats2024(pred, gt, spacing, targets, meta.domain_label_ids(domain),
                                               parser_for(domain, dom.source, brats2024_parser))
    elif dom.lesion_wise:
        for name, (p, g) in masks.items():
            out["lesions"][name] = lesion_wise(p, g, spacing, lesion_config)
    class_dice = [v["dice"] for v in out["classes"].values()]
    class_hd = [v["hd95"] for v in out["classes"].values() if math.isfinite(v["hd95"])]
    out["mean_dice"] = float(np.mean(class_dice)) if class_dice else math.nan
    out["mean_hd95"] = float(np.mean(class_hd)) if class_hd else math.nan
    out["cross_domain_fp"] = cross_domain_fp(pred, domain, meta, spacing)
    return out


def summarize(cases: list[dict[str, Any]], meta: UniversalMeta) -> dict[str, Any]:
    """Aggregate :func:`evaluate_case` results per domain (in ``meta``'s domain order).

    Means/stds are over cases (HD95: over cases where it is defined, ``n_excluded`` counts the rest); lesion
    detection precision/recall/F1 pool the TP/FN/FP counts of all cases of the domain. Cases carrying a
    ``routing`` entry (``mode``, ``inferred_domain``) add per-domain routing accuracy and a confusion matrix
    over dataset-free cases.
    """
    domains: dict[str, Any] = {}
    for dname, dom in meta.domains.items():
        rows = [c for c in cases if c["domain"] == dname]
        if not rows:
            continue
        classes, regions = domain_targets(dom)
        d: dict[str, Any] = {"n_cases": len(rows), "dice": stats(c["mean_dice"] for c in rows),
                             "hd95": stats(c["mean_hd95"] for c in rows)}
        for kind, targets in (("classes", classes), ("regions", regions)):
            d[kind] = {name: {"ids": ids, "dice": stats(c[kind][name]["dice"] for c in rows),
                              "hd95": stats(c[kind][name]["hd95"] for c in rows)} for name, ids in targets.items()}
        d["lesions"] = {}
        for name in (list(classes) + list(regions)) if dom.lesion_wise else []:
            per = [c["lesions"][name] for c in rows]
            if "parser" in per[0]:  # brats2024: the official package's per-case columns
                d["lesions"][name] = _summarize_brats2024(per)
                continue
            pooled = {k: int(sum(x[k] for x in per)) for k in _LESION_COUNTS}
            d["lesions"][name] = {"lesion_dice": stats(x["lesion_dice"] for x in per),
                                  "lesion_hd95": stats(x["lesion_hd95"] for x in per), **pooled,
                                  **detection_scores(pooled["tp"], pooled["fn"], pooled["pred_matched"],
                                                     pooled["n_pred"])}
        d["lesion_headline"] = headline_lesion_target(dom)
        xfp = [c["cross_domain_fp"] for c in rows]
        d["cross_domain_fp"] = {"voxels_total": int(sum(x["voxels"] for x in xfp)),
                                "voxels_per_case": stats(x["voxels"] for x in xfp),
                                "ml_total": float(sum(x["ml"] for x in xfp)),
                                "lesions_total": int(sum(x["lesions"] for x in xfp)),
                                "cases_with_fp": int(sum(x["voxels"] > 0 for x in xfp))}
        routed = [c["routing"] for c in rows if c.get("routing") and c["routing"]["mode"] == "dataset-free"]
        d["routing"] = ({"n": len(routed), "correct": sum(r["inferred_domain"] == dname for r in routed),
                         "accuracy": sum(r["inferred_domain"] == dname for r in routed) / len(routed)}
                        if routed else None)
        domains[dname] = d
    return {"n_cases": len(cases), "domains": domains, "routing": routing_confusion(cases, meta),
            "per_case": [per_label_metrics(c) for c in cases]}


def _summarize_brats2024(per: list[dict[str, Any]]) -> dict[str, Any]:
    """Domain summary of one target's official BraTS 2024+ columns: means over cases (NaN: n/a), pooled counts."""
    counts = {k: int(sum(x[f"all_instance_{k}"] for x in per)) for k in ("tp", "fn", "fp")}
    out = {"protocol": "brats2024", "parser": per[0]["parser"],
           "lesion_dice": stats(x["lesionwise_dsc_mean"] for x in per),
           "lesion_nsd": stats(x["lesionwise_nsd_mean"] for x in per),
           "lesion_hd95": stats(x["lesionwise_hd95_mean"] for x in per),
           "case_f1": stats(x["all_instance_f1"] for x in per), **counts,
           **detection_scores(counts["tp"], counts["fn"], counts["tp"], counts["tp"] + counts["fp"])}
    if out["parser"] == "mets":
        for size in ("large", "small"):
            for k in ("tp", "fn"):
                out[f"{size}_{k}"] = int(sum(x[f"{size}_instance_{k}"] for x in per
                                             if math.isfinite(x[f"{size}_instance_{k}"])))
            out[f"{size}_f1"] = stats(x[f"{size}_instance_f1"] for x in per)
    return out


def per_label_metrics(case: dict[str, Any]) -> dict[str, Any]:
    """One :func:`evaluate_case` result in nnU-Net's ``metric_per_case`` shape: ``{"case", "domain", "metrics":
    {union id: {"Dice", "HD95"}}}`` over the classes the case's domain annotates (HD95 None where undefined)."""
    metrics = {str(v["ids"][0]): {"Dice": v["dice"], "HD95": v["hd95"] if math.isfinite(v["hd95"]) else None}
               for v in case["classes"].values()}
    return {"case": case.get("case"), "domain": case["domain"], "metrics": metrics}


def routing_confusion(cases: list[dict[str, Any]], meta: UniversalMeta) -> dict[str, Any] | None:
    """Confusion matrix true domain (rows) x inferred domain (columns) over dataset-free routed cases.

    Oracle-mode routing records are not routing decisions and are only counted (``n_oracle``).
    ``None`` when no case has a routing record.
    """
    recs = [(c["domain"], c["routing"]) for c in cases if c.get("routing")]
    if not recs:
        return None
    free = [(t, r["inferred_domain"]) for t, r in recs if r["mode"] == "dataset-free"]
    labels = list(meta.domain_names) + sorted({i for _, i in free} - set(meta.domain_names))
    matrix = [[sum(1 for t, i in free if t == row and i == col) for col in labels] for row in labels]
    return {"labels": labels, "matrix": matrix, "n": len(free), "n_oracle": len(recs) - len(free),
            "accuracy": (sum(t == i for t, i in free) / len(free)) if free else None}


# ---- Markdown ---------------------------------------------------------------------------------------

def to_markdown(summary: dict[str, Any]) -> str:
    """Readable report of :func:`summarize`'s output: a per-domain table, a per-class/region table, routing."""
    lines = ["## Per-domain summary", "", *domain_table(summary)]
    b24 = summary.get("lesion_protocol") == "brats2024"
    note = BRATS2024_NOTE if b24 else TABLE_NOTE
    lines += ["", note.format(protocol=summary.get("protocol", PROTOCOL),
                              lesion_protocol=summary.get("lesion_protocol_detail", "brats2024")), "",
              "## Per class and region", "",
              "| domain | class / region | Dice | HD95 (mm) | lesion-wise Dice "
              + ("| lesion-wise NSD " if b24 else "") + "| lesion-wise HD95 (mm) "
              "| lesions TP / FN / FP | precision | recall | F1 |",
              "|---|---|---|---|---|---|---|---|---|---|" + ("---|" if b24 else "")]
    return _rest_of_markdown(summary, lines, b24)


def domain_table(summary: dict[str, Any]) -> list[str]:
    """The per-domain summary as Markdown table lines (what ``nnunet-universal evaluate`` prints)."""
    lines = ["| domain | cases | Dice | HD95 (mm) | lesion-wise Dice | lesion F1 | cross-domain FP voxels/case "
             "| cross-domain FP lesions | routing accuracy |",
             "|---|---:|---|---|---|---|---|---:|---|"]
    for dname, d in summary["domains"].items():
        head = d["lesion_headline"]
        les = d["lesions"].get(head) if head else None
        xfp = d["cross_domain_fp"]
        rt = d["routing"]
        lines.append("| " + " | ".join([
            dname, str(d["n_cases"]), _ms(d["dice"]), _ms(d["hd95"], 2),
            f"{_ms(les['lesion_dice'])} ({head})" if les else "–",
            f"{les['f1']:.3f} ({head})" if les else "–",
            _ms(xfp["voxels_per_case"], 1), str(xfp["lesions_total"]),
            f"{rt['accuracy']:.3f} ({rt['correct']}/{rt['n']})" if rt else "–"]) + " |")
    return lines


def _rest_of_markdown(summary: dict[str, Any], lines: list[str], b24: bool = False) -> str:
    for dname, d in summary["domains"].items():
        for kind in ("classes", "regions"):
            for name, t in d[kind].items():
                les = d["lesions"].get(name)
                label = name if kind == "classes" else f"{name} (region)"
                cells = [dname, label, _ms(t["dice"]), _ms(t["hd95"], 2)]
                if les:
                    cells += [_ms(les["lesion_dice"]), *([_ms(les["lesion_nsd"])] if b24 else []),
                              _ms(les["lesion_hd95"], 1), f"{les['tp']} / {les['fn']} / {les['fp']}",
                              f"{les['precision']:.3f}", f"{les['recall']:.3f}", f"{les['f1']:.3f}"]
                else:
                    cells += ["–"] * (7 if b24 else 6)
                lines.append("| " + " | ".join(cells) + " |")
    rc = summary.get("routing")
    if rc and rc["n"]:
        lines += ["", f"## Routing (dataset-free, {rc['n']} cases, accuracy {rc['accuracy']:.3f})", "",
                  "| true \\ inferred | " + " | ".join(rc["labels"]) + " |",
                  "|---|" + "---:|" * len(rc["labels"])]
        lines += [f"| {row} | " + " | ".join(str(v) for v in counts) + " |"
                  for row, counts in zip(rc["labels"], rc["matrix"], strict=True) if any(counts)]
    missing = summary.get("missing_predictions") or []
    if missing:
        lines += ["", f"**{len(missing)} ground-truth case(s) without a prediction (not scored):** "
                  + ", ".join(missing)]
    return "\n".join(lines) + "\n"


def _ms(s: dict[str, Any], digits: int = 3) -> str:
    """'mean ± std' of a :func:`stats` dict, with the count of excluded (undefined) values."""
    if s["mean"] is None:
        text = "–"
    else:
        text = f"{s['mean']:.{digits}f} ± {s['std']:.{digits}f}"
    return text + (f" ({s['n_excluded']} n/a)" if s["n_excluded"] else "")
