"""Contract tests: nnU-Net finds every trainer through nnUNet_extTrainer, with nnU-Net's exact __init__ signature."""

from __future__ import annotations

import inspect
import os
import pickle
import subprocess
import sys
from pathlib import Path

import nnunetv2
import pytest
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunet_universal.discovery import (
    all_trainers,
    baseline_trainers,
    export_line,
    ext_trainer_path,
    ext_trainer_value,
)

TRAINERS = all_trainers() + baseline_trainers()
NAMES = [t.__name__ for t in TRAINERS]


@pytest.mark.parametrize("trainer", TRAINERS, ids=NAMES)
def test_init_signature_matches_nnunet(trainer):
    assert inspect.signature(trainer.__init__) == inspect.signature(nnUNetTrainer.__init__)
    assert "__init__" not in vars(trainer) or trainer.__name__ == "UniversalTrainer"  # only the base has one


def test_scheduled_stock_trainer_obeys_the_schedule(monkeypatch, capsys):
    from nnunet_universal.trainers.scheduled import nnUNetTrainerScheduled

    assert nnUNetTrainerScheduled.__mro__[1] is nnUNetTrainer
    assert {k for k in vars(nnUNetTrainerScheduled) if not k.startswith("__")} == {"initialize",
                                                                                  "perform_actual_validation"}
    monkeypatch.setenv("NNUNET_UNIVERSAL_SCHEDULE", "3:4:2")

    class Probe(nnUNetTrainerScheduled):
        def __init__(self):  # no plans needed: only the schedule part of initialize() is exercised
            self.logged = []
            self.save_every = 50

        def print_to_log_file(self, *args, **kwargs):
            self.logged.append(args)

    probe = Probe()
    probe.num_epochs, probe.num_iterations_per_epoch, probe.num_val_iterations_per_epoch = 1000, 250, 50
    with pytest.raises(AttributeError, match="was_initialized"):  # nnU-Net's own initialize needs a real trainer
        probe.initialize()
    assert (probe.num_epochs, probe.num_iterations_per_epoch, probe.num_val_iterations_per_epoch) == (3, 4, 2)
    assert probe.save_every == 1  # short runs checkpoint often enough to resume
    # a leftover variable must not shorten a real training silently: a WARNING in the log and on stderr
    expected = ("WARNING: NNUNET_UNIVERSAL_SCHEDULE=3:4:2 is set: this run trains 3 epochs x 4 iterations "
                "(2 validation iterations) instead of 1000 x 250 (50)")
    assert [a for a in probe.logged if a[0].startswith(expected)], probe.logged
    assert expected in capsys.readouterr().err


@pytest.mark.parametrize("env, expected", [("0", None), ("1", (0, 1, 2)), (None, (0, 1, 2))])
def test_scheduled_stock_trainer_final_validation_mirroring(monkeypatch, env, expected):
    """NNUNET_UNIVERSAL_VAL_MIRRORING=0 hides the mirroring axes from nnU-Net's validation only (restored after)."""
    from nnunet_universal.trainers.scheduled import nnUNetTrainerScheduled

    if env is None:
        monkeypatch.delenv("NNUNET_UNIVERSAL_VAL_MIRRORING", raising=False)
    else:
        monkeypatch.setenv("NNUNET_UNIVERSAL_VAL_MIRRORING", env)
    seen = []
    monkeypatch.setattr(nnUNetTrainer, "perform_actual_validation",
                        lambda self, save_probabilities=False: seen.append(self.inference_allowed_mirroring_axes))
    probe = object.__new__(nnUNetTrainerScheduled)
    probe.inference_allowed_mirroring_axes = (0, 1, 2)
    probe.perform_actual_validation()
    assert seen == [expected]
    assert probe.inference_allowed_mirroring_axes == (0, 1, 2)  # the checkpoint keeps the model's axes


def test_no_trainer_name_is_shadowed_by_a_builtin():
    builtin_folder = Path(nnunetv2.__path__[0]) / "training" / "nnUNetTrainer"
    for py in builtin_folder.rglob("*.py"):
        text = py.read_text(errors="ignore")
        for name in NAMES:
            assert f"class {name}(" not in text and f"class {name}:" not in text, (name, py)
    assert len(set(NAMES)) == len(NAMES)


def test_shim_folder_holds_only_reexports():
    folder = Path(ext_trainer_path())
    modules = sorted(p.name for p in folder.glob("*.py"))
    assert modules == ["__init__.py", "nnunet_universal_trainers_shim.py"]
    shim = (folder / "nnunet_universal_trainers_shim.py").read_text()
    assert "class " not in shim and "def " not in shim
    for name in NAMES:
        assert name in shim, f"{name} is not re-exported by the shim"


def test_export_line_keeps_other_folders(monkeypatch):
    monkeypatch.setenv("nnUNet_extTrainer", "/some/other")
    value = ext_trainer_value()
    assert value.split(os.pathsep) == [ext_trainer_path(), "/some/other"]
    assert export_line() == f"export nnUNet_extTrainer={value}"
    monkeypatch.setenv("nnUNet_extTrainer", ext_trainer_value())  # idempotent
    assert ext_trainer_value() == value


def test_nnunet_lookup_finds_every_trainer_and_the_class_stays_picklable(monkeypatch):
    """nnU-Net's own resolver (built-ins first, then nnUNet_extTrainer) finds each trainer through the shim."""
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    monkeypatch.setenv("nnUNet_extTrainer", ext_trainer_value(""))
    for cls in TRAINERS:
        found = recursive_find_trainer_class_by_name(cls.__name__)
        assert found is cls and found.__module__.startswith("nnunet_universal.trainers.")
        assert pickle.loads(pickle.dumps(found)) is found
    assert "nnunet_universal_trainers_shim" not in sys.modules  # nnU-Net popped the shim, not our classes
    monkeypatch.delenv("nnUNet_extTrainer")
    with pytest.raises(RuntimeError, match="nnUNet_extTrainer"):
        recursive_find_trainer_class_by_name("UniversalTrainer")


def test_cli_env_prints_the_export_line():
    exe = Path(sys.executable).with_name("nnunet-universal")
    res = subprocess.run([str(exe), "env"], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "nnUNet_extTrainer": ""})
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == f"export nnUNet_extTrainer={ext_trainer_path()}"


def test_trainer_classes_pickle_by_reference():
    for cls in TRAINERS:
        assert pickle.loads(pickle.dumps(cls)) is cls
