"""Byte-deterministic, atomic file writing for the synthetic datasets (NIfTI, PNG, JSON, macOS junk).

Same content, same bytes: NIfTI is serialised in memory and gzip-compressed with ``mtime=0`` and no file
name in the gzip header (a temp file name there would differ from run to run), PNGs carry no time stamp.
Every file goes to a hidden, unique temp name in the target folder first and is moved into place with
``os.replace``; the final file gets the mode a plain ``open()`` would give it (``0o666 & ~umask``), not the
owner-only 0600 of ``tempfile.mkstemp``. The atomic writers themselves live in :mod:`nnunet_universal.atomic_io`
(shared with conversion, evaluation, metadata and scripts); they are re-exported here for old imports.
"""

from __future__ import annotations

import gzip
import io
import json
from pathlib import Path
from typing import Any

import numpy as np

from nnunet_universal.atomic_io import atomic_write_bytes, atomic_write_json, file_mode  # noqa: F401

#: Start of a macOS AppleDouble ("._name") file: magic, version, "Mac OS X" filler, no entries.
_APPLEDOUBLE = (b"\x00\x05\x16\x07\x00\x02\x00\x00" + b"Mac OS X        " + b"\x00\x00").ljust(4096, b"\x00")


def nifti_bytes(array: np.ndarray, affine: np.ndarray, dtype: np.dtype | type, compress: bool) -> bytes:
    """Serialise a NIfTI-1 image (qform = sform = ``affine``, code 1 "scanner", units mm) to bytes."""
    import nibabel as nib

    data = np.asarray(array).astype(dtype, copy=False)
    img = nib.Nifti1Image(data, affine)
    img.header.set_data_dtype(data.dtype)
    img.header.set_xyzt_units("mm", "sec")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    raw = img.to_bytes()
    return gzip.compress(raw, compresslevel=1, mtime=0) if compress else raw


def write_nifti(path: Path, array: np.ndarray, affine: np.ndarray, dtype: np.dtype | type) -> None:
    """Write ``array`` as ``dtype`` to ``path`` (``.nii`` or ``.nii.gz``), deterministically and atomically."""
    atomic_write_bytes(path, nifti_bytes(array, affine, dtype, compress=path.name.endswith(".gz")))


def write_png(path: Path, image: np.ndarray) -> None:
    """Write a 2D uint8 or uint16 greyscale image as PNG (rows = image rows)."""
    from PIL import Image

    buf = io.BytesIO()
    if image.dtype not in (np.uint8, np.uint16):
        raise TypeError(f"PNG slices must be uint8 or uint16, got {image.dtype} for {path}")
    Image.fromarray(np.ascontiguousarray(image)).save(buf, format="PNG")  # dtype picks mode L or I;16
    atomic_write_bytes(path, buf.getvalue())


def write_json(path: Path, obj: Any) -> None:
    """Pretty-printed JSON with a trailing newline."""
    atomic_write_bytes(path, (json.dumps(obj, indent=4) + "\n").encode())


def write_appledouble(path: Path) -> None:
    """The ``._<name>`` resource-fork file macOS leaves next to ``path`` in archives (converters must skip it)."""
    atomic_write_bytes(path.with_name("._" + path.name), _APPLEDOUBLE)
