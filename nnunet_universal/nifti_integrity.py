"""Cheap integrity checks for NIfTI files that readers would otherwise accept half-read.

SimpleITK (ITK's NIfTI reader) reads a cut-off ``.nii.gz`` or ``.nii`` without complaint and fills the missing
voxels with zeros, so a truncated download or an interrupted copy silently becomes a wrong image or label. Two
checks catch that before any voxel is used:

* ``.nii.gz``: the gzip stream is decompressed to its end (every member; ``zlib`` verifies each member's CRC-32 and
  ISIZE trailer), and the decompressed bytes must hold the header's data block;
* ``.nii``: the file size is at least ``vox_offset + prod(dim) * bitpix / 8`` from the header.

:func:`verify_nifti` can keep the decompressed bytes of float images, from which :func:`count_nonfinite` counts
NaN/Inf voxels (ITK's reader also turns those into 0). :func:`verify_nifti_bytes` checks a file already read into
memory and keeps its decompressed bytes, from which :func:`voxels` gives the voxel array: the check's decompression
is then the only one (conversion reads every file once). Other formats are not checked (their readers fail
loudly).
"""

from __future__ import annotations

import os
import struct
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

__all__ = ["CorruptImageError", "NiftiInfo", "check_file", "count_nonfinite", "is_nifti", "verify_nifti",
           "verify_nifti_bytes", "voxels"]

_CHUNK = 1 << 20
#: NIfTI datatype code -> numpy dtype (without byte order)
_DTYPES = {2: "u1", 4: "i2", 8: "i4", 16: "f4", 32: "c8", 64: "f8", 128: "u1", 256: "i1", 512: "u2",
           768: "u4", 1024: "i8", 1280: "u8", 1792: "c16", 2304: "u1"}
_FLOAT_CODES = {16, 32, 64, 1536, 1792, 2048}
_NIFTI1_SIZES = (struct.pack("<i", 348), struct.pack(">i", 348))  # sizeof_hdr of a NIfTI-1 header, both byte orders


class CorruptImageError(ValueError):
    """A NIfTI file is truncated or corrupt. ``str(e)`` names the file, the problem and what to do."""

    def __init__(self, path: str | os.PathLike, problem: str) -> None:
        self.path, self.problem = str(path), problem
        super().__init__(f"{path} is truncated or corrupt: {problem}. What to do: re-download or re-copy the file "
                         "(compare its size or checksum with the original), or remove it")

    def __reduce__(self):  # picklable across worker processes
        return (self.__class__, (self.path, self.problem))


@dataclass
class NiftiInfo:
    """What the header says (``shape``: the ``dim`` entries in file order) and, if kept, the file's bytes."""

    shape: tuple[int, ...]
    datatype: int
    bitpix: int
    vox_offset: int
    byteorder: str  # "<" or ">"
    data: bytes | None = None  # the whole (decompressed) file, when kept
    scl_slope: float = 0.0  # intensity scaling (0 or 1 with scl_inter 0: none)
    scl_inter: float = 0.0

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.bitpix // 8

    @property
    def is_float(self) -> bool:
        return self.datatype in _FLOAT_CODES


def is_nifti(path: str | os.PathLike) -> bool:
    return str(path).endswith((".nii", ".nii.gz"))


def _parse_header(path: str | os.PathLike, head: bytes) -> NiftiInfo:
    """NIfTI-1 (348-byte) or NIfTI-2 (540-byte) header -> :class:`NiftiInfo`."""
    for bo in ("<", ">"):
        if len(head) >= 4 and struct.unpack(bo + "i", head[:4])[0] == 348 and len(head) >= 348:
            dim = struct.unpack(bo + "8h", head[40:56])
            datatype, bitpix = struct.unpack(bo + "2h", head[70:74])
            vox_offset = int(struct.unpack(bo + "f", head[108:112])[0])
            slope, inter = struct.unpack(bo + "2f", head[112:120])
            break
        if len(head) >= 4 and struct.unpack(bo + "i", head[:4])[0] == 540 and len(head) >= 540:
            datatype, bitpix = struct.unpack(bo + "2h", head[12:16])
            dim = struct.unpack(bo + "8q", head[16:80])
            vox_offset = struct.unpack(bo + "q", head[168:176])[0]
            slope, inter = struct.unpack(bo + "2d", head[176:192])
            break
    else:
        raise CorruptImageError(path, f"no valid NIfTI header ({len(head)} bytes read)")
    ndim = dim[0]
    if not 1 <= ndim <= 7 or any(d < 0 for d in dim[1:ndim + 1]) or bitpix <= 0 or vox_offset < 0:
        raise CorruptImageError(path, f"invalid NIfTI header (dim {list(dim)}, bitpix {bitpix}, "
                                      f"vox_offset {vox_offset})")
    hdr_size = 348 if struct.unpack(bo + "i", head[:4])[0] == 348 else 540
    return NiftiInfo(shape=tuple(int(d) for d in dim[1:ndim + 1]), datatype=int(datatype), bitpix=int(bitpix),
                     vox_offset=max(int(vox_offset), hdr_size), byteorder=bo, scl_slope=float(slope),
                     scl_inter=float(inter))


def _gunzip(path: Path, blocks: Iterable[bytes], keep: bool | str) -> tuple[NiftiInfo, int, bytes | None]:
    """Decompress every gzip member of ``blocks`` (the file's bytes, in order) to its end (CRC-32 and ISIZE checked
    by zlib); return header, decompressed size and, if kept, the decompressed bytes."""
    total, head, parts = 0, b"", []
    info: NiftiInfo | None = None
    keeping = keep is True
    d = zlib.decompressobj(16 + zlib.MAX_WBITS)
    for block in blocks:
        while block:
            try:
                out = d.decompress(block)
            except zlib.error as e:
                raise CorruptImageError(path, f"the gzip stream is damaged ({e})") from None
            total += len(out)
            if info is None:
                head += out
                if len(head) >= 540 or (len(head) >= 348 and head[:4] in _NIFTI1_SIZES):
                    info = _parse_header(path, head)
                    keeping = keep is True or (keep == "float" and info.is_float)
                    if keeping:
                        parts.append(head)
                    head = b""
            elif keeping:
                parts.append(out)
            if d.eof:
                block = d.unused_data
                if block.strip(b"\x00"):  # another gzip member follows
                    d = zlib.decompressobj(16 + zlib.MAX_WBITS)
                else:
                    block = b""
                    d = None
                    break
            else:
                block = b""
        if d is None:
            break
    if d is not None and not d.eof:
        raise CorruptImageError(path, f"the gzip stream ends early after {total} decompressed bytes (no valid "
                                      "end-of-stream trailer): the file was cut off")
    if info is None:
        info = _parse_header(path, head)
        if keeping or keep is True:
            parts.append(head)
    data = parts[0] if len(parts) == 1 else b"".join(parts) if parts else None
    return info, total, data


def _file_blocks(f: BinaryIO) -> Iterator[bytes]:
    while block := f.read(_CHUNK):
        yield block


def _memory_blocks(stored: bytes) -> Iterator[memoryview]:
    view = memoryview(stored)
    for i in range(0, len(view), 8 * _CHUNK):
        yield view[i:i + 8 * _CHUNK]


def _check_size(path: Path, info: NiftiInfo, size: int) -> NiftiInfo:
    need = info.vox_offset + info.nbytes
    if size < need:
        raise CorruptImageError(path, f"the header announces {need} bytes (offset {info.vox_offset} + "
                                      f"{'x'.join(map(str, info.shape))} voxels x {info.bitpix // 8} bytes) but the "
                                      f"{'decompressed ' if str(path).endswith('.gz') else ''}file has only {size}")
    return info


def verify_nifti(path: str | os.PathLike, keep: bool | str = False) -> NiftiInfo:
    """Raise :class:`CorruptImageError` if the NIfTI file ``path`` is truncated or its gzip stream is damaged.

    ``keep``: True keeps the whole (decompressed) file in ``NiftiInfo.data``; ``"float"`` only for float images
    (for :func:`count_nonfinite`); False keeps nothing (streamed, constant memory).
    """
    path = Path(path)
    try:
        if str(path).endswith(".nii.gz"):
            with open(path, "rb") as f:
                info, size, data = _gunzip(path, _file_blocks(f), keep)
        else:
            with open(path, "rb") as f:
                info = _parse_header(path, f.read(540))
            size = path.stat().st_size
            data = None
            if keep is True or (keep == "float" and info.is_float):
                data = path.read_bytes()
                size = len(data)
    except OSError as e:
        raise CorruptImageError(path, f"cannot be read ({e.strerror or e})") from None
    _check_size(path, info, size).data = data
    return info


def verify_nifti_bytes(path: str | os.PathLike, stored: bytes, keep: bool = True) -> NiftiInfo:
    """:func:`verify_nifti` of a file already read into memory (``stored``: its bytes as on disk, read once).

    ``path`` names the file in messages and says whether it is gzipped (``.nii.gz``). With ``keep`` the
    decompressed file (``stored`` itself for a ``.nii``) is in ``NiftiInfo.data``; that is the file's one
    decompression, from which the voxels are then read (:func:`voxels`).
    """
    path = Path(path)
    if str(path).endswith(".nii.gz"):
        info, size, data = _gunzip(path, _memory_blocks(stored), keep)
    else:
        info, size, data = _parse_header(path, stored[:540]), len(stored), stored if keep else None
    _check_size(path, info, size).data = data
    return info


def check_file(path: str | os.PathLike) -> None:
    """:func:`verify_nifti` for a NIfTI file (streamed, nothing kept); other formats pass unchecked.

    One call before any ``SimpleITK.ReadImage`` of a user's file; raises :class:`CorruptImageError` (a ValueError).
    """
    if is_nifti(path):
        verify_nifti(path)


def count_nonfinite(info: NiftiInfo) -> int:
    """Number of NaN/Inf voxels of a float image verified with ``keep`` (0 for integer images)."""
    if not info.is_float or info.data is None or info.datatype not in _DTYPES:
        return 0
    dt = np.dtype(info.byteorder + _DTYPES[info.datatype])
    arr = np.frombuffer(info.data, dtype=dt, count=info.nbytes // dt.itemsize, offset=info.vox_offset)
    return int(arr.size - np.count_nonzero(np.isfinite(arr)))


#: datatypes :func:`voxels` decodes (scalar integers and reals; not complex, RGB or RGBA)
_SCALAR_CODES = {2, 4, 8, 16, 64, 256, 512, 768, 1024, 1280}


def voxels(info: NiftiInfo) -> np.ndarray | None:
    """The stored voxels of a file verified with ``keep``, as a native-endian array in reversed ``dim`` order
    (``(z, y, x)``, or ``(t, z, y, x)``: NumPy's view of ITK's voxel order); a view of ``info.data`` when the file
    is native-endian.

    None where the stored numbers are not the image's values as readers see them (a scaling ``scl_slope`` /
    ``scl_inter``) or the datatype is not a scalar integer or real: read those with a full reader.
    """
    # NIfTI readers (nifti1_io, hence ITK) read a non-finite scl_slope / scl_inter as 0: nibabel writes NaN there
    slope = info.scl_slope if np.isfinite(info.scl_slope) else 0.0
    inter = info.scl_inter if np.isfinite(info.scl_inter) else 0.0
    if info.data is None or info.datatype not in _SCALAR_CODES or slope not in (0.0, 1.0) or inter != 0.0:
        return None
    dt = np.dtype(info.byteorder + _DTYPES[info.datatype])
    if dt.itemsize * 8 != info.bitpix:
        return None
    n = int(np.prod(info.shape, dtype=np.int64))
    arr = np.frombuffer(info.data, dtype=dt, count=n, offset=info.vox_offset).reshape(info.shape[::-1])
    return arr if dt.isnative else arr.astype(dt.newbyteorder("="))
