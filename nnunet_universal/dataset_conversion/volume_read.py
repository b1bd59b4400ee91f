"""Read every source file once: its bytes give the sha256, one decompression gives the integrity check and the
voxels.

Reading (:func:`read_file`): a file's bytes are read once into memory. They give its sha256 (provenance), are
decompressed once by the integrity check (:func:`nifti_integrity.verify_nifti_bytes`: gzip CRC and length, header
data size), and the voxels are a view of that one decompression (:func:`nifti_integrity.voxels`); ITK only parses
the header (geometry in its LPS convention, so geometry means exactly what it means to nnU-Net's reader). Files
whose stored numbers are not what ITK returns (intensity scaling, vector pixels, unusual dimensions) and other
formats go through ITK's full reader as before (float NIfTI through nibabel, which keeps NaN/Inf visible where ITK
would not). The bytes are kept, so an output that needs no change is written from the very bytes that were
validated: a ``.nii.gz`` copied as is, a ``.nii`` gzipped (:func:`.volume_write.write_source`).

Writing is :mod:`.volume_write`.
"""

from __future__ import annotations

import hashlib
import io
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from nnunet_universal.dataset_conversion.common import ConversionError
from nnunet_universal.nifti_integrity import CorruptImageError, is_nifti, verify_nifti_bytes, voxels

_SITK_OF_DTYPE = {np.dtype(k): v for k, v in (
    ("u1", sitk.sitkUInt8), ("i1", sitk.sitkInt8), ("u2", sitk.sitkUInt16), ("i2", sitk.sitkInt16),
    ("u4", sitk.sitkUInt32), ("i4", sitk.sitkInt32), ("u8", sitk.sitkUInt64), ("i8", sitk.sitkInt64),
    ("f4", sitk.sitkFloat32), ("f8", sitk.sitkFloat64))}


@dataclass
class Volume:
    """One 3D volume: voxels ``array`` of shape (z, y, x) and ITK's geometry (x, y, z order, LPS).

    Offers the geometry getters of ``sitk.Image`` (``GetSize``, ``GetSpacing``, ``GetOrigin``, ``GetDirection``),
    so geometry checks take either.
    """

    array: np.ndarray
    spacing: tuple[float, ...]
    origin: tuple[float, ...]
    direction: tuple[float, ...]

    def GetSize(self) -> tuple[int, ...]:
        return tuple(int(n) for n in self.array.shape[::-1])

    def GetSpacing(self) -> tuple[float, ...]:
        return self.spacing

    def GetOrigin(self) -> tuple[float, ...]:
        return self.origin

    def GetDirection(self) -> tuple[float, ...]:
        return self.direction

    @classmethod
    def from_image(cls, img: sitk.Image) -> Volume:
        return cls(sitk.GetArrayFromImage(img), img.GetSpacing(), img.GetOrigin(), img.GetDirection())


def image_from_array(arr: np.ndarray, geometry: Volume | sitk.Image) -> sitk.Image:
    """A ``sitk.Image`` of the (z, y, x) array ``arr`` with the spacing, origin and direction of ``geometry``."""
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(tuple(geometry.GetSpacing()))
    img.SetOrigin(tuple(geometry.GetOrigin()))
    img.SetDirection(tuple(geometry.GetDirection()))
    return img


@dataclass
class SourceFile:
    """A file read once: its bytes as stored (NIfTI only; what copies are written from), sha256, volumes.

    ``header``: the (decompressed) header and extensions of a NIfTI whose stored numbers are its voxels (read
    without ITK's full reader), for writing other volumes on exactly this file's grid (:meth:`header_for`).
    """

    path: str
    sha256: str
    volumes: list[Volume] = field(default_factory=list)
    stored: bytes | None = None
    header: bytes | None = None

    def header_for(self, arr: np.ndarray) -> bytes | None:
        """This file's header if it describes ``arr`` too (one 3D volume of the same shape and type), else None.

        A volume written with it (:func:`.volume_write.write_image`) has this file's geometry exactly as every
        reader sees it.
        """
        if self.header is None or len(self.volumes) != 1:
            return None
        own = self.volumes[0].array
        return self.header if own.shape == arr.shape and own.dtype == arr.dtype else None


def _unreadable(path: str, case: str, e: BaseException) -> ConversionError:
    first = str(e).strip().splitlines()[-1] if str(e).strip() else repr(e)
    return ConversionError(f"cannot be read as an image ({first[:200]})", case=case, file=path,
                           fix="re-download or re-export the file (it may be truncated or not an image)")


def _truncated(path: str, case: str, e: CorruptImageError) -> ConversionError:
    return ConversionError(f"cannot be read: it is truncated or corrupt ({e.problem})", case=case, file=path,
                           fix="re-download or re-copy the file (compare its size or checksum with the original), "
                               "or remove the case")


def read_bytes(path: str, case: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise ConversionError(f"cannot be read ({e.strerror or e})", case=case, file=path,
                              fix="check that the file exists and is readable") from None


def _header(path: str) -> sitk.ImageFileReader:
    r = sitk.ImageFileReader()
    r.SetFileName(path)
    r.ReadImageInformation()
    return r


@dataclass(frozen=True)
class _Header:
    """What ITK makes of a NIfTI header: the fields a fast read is checked against, and the geometry."""

    dim: int
    size: tuple[int, ...]
    pixel_id: int
    components: int
    spacing: tuple[float, ...]
    origin: tuple[float, ...]
    direction: tuple[float, ...]  # dim x dim, row-major


_HEADERS: dict[bytes, _Header] = {}  # per process: the sequences of a case usually share one header


def _itk_header(path: str, head: bytes, scratch: Path | None) -> _Header:
    """ITK's reading of the header bytes ``head`` (the file's first ``vox_offset`` bytes, decompressed).

    ITK is handed a header-only ``.nii`` in ``scratch`` (opening a ``.nii.gz`` costs ITK an inflate of its first
    blocks) or, without ``scratch``, the file itself; results are cached by header bytes.
    """
    if head in _HEADERS:
        return _HEADERS[head]
    r = None
    if scratch is not None:
        tmp = scratch / f"{uuid.uuid4().hex}_header.nii"
        try:
            tmp.write_bytes(head)
            r = sitk.ImageFileReader()
            r.SetFileName(str(tmp))
            r.SetImageIO("NiftiImageIO")
            r.ReadImageInformation()
        except RuntimeError:  # an unusual header ITK wants to see with its file: read that
            r = None
        finally:
            tmp.unlink(missing_ok=True)
    if r is None:
        r = _header(path)
    h = _Header(r.GetDimension(), tuple(r.GetSize()), r.GetPixelID(), r.GetNumberOfComponents(),
                tuple(r.GetSpacing()), tuple(r.GetOrigin()), tuple(r.GetDirection()))
    if len(_HEADERS) >= 32:
        _HEADERS.clear()
    _HEADERS[head] = h
    return h


def _volumes_from_decompressed(path: str, info, scratch: Path | None) -> list[Volume] | None:
    """The volumes of a verified NIfTI from its kept decompressed bytes; None where ITK would read other values."""
    arr = voxels(info)
    if arr is None or arr.ndim not in (3, 4):
        return None
    h = _itk_header(path, bytes(info.data[:info.vox_offset]), scratch)
    if (h.components != 1 or list(h.size) != list(info.shape) or h.dim != arr.ndim
            or h.pixel_id != _SITK_OF_DTYPE.get(arr.dtype)):
        return None
    spacing, origin = h.spacing[:3], h.origin[:3]
    direction = tuple(np.array(h.direction).reshape(h.dim, h.dim)[:3, :3].ravel().tolist())
    arrays = [arr] if arr.ndim == 3 else [arr[k] for k in range(arr.shape[0])]  # (t, z, y, x): channel t
    return [Volume(a, spacing, origin, direction) for a in arrays]


def _read_float_nifti(path: str, r: sitk.ImageFileReader, raw: bytes | None) -> list[Volume]:
    """Float NIfTI with intensity scaling through nibabel: ITK's reader silently turns NaN/Inf into 0.

    ``raw``: the file's decompressed bytes. Voxel order is the file's in both libraries; geometry from ITK (LPS).
    """
    import nibabel as nib

    if raw is None:
        nii = nib.load(path)
    else:
        nifti1 = raw[:4] in (b"\x5c\x01\x00\x00", b"\x00\x00\x01\x5c")  # sizeof_hdr 348: NIfTI-1
        nii = (nib.Nifti1Image if nifti1 else nib.Nifti2Image).from_bytes(raw)
    data = np.asanyarray(nii.dataobj)
    if data.dtype == np.float64 and r.GetPixelID() == sitk.sitkFloat32:  # ITK's pixel type (scaled ints: float32)
        data = data.astype(np.float32)
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim not in (3, 4):
        raise ConversionError(f"is {data.ndim}D with shape {data.shape}, expected a 3D volume", file=path,
                              fix="export one 3D volume per sequence")
    dim = r.GetDimension()
    direction = tuple(np.array(r.GetDirection()).reshape(dim, dim)[:3, :3].ravel())
    return [Volume(np.ascontiguousarray(v.T), tuple(r.GetSpacing()[:3]), tuple(r.GetOrigin()[:3]), direction)
            for v in ([data] if data.ndim == 3 else [data[..., k] for k in range(data.shape[3])])]


def _read_with_itk(path: str, case: str, raw: bytes | None) -> list[Volume]:
    """ITK's full reader (other formats; NIfTI that :func:`_volumes_from_decompressed` leaves to it)."""
    if is_nifti(path):
        r = _header(path)
        if r.GetPixelID() in (sitk.sitkFloat32, sitk.sitkFloat64):
            return _read_float_nifti(path, r, raw)
    img = sitk.ReadImage(path)
    if img.GetNumberOfComponentsPerPixel() != 1:
        raise ConversionError(f"has {img.GetNumberOfComponentsPerPixel()} components per voxel (vector/RGB image)",
                              case=case, file=path, fix="export a scalar (greyscale) 3D volume")
    if img.GetDimension() == 4 and img.GetSize()[3] == 1:
        img = img[:, :, :, 0]
    if img.GetDimension() not in (3, 4):
        raise ConversionError(f"is {img.GetDimension()}D with size {img.GetSize()}, expected a 3D volume",
                              case=case, file=path, fix="export one 3D volume per sequence")
    if img.GetDimension() == 4:
        return [Volume.from_image(img[:, :, :, k]) for k in range(img.GetSize()[3])]
    return [Volume.from_image(img)]


def read_file(path: str, case: str, scratch: Path | None = None, stored: bytes | None = None,
              sha256: str | None = None) -> SourceFile:
    """Read, hash, integrity-check and decode one image file, decompressing it once; raise ConversionError.

    ``scratch``: a folder for ITK's header-only reads (:func:`_itk_header`); ``stored``/``sha256``: the file's
    bytes and hash when the caller has already read them.
    """
    stored = read_bytes(path, case) if stored is None else stored
    sha = sha256 or hashlib.sha256(stored).hexdigest()
    try:
        raw = None
        if is_nifti(path):
            # ITK reads a cut-off file and fills the rest with zeros: gzip trailer / header data size first
            info = verify_nifti_bytes(path, stored, keep=True)
            raw = info.data
            vols = _volumes_from_decompressed(path, info, scratch)
            if vols is not None:
                return SourceFile(path, sha, vols, stored, bytes(info.data[:info.vox_offset]))
        vols = _read_with_itk(path, case, raw)
    except CorruptImageError as e:
        raise _truncated(path, case, e) from None
    except ConversionError as e:
        raise ConversionError(e.problem, case=case, file=path, fix=e.fix) from None
    except Exception as e:  # ITK raises RuntimeError; nibabel, gzip and zlib raise their own
        raise _unreadable(path, case, e) from None
    return SourceFile(path, sha, vols, stored if is_nifti(path) else None)


def read_png(path: str, case: str) -> tuple[np.ndarray, str]:
    """One PNG slice (decoded from the bytes read once) and its sha256."""
    from PIL import Image, UnidentifiedImageError

    data = read_bytes(path, case)
    try:
        with Image.open(io.BytesIO(data)) as im:
            return np.asarray(im), hashlib.sha256(data).hexdigest()
    except (OSError, UnidentifiedImageError) as e:
        raise ConversionError(f"cannot be read as a PNG slice ({e})", case=case, file=path,
                              fix="re-download the slice or remove the case") from None
