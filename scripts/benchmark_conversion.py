"""Benchmark: convert + merge of a fixed synthetic set vs. a plain copy of the same bytes.

    .venv/bin/python scripts/benchmark_conversion.py --cases 4 --shape 128 128 96 --repeats 5

Generates the five synthetic sources (seed 0, not timed), then per repeat (and per worker count), with a warm
page cache:
  * ``copy``: ``shutil.copytree`` of the native trees (the bytes conversion reads);
  * ``convert``: ``nnunet-universal convert`` of every source into a fresh ``$nnUNet_raw``;
  * ``rerun``: the same conversions again (everything up to date: the resume check only);
  * ``merge``: ``nnunet-universal merge`` of the five converted datasets (images hard-linked);
  * ``merge_images_by_copy`` / ``_by_link``: only placing the merged images, by copying the files that merge
    links (the "write files" option) or by hard-linking them (what merge does; the ``dataset`` key costs 0).
Minimum (the least disturbed run on a shared machine) and median over repeats go to
``benchmarks/results/conversion.json`` with the ratio (convert + merge) / copy.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

SOURCES = {"brats-mets": "brats-mets", "ucsf-bmsr": "ucsf-bmsr", "brainmetshare": "brainmetshare", "lits": "lits",
           "msd-braintumour": "msd"}  # synthetic source -> convert source


def _bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def _timed(fn, *args) -> float:
    t = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t


def _copy_trees(native: dict[str, Path], dst: Path) -> None:
    for s, top in native.items():
        shutil.copytree(top, dst / s)


def _convert_all(native: dict[str, Path], ids: list[int], workers: int) -> None:
    from nnunet_universal.dataset_conversion.api import convert

    for did, (s, top) in zip(ids, native.items(), strict=True):
        convert(SOURCES[s], top, did, workers=workers)


def _merge_all(ids: list[int], workers: int) -> None:
    from nnunet_universal.dataset_conversion.merge import merge_datasets

    merge_datasets(600, "Bench", [str(i) for i in ids], identical=["ucsf_bmsr.ET=brainmetshare.ET"], workers=workers)


def _copy_files(files: list[str], dst: Path) -> None:
    for i, f in enumerate(files):
        shutil.copyfile(f, dst / f"{i}.nii.gz")


def _link_files(files: list[str], dst: Path) -> None:
    for i, f in enumerate(files):
        os.link(f, dst / f"{i}.nii.gz")


def run(cases: int, shape: tuple[int, int, int] | None, workers: list[int], repeats: int, workdir: Path) -> dict:
    from nnunet_universal.synthetic.api import synthesize

    native = {s: synthesize(s, workdir / "native" / s, cases=cases, seed=0, shape=shape) for s in SOURCES}
    for top in native.values():  # warm the page cache for every variant alike
        [p.read_bytes() for p in top.rglob("*") if p.is_file()]
    ids = list(range(501, 501 + len(SOURCES)))
    times: dict[str, list[float]] = {"copy": [], "merge_images_by_copy": [], "merge_images_by_link": []}
    for r in range(repeats):
        times["copy"].append(_timed(_copy_trees, native, workdir / f"copy{r}"))
        for w in workers:
            raw = workdir / f"raw{r}_j{w}"
            raw.mkdir()
            os.environ["nnUNet_raw"] = str(raw)
            steps = (("convert", _convert_all, (native, ids, w)), ("rerun", _convert_all, (native, ids, w)),
                     ("merge", _merge_all, (ids, w)))
            for step, fn, args in steps:
                times.setdefault(f"{step}_j{w}", []).append(_timed(fn, *args))
        prov = json.loads((raw / "Dataset600_Bench" / "provenance.json").read_text())["cases"]
        linked = [e["file"] for c in prov.values() for k, e in c["sources"].items() if k.startswith("image:")]
        for how, fn in (("copy", _copy_files), ("link", _link_files)):
            (workdir / f"merge{how}{r}").mkdir()
            times[f"merge_images_by_{how}"].append(_timed(fn, linked, workdir / f"merge{how}{r}"))
    best = {k: round(min(v), 4) for k, v in times.items()}
    raw0 = workdir / f"raw0_j{workers[0]}"
    return {
        "command": "python " + " ".join(sys.argv),
        "cases_per_source": cases, "shape": list(shape) if shape else "synthetic default", "workers": workers,
        "repeats": repeats, "sources": list(SOURCES),
        "native_bytes": sum(_bytes(t) for t in native.values()),
        "converted_bytes": sum(_bytes(p) for p in raw0.glob("Dataset50*")),
        "merged_bytes_apparent": _bytes(raw0 / "Dataset600_Bench"),
        "merged_image_files": len(linked),
        "seconds_min": best,
        "seconds_median": {k: round(statistics.median(v), 4) for k, v in times.items()},
        "seconds_all": {k: [round(x, 4) for x in v] for k, v in times.items()},
        "ratio_vs_copy_min": {f"convert_plus_merge_j{w}": round((best[f"convert_j{w}"] + best[f"merge_j{w}"])
                                                                / best["copy"], 2) for w in workers},
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
                    "load_average_1min_at_end": round(os.getloadavg()[0], 2)},
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", type=int, default=6, help="cases per source (default 6)")
    p.add_argument("--shape", type=int, nargs=3, default=None, help="volume shape (default: synthetic default)")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts to time (default 1 2)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default="benchmarks/results/conversion.json")
    p.add_argument("--workdir", default=None, help="scratch folder (default: a temp folder, removed afterwards)")
    a = p.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with tempfile.TemporaryDirectory(dir=a.workdir) as tmp:
        result = run(a.cases, tuple(a.shape) if a.shape else None, a.workers, a.repeats, Path(tmp))
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("seconds_min", "ratio_vs_copy_min", "native_bytes")}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
