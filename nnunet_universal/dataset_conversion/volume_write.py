"""Write outputs atomically, at deflate level 1, never as hard links.

Writing (:func:`write_image`): the header is ITK's (it writes the volume uncompressed once per shape, type and
geometry; the other volumes of a case with that header reuse it), the voxels are the array's bytes, and the file
is gzipped at deflate level 1 (``zlib``; fixed header, mtime 0: byte-identical on every rerun). ITK's own
``.nii.gz`` writer uses level 6 (its ``compressionLevel`` is ignored for NIfTI) and takes about twice as long.
Size trade-off, measured on the benchmark's set: the whole converted set grows by 0.7 % (most files are copies);
re-encoded files range from 1 % smaller (MR floats, ``Z_RLE``) to 7 % larger (CT int16), label maps are 2-3x
larger but stay around 100 kB.

Every output goes through a temp file in the dataset's state folder and :func:`os.replace` (never seen half
written), is created by ``open()`` (mode ``0o666 & ~umask``) and is never a hard link: a later write to an output
can never reach a source file or another output.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import uuid
import zlib
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from nnunet_universal.dataset_conversion.common import FILE_ENDING, Layout, digest
from nnunet_universal.dataset_conversion.volume_read import SourceFile, Volume, image_from_array
from nnunet_universal.nifti_integrity import is_nifti

#: deflate level of re-encoded outputs (1: fastest; see the module docstring for the size trade-off)
DEFLATE_LEVEL = 1

def gzip_bytes(*parts: bytes | memoryview, label: bool = False) -> bytes:
    """One gzip member of the concatenated ``parts`` at :data:`DEFLATE_LEVEL`, mtime 0 (deterministic for a given
    zlib and the same parts).

    Images use zlib's run-length strategy (``Z_RLE``: matches of distance 1 only), about twice as fast as level 1's
    match search on MR/CT voxels for files within a few per cent of its size; label maps (long runs, repeated
    rows) keep level 1's full match search, which makes them several times smaller for about the same time.
    """
    c = zlib.compressobj(DEFLATE_LEVEL, zlib.DEFLATED, 16 + zlib.MAX_WBITS, 9,
                         zlib.Z_DEFAULT_STRATEGY if label else zlib.Z_RLE)
    return b"".join([*(c.compress(x) for x in parts), c.flush()])


def _tmp_name(tmp_dir: Path, final: Path) -> Path:
    return tmp_dir / f"{uuid.uuid4().hex}_{final.name}"


def write_bytes(data: bytes, final: Path, tmp_dir: Path, sha256: str | None = None) -> str:
    """Write ``data`` to ``final`` atomically (temp file in ``tmp_dir`` + rename); return its sha256 (``sha256``
    when the caller already has it)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(tmp_dir, final)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)
    return sha256 or hashlib.sha256(data).hexdigest()


_WRITTEN_HEADERS: dict[tuple, bytes] = {}  # per process: the volumes a case writes usually share one header


def _nifti_parts(arr: np.ndarray, geometry: Volume | sitk.Image, tmp: Path) -> tuple[bytes, memoryview]:
    """The ``.nii`` ITK writes for the (z, y, x) array ``arr`` on ``geometry``, as (header, voxels).

    The header is ITK's own: written by ITK once per shape, type and geometry (into ``tmp``, uncompressed) and
    cached when the rest of that file is exactly the array's bytes, so that the other volumes of a case with that
    header (the channels of a 4D file, the slices stacks of a PNG case) cost no ITK write.
    """
    arr = np.ascontiguousarray(arr)
    key = (arr.shape, arr.dtype.str, tuple(geometry.GetSpacing()), tuple(geometry.GetOrigin()),
           tuple(geometry.GetDirection()))
    body = memoryview(arr).cast("B")
    if key in _WRITTEN_HEADERS:
        return _WRITTEN_HEADERS[key], body
    try:
        sitk.WriteImage(image_from_array(arr, geometry), str(tmp), False)
        raw = tmp.read_bytes()
    finally:
        tmp.unlink(missing_ok=True)
    head = raw[:len(raw) - arr.nbytes]
    if memoryview(raw)[len(head):] != body:  # not header + voxels as stored here: use ITK's file as it is
        return raw, memoryview(b"")
    if len(_WRITTEN_HEADERS) >= 64:
        _WRITTEN_HEADERS.clear()
    _WRITTEN_HEADERS[key] = head
    return head, body


def file_state(st: os.stat_result) -> list[int]:
    """Size, mtime, ctime (ns) and inode of a file: any write to it, or to its metadata, changes them (ctime cannot
    be set back by a user), and a copy elsewhere is another inode."""
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


def copy_if_unchanged(src: str, state: list[int] | None, final: Path, tmp_dir: Path) -> bool:
    """Copy ``src`` to ``final`` atomically if it is still in ``state`` (:func:`file_state`, checked on the open
    file, so the bytes copied are those of that file); kernel-side copy, nothing read into Python. Returns False
    (nothing written) when it changed or the state is unknown."""
    if state is None:
        return False
    with open(src, "rb") as fin:
        st = os.fstat(fin.fileno())
        if file_state(st) != list(state):
            return False
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = _tmp_name(tmp_dir, final)
        try:
            with open(tmp, "wb") as fout:
                offset = 0
                try:
                    while offset < st.st_size:
                        sent = os.sendfile(fout.fileno(), fin.fileno(), offset, st.st_size - offset)
                        if sent == 0:
                            break
                        offset += sent
                except (AttributeError, OSError):  # no sendfile here: copy through Python
                    fin.seek(offset)
                    shutil.copyfileobj(fin, fout)
            os.replace(tmp, final)
        finally:
            tmp.unlink(missing_ok=True)
    return True


def write_image(arr: np.ndarray, geometry: Volume | sitk.Image, final: Path, tmp_dir: Path,
                label: bool = False, header: bytes | None = None) -> str:
    """Write the (z, y, x) array ``arr`` with ``geometry``'s spacing, origin and direction as a ``.nii.gz`` (ITK's
    header, deflate level 1) atomically; return its sha256. ``label``: a label map (see :func:`gzip_bytes`);
    ``header``: the header of a file on that grid to use instead (:meth:`SourceFile.header_for`)."""
    if header is not None:
        head, body = header, memoryview(np.ascontiguousarray(arr)).cast("B")
    else:
        head, body = _nifti_parts(arr, geometry, _tmp_name(tmp_dir, final).with_suffix(""))  # x.nii.gz -> x.nii
    return write_bytes(gzip_bytes(head, body, label=label), final, tmp_dir)


def write_source(src: SourceFile, final: Path, tmp_dir: Path, label: bool = False) -> tuple[str, str]:
    """Write a NIfTI source unchanged as ``final`` (``.nii.gz``): its bytes as read, a ``.nii`` gzipped.

    Returns (how, sha256 of the output): ``"copy"`` or ``"gzipped"``.
    """
    assert src.stored is not None and is_nifti(src.path)
    if src.path.endswith(".gz"):
        return "copy", write_bytes(src.stored, final, tmp_dir, src.sha256)
    return "gzipped", write_bytes(gzip_bytes(src.stored, label=label), final, tmp_dir)


def zero_template(ref: Volume | sitk.Image, layout: Layout) -> Path:
    """A cached all-zero uint8 ``.nii.gz`` with ``ref``'s geometry (one per geometry, copied for each case)."""
    key = digest([list(ref.GetSize()), list(ref.GetSpacing()), list(ref.GetOrigin()), list(ref.GetDirection())])
    path = layout.zeros / f"zeros_{key}{FILE_ENDING}"
    if not path.exists():
        write_image(np.zeros(ref.GetSize()[::-1], np.uint8), ref, path, layout.tmp, label=True)
    return path


def write_zeros(ref: Volume | sitk.Image, final: Path, layout: Layout, like: SourceFile | None = None) -> str:
    """Write a zero-filled file of ``ref``'s geometry as ``final`` (its own file, never a link); return its sha256.

    ``like``: a uint8 file on that grid (a label map): its header is used, so no template has to be written.
    """
    zeros = np.zeros(ref.GetSize()[::-1], np.uint8)
    header = like.header_for(zeros) if like is not None else None
    if header is None:
        return write_bytes(zero_template(ref, layout).read_bytes(), final, layout.tmp)
    key = (header, zeros.shape)  # a case's missing slots are one file: compressed once
    if key not in _ZEROS:
        if len(_ZEROS) >= 8:
            _ZEROS.clear()
        _ZEROS[key] = gzip_bytes(header, memoryview(zeros).cast("B"), label=True)
    return write_bytes(_ZEROS[key], final, layout.tmp)


_ZEROS: dict[tuple[bytes, tuple[int, ...]], bytes] = {}
