"""Atomic file writing shared by the whole package: a hidden temp file in the target folder, then ``os.replace``.

A reader never sees a half-written file, and an interrupted write leaves the old file (or none) in place. The
final file gets the mode a plain ``open()`` would give it (``0o666 & ~umask``: a shared cluster's group can read
it), not the owner-only 0600 of ``tempfile.mkstemp``. Stdlib only (importable without numpy or torch).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any


def file_mode() -> int:
    """The mode ``open(path, "w")`` gives a new file: ``0o666`` minus the process umask."""
    return 0o666 & ~_umask()


def _umask() -> int:
    try:  # Linux: read it without changing it (os.umask both sets and returns, racing other threads)
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | os.PathLike, data: bytes, fsync: bool = False) -> None:
    """Write ``data`` to ``path`` via a hidden temp file in the same folder and an atomic rename.

    The file ends up with mode ``0o666 & ~umask`` (readable by the group and others under the usual umask 022,
    like any file ``open()`` creates). ``fsync``: flush the bytes to disk before the rename (metadata files).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_dead_writers_temps(path.parent)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{_TMP_TAG}{os.getpid()}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
            os.fchmod(f.fileno(), file_mode())  # mkstemp creates 0600 whatever the umask
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


#: marks our temp files' writer PID: ``.NAME.pidPID.RANDOM.tmp``
_TMP_TAG = "pid"
_cleaned: set[str] = set()


def _remove_dead_writers_temps(folder: Path) -> None:
    """Remove the temp files that killed writers left in ``folder`` (once per folder and process).

    A ``kill -9`` between the temp file and the rename leaves ``.NAME.pidPID.*.tmp`` behind; nothing reads it, but
    it would stay forever. Only files whose writer process no longer exists are removed, so a concurrent writer's
    temp file is never touched."""
    key = os.fspath(folder)
    if key in _cleaned:
        return
    _cleaned.add(key)
    try:
        entries = [e.name for e in os.scandir(folder) if e.name.startswith(".") and e.name.endswith(".tmp")]
    except OSError:
        return
    for name in entries:
        parts = name.rsplit(".", 3)  # [".NAME", "pidPID", RANDOM (no dots), "tmp"]
        pid = parts[1][len(_TMP_TAG):] if len(parts) == 4 and parts[1].startswith(_TMP_TAG) else ""
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:  # its writer is gone: the file is an orphan
            Path(folder, name).unlink(missing_ok=True)
        except OSError:  # alive under another user (EPERM): leave it
            pass


def atomic_write_json(obj: Any, path: str | os.PathLike, indent: int = 2, fsync: bool = True) -> None:
    """JSON (no trailing newline, like ``json.dump``) written atomically, durably (unless ``fsync`` is False) and
    with the umask's mode."""
    atomic_write_bytes(Path(path), json.dumps(obj, indent=indent).encode(), fsync=fsync)


def atomic_write_text(text: str, path: str | os.PathLike) -> None:
    """UTF-8 text (Markdown reports, tables) written atomically with the umask's mode."""
    atomic_write_bytes(Path(path), text.encode())
