"""Byte-deterministic, atomic file writing for the synthetic datasets (NIfTI, PNG, JSON, macOS junk).

Same content, same bytes: NIfTI is serialised in memory and gzip-compressed with ``mtime=0`` and no file
name in the gzip header (a temp file name there would differ from run to run), PNGs carry no time stamp.
Every file goes to a hidden, unique temp name in the target folder first and is moved into place with
``os.replace``; the final file gets the mode a plain ``open()`` would give it (``0o666 & ~umask``), not the
owner-only 0600 of ``tempfile.mkstemp``.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

#: Start of a macOS AppleDouble ("._name") file: magic, version, "Mac OS X" filler, no entries.
_APPLEDOUBLE = (b"\x00\x05\x16\x07\x00\x02\x00\x00" + b"Mac OS X        " + b"\x00\x00").ljust(4096, b"\x00")


def file_mode() -> int:
    """The mode ``open(path, "w")`` gives a new file: ``0o666`` minus the process umask."""
    return 0o666 & ~_umask()


def _umask() -> int:
    try:  # Linux: read it without changing it (os.umask both sets and returns, racing other threads)
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: Path, data: bytes, fsync: bool = False) -> None:
    """Write ``data`` to ``path`` via a hidden temp file in the same folder and an atomic rename.

    The file ends up with mode ``0o666 & ~umask`` (readable by the group and others under the usual umask 022,
    like any file ``open()`` creates). ``fsync``: flush the bytes to disk before the rename (metadata files).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
            os.fchmod(f.fileno(), file_mode())  # mkstemp creates 0600 whatever the umask
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(obj: Any, path: Path, indent: int = 2) -> None:
    """JSON (no trailing newline, like ``json.dump``) written atomically, durably and with the umask's mode."""
    atomic_write_bytes(Path(path), json.dumps(obj, indent=indent).encode(), fsync=True)


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
