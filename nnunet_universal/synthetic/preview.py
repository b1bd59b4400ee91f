"""PNG preview of a synthetic dataset: one axial slice per sequence, raw and with the native labels overlaid."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from nnunet_universal.atomic_io import atomic_write_bytes
from nnunet_universal.synthetic.case import CaseData
from nnunet_universal.synthetic.grid import LPS_FLIPS, to_storage
from nnunet_universal.synthetic.writers import NativeWriter

_COLORS = ("#ff2a2a", "#2adf2a", "#ffd700", "#2a8cff")


def _display(vol: np.ndarray, k: int) -> np.ndarray:
    """Axial slice ``k`` of a RAS-ordered volume in radiological view (anterior up, patient right on the left)."""
    return to_storage(vol, LPS_FLIPS)[:, :, k].T


def _coronal(vol: np.ndarray, j: int) -> np.ndarray:
    """Coronal slice ``j`` of a RAS-ordered volume: superior up, patient right on the left."""
    return to_storage(vol, LPS_FLIPS)[:, vol.shape[1] - 1 - j, ::-1].T


def _window(img: np.ndarray, ct: bool) -> tuple[float, float]:
    if ct:
        return -160.0, 240.0  # abdominal soft-tissue window W400 / L40
    fg = img[img != 0]
    if fg.size == 0:
        return 0.0, 1.0
    lo, hi = np.percentile(fg, [0.5, 99.5])
    return float(lo), float(max(hi, lo + 1e-6))


def write_preview(path: Path, source: str, cases: list[CaseData], writer: NativeWriter) -> Path:
    """Write a PNG with, per case (at most two), one row of raw slices and one row with labels overlaid.

    The slice is the axial slice with the most lesion (or, without lesions, foreground-label) voxels; the
    overlay shows the labels in the source's own protocol and values, as written to disk.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import ListedColormap
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    shown = cases[:2]
    ct = source == "lits"
    ncol = max(len(c.images) for c in shown) + (1 if ct else 0)  # CT: add a coronal view (slice thickness)
    fig = Figure(figsize=(2.7 * max(ncol, 2), 2.9 * 2 * len(shown) + 0.8), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(2 * len(shown), max(ncol, 2), squeeze=False)
    values = sorted(v for v in writer.label_names if v != 0)
    cmap = ListedColormap(_COLORS[: len(values)])
    for ax in axes.ravel():
        ax.set_axis_off()
    for r, case in enumerate(shown):
        native = writer.native_labels(case.labels)
        per_slice = (native == values[-1]).sum((0, 1)) if ct else (native > 0).sum((0, 1))
        if per_slice.max() == 0:
            per_slice = (native > 0).sum((0, 1))
        k = int(np.argmax(per_slice)) if per_slice.max() > 0 else case.grid.shape[2] // 2
        sp = case.grid.spacing
        views = [(name, _display(vol, k), _display(native, k), sp[1] / sp[0], f"axial {k}")
                 for name, vol in case.images.items()]
        if ct:
            name, vol = next(iter(case.images.items()))
            hit = (native == values[-1]).sum((0, 2))
            j = int(np.argmax(hit)) if hit.max() > 0 else vol.shape[1] // 2
            views.append((name, _coronal(vol, j), _coronal(native, j), sp[2] / sp[0], f"coronal {j}"))
        for col, (name, img, lab, aspect, where) in enumerate(views):
            top, bottom = axes[2 * r, col], axes[2 * r + 1, col]
            vmin, vmax = _window(img, ct)
            for ax in (top, bottom):
                ax.imshow(img, cmap="gray", vmin=vmin, vmax=vmax, interpolation="nearest", aspect=aspect)
            masked = np.ma.masked_where(lab == 0, np.searchsorted(values, lab).astype(float))
            bottom.imshow(masked, cmap=cmap, vmin=-0.5, vmax=len(values) - 0.5, alpha=0.45,
                          interpolation="nearest", aspect=aspect)
            top.set_title(f"{case.case_id}: {name}\n{where}" if col == 0 else f"{name}\n{where}", fontsize=8)
    handles = [Patch(color=_COLORS[i], label=f"{v} {writer.label_names[v]}") for i, v in enumerate(values)]
    fig.legend(handles=handles, loc="outside lower center", ncol=len(handles), fontsize=8, frameon=False)
    fig.suptitle(f"synthetic {source}: slice with most lesion, raw / labels overlaid", fontsize=9)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    atomic_write_bytes(Path(path), buf.getvalue())
    return Path(path)
