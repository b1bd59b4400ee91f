"""PNG plots of an evaluation: per-domain Dice box plots and the routing confusion matrix (matplotlib, Agg).

Every figure is drawn inside :func:`plot_style`: matplotlib's defaults plus this module's few settings, whatever
the process changed before (nnU-Net's training code sets global rcParams, e.g. ``font.size`` for its
``progress.png``; the demo draws these plots in the same process). Figures have explicit sizes and use
constrained layout, so that titles and tick labels are never clipped or overlapping.
"""

from __future__ import annotations

import contextlib
import math
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

#: rcParams on top of matplotlib's defaults for every plot of this package
STYLE: dict[str, Any] = {
    "font.size": 9, "axes.titlesize": 10, "axes.labelsize": 9, "xtick.labelsize": 8, "ytick.labelsize": 8,
    "legend.fontsize": 8, "figure.titlesize": 11, "figure.dpi": 100, "savefig.dpi": 120,
}


def _pyplot():
    """matplotlib.pyplot on the non-interactive Agg backend (imported lazily: no display, fast CLI start)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


@contextlib.contextmanager
def plot_style() -> Iterator[Any]:
    """matplotlib's default style plus :data:`STYLE`, for the duration of the block; yields pyplot."""
    plt = _pyplot()
    import matplotlib

    with matplotlib.rc_context():  # restores the caller's rcParams afterwards
        matplotlib.rcdefaults()
        matplotlib.rcParams.update(STYLE)
        yield plt


def save_figure(fig: Any, path: Path) -> Path:
    """Write a figure atomically (temp file in the same folder, then rename) and close it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, format="png")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
        _pyplot().close(fig)
    return path


def boxplot_series(rows: list[dict[str, Any]]) -> list[tuple[str, list[float]]]:
    """(label, per-case Dice) of each class, then each region, of one domain's evaluated cases.

    Regions are labelled ``NAME (region)`` and read from ``case["regions"]`` even when a class has the same name
    (LiTS's ``liver`` region is liver + tumour, its ``liver`` class is not).
    """
    first = rows[0]
    out = [(name, [c["classes"][name]["dice"] for c in rows]) for name in first["classes"]]
    out += [(f"{name} (region)", [c["regions"][name]["dice"] for c in rows]) for name in first["regions"]]
    return out


def dice_boxplots(cases: list[dict[str, Any]], domains: list[str], path: Path) -> Path:
    """One panel per domain with a box of per-case Dice for each class and region (:func:`boxplot_series`)."""
    domains = [d for d in domains if any(c["domain"] == d for c in cases)]
    if not domains:
        raise ValueError("no evaluated case to plot")
    ncols = min(len(domains), 3)
    nrows = math.ceil(len(domains) / ncols)
    with plot_style() as plt:
        fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.6 * nrows), squeeze=False,
                                 layout="constrained")
        for ax, dname in zip(axes.flat, domains, strict=False):
            rows = [c for c in cases if c["domain"] == dname]
            series = boxplot_series(rows)
            ax.boxplot([v for _, v in series], showmeans=True)
            ax.set_xticks(range(1, len(series) + 1), [label for label, _ in series], rotation=30, ha="right",
                          rotation_mode="anchor")
            ax.set_ylim(-0.02, 1.02)
            ax.set_ylabel("Dice")
            ax.set_title(f"{dname} (n={len(rows)})")
            ax.grid(axis="y", alpha=0.3)
        for ax in list(axes.flat)[len(domains):]:
            ax.axis("off")
        fig.suptitle("Per-case Dice per class and region")
        return save_figure(fig, path)


def routing_confusion_plot(confusion: dict[str, Any], path: Path) -> Path:
    """Heat map of the routing confusion matrix (rows: true domain, columns: inferred domain), with counts."""
    labels, matrix = confusion["labels"], confusion["matrix"]
    n = len(labels)
    side = max(4.5, 0.9 * n + 2.5)  # readable cells and room for long domain names
    with plot_style() as plt:
        fig, ax = plt.subplots(figsize=(side + 1.0, side), layout="constrained")
        im = ax.imshow(matrix, cmap="Blues", vmin=0)
        top = max((max(r) for r in matrix), default=0)
        for i in range(n):
            for j in range(n):
                ax.text(j, i, str(matrix[i][j]), ha="center", va="center",
                        color="white" if top and matrix[i][j] > top / 2 else "black")
        ax.set_xticks(range(n), labels, rotation=30, ha="right", rotation_mode="anchor")
        ax.set_yticks(range(n), labels)
        ax.set_xlabel("inferred domain")
        ax.set_ylabel("true domain")
        acc = confusion.get("accuracy")
        ax.set_title(f"Dataset-free routing (n={confusion['n']}" + (f", accuracy {acc:.2f})" if acc is not None
                                                                    else ")"))
        from matplotlib.ticker import MaxNLocator

        fig.colorbar(im, ax=ax, shrink=0.8, label="cases", ticks=MaxNLocator(integer=True))
        return save_figure(fig, path)
