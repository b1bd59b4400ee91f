"""Regenerate README.md's benchmark tables from the result files the benchmark scripts wrote.

    python scripts/update_readme_tables.py           # rewrite README.md in place (atomically)
    python scripts/update_readme_tables.py --check   # exit 1 if README.md is out of date (the test suite runs this)

README.md marks every generated block with a pair of HTML comments (invisible when rendered)::

    <!-- from benchmarks/results/speed_cpu.md: table -->
    ...generated...
    <!-- end generated -->

``table`` takes the first Markdown table of the file; ``sections A; B`` takes the file's ``###`` sections whose
titles start with ``A`` or ``B`` (in the file's order), as ``####`` sections. Everything outside the markers (the
prose, the discussion) is written by hand and left alone.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
_BLOCK = re.compile(r"(?ms)^<!-- from (?P<src>\S+): (?P<what>table|sections (?P<titles>[^>]*?)) -->\n"
                    r"(?P<body>.*?)^<!-- end generated -->$")


def first_table(md: str, where: str) -> str:
    """The first run of consecutive ``|``-lines of ``md``."""
    lines = md.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith("|")), None)
    if start is None:
        raise ValueError(f"{where}: no Markdown table in the file")
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
    return "\n".join(lines[start:end]) + "\n"


def sections(md: str, prefixes: list[str], where: str) -> str:
    """The ``###`` sections of ``md`` whose titles start with one of ``prefixes``, demoted to ``####``."""
    parts = re.split(r"(?m)^### ", md)[1:]
    chosen = [p.rstrip() for p in parts if any(p.startswith(x) for x in prefixes)]
    missing = [x for x in prefixes if not any(p.startswith(x) for p in parts)]
    if missing:
        raise ValueError(f"{where}: no section titled {missing} (run the benchmark's --report first?)")
    return "\n\n".join("#### " + p for p in chosen) + "\n"


def render(readme: str, repo: Path = REPO) -> str:
    """``readme`` with every generated block rebuilt from its source file."""
    def block(m: re.Match) -> str:
        src = repo / m["src"]
        if not src.is_file():
            raise FileNotFoundError(f"README.md takes a table from {m['src']}, which does not exist")
        md = src.read_text()
        if m["what"] == "table":
            body = first_table(md, m["src"])
        else:
            body = sections(md, [t.strip() for t in m["titles"].split(";") if t.strip()], m["src"])
        return f"<!-- from {m['src']}: {m['what']} -->\n{body}<!-- end generated -->"

    out, n = _BLOCK.subn(block, readme)
    if n == 0:
        raise ValueError("README.md has no generated blocks (<!-- from FILE: table --> ... <!-- end generated -->)")
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--readme", type=Path, default=REPO / "README.md")
    p.add_argument("--check", action="store_true", help="only report whether the README is up to date")
    args = p.parse_args()
    current = args.readme.read_text()
    new = render(current, args.readme.resolve().parent)
    if args.check:
        if new != current:
            print(f"{args.readme} is out of date with benchmarks/results/: run python scripts/update_readme_tables.py",
                  file=sys.stderr)
            return 1
        print(f"{args.readme}: generated tables up to date")
        return 0
    if new != current:
        from nnunet_universal.atomic_io import atomic_write_bytes

        atomic_write_bytes(args.readme, new.encode())
        print(f"rewrote {args.readme}")
    else:
        print(f"{args.readme}: already up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
