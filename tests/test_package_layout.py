"""Layering of the package: which subpackages may import which (a static check over the source, nothing imported).

``inference/`` serves ``nnUNetv2_predict`` and the ``predict`` command and must not pull in the training package
(``trainers/`` imports the predictor for its final validation: an import the other way is a cycle). ``nn/`` is
used by both and imports neither. The trainer classes a checkpoint names are found through
``nnunet_universal/discovery.py``, above both.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "nnunet_universal"

#: subpackage -> packages its modules must not import (at module level, in functions or under TYPE_CHECKING)
FORBIDDEN = {
    "inference": ("nnunet_universal.trainers",),
    "nn": ("nnunet_universal.trainers", "nnunet_universal.inference"),
}


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, dotted module) of every import statement in ``path``; ``from a import b`` yields ``a.b`` and ``a``."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.append((node.lineno, node.module))
            out += [(node.lineno, f"{node.module}.{alias.name}") for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            raise AssertionError(f"{path}:{node.lineno}: relative import (absolute imports only, STYLE.md)")
    return out


def _hits(sub: str) -> list[str]:
    bad = FORBIDDEN[sub]
    return [f"{path.relative_to(PACKAGE.parent)}:{line}: imports {mod}"
            for path in sorted((PACKAGE / sub).rglob("*.py"))
            for line, mod in imported_modules(path)
            if any(mod == b or mod.startswith(b + ".") for b in bad)]


@pytest.mark.parametrize("sub", sorted(FORBIDDEN))
def test_subpackage_does_not_import_forbidden_packages(sub):
    assert not _hits(sub), "\n".join(_hits(sub))


def test_the_check_sees_imports_inside_functions(tmp_path):
    """The check is not vacuous: a lazy import inside a function (the old cycle's form) is found."""
    src = tmp_path / "mod.py"
    src.write_text("def f():\n    from nnunet_universal.trainers.final_validation import restrict_to_domain\n"
                   "    import nnunet_universal.trainers.ddp\n")
    assert [m for _, m in imported_modules(src) if m.startswith("nnunet_universal.trainers")] == [
        "nnunet_universal.trainers.final_validation",
        "nnunet_universal.trainers.final_validation.restrict_to_domain",
        "nnunet_universal.trainers.ddp"]
