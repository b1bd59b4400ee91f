"""How nnU-Net finds our trainers: the ``nnUNet_extTrainer`` folder and the trainer registry.

nnU-Net resolves ``-tr NAME`` inside nnunetv2 first, then in the folders listed in ``nnUNet_extTrainer``
(NNUNET_NOTES §1.2). Modules found there are imported as top-level modules and dropped from
``sys.modules`` afterwards, so classes *defined* there would be unpicklable; the folder therefore holds
only a re-export shim (``nnunet_universal/nnunet_trainers/nnunet_universal_trainers_shim.py``) and the
classes live in :mod:`nnunet_universal.trainers`.

This module sits above ``trainers/`` and ``inference/``: the predictor finds the trainer class named in a
checkpoint here (:func:`trainer_class`), so the inference package never imports the training package.
"""

from __future__ import annotations

import os
import shlex
from pathlib import Path

#: Environment variable nnU-Net 2.8 reads for external trainer folders (os.pathsep-separated).
ENV_VAR = "nnUNet_extTrainer"


def ext_trainer_path() -> str:
    """Absolute path of the folder ``nnUNet_extTrainer`` must contain (``nnunet_universal/nnunet_trainers``)."""
    return str(Path(__file__).resolve().parent / "nnunet_trainers")


def ext_trainer_value(current: str | None = None) -> str:
    """Value of ``nnUNet_extTrainer`` with our folder first, keeping the other folders already listed.

    ``current`` defaults to the variable's value in this process.
    """
    current = os.environ.get(ENV_VAR, "") if current is None else current
    ours = ext_trainer_path()
    others = [p for p in current.split(os.pathsep) if p.strip() and os.path.abspath(p) != ours]
    return os.pathsep.join([ours, *others])


def export_line() -> str:
    """``export nnUNet_extTrainer=…``: the shell line that lets ``nnUNetv2_train/predict`` find our trainers."""
    return f"export {ENV_VAR}={shlex.quote(ext_trainer_value())}"


def set_ext_trainer_env() -> str:
    """Put our folder into ``os.environ['nnUNet_extTrainer']`` (inherited by DDP/spawned workers); return the value."""
    value = ext_trainer_value()
    os.environ[ENV_VAR] = value
    return value


def all_trainers() -> list[type]:
    """Every trainer class this package provides (base first), for the shim and parametrized tests."""
    from nnunet_universal.trainers.universal_trainer import UniversalTrainer
    from nnunet_universal.trainers.variants import VARIANTS

    return [UniversalTrainer, *VARIANTS]


def baseline_trainers() -> list[type]:
    """Stock-nnU-Net baselines that obey the short schedule (benchmarks); found through the same shim."""
    from nnunet_universal.trainers.scheduled import nnUNetTrainerScheduled

    return [nnUNetTrainerScheduled]


def extension_trainers() -> list[type]:
    """Trainers of models grown by ``nnunet-universal extend`` (they need the plans' extension block)."""
    from nnunet_universal.trainers.extension_trainer import EXTENSION_TRAINERS

    return list(EXTENSION_TRAINERS)


def trainer_class(name: str) -> type:
    """The trainer class named in a checkpoint: this package's trainers first (no module scan), then nnU-Net's
    lookup (its built-in trainers and the ``nnUNet_extTrainer`` folders), as ``nnUNetv2_predict`` does."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    for cls in (*all_trainers(), *baseline_trainers(), *extension_trainers()):
        if cls.__name__ == name:
            return cls
    set_ext_trainer_env()  # our trainer folder first in nnUNet_extTrainer, the user's folders kept
    cls = recursive_find_trainer_class_by_name(name)
    if not (isinstance(cls, type) and issubclass(cls, nnUNetTrainer)):
        raise RuntimeError(f"trainer {name!r} named in the checkpoint is not an nnU-Net trainer")
    return cls
