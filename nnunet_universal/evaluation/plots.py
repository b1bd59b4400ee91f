"""PNG plots of an evaluation: per-domain Dice box plots and the routing confusion matrix (matplotlib, Agg)."""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path
from typing import Any


def _pyplot():
    """matplotlib.pyplot on the non-interactive Agg backend (imported lazily: no display, fast CLI start)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> Path:
    """Write a figure atomically (temp file in the same folder, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
        _pyplot().close(fig)
    return path


def dice_boxplots(cases: list[dict[str, Any]], domains: list[str], path: Path) -> Path:
    """One panel per domain with a box of per-case Dice for each class and region (regions marked ``[R]``)."""
    plt = _pyplot()
    domains = [d for d in domains if any(c["domain"] == d for c in cases)]
    if not domains:
        raise ValueError("no evaluated case to plot")
    ncols = min(len(domains), 3)
    nrows = math.ceil(len(domains) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.5 * ncols, 3.6 * nrows), squeeze=False)
    for ax, dname in zip(axes.flat, domains, strict=False):
        rows = [c for c in cases if c["domain"] == dname]
        names = list(rows[0]["classes"]) + list(rows[0]["regions"])
        data = [[c["classes"][n]["dice"] if n in c["classes"] else c["regions"][n]["dice"] for c in rows]
                for n in names]
        ax.boxplot(data, showmeans=True)
        ax.set_xticks(range(1, len(names) + 1),
                      [n if n in rows[0]["classes"] else f"{n} [R]" for n in names], rotation=30, ha="right")
        ax.set_ylim(-0.02, 1.02)
        ax.set_ylabel("Dice")
        ax.set_title(f"{dname} (n={len(rows)})")
        ax.grid(axis="y", alpha=0.3)
    for ax in list(axes.flat)[len(domains):]:
        ax.axis("off")
    fig.suptitle("Per-case Dice per class and region")
    fig.tight_layout()
    return _save(fig, path)


def routing_confusion_plot(confusion: dict[str, Any], path: Path) -> Path:
    """Heat map of the routing confusion matrix (rows: true domain, columns: inferred domain), with counts."""
    plt = _pyplot()
    labels, matrix = confusion["labels"], confusion["matrix"]
    n = len(labels)
    fig, ax = plt.subplots(figsize=(1.2 * n + 2.5, 1.0 * n + 1.8))
    im = ax.imshow(matrix, cmap="Blues", vmin=0)
    top = max((max(r) for r in matrix), default=0)
    for i in range(n):
        for j in range(n):
            ax.text(j, i, str(matrix[i][j]), ha="center", va="center",
                    color="white" if top and matrix[i][j] > top / 2 else "black")
    ax.set_xticks(range(n), labels, rotation=30, ha="right")
    ax.set_yticks(range(n), labels)
    ax.set_xlabel("inferred domain")
    ax.set_ylabel("true domain")
    acc = confusion.get("accuracy")
    ax.set_title(f"Dataset-free routing (n={confusion['n']}" + (f", accuracy {acc:.2f})" if acc is not None else ")"))
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    return _save(fig, path)
