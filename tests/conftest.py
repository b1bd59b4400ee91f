"""Shared test setup: nnU-Net folders in a temp dir, one thread, no compile (neither nnU-Net's nor the fused
U-Harmony kernels': compiling the GPU path or building the C++ CPU kernels would cost test processes tens of
seconds; one test of each builds them)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("nnUNet_compile", "f")
os.environ.setdefault("NNUNET_UNIVERSAL_FUSED", "0")
os.environ.setdefault("nnUNet_def_n_proc", "1")


@pytest.fixture
def nnunet_dirs(tmp_path, monkeypatch):
    """Fresh nnUNet_raw / nnUNet_preprocessed / nnUNet_results under tmp_path, set in os.environ."""
    dirs = {}
    for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        d = tmp_path / k
        d.mkdir()
        monkeypatch.setenv(k, str(d))
        dirs[k] = d
    return dirs
