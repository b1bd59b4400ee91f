"""The ``nnunet-universal`` parsers through the real console script: defaults shown in ``--help``, no option
abbreviations (nnU-Net's ``-d 600`` is never read as ``-device 600``), nnU-Net's model selectors for ``predict``
and their errors (exit 2, one line, no traceback). The model-backed runs are in ``tests/test_inference.py``."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from nnunet_universal.cli import build_parser


def _cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).parent / "nnunet-universal"
    return subprocess.run([str(exe) if exe.exists() else shutil.which("nnunet-universal"), *args],
                          capture_output=True, text=True, timeout=120, env=env)


@pytest.mark.parametrize("command,shown", [
    ("predict", ["-device {cuda,cpu,mps}", "(default: cuda)", "(default: 3d_fullres)", "(default: UniversalTrainer)",
                 "(default: nnUNetUniversalPlans)", "(default: checkpoint_final.pth)", "(default: 0.5)",
                 "--save_probabilities"]),
    ("train", ["(default: cuda)", "(default: UniversalTrainer)", "(default: nnUNetUniversalPlans)",
               "trainer class", "plans identifier"]),
    ("demo", ["(default: cpu)"]),
    ("plan", ["(default: 2)", "(default: ['3d_fullres'])"]),
])
def test_help_shows_defaults(command, shown):
    proc = _cli(command, "--help")
    assert proc.returncode == 0, proc.stderr
    text = " ".join(proc.stdout.split())  # argparse wraps lines
    for s in shown:
        assert s in text, (s, proc.stdout)
    assert "(default: None)" not in text and "(default: False)" not in text


def test_no_abbreviations_in_any_parser():
    parser = build_parser()
    subparsers = next(a for a in parser._actions if a.dest == "command").choices
    assert not parser.allow_abbrev and all(not sp.allow_abbrev for sp in subparsers.values())
    args = parser.parse_args(["predict", "-d", "600", "-o", "out", "-i", "in"])
    assert args.dataset == "600" and args.device == "cuda"  # not '-device 600'
    proc = _cli("predict", "-m", "model", "-o", "out", "--rout", "soft")
    assert proc.returncode == 2 and "unrecognized arguments: --rout soft" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_predict_model_selector_errors(tmp_path):
    env = {**os.environ, "nnUNet_results": str(tmp_path)}
    proc = _cli("predict", "-d", "600", "-c", "2d", "-i", str(tmp_path), "-o", str(tmp_path / "out"), env=env)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"no trained model of dataset 600: no folder {tmp_path / 'Dataset600_*'}" in proc.stderr
    (tmp_path / "Dataset600_Universal" / "UniversalTrainer__nnUNetUniversalPlans__3d_fullres").mkdir(parents=True)
    proc = _cli("predict", "-d", "600", "-c", "2d", "-i", str(tmp_path), "-o", str(tmp_path / "out"), env=env)
    expected = tmp_path / "Dataset600_Universal" / "UniversalTrainer__nnUNetUniversalPlans__2d"
    assert proc.returncode == 2 and f"model folder {expected} does not exist" in proc.stderr
    assert "trained models of Dataset600_Universal: UniversalTrainer__nnUNetUniversalPlans__3d_fullres" in proc.stderr
    proc = _cli("predict", "-m", str(tmp_path), "-d", "600", "-o", str(tmp_path / "out"), env=env)
    assert proc.returncode == 2 and "either as -m MODEL_DIR or by -d/-c/-tr/-p, not both" in proc.stderr
    proc = _cli("predict", "-tr", "UniversalTrainer", "-o", str(tmp_path / "out"), env=env)
    assert proc.returncode == 2 and "no model given: pass -m MODEL_DIR, or -d DATASET" in proc.stderr
    env.pop("nnUNet_results")
    proc = _cli("predict", "-d", "600", "-o", str(tmp_path / "out"), env=env)
    assert proc.returncode == 2 and "$nnUNet_results, which is not set" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
