"""Moved to :mod:`nnunet_universal.discovery` (above ``trainers/`` and ``inference/``); old imports keep working."""

from nnunet_universal.discovery import (  # noqa: F401
    ENV_VAR,
    all_trainers,
    baseline_trainers,
    export_line,
    ext_trainer_path,
    ext_trainer_value,
    set_ext_trainer_env,
    trainer_class,
)
