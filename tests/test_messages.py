"""What synth, convert, merge and plan tell the user, through the installed CLI in a subprocess: every option has
help, errors are one line with exit code 2 and no traceback, each run ends with a summary, and synthetic
BrainMetShare PNG data is converted on its true spacing (``--spacing`` still overrides)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from nnunet_universal.cli import build_parser

EXE = Path(sys.executable).with_name("nnunet-universal")
COMMANDS = ("synth", "convert", "merge", "plan")


def cli(*args: object, raw: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, **({"nnUNet_raw": str(raw)} if raw else {})}
    env.pop("NNUNET_UNIVERSAL_DEBUG", None)
    return subprocess.run([str(EXE) if EXE.exists() else shutil.which("nnunet-universal"), *map(str, args)],
                          capture_output=True, text=True, timeout=300, env=env)


def assert_user_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    """Exit 2, one message on stderr naming what is wrong, no traceback."""
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr and "DATASETS.md" not in proc.stderr, proc.stderr
    for n in needles:
        assert n in proc.stderr, (n, proc.stderr)


@pytest.mark.parametrize("command", COMMANDS)
def test_every_option_has_help(command):
    sub = next(a for a in build_parser()._actions if a.dest == "command").choices[command]
    missing = [a.option_strings or a.dest for a in sub._actions if not a.help]
    assert not missing, f"{command}: options without help: {missing}"


def test_help_names_defaults_and_layouts():
    text = {c: " ".join(cli(c, "--help").stdout.split()) for c in COMMANDS}
    assert "parallel workers (default: 2)" in text["merge"] and "(default: 0, none)" in text["merge"]
    assert "skip invalid cases and list them in conversion_report.json" in text["merge"]
    assert "preprocessing processes (default: 2)" in text["plan"] and "(default: default)" in text["plan"]
    assert "(default: ['3d_fullres'])" in text["plan"]
    assert "expected layouts:" in text["convert"] and "volume-N.nii + segmentation-N.nii" in text["convert"]
    assert "spacing_mm.json" in text["convert"]


def test_no_cases_error_names_the_expected_layout(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "raw").mkdir()
    proc = cli("convert", "lits", tmp_path / "empty", "-d", 541, raw=tmp_path / "raw")
    assert_user_error(proc, "no cases found", str(tmp_path / "empty"), "volume-N.nii + segmentation-N.nii",
                      "nnunet-universal convert --help")


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("native")
    out = {}
    for source, cases in (("brainmetshare", 3), ("ucsf-bmsr", 3)):
        proc = cli("synth", source, "-o", base / source, "--cases", cases, "--preview", base / f"{source}.png")
        assert proc.returncode == 0, proc.stderr
        out[source] = next((base / source).iterdir())
        out[f"{source}.stdout"] = proc.stdout  # type: ignore[assignment]
    return out


def _spacing(folder: Path) -> tuple[float, ...]:
    return sitk.ReadImage(str(next((folder / "labelsTr").glob("*.nii.gz")))).GetSpacing()


def test_synth_prints_preview_and_spacing(synth, tmp_path):
    out = synth["brainmetshare.stdout"]
    assert "preview: " in out and "brainmetshare.png" in out
    table = json.loads((synth["brainmetshare"] / "mets_stanford_releaseMask_train" / "spacing_mm.json").read_text())
    z = sorted(s[2] for s in table["spacing_mm"].values())
    assert f"voxel spacing: 3.75 x 3.75 x {z[0]:g}-{z[-1]:g} mm" in out
    assert "spacing_mm.json" in out and "--spacing overrides it" in out
    assert "voxel spacing: " in synth["ucsf-bmsr.stdout"] and "spacing_mm.json" not in synth["ucsf-bmsr.stdout"]


def test_convert_uses_the_synthetic_spacing_and_spacing_overrides(synth, tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    table = json.loads((synth["brainmetshare"] / "mets_stanford_releaseMask_train" / "spacing_mm.json").read_text())
    proc = cli("convert", "brainmetshare", synth["brainmetshare"], "-d", 503, "-j", 1, raw=raw)
    assert proc.returncode == 0, proc.stderr
    folder = raw / "Dataset503_BrainMetShare"
    assert "converted 3 case(s) of brainmetshare" in proc.stdout and "skipped: none" in proc.stdout
    assert f"output: {folder}" in proc.stdout
    assert "voxel spacing: 3.75 x 3.75 x" in proc.stdout and "per case from" in proc.stdout
    first = sorted(table["spacing_mm"])[0]
    lab = sitk.ReadImage(str(folder / "labelsTr" / f"{first}.nii.gz"))
    assert np.allclose(lab.GetSpacing(), table["spacing_mm"][first])

    proc = cli("convert", "brainmetshare", synth["brainmetshare"], "-d", 504, "-j", 1, "--spacing", 1, 1, 2, raw=raw)
    assert proc.returncode == 0, proc.stderr
    assert "voxel spacing: 1 x 1 x 2 mm (option --spacing)" in proc.stdout
    assert np.allclose(_spacing(raw / "Dataset504_BrainMetShare"), (1, 1, 2))


def test_convert_without_spacing_file_says_it_used_the_release_default(synth, tmp_path):
    src = tmp_path / "stanford_release_brainmask"
    shutil.copytree(synth["brainmetshare"], src)
    (src / "mets_stanford_releaseMask_train" / "spacing_mm.json").unlink()
    (tmp_path / "raw").mkdir()
    proc = cli("convert", "brainmetshare", src, "-d", 505, "-j", 1, raw=tmp_path / "raw")
    assert proc.returncode == 0, proc.stderr
    assert "voxel spacing: 0.94 x 0.94 x 1 mm (default: the real release's spacing" in proc.stdout
    assert np.allclose(_spacing(tmp_path / "raw" / "Dataset505_BrainMetShare"), (0.94, 0.94, 1.0))


def test_bad_spacing_file_is_a_user_error(synth, tmp_path):
    src = tmp_path / "stanford_release_brainmask"
    shutil.copytree(synth["brainmetshare"], src)
    sidecar = src / "mets_stanford_releaseMask_train" / "spacing_mm.json"
    (tmp_path / "raw").mkdir()
    sidecar.write_text("{not json")
    assert_user_error(cli("convert", "brainmetshare", src, "-d", 506, raw=tmp_path / "raw"),
                      "unreadable spacing file", str(sidecar), "--spacing X Y Z")
    table = json.loads((synth["brainmetshare"] / "mets_stanford_releaseMask_train" / "spacing_mm.json").read_text())
    dropped = sorted(table["spacing_mm"])[0]
    del table["spacing_mm"][dropped]
    sidecar.write_text(json.dumps(table))
    assert_user_error(cli("convert", "brainmetshare", src, "-d", 506, raw=tmp_path / "raw"),
                      f"case {dropped!r}", "not listed in spacing_mm.json", "--skip-bad")
    # --spacing overrides a bad file
    proc = cli("convert", "brainmetshare", src, "-d", 506, "-j", 1, "--spacing", 1, 1, 1, raw=tmp_path / "raw")
    assert proc.returncode == 0, proc.stderr


def test_convert_summary_lists_skipped_cases_and_the_report(synth, tmp_path):
    src = tmp_path / "stanford_release_brainmask"
    shutil.copytree(synth["brainmetshare"], src)
    bad = sorted((src / "mets_stanford_releaseMask_train").glob("Mets_*"))[1]
    shutil.rmtree(bad / "seg")
    (tmp_path / "raw").mkdir()
    assert_user_error(cli("convert", "brainmetshare", src, "-d", 507, raw=tmp_path / "raw"),
                      f"case {bad.name!r}", "seg/", "--skip-bad")
    proc = cli("convert", "brainmetshare", src, "-d", 507, "-j", 1, "--skip-bad", raw=tmp_path / "raw")
    assert proc.returncode == 0, proc.stderr
    folder = tmp_path / "raw" / "Dataset507_BrainMetShare"
    assert "converted 2 case(s)" in proc.stdout
    assert f"skipped: 1 case(s) ({bad.name}); why and what to do: {folder / 'conversion_report.md'}" in proc.stdout


def test_merge_summary_and_no_warnings_of_its_own(synth, tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    for source, did in (("brainmetshare", 503), ("ucsf-bmsr", 502)):
        assert cli("convert", source, synth[source], "-d", did, "-j", 1, raw=raw).returncode == 0
    proc = cli("merge", "-d", 600, "-n", "U", 502, 503, "--identical", "ucsf_bmsr.ET=brainmetshare.ET",
               "--holdout", 1, "-j", 1, raw=raw)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("merged 2 domain(s), 6 case(s), 5 channel(s)"), proc.stdout
    rows = {ln.split()[0]: ln.split()[1:] for ln in lines[2:4]}
    assert rows == {"ucsf_bmsr": ["2", "1"], "brainmetshare": ["2", "1"]}, proc.stdout
    assert any(ln.startswith("folds: ") for ln in lines) and "skipped: none" in lines
    assert f"output: {raw / 'Dataset600_U'}" in proc.stdout
    assert "constant" not in proc.stderr  # zero-filled slots are known to be missing: nothing to warn about
    assert_user_error(cli("merge", "-d", 601, "-n", "V", 599, raw=raw), "599")
