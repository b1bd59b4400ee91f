"""Load a case's volumes and check them: readable, finite, not constant, one geometry, known label values.

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
from nnunet_universal.nifti_integrity import CorruptImageError, is_nifti, verify_nifti

_ATOL, _RTOL = 1e-4, 1e-5
_ROUND_TOL = 1e-3  # labels within 1e-3 of a table value are rounded


def _unreadable(path: str, case: str, e: Exception) -> ConversionError:
    first = str(e).strip().splitlines()[-1] if str(e).strip() else repr(e)
    return ConversionError(f"cannot be read as an image ({first[:200]})", case=case, file=path,
                           fix="re-download or re-export the file (it may be truncated or not an image)")


def _split_channels(img: sitk.Image) -> list[sitk.Image]:
    """A 3D image -> [img]; a 4D image -> one 3D image per index of its last axis."""
    if img.GetDimension() == 4:
        return [img[:, :, :, k] for k in range(img.GetSize()[3])]
    return [img]


def _read_float_nifti(path: str, info: sitk.ImageFileReader, raw: bytes | None = None) -> list[sitk.Image]:
    """Float NIfTI through nibabel: ITK's NIfTI reader silently turns NaN/Inf into 0, which would hide them.

    ``raw``: the file's (decompressed) bytes when the integrity check kept them (decompressed once, not twice).
    Voxel order is the file's in both libraries; geometry comes from ITK's header reading (LPS).
    """
    import nibabel as nib

    if raw is None:
        nii = nib.load(path)
    else:
        nifti1 = raw[:4] in (b"\x5c\x01\x00\x00", b"\x00\x00\x01\x5c")  # sizeof_hdr 348: NIfTI-1
        nii = (nib.Nifti1Image if nifti1 else nib.Nifti2Image).from_bytes(raw)
    data = np.asanyarray(nii.dataobj)
    if data.dtype == np.float64 and nii.get_data_dtype() == np.float32:
        data = data.astype(np.float32)
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim not in (3, 4):
        raise ConversionError(f"is {data.ndim}D with shape {data.shape}, expected a 3D volume", file=path,
                              fix="export one 3D volume per sequence")
    dim = info.GetDimension()
    direction = tuple(np.array(info.GetDirection()).reshape(dim, dim)[:3, :3].ravel())
    out = []
    for v in ([data] if data.ndim == 3 else [data[..., k] for k in range(data.shape[3])]):
        img = sitk.GetImageFromArray(np.ascontiguousarray(v.T))  # (x, y, z) file order -> ITK's (z, y, x) array
        img.SetSpacing(info.GetSpacing()[:3])
        img.SetOrigin(info.GetOrigin()[:3])
        img.SetDirection(direction)
        out.append(img)
    return out


def _read(path: str, case: str) -> list[sitk.Image]:
    """All 3D volumes of a file (one, or one per channel of a 4D file)."""
    try:
        if is_nifti(path):
            # ITK reads a cut-off file and fills the rest with zeros: check the gzip trailer / file size first
            checked = verify_nifti(path, keep="float")
            info = sitk.ImageFileReader()
            info.SetFileName(path)
            info.ReadImageInformation()
            if info.GetPixelID() in (sitk.sitkFloat32, sitk.sitkFloat64):
                return _read_float_nifti(path, info, checked.data)
        img = sitk.ReadImage(path)
    except CorruptImageError as e:
        raise ConversionError(f"cannot be read: it is truncated or corrupt ({e.problem})", case=case, file=path,
                              fix="re-download or re-copy the file (compare its size or checksum with the "
                                  "original), or remove the case") from None
    except ConversionError as e:
        raise ConversionError(e.problem, case=case, file=path, fix=e.fix) from None
    except Exception as e:  # ITK raises RuntimeError; nibabel, gzip and zlib raise their own
        raise _unreadable(path, case, e) from None
    if img.GetNumberOfComponentsPerPixel() != 1:
        raise ConversionError(f"has {img.GetNumberOfComponentsPerPixel()} components per voxel (vector/RGB image)",
                              case=case, file=path, fix="export a scalar (greyscale) 3D volume")
    if img.GetDimension() == 4 and img.GetSize()[3] == 1:
        img = img[:, :, :, 0]
    if img.GetDimension() not in (3, 4):
        raise ConversionError(f"is {img.GetDimension()}D with size {img.GetSize()}, expected a 3D volume",
                              case=case, file=path, fix="export one 3D volume per sequence")
    return _split_channels(img)


def _load_png_stack(ref: ImageRef, case: str) -> sitk.Image:
    from PIL import Image, UnidentifiedImageError

    slices = []
    for f in ref.source_files:
        try:
            with Image.open(f) as im:
                arr = np.asarray(im)
        except (OSError, UnidentifiedImageError) as e:
            raise ConversionError(f"cannot be read as a PNG slice ({e})", case=case, file=f,
                                  fix="re-download the slice or remove the case") from None
        if arr.ndim == 3:  # greyscale stored as RGB(A): identical channels expected
            if not all(np.array_equal(arr[..., 0], arr[..., c]) for c in range(1, min(3, arr.shape[-1]))):
                raise ConversionError("is a colour PNG, expected greyscale", case=case, file=f,
                                      fix="export greyscale slices")
            arr = arr[..., 0]
        if slices and arr.shape != slices[0].shape:
            raise ConversionError(f"slice size {arr.shape} differs from the folder's first slice "
                                  f"{slices[0].shape}", case=case, file=f, fix="re-export the slices of this folder")
        slices.append(arr)
    vol = sitk.GetImageFromArray(np.stack(slices, 0))  # (z, y, x): slice index is z
    vol.SetSpacing(tuple(float(s) for s in (ref.spacing or (1.0, 1.0, 1.0))))
    return vol


def load_ref(ref: ImageRef, case: str, cache: dict[str, list[sitk.Image]] | None = None) -> sitk.Image:
    """Read one volume of ``case`` (a 3D file, a channel of a 4D file, or a PNG slice folder)."""
    if ref.kind == "png":
        return _load_png_stack(ref, case)
    cache = {} if cache is None else cache
    if ref.path not in cache:
        cache[ref.path] = _read(ref.path, case)
    vols = cache[ref.path]
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


def check_voxels(img: sitk.Image, case: str, file: str, what: str) -> None:
    """NaN/Inf, empty and constant volumes are errors (a constant sequence is a failed export, not data)."""
    arr = sitk.GetArrayViewFromImage(img)
    if arr.size == 0:
        raise ConversionError(f"the {what} is empty (size {img.GetSize()})", case=case, file=file,
                              fix="re-export the sequence or remove the case")
    if np.issubdtype(arr.dtype, np.floating):
        finite = np.isfinite(arr)
        if not finite.all():
            n_nan, n_inf = int(np.isnan(arr).sum()), int(np.isinf(arr).sum())
            raise ConversionError(f"the {what} has {n_nan} NaN and {n_inf} Inf voxels", case=case, file=file,
                                  fix="replace them with a valid value (e.g. 0 or the background intensity) in a "
                                      "copy of the file, or remove the case")
    lo, hi = arr.min(), arr.max()
    if lo == hi:
        raise ConversionError(f"the {what} is constant (every voxel is {lo}): an empty or failed export",
                              case=case, file=file, fix="re-export the sequence, or remove it (optional sequences "
                                                        "are then zero-filled) or the case")


def geometry(img: sitk.Image) -> dict[str, list[float]]:
    return {"size": list(img.GetSize()), "spacing": list(img.GetSpacing()), "origin": list(img.GetOrigin()),
            "direction": list(img.GetDirection())}


def check_geometry(ref: sitk.Image, ref_file: str, img: sitk.Image, file: str, case: str) -> bool:
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


def normalize_label(img: sitk.Image, table: LabelTable, case: str, file: str,
                    fix: str = "fix the label file, or map the values explicitly with --label-map VALUE=CLASS "
                               "(VALUE=background to drop one)") -> tuple[np.ndarray, bool]:
    """Map source label values to output ids.

    Returns the (z, y, x) uint8 (uint16 beyond 255 ids) array and whether the file's own values are already the
    output ids (integer dtype, identity table), in which case its bytes can be copied unchanged.
    """
    arr = sitk.GetArrayViewFromImage(img)
    if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
        raise ConversionError(f"the label map has {int((~np.isfinite(arr)).sum())} NaN/Inf voxels", case=case,
                              file=file, fix="fix the label file (every voxel needs a class value)")
    if table.binary:
        return (arr != 0).astype(np.uint8), False
    integer = np.issubdtype(arr.dtype, np.integer)
    if integer and arr.min() >= 0 and arr.max() < 65536:
        present = np.flatnonzero(np.bincount(arr.ravel().astype(np.int64, copy=False)))
        rounded = arr
    else:
        values = np.unique(arr)
        near = np.round(values)
        far = values[np.abs(values - near) > _ROUND_TOL]
        if far.size:
            raise ConversionError(
                f"label values {far[:10].tolist()} are not within {_ROUND_TOL} of an integer "
                f"(interpolated or non-label image?)", case=case, file=file,
                fix="use the original (nearest-neighbour) label file")
        present = near.astype(np.int64)
        rounded = np.rint(arr).astype(np.int64)
        integer = False
    unknown = sorted(set(present.tolist()) - set(table.values))
    if unknown:
        raise ConversionError(
            f"label values {unknown[:10]} are not in the label table ({table.describe()})", case=case,
            file=file, fix=fix)
    dtype = np.uint8 if max(table.values.values()) < 256 else np.uint16
    lut = np.zeros(max(max(table.values), int(present.max(initial=0))) + 1, dtype=dtype)
    for v, o in table.values.items():
        lut[v] = o
    out = lut[rounded]
    return out, integer and table.is_identity()


def relpath_or_abs(path: str | Path, root: Path) -> str:
    """Path relative to ``root`` when lexically inside it (provenance stays valid when the tree moves)."""
    rel = os.path.relpath(os.path.abspath(path), os.path.abspath(root))
    return rel if not rel.startswith("..") else os.path.abspath(path)
