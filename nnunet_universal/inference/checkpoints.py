"""Load nnU-Net checkpoints without running code from them.

A ``checkpoint_*.pth`` is a pickle: nnU-Net 2.8.1 loads it with ``torch.load(weights_only=False)``, so a model
folder received from someone else can run arbitrary code the moment it is loaded (a ``__reduce__`` payload).
Here every checkpoint is loaded with ``weights_only=True`` and an explicit allow-list of the few non-tensor types
that nnU-Net 2.8.1 checkpoints contain (inspected in checkpoints written by ``nnUNetv2_train``: the trainer's
logging holds numpy scalars, whose pickles name ``numpy._core.multiarray.scalar`` - ``numpy.core`` with
numpy < 2 - ``numpy.dtype`` and the dtype's class). Anything else is refused with :class:`UntrustedCheckpointError`
before any of it is unpickled: the list of what the file references comes from scanning the pickle's opcodes
(``torch.serialization.get_unsafe_globals_in_checkpoint``), which executes nothing.

Residual risk: nnU-Net's own commands (``nnUNetv2_predict``, ``-pretrained_weights``, ...) still load with
``weights_only=False``; run ``nnunet-universal check-model MODEL_DIR`` on a received model first. (``--c`` and
``--val`` of our trainers load through this module: ``trainers/checkpoint_io.py``.)
"""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["ALLOWED_GLOBALS", "UntrustedCheckpointError", "check_model_checkpoints", "load_checkpoint"]

_SCALAR = np._core.multiarray.scalar if hasattr(np, "_core") else np.core.multiarray.scalar
_DTYPE_CLASSES = [type(np.dtype(t)) for t in ("float16", "float32", "float64", "int8", "int16", "int32", "int64",
                                              "uint8", "uint16", "uint32", "uint64", "bool")]

#: What nnU-Net 2.8.1 checkpoints contain beyond what ``weights_only=True`` accepts by default (tensors, containers,
#: ``OrderedDict``, ``torch.device``, ``_codecs.encode``): numpy scalars of the logging, under both module names.
ALLOWED_GLOBALS: list[Any] = [
    (_SCALAR, "numpy._core.multiarray.scalar"),
    (_SCALAR, "numpy.core.multiarray.scalar"),
    np.dtype,
    *_DTYPE_CLASSES,
]
_ALLOWED_NAMES = {"numpy._core.multiarray.scalar", "numpy.core.multiarray.scalar", "numpy.dtype",
                  *(f"{c.__module__}.{c.__name__}" for c in _DTYPE_CLASSES)}
_REQUIRED_KEYS = ("network_weights", "trainer_name", "init_args")


class UntrustedCheckpointError(RuntimeError):
    """A checkpoint holds something an nnU-Net checkpoint never does (possibly code), or cannot be read safely."""


def _refuse(path: Path, what: str) -> UntrustedCheckpointError:
    return UntrustedCheckpointError(
        f"{path}: {what}. This model is not trusted and was not loaded (nothing in the file was executed). "
        "Use only models from a source you trust; if you trust this one, re-save its checkpoints as plain "
        "tensors and numbers, or ask its author for a checkpoint written by nnU-Net itself")


def scan_checkpoint(path: str | os.PathLike) -> list[str]:
    """Globals the pickle in ``path`` references beyond the allow-list (the scan executes nothing)."""
    path = Path(path)
    if not zipfile.is_zipfile(path):
        raise _refuse(path, "is not a torch zip checkpoint (legacy or damaged file)")
    try:
        found = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except Exception as e:  # damaged zip or pickle
        raise _refuse(path, f"cannot be scanned ({type(e).__name__}: {e})") from None
    return [g for g in found if g not in _ALLOWED_NAMES]


def load_checkpoint(path: str | os.PathLike) -> dict:
    """``torch.load(path, weights_only=True)`` with :data:`ALLOWED_GLOBALS`; refuse anything else.

    Raises :class:`UntrustedCheckpointError` naming the file and what it references.
    """
    path = Path(path)
    unexpected = scan_checkpoint(path)
    if unexpected:
        raise _refuse(path, f"references {', '.join(unexpected)}, which no nnU-Net checkpoint contains (a pickled "
                            "object like this can run code when loaded)")
    try:
        with torch.serialization.safe_globals(ALLOWED_GLOBALS):
            ckpt = torch.load(path, map_location=torch.device("cpu"), weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile) as e:
        detail = str(e).split("WeightsUnpickler error:")[-1].strip().splitlines()[0][:300] if str(e) else repr(e)
        raise _refuse(path, f"cannot be loaded as weights only ({detail})") from None
    if not isinstance(ckpt, dict) or any(k not in ckpt for k in _REQUIRED_KEYS):
        keys = sorted(ckpt) if isinstance(ckpt, dict) else type(ckpt).__name__
        raise _refuse(path, f"is not an nnU-Net checkpoint (expected keys {list(_REQUIRED_KEYS)}, found {keys})")
    return ckpt


def check_model_checkpoints(model_dir: str | os.PathLike) -> tuple[list[Path], list[str], list[str]]:
    """Check every ``*.pth`` under ``model_dir`` as :func:`load_checkpoint` does.

    Returns (checkpoints checked, problems, warnings); warnings name pickle files (``*.pkl``) that nnU-Net's own
    tools load with ``pickle`` (``nnunet-universal predict`` never reads them).
    """
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise FileNotFoundError(f"model folder {model_dir} does not exist")
    checkpoints = sorted(p for p in model_dir.rglob("*.pth") if p.is_file())
    problems = []
    for p in checkpoints:
        try:
            load_checkpoint(p)
        except UntrustedCheckpointError as e:
            problems.append(str(e))
    warnings = [f"{p}: a pickle file; nnU-Net's own tools (e.g. nnUNetv2_apply_postprocessing) load it with "
                "pickle, which can run code: delete it unless you trust the model's source"
                for p in sorted(model_dir.rglob("*.pkl"))]
    return checkpoints, problems, warnings
