"""Shared plumbing of ``convert`` and ``merge``: errors, fingerprints, output folders and their state folder.

Every output file is first written under the dataset's hidden state folder (``.nnunet_universal/tmp``, same
file system) and then moved into place with :func:`os.replace` (:mod:`.volume_write`), so a reader never sees a
half-written file and nnU-Net's file listing (which would pick up any ``*.nii.gz`` in ``imagesTr``) never sees a
temp file; a run's leftover temp files are dropped when the next run starts (:meth:`Layout.prepare`).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

#: Hidden folder inside an output dataset with resume markers, temp files and zero-filled templates.
STATE_DIR = ".nnunet_universal"
FILE_ENDING = ".nii.gz"
#: nnU-Net case identifiers we write: no path separators, no leading dot, nothing a shell or nnU-Net chokes on.
_CASE_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._\-]*$")
HIDDEN_PREFIXES = ("._", ".")


class ConversionError(ValueError):
    """One invalid input. The message names the case, the file, the problem and what to do about it."""

    def __init__(self, problem: str, case: str = "", file: str | os.PathLike = "", fix: str = "") -> None:
        self.case, self.file, self.problem, self.fix = case, str(file), problem, fix
        parts = []
        if case:
            parts.append(f"case {case!r}")
        if file:
            parts.append(f"file {self.file}")
        head = ": ".join(parts)
        msg = f"{head}: {problem}" if head else problem
        if fix:
            msg += f". What to do: {fix}"
        super().__init__(msg)

    def __reduce__(self) -> tuple[Any, ...]:  # picklable across worker processes
        return (self.__class__, (self.problem, self.case, self.file, self.fix))

    def as_dict(self) -> dict[str, str]:
        return {"case": self.case, "file": self.file, "problem": self.problem, "fix": self.fix,
                "message": str(self)}


SKIP_HINT = "or rerun with --skip-bad to skip such cases and get a report listing all of them"


def check_case_id(case_id: str, where: str | os.PathLike = "") -> str:
    """Return ``case_id`` if it is a safe nnU-Net identifier, else raise: it must not escape the output folder."""
    if not isinstance(case_id, str) or not _CASE_ID_RE.match(case_id) or ".." in case_id:
        raise ConversionError(
            f"case id {case_id!r} is not a safe file name (it could escape the output folder or break nnU-Net's "
            "file naming); allowed are letters, digits, '.', '_' and '-', not starting with '.' and without '..'",
            case=str(case_id), file=where, fix="rename the case in the source (or its dataset.json) and rerun")
    return case_id


def is_hidden(name: str) -> bool:
    """macOS resource forks (``._x``), ``.DS_Store`` and other dot files are never data."""
    return name.startswith(HIDDEN_PREFIXES)


def inside(path: str | os.PathLike, root: str | os.PathLike) -> bool:
    """Whether ``path``, symlinks resolved, lies inside ``root`` (resolved).

    Fast path for the usual case of a path built by listing ``root``: lexically below it, without ``..`` and
    without a symlink on the way (a few ``lstat`` calls instead of two full ``realpath`` resolutions).
    """
    path, root = Path(path), Path(root)
    try:
        rel = path.relative_to(root)
    except ValueError:
        rel = None
    if rel is not None and ".." not in rel.parts:
        p = root
        for part in rel.parts:
            p = p / part
            if p.is_symlink():
                break
        else:
            return True
    try:
        Path(os.path.realpath(path)).relative_to(os.path.realpath(root))
        return True
    except ValueError:
        return False


#: The one symlink rule of every converter: a file or folder that is (or lies below) a symlink is read where it
#: points if that is inside the input folder; one pointing outside is refused and its case listed with this reason.
OUTSIDE = "is a symlink pointing outside the input folder"
OUTSIDE_FIX = "copy the real file into the dataset folder (or point the converter at a folder that contains it)"


def outside_error(case: str, path: str | os.PathLike) -> ConversionError:
    """The error for a case whose ``path`` is a symlink pointing outside the input folder."""
    return ConversionError(OUTSIDE, case=case, file=path, fix=OUTSIDE_FIX)


def first_outside(paths, root: str | os.PathLike) -> Path | None:
    """The first of ``paths`` that does not lie inside ``root`` once symlinks are resolved, or None."""
    return next((Path(p) for p in paths if p is not None and not inside(p, root)), None)


def unexpected_folder(folder: Path, naming: str) -> ConversionError:
    """A folder among the case folders whose name does not follow the source's naming: listed, never ignored."""
    return ConversionError(f"folder name does not follow the naming {naming}, so it is not read as a case",
                           case=folder.name, file=folder,
                           fix="rename the folder to the source's naming, or move it out of the input folder")


def strip_nifti_ending(name: str) -> str | None:
    """``'x.nii.gz'`` / ``'x.nii'`` -> ``'x'``; anything else -> None."""
    for ending in (".nii.gz", ".nii"):
        if name.endswith(ending):
            return name[: -len(ending)]
    return None


def find_nifti(folder: Path, stem: str) -> Path | None:
    """The file ``stem.nii.gz`` or ``stem.nii`` in ``folder`` (both accepted, gz preferred), or None."""
    for ending in (".nii.gz", ".nii"):
        p = folder / f"{stem}{ending}"
        if p.is_file():
            return p
    return None


# ---- fingerprints -----------------------------------------------------------------------------------

def stat_fingerprint(path: str | os.PathLike) -> list[int]:
    """[size, mtime_ns]: a cheap staleness key for resume."""
    st = os.stat(path)
    return [st.st_size, st.st_mtime_ns]


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def digest(obj: Any) -> str:
    """Short stable hash of a JSON-able object (options, fingerprints)."""
    import json

    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


# ---- output folders ---------------------------------------------------------------------------------

def raw_root() -> Path:
    """``$nnUNet_raw``, read at call time (nnunetv2.paths reads it once at import)."""
    raw = os.environ.get("nnUNet_raw")
    if not raw:
        raise ConversionError("the environment variable nnUNet_raw is not set",
                              fix="export nnUNet_raw=/path/to/nnUNet_raw (nnU-Net's raw data folder)")
    return Path(raw)


def dataset_folder(dataset_id: int, name: str) -> Path:
    """``$nnUNet_raw/Dataset{id:03d}_{name}``; refuse an id already taken by another name (nnU-Net would too)."""
    if not 0 < int(dataset_id) < 10000:
        raise ConversionError(f"dataset id {dataset_id} is out of range", fix="pick an id between 1 and 9999")
    if not re.match(r"^[A-Za-z0-9][A-Za-z0-9_\-]*$", name):
        raise ConversionError(f"dataset name {name!r} must be letters, digits, '_' or '-'", fix="pass another -n")
    root = raw_root()
    folder = root / f"Dataset{int(dataset_id):03d}_{name}"
    if root.is_dir():
        taken = [p.name for p in root.glob(f"Dataset{int(dataset_id):03d}_*") if p.is_dir() and p != folder]
        if taken:
            raise ConversionError(
                f"dataset id {dataset_id} is already used by {taken[0]} in {root}",
                fix=f"choose another -d, or delete {root / taken[0]} if it is an old copy")
    return folder


@dataclass
class Layout:
    """Where a dataset's state lives: resume markers, temp files, zero-filled templates."""

    root: Path

    @property
    def state(self) -> Path:
        return self.root / STATE_DIR

    @property
    def tmp(self) -> Path:
        return self.state / "tmp"

    @property
    def markers(self) -> Path:
        return self.state / "cases"

    @property
    def zeros(self) -> Path:
        return self.state / "zeros"

    def marker(self, case_id: str) -> Path:
        return self.markers / f"{case_id}.json"

    def prepare(self) -> None:
        """Create the folders and drop temp files of an interrupted run."""
        for sub in ("imagesTr", "labelsTr"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        for d in (self.markers, self.zeros):
            d.mkdir(parents=True, exist_ok=True)
        if self.tmp.exists():
            shutil.rmtree(self.tmp)
        self.tmp.mkdir(parents=True)

    def finish(self) -> None:
        """Drop the (empty) temp folder at the end of a successful run."""
        shutil.rmtree(self.tmp, ignore_errors=True)
