"""End-of-run summaries of ``convert`` and ``merge``, read back from what the run wrote (dataset.json, reports).

Reading the written files (not the run's in-memory state) means a resumed or no-op rerun prints the same summary
as the run that did the work.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any


def _read(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def _skipped_line(root: Path, skipped: list[str]) -> str:
    if not skipped:
        return "skipped: none"
    shown = ", ".join(skipped[:5]) + (", …" if len(skipped) > 5 else "")
    return f"skipped: {len(skipped)} case(s) ({shown}); why and what to do: {root / 'conversion_report.md'}"


def _spacing_line(options: dict[str, Any]) -> str | None:
    spacing = options.get("spacing_mm")
    if not spacing:
        return None
    if isinstance(spacing, dict):  # per case, from a synthetic dataset's spacing file
        values = sorted({tuple(v) for v in spacing.values()})
        lo, hi = values[0], values[-1]
        text = " x ".join(f"{a:g}" if a == b else f"{a:g}-{b:g}" for a, b in zip(lo, hi, strict=True))
    else:
        text = " x ".join(f"{v:g}" for v in spacing)
    return f"voxel spacing: {text} mm ({options.get('spacing_source', 'unknown source')})"


def convert_summary(root: Path) -> list[str]:
    """Lines describing a converted dataset: cases converted and skipped (with the report), spacing, folder."""
    uni = _read(root / "dataset.json").get("universal", {})
    prov = uni.get("provenance", {})
    cases = uni.get("cases", {})
    domains = uni.get("domains", {})
    dom, info = next(iter(domains.items()), ("?", {}))
    lines = [f"converted {len(cases)} case(s) of {prov.get('source', '?')} (domain {dom}; slots "
             f"{', '.join(uni.get('slots', []))}; classes {', '.join(info.get('labels', {}))})",
             _skipped_line(root, list(prov.get("skipped_cases", [])))]
    spacing = _spacing_line(prov.get("options", {}))
    if spacing:
        lines.append(spacing)
    lines.append(f"output: {root}")
    return lines


def merge_summary(root: Path) -> list[str]:
    """Lines describing a merged dataset: cases and held-out cases per domain, folds, skipped cases, folder."""
    dj = _read(root / "dataset.json")
    uni = dj.get("universal", {})
    cases = uni.get("cases", {})
    train = Counter(c["domain"] for c in cases.values() if c.get("split") == "train")
    test = Counter(c["domain"] for c in cases.values() if c.get("split") == "test")
    width = max([len(d) for d in uni.get("domains", {})] + [6])
    lines = [f"merged {len(uni.get('domains', {}))} domain(s), {len(cases)} case(s), "
             f"{len(uni.get('slots', []))} channel(s) ({', '.join(uni.get('slots', []))}), "
             f"{len(dj.get('labels', {})) - 1} union class(es):",
             f"  {'domain':<{width}}  train  held out"]
    for d in uni.get("domains", {}):
        lines.append(f"  {d:<{width}}  {train[d]:>5}  {test[d]:>8}")
    splits = root / "splits_final.json"
    if splits.is_file():
        n = len(json.loads(splits.read_text()))
        lines.append(f"folds: {n} in splits_final.json (patient groups kept together)")
    else:
        lines.append("folds: no splits_final.json (no domain has two patient groups to validate; nnU-Net makes its own "
                     "random split)")
    lines.append(_skipped_line(root, list(uni.get("provenance", {}).get("skipped_cases", []))))
    lines.append(f"output: {root} (held-out cases in imagesTs/ + labelsTs/)" if sum(test.values())
                 else f"output: {root}")
    return lines
