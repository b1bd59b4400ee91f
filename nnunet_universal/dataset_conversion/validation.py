"""Load a case's volumes and check them: readable, finite, not constant, one geometry, known label values.

Files are read through :mod:`.volume_read` (read once, integrity-checked, decompressed once).

Geometry tolerances: size must match exactly; spacing, origin (mm) and direction cosines within
``atol=1e-4`` (+ ``rtol=1e-5``), the same order as nnU-Net's ``np.allclose`` checks. Outputs are written with the
reference geometry so that nnU-Net's exact-ish checks pass.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from nnunet_universal.dataset_conversion.common import ConversionError
from nnunet_universal.dataset_conversion.spec import ImageRef, LabelTable
from nnunet_universal.dataset_conversion.volume_read import SourceFile, Volume, read_file, read_png

_ATOL, _RTOL = 1e-4, 1e-5
_ROUND_TOL = 1e-3  # labels within 1e-3 of a table value are rounded


def _load_png_stack(ref: ImageRef, case: str, cache: dict[str, SourceFile]) -> Volume:
    slices = []
    for f in ref.source_files:
        arr, sha = read_png(f, case)
        cache[f] = SourceFile(f, sha)  # hashed for provenance; nothing to copy
        if arr.ndim == 3:  # greyscale stored as RGB(A): identical channels expected
            if not all(np.array_equal(arr[..., 0], arr[..., c]) for c in range(1, min(3, arr.shape[-1]))):
                raise ConversionError("is a colour PNG, expected greyscale", case=case, file=f,
                                      fix="export greyscale slices")
            arr = arr[..., 0]
        if slices and arr.shape != slices[0].shape:
            raise ConversionError(f"slice size {arr.shape} differs from the folder's first slice "
                                  f"{slices[0].shape}", case=case, file=f, fix="re-export the slices of this folder")
        slices.append(arr)
    vol = np.stack(slices, 0)  # (z, y, x): slice index is z
    return Volume(vol, tuple(float(s) for s in (ref.spacing or (1.0, 1.0, 1.0))), (0.0, 0.0, 0.0),
                  tuple(np.eye(3).ravel().tolist()))


def load_ref(ref: ImageRef, case: str, cache: dict[str, SourceFile] | None = None,
             scratch: Path | None = None) -> Volume:
    """Read one volume of ``case`` (a 3D file, a channel of a 4D file, or a PNG slice folder).

    ``cache``: files read so far by path (each file is read and decompressed once; their sha256 is kept there).
    ``scratch``: a temp folder for header reads (:func:`volume_read.read_file`).
    """
    cache = {} if cache is None else cache
    if ref.kind == "png":
        return _load_png_stack(ref, case, cache)
    if ref.path not in cache:
        cache[ref.path] = read_file(ref.path, case, scratch)
    vols = cache[ref.path].volumes
    if ref.kind == "file":
        if len(vols) != 1:
            raise ConversionError(f"is 4D with {len(vols)} volumes, expected one 3D volume", case=case,
                                  file=ref.path, fix="export one 3D volume per sequence")
        return vols[0]
    if ref.kind == "channel":
        if ref.index >= len(vols):
            raise ConversionError(f"has {len(vols)} channel(s) on its last axis, expected at least {ref.index + 1} "
                                  "(as listed in the task's dataset.json)", case=case, file=ref.path,
                                  fix="check the file or the task's dataset.json 'modality'")
        return vols[ref.index]
    raise ValueError(f"unknown image reference kind {ref.kind!r}")


def _array(img: Volume | sitk.Image) -> np.ndarray:
    return img.array if isinstance(img, Volume) else sitk.GetArrayViewFromImage(img)


def check_voxels(img: Volume | sitk.Image, case: str, file: str, what: str) -> None:
    """NaN/Inf, empty and constant volumes are errors (a constant sequence is a failed export, not data)."""
    arr = _array(img)
    if arr.size == 0:
        raise ConversionError(f"the {what} is empty (size {img.GetSize()})", case=case, file=file,
                              fix="re-export the sequence or remove the case")
    lo, hi = arr.min(), arr.max()  # NaN propagates into both, an Inf is one of them: no separate finite pass
    if np.issubdtype(arr.dtype, np.floating) and not (np.isfinite(lo) and np.isfinite(hi)):
        n_nan, n_inf = int(np.isnan(arr).sum()), int(np.isinf(arr).sum())
        raise ConversionError(f"the {what} has {n_nan} NaN and {n_inf} Inf voxels", case=case, file=file,
                              fix="replace them with a valid value (e.g. 0 or the background intensity) in a "
                                  "copy of the file, or remove the case")
    if lo == hi:
        raise ConversionError(f"the {what} is constant (every voxel is {lo}): an empty or failed export",
                              case=case, file=file, fix="re-export the sequence, or remove it (optional sequences "
                                                        "are then zero-filled) or the case")


def geometry(img: Volume | sitk.Image | sitk.ImageFileReader) -> dict[str, list[float]]:
    return {"size": list(img.GetSize()), "spacing": list(img.GetSpacing()), "origin": list(img.GetOrigin()),
            "direction": list(img.GetDirection())}


def check_geometry(ref: Volume | sitk.Image, ref_file: str, img: Volume | sitk.Image | sitk.ImageFileReader,
                   file: str, case: str) -> bool:
    """Raise if ``img`` and ``ref`` differ beyond tolerance; return True if they are exactly equal."""
    a, b = geometry(ref), geometry(img)
    for key in ("size", "spacing", "origin", "direction"):
        same = a[key] == b[key] if key == "size" else np.allclose(a[key], b[key], atol=_ATOL, rtol=_RTOL)
        if not same:
            fmt = (lambda v: [round(x, 6) for x in v]) if key != "size" else list
            raise ConversionError(
                f"{key} mismatch: {fmt(b[key])} here vs {fmt(a[key])} in {ref_file}", case=case, file=file,
                fix="resample/re-register the file onto the grid of the case's other files (e.g. with "
                    "SimpleITK.Resample), or remove the case")
    return a == b


def normalize_label(img: Volume | sitk.Image, table: LabelTable, case: str, file: str,
                    fix: str = "fix the label file, or map the values explicitly with --label-map VALUE=CLASS "
                               "(VALUE=background to drop one)") -> tuple[np.ndarray, bool]:
    """Map source label values to output ids.

    Returns the (z, y, x) uint8 (uint16 from 255 ids on) array and whether the file's own values are already the
    output ids (integer dtype, identity table), in which case its bytes can be copied unchanged. Integer maps take
    one min/max pass and, unless the table is the identity on every value present, one lookup pass.
    """
    arr = _array(img)
    if np.issubdtype(arr.dtype, np.floating) and not (np.isfinite(arr.min()) and np.isfinite(arr.max())):
        raise ConversionError(f"the label map has {int((~np.isfinite(arr)).sum())} NaN/Inf voxels", case=case,
                              file=file, fix="fix the label file (every voxel needs a class value)")
    if table.binary:
        return (arr != 0).astype(np.uint8), False
    ids = table.values
    dtype = np.uint8 if max(ids.values()) < 255 else np.uint16  # the largest value marks unknown source values
    unknown_id = np.iinfo(dtype).max
    integer = np.issubdtype(arr.dtype, np.integer)
    values = arr
    if not integer:  # float labels: every voxel within _ROUND_TOL of an integer, which it then is
        values = np.rint(arr)
        off = np.abs(arr - values) > _ROUND_TOL
        if off.any():
            raise ConversionError(
                f"label values {np.unique(arr[off])[:10].tolist()} are not within {_ROUND_TOL} of an integer "
                f"(interpolated or non-label image?)", case=case, file=file,
                fix="use the original (nearest-neighbour) label file")
    lo = 0 if np.issubdtype(arr.dtype, np.unsignedinteger) else int(values.min())
    hi = int(values.max())
    covered = lo >= 0 and all(v in ids for v in range(lo, hi + 1))  # every value in [lo, hi] has an output id
    if integer and covered and table.is_identity():  # the file already holds the output ids: no lookup pass
        return (arr if arr.dtype == dtype else arr.astype(dtype)), True
    if lo >= 0 and hi < 256 and dtype == np.uint8:  # one bytes.translate pass (5x a NumPy fancy-index lookup)
        small = values if values.dtype == np.uint8 else values.astype(np.uint8)
        table_bytes = bytearray([unknown_id]) * 256
        for v, o in ids.items():
            if 0 <= v < 256:
                table_bytes[v] = o
        out = np.frombuffer(np.ascontiguousarray(small).tobytes().translate(table_bytes), np.uint8).reshape(arr.shape)
    elif lo >= 0 and hi < 65536:
        lut = np.full(hi + 1, unknown_id, dtype)
        for v, o in ids.items():
            if 0 <= v <= hi:
                lut[v] = o
        out = lut[values if integer else values.astype(np.int64)]
    else:  # negative or very large values: sorted lookup
        present = np.unique(values)
        _unknown_values(sorted(set(present.astype(np.int64).tolist()) - set(ids)), table, case, file, fix)
        keys = np.array(sorted(ids), dtype=np.int64)
        return np.array([ids[k] for k in keys.tolist()], dtype)[np.searchsorted(keys, values)], False
    if not covered and (bad := out == unknown_id).any():
        _unknown_values(np.unique(values[bad]).astype(np.int64).tolist(), table, case, file, fix)
    return out, integer and table.is_identity()


def _unknown_values(unknown: list[int], table: LabelTable, case: str, file: str, fix: str) -> None:
    if unknown:
        raise ConversionError(f"label values {unknown[:10]} are not in the label table ({table.describe()})",
                              case=case, file=file, fix=fix)


def relpath_or_abs(path: str | Path, root: Path) -> str:
    """Path relative to ``root`` when lexically inside it (provenance stays valid when the tree moves)."""
    rel = os.path.relpath(os.path.abspath(path), os.path.abspath(root))
    return rel if not rel.startswith("..") else os.path.abspath(path)
