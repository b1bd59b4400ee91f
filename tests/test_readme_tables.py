"""README.md's benchmark tables are generated from benchmarks/results/ (scripts/update_readme_tables.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "update_readme_tables.py"


def _load():
    import importlib.util

    spec = importlib.util.spec_from_file_location("update_readme_tables", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_readme_tables_are_the_result_files_tables():
    """The committed README equals what the script generates from the committed results (``--check``)."""
    res = subprocess.run([sys.executable, str(SCRIPT), "--check"], capture_output=True, text=True, cwd=REPO)
    assert res.returncode == 0, res.stderr


def test_generated_blocks_are_rebuilt_and_prose_is_kept(tmp_path):
    """A stale block is replaced by the source's table / sections; text outside the markers is untouched."""
    mod = _load()
    (tmp_path / "r.md").write_text("intro\n\n| a | b |\n|---|---|\n| 1 | 2 |\n\ntail\n")
    (tmp_path / "s.md").write_text("# t\n\n### Alpha x\n\nA\n\n### Beta\n\nB\n\n### Gamma\n\nC\n")
    readme = ("# R\n\nhand text\n<!-- from r.md: table -->\n| old |\n<!-- end generated -->\nmore\n"
              "<!-- from s.md: sections Gamma; Alpha -->\nstale\n<!-- end generated -->\nend\n")
    out = mod.render(readme, tmp_path)
    assert out == ("# R\n\nhand text\n<!-- from r.md: table -->\n| a | b |\n|---|---|\n| 1 | 2 |\n"
                   "<!-- end generated -->\nmore\n<!-- from s.md: sections Gamma; Alpha -->\n#### Alpha x\n\nA\n\n"
                   "#### Gamma\n\nC\n<!-- end generated -->\nend\n")
    assert mod.render(out, tmp_path) == out
    with pytest.raises(ValueError, match="no section titled"):
        mod.render(readme.replace("Gamma", "Delta"), tmp_path)
    with pytest.raises(FileNotFoundError, match="missing.md"):
        mod.render(readme.replace("r.md", "missing.md"), tmp_path)
