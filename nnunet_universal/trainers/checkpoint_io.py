"""Training checkpoints that are read safely and written whole.

nnU-Net 2.8.1 writes ``checkpoint_*.pth`` in place with ``torch.save``: a run killed (or a disk filled) during the
save leaves a truncated zip, and ``nnUNetv2_train --c`` then dies in ``torch.load`` with miniz's "failed finding
central directory" traceback, which names neither the file nor a way out. A checkpoint with damaged bytes inside
is worse: torch does not check the zip's CRC-32s and loads wrong weights without a word. ``--c`` also loads with
``weights_only=False``, so a checkpoint can run code.

Here a checkpoint is checked before it is loaded (complete zip, every record's CRC-32; about 0.2 s for a 200 MB
checkpoint), loaded with ``weights_only=True`` and the allow-list of
:func:`nnunet_universal.inference.checkpoints.load_checkpoint`, and a damaged one is refused with its path and the
command that resumes from the next checkpoint nnU-Net's ``--c`` looks for (final, then latest, then best). Saves
go to a hidden temp file in the same folder and are renamed, so an interrupted save keeps the previous checkpoint.
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["DamagedCheckpointError", "read_training_checkpoint", "restore_training_state", "save_atomically",
           "verify_checkpoint_file"]

#: The order in which nnU-Net's ``maybe_load_checkpoint`` (``--c``) looks for a checkpoint in the fold folder.
RESUME_ORDER = ("checkpoint_final.pth", "checkpoint_latest.pth", "checkpoint_best.pth")
_CHUNK = 1 << 24


class DamagedCheckpointError(RuntimeError):
    """A checkpoint file is truncated or its bytes are damaged; the message says how to resume without it."""


def _what_to_do(path: Path) -> str:
    """How to continue without ``path``: the checkpoint ``--c`` falls back to once ``path`` is moved away."""
    move = f"mv '{path}' '{path}.damaged'"
    if path.name not in RESUME_ORDER:
        return f"What to do: use another checkpoint, or move this one away ({move})."
    later = [n for n in RESUME_ORDER[RESUME_ORDER.index(path.name) + 1:] if (path.parent / n).is_file()]
    if not later:
        return (f"What to do: no other checkpoint is in {path.parent}; move this one away ({move}) and train the "
                "fold again without --c.")
    fallback = later[0]
    what = ("the best epoch so far: the epochs after it are trained again" if fallback == "checkpoint_best.pth"
            else "the last epoch saved before the end of the training")
    return (f"What to do: move it away ({move}) and rerun with --c: nnU-Net then continues from {fallback} "
            f"({what}). Equivalently, copy {fallback} over it.")


def _damaged(path: Path, reason: str) -> DamagedCheckpointError:
    return DamagedCheckpointError(
        f"checkpoint {path} is damaged ({reason}; was the training killed while saving it, or the disk full?), so "
        f"it cannot be loaded and nothing was changed. {_what_to_do(path)}")


def verify_checkpoint_file(path: str | os.PathLike) -> None:
    """Raise :class:`DamagedCheckpointError` unless ``path`` is a complete torch zip whose records match their CRCs.

    Records stored with a CRC of 0 (``torch.serialization`` can skip computing them) are not checked.
    """
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                if info.CRC == 0:
                    continue
                with archive.open(info) as record:  # zipfile compares the CRC-32 when a record is read to its end
                    while record.read(_CHUNK):
                        pass
    except zipfile.BadZipFile as e:
        detail = ("not a complete zip archive: the end of the file is missing" if "not a zip file" in str(e).lower()
                  else f"zip archive: {e}")
        raise _damaged(path, detail) from None
    except (EOFError, OSError) as e:
        raise _damaged(path, f"cannot be read to its end: {e}") from None


def read_training_checkpoint(path: str | os.PathLike) -> dict:
    """A checkpoint checked by :func:`verify_checkpoint_file`, then loaded as weights only (on the CPU).

    Raises :class:`DamagedCheckpointError` for a damaged file and
    :class:`~nnunet_universal.inference.checkpoints.UntrustedCheckpointError` for one that references anything an
    nnU-Net checkpoint never holds (nothing in it is executed).
    """
    from nnunet_universal.inference.checkpoints import load_checkpoint

    verify_checkpoint_file(path)
    return load_checkpoint(path)


def restore_training_state(trainer: Any, checkpoint: dict) -> None:
    """Restore an nnU-Net trainer from a loaded checkpoint, as ``nnUNetTrainer.load_checkpoint`` does with a file.

    nnU-Net 2.8.1's own method cannot take the dict (its dict branch never binds ``checkpoint``) and loads files
    with ``weights_only=False``; this is its restore step alone: weights (a DDP ``module.`` prefix dropped, into
    the network behind DDP/``torch.compile``), init args, epoch, logging, best EMA, mirroring axes, optimizer and
    grad scaler. The optimizer moves its state to the parameters' device, so a CPU-loaded checkpoint resumes on GPU.
    """
    from nnunet_universal.nn.wrappers import unwrap

    if not trainer.was_initialized:
        trainer.initialize()
    network = unwrap(trainer.network)
    own = network.state_dict().keys()
    weights = {k[len("module."):] if k not in own and k.startswith("module.") else k: v
               for k, v in checkpoint["network_weights"].items()}
    trainer.my_init_kwargs = checkpoint["init_args"]
    trainer.current_epoch = checkpoint["current_epoch"]
    trainer.logger.load_checkpoint(checkpoint["logging"])
    trainer._best_ema = checkpoint["_best_ema"]
    trainer.inference_allowed_mirroring_axes = checkpoint.get("inference_allowed_mirroring_axes",
                                                              trainer.inference_allowed_mirroring_axes)
    network.load_state_dict(weights)
    trainer.optimizer.load_state_dict(checkpoint["optimizer_state"])
    if trainer.grad_scaler is not None and checkpoint.get("grad_scaler_state") is not None:
        trainer.grad_scaler.load_state_dict(checkpoint["grad_scaler_state"])


def save_atomically(save: Callable[[str], None], filename: str | os.PathLike) -> None:
    """Call ``save(temp_path)`` and rename the result to ``filename`` (same folder, so the rename is atomic).

    ``save`` may write nothing (nnU-Net's ``save_checkpoint`` on a DDP rank other than 0, or with checkpointing
    disabled): then ``filename`` is left as it was. The file gets the mode ``torch.save``'s ``open()`` gives it.
    Temp files that earlier saves of ``filename`` left when they were killed are removed.
    """
    final = Path(filename)
    for stale in final.parent.glob(f".{final.name}.*.tmp"):
        stale.unlink(missing_ok=True)
    tmp = final.with_name(f".{final.name}.{os.getpid()}.tmp")
    try:
        save(str(tmp))
        if tmp.exists():
            os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)
