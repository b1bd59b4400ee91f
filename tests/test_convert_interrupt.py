"""Killing ``nnunet-universal convert -j 2`` (SIGTERM or SIGKILL of the main process) leaves no process behind.

The CLI runs in a subprocess with its per-case job slowed down (:data:`_SLOW_JOB`, so that the kill lands while both
workers are busy); every descendant (forkserver, workers, resource tracker) is recorded from ``/proc`` before the
kill and must be gone shortly after it. A rerun then converts every case, and no visible file is half written.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads the process tree from /proc")

#: Imported by the main process and, as the job's module, preloaded by the forkserver: each case sleeps first.
_SLOW_JOB = '''
import os, time
from nnunet_universal.dataset_conversion import writer

_real = writer.convert_case


def convert_case(job):
    time.sleep(float(os.environ.get("SLOW_JOB_S", "0")))
    return _real(job)


writer.convert_case = convert_case
'''
_RUNNER = "import sys, slow_job\nfrom nnunet_universal.cli import main\nsys.exit(main(sys.argv[1:]))"


def _stat(pid: int) -> tuple[int, str, int] | None:
    """(parent pid, state, start time) of ``pid`` from ``/proc/PID/stat``, or None once it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rindex(")") + 2:].split()  # after "pid (comm) ": state, ppid, ..., starttime (field 22)
    return int(fields[1]), fields[0], int(fields[19])


def _descendants(root: int) -> dict[int, int]:
    """Every living descendant of ``root``: pid -> start time (so that a reused pid is not mistaken for it)."""
    children: dict[int, list[int]] = {}
    starts: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (st := _stat(int(entry.name))) is not None and st[1] != "Z":
            children.setdefault(st[0], []).append(int(entry.name))
            starts[int(entry.name)] = st[2]
    out, todo = {}, [root]
    while todo:
        for c in children.get(todo.pop(), []):
            out[c] = starts[c]
            todo.append(c)
    return out


def _alive(procs: dict[int, int]) -> list[int]:
    """The pids of ``procs`` still running (not exited, not a zombie, not reused)."""
    return [p for p, start in procs.items() if (st := _stat(p)) is not None and st[1] != "Z" and st[2] == start]


def _source(root: Path, cases: int) -> Path:
    rng = np.random.default_rng(0)
    for c in range(cases):
        lab = np.zeros((8, 10, 10), np.uint8)
        lab[2:5, 3:6, 3:6] = 1
        for i in range(2):
            img = sitk.GetImageFromArray(rng.normal(size=lab.shape).astype(np.float32))
            (root / "imagesTr").mkdir(parents=True, exist_ok=True)
            sitk.WriteImage(img, str(root / "imagesTr" / f"c{c}_{i:04d}.nii.gz"))
        (root / "labelsTr").mkdir(exist_ok=True)
        sitk.WriteImage(sitk.GetImageFromArray(lab), str(root / "labelsTr" / f"c{c}.nii.gz"))
    (root / "dataset.json").write_text(json.dumps({"channel_names": {"0": "T1c", "1": "FLAIR"},
                                                   "labels": {"background": 0, "ET": 1}, "numTraining": cases,
                                                   "file_ending": ".nii.gz"}))
    return root


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_killed_convert_leaves_no_process_and_reruns(sig, tmp_path):
    src = _source(tmp_path / "Dataset790_Kill", cases=4)
    (tmp_path / "hook").mkdir()
    (tmp_path / "hook" / "slow_job.py").write_text(_SLOW_JOB)
    raw = tmp_path / "raw"
    raw.mkdir()
    env = {**os.environ, "nnUNet_raw": str(raw), "OMP_NUM_THREADS": "1", "SLOW_JOB_S": "60",
           "PYTHONPATH": os.pathsep.join([str(tmp_path / "hook"), *filter(None, [os.environ.get("PYTHONPATH")])])}
    args = ["convert", "nnunet", str(src), "-d", "790", "-j", "2"]
    proc = subprocess.Popen([sys.executable, "-c", _RUNNER, *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    seen: dict[int, int] = {}
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:  # forkserver + 2 workers + resource tracker
            seen.update(_descendants(proc.pid))
            workers = [p for p in seen if (st := _stat(p)) is not None and st[0] != proc.pid]
            if len(workers) >= 2 and len(seen) >= 4:
                break
            time.sleep(0.05)
        assert proc.poll() is None and len(seen) >= 4, (proc.poll(), seen, proc.stderr.read() if proc.stderr else "")
        time.sleep(0.3)  # the workers are inside their jobs
        seen.update(_descendants(proc.pid))
        proc.send_signal(sig)
        proc.wait(timeout=20)
        deadline = time.monotonic() + 10
        while _alive(seen) and time.monotonic() < deadline:
            time.sleep(0.1)
        left = _alive(seen)
        assert not left, f"still running after the main process was killed: {left}"
    finally:
        for p in _alive(seen):  # never leave a process behind, even when the test fails
            os.kill(p, signal.SIGKILL)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if sig == signal.SIGTERM:
        err = proc.stderr.read()
        assert proc.returncode == 128 + signal.SIGTERM and "Traceback" not in err, (proc.returncode, err)
    folder = raw / "Dataset790_Kill"
    assert not (folder / "dataset.json").exists()
    assert not [p for p in folder.rglob("*") if p.is_file() and ".nnunet_universal" not in p.parts
                and not p.name.endswith(".nii.gz")]  # nothing but whole outputs (renamed into place when complete)
    rerun = subprocess.run([sys.executable, "-c", _RUNNER, *args[:-1], "1"], env={**env, "SLOW_JOB_S": "0"},
                           capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stderr
    assert len(json.loads((folder / "dataset.json").read_text())["universal"]["cases"]) == 4
    assert not (folder / ".nnunet_universal" / "tmp").exists()
