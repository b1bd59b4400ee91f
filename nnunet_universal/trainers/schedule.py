"""Short training schedules without new class names: the ``NNUNET_UNIVERSAL_SCHEDULE`` environment variable.

``NNUNET_UNIVERSAL_SCHEDULE="EPOCHS:ITERATIONS:VAL_ITERATIONS"`` (e.g. ``"2:3:1"``) overrides nnU-Net's
``num_epochs`` (1000), ``num_iterations_per_epoch`` (250) and ``num_val_iterations_per_epoch`` (50) of every
universal trainer, for tests, the demo and quick checks: ``NNUNET_UNIVERSAL_SCHEDULE=2:3:1 nnUNetv2_train …``.
Unset or empty: nnU-Net's schedule. Set, it is announced as a WARNING line in the training log and on stderr
(a variable left over from a quick run would otherwise silently shorten a real training).

``NNUNET_UNIVERSAL_SEED=N`` seeds Python's, numpy's and torch's generators when the trainer is created (before the
network's initialization), for repeatable quick runs and tests: with ``nnUNet_n_proc_DA=0`` (augmentation in the
training process) a CPU run repeats itself; with augmentation workers or on a GPU it does not (nnU-Net's workers
and cuDNN are not seeded). Unset: nnU-Net's unseeded behaviour.

``NNUNET_UNIVERSAL_VAL_MIRRORING=0`` turns off test-time mirroring in the final validation only (8x fewer
forward passes in 3D; training augmentation and the model's saved mirroring axes are unchanged), for quick runs
on a CPU such as the demo's.
"""

from __future__ import annotations

import os
import sys
from typing import Any, NamedTuple

ENV_VAR = "NNUNET_UNIVERSAL_SCHEDULE"
VAL_MIRRORING_ENV_VAR = "NNUNET_UNIVERSAL_VAL_MIRRORING"
SEED_ENV_VAR = "NNUNET_UNIVERSAL_SEED"


class Schedule(NamedTuple):
    num_epochs: int
    num_iterations_per_epoch: int
    num_val_iterations_per_epoch: int


def parse_schedule(value: str) -> Schedule:
    """Parse ``"EPOCHS:ITERATIONS:VAL_ITERATIONS"``; raise ValueError with the expected format otherwise."""
    parts = value.strip().split(":")
    try:
        if len(parts) != 3:
            raise ValueError
        numbers = [int(p) for p in parts]
    except ValueError:
        raise ValueError(f"{ENV_VAR}={value!r} is not 'EPOCHS:ITERATIONS:VAL_ITERATIONS' (e.g. '2:3:1')") from None
    if min(numbers) < 1:  # nnU-Net's epoch-end logging needs at least one validation iteration
        raise ValueError(f"{ENV_VAR}={value!r}: every number must be >= 1")
    return Schedule(*numbers)


def schedule_from_env() -> Schedule | None:
    """The schedule requested through ``NNUNET_UNIVERSAL_SCHEDULE``, or None when it is unset or empty."""
    value = os.environ.get(ENV_VAR, "").strip()
    return parse_schedule(value) if value else None


def apply_schedule(trainer: Any) -> Schedule | None:
    """Apply the environment's schedule to an nnU-Net trainer (before ``initialize`` builds the LR scheduler).

    Also checkpoints every ``num_epochs // 5`` epochs (at most nnU-Net's 50), so that an interrupted short run
    resumes with ``--c`` instead of starting over. Returns the schedule, or None (nnU-Net's own) when unset.
    """
    schedule = schedule_from_env()
    if schedule is None:
        return None
    stock = Schedule(trainer.num_epochs, trainer.num_iterations_per_epoch, trainer.num_val_iterations_per_epoch)
    trainer.num_epochs, trainer.num_iterations_per_epoch, trainer.num_val_iterations_per_epoch = schedule
    trainer.save_every = max(1, min(trainer.save_every, schedule.num_epochs // 5))
    message = (f"WARNING: {ENV_VAR}={os.environ[ENV_VAR].strip()} is set: this run trains {schedule.num_epochs} "
               f"epochs x {schedule.num_iterations_per_epoch} iterations ({schedule.num_val_iterations_per_epoch} "
               f"validation iterations) instead of {stock.num_epochs} x {stock.num_iterations_per_epoch} "
               f"({stock.num_val_iterations_per_epoch}), checkpoint every {trainer.save_every} epochs; unset "
               f"{ENV_VAR} for a full training")
    trainer.print_to_log_file(message, also_print_to_console=False)
    if getattr(trainer, "local_rank", 0) == 0:
        print(message, file=sys.stderr, flush=True)  # also when the log file is not watched
    return schedule


def apply_seed(trainer: Any) -> int | None:
    """Seed ``random``, numpy and torch from ``NNUNET_UNIVERSAL_SEED`` (logged); return the seed or None when unset."""
    value = os.environ.get(SEED_ENV_VAR, "").strip()
    if not value:
        return None
    try:
        seed = int(value)
        if not 0 <= seed < 2**32:
            raise ValueError
    except ValueError:
        raise ValueError(f"{SEED_ENV_VAR}={value!r}: use an integer from 0 to 2**32 - 1") from None
    import random

    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    trainer.print_to_log_file(f"{SEED_ENV_VAR}={seed}: random, numpy and torch seeded", also_print_to_console=False)
    return seed


def validation_mirroring_from_env() -> bool:
    """Whether the final validation mirrors (default True; ``NNUNET_UNIVERSAL_VAL_MIRRORING=0`` turns it off)."""
    value = os.environ.get(VAL_MIRRORING_ENV_VAR, "1").strip().lower()
    if value not in ("0", "1", "true", "false", "t", "f", ""):
        raise ValueError(f"{VAL_MIRRORING_ENV_VAR}={value!r}: use 0 or 1")
    return value not in ("0", "false", "f")
