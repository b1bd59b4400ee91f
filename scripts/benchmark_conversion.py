"""Benchmark: convert + merge of a fixed synthetic set vs. the least work a validating converter must do.

    .venv/bin/python scripts/benchmark_conversion.py --cases 4 --shape 128 128 96 --repeats 5

Generates the synthetic sources (seed 0, not timed; all five unless ``--sources``), then per repeat (and per
worker count), with a warm page cache:
  * ``copy``: ``shutil.copytree`` of the native trees (the bytes conversion reads);
  * ``copy_decompress``: the same copy, plus every file decompressed once (``.nii.gz`` inflated with ``zlib``,
    PNG slices decoded; a ``.nii`` has nothing to decompress): the floor for a converter that must look at every
    voxel to validate it (the issue's yardstick; one process, like ``-j 1``);
  * ``convert``: ``nnunet-universal convert`` of every source into a fresh ``$nnUNet_raw`` (and each source alone,
    ``convert_<source>_j1``, beside ``copy_decompress_<source>``);
  * ``rerun``: the same conversions again (everything up to date: the resume check only);
  * ``merge``: ``nnunet-universal merge`` of the converted datasets (images copied);
  * ``merge_images_by_copy`` / ``_by_link``: only placing the merged images, by copying them (what merge does
    for images still as their converter wrote them) or by hard-linking them (what merge did before: cheaper, but
    a write to either file would change both).
Minimum (the least disturbed run on a shared machine) and median over repeats go to
``benchmarks/results/conversion.json`` with the ratios (convert + merge) / copy_decompress (the goal: <= 2) and
(convert + merge) / copy, and the README's table to ``conversion.md`` beside it (same name, ``.md``).
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
import zlib
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


def _decompress(path: Path) -> None:
    """Decompress one file once, discarding the output (gzip members inflated in 1 MiB blocks; PNG decoded)."""
    if path.name.startswith("._"):  # macOS resource forks of the synthetic MSD tree: not images
        return
    if path.name.endswith(".gz"):
        d = zlib.decompressobj(16 + zlib.MAX_WBITS)
        with open(path, "rb") as f:
            while block := f.read(1 << 20):
                while block:
                    d.decompress(block)
                    block = d.unused_data if d.eof else b""
                    if block:
                        d = zlib.decompressobj(16 + zlib.MAX_WBITS)
    elif path.suffix.lower() == ".png":
        from PIL import Image

        with Image.open(path) as im:
            im.load()


def _copy_decompress(native: dict[str, Path], dst: Path) -> None:
    _copy_trees(native, dst)
    for top in native.values():
        for p in sorted(top.rglob("*")):
            if p.is_file():
                _decompress(p)


def _convert_all(native: dict[str, Path], ids: list[int], workers: int,
                 per_source: dict[str, float] | None = None) -> None:
    from nnunet_universal.dataset_conversion.api import convert

    for did, (s, top) in zip(ids, native.items(), strict=True):
        t = time.perf_counter()
        convert(SOURCES[s], top, did, workers=workers)
        if per_source is not None:
            per_source[s] = time.perf_counter() - t


def _merge_all(ids: list[int], workers: int) -> None:
    from nnunet_universal.dataset_conversion.merge import merge_datasets

    merge_datasets(600, "Bench", [str(i) for i in ids], identical=_identical(list(ids)), workers=workers)


_DOMAIN_IDS: dict[int, str] = {}


def _identical(ids: list[int]) -> list[str]:
    both = {"ucsf-bmsr", "brainmetshare"} <= {_DOMAIN_IDS[i] for i in ids}
    return ["ucsf_bmsr.ET=brainmetshare.ET"] if both else []


def _copy_files(files: list[str], dst: Path) -> None:
    for i, f in enumerate(files):
        shutil.copyfile(f, dst / f"{i}.nii.gz")


def _link_files(files: list[str], dst: Path) -> None:
    for i, f in enumerate(files):
        os.link(f, dst / f"{i}.nii.gz")


def run(cases: int, shape: tuple[int, int, int] | None, workers: list[int], repeats: int, workdir: Path,
        sources: list[str] | None = None) -> dict:
    from nnunet_universal.synthetic.api import synthesize

    sources = sources or list(SOURCES)
    native = {s: synthesize(s, workdir / "native" / s, cases=cases, seed=0, shape=shape) for s in sources}
    for top in native.values():  # warm the page cache for every variant alike
        [p.read_bytes() for p in top.rglob("*") if p.is_file()]
    ids = list(range(501, 501 + len(sources)))
    _DOMAIN_IDS.update(zip(ids, sources, strict=True))
    times: dict[str, list[float]] = {"copy": [], "copy_decompress": [], "merge_images_by_copy": [],
                                     "merge_images_by_link": []}
    for r in range(repeats):
        times["copy"].append(_timed(_copy_trees, native, workdir / f"copy{r}"))
        times["copy_decompress"].append(_timed(_copy_decompress, native, workdir / f"copyd{r}"))
        for s, top in native.items():
            times.setdefault(f"copy_decompress_{s}", []).append(
                _timed(_copy_decompress, {s: top}, workdir / f"copyd{r}_{s}"))
        for w in workers:
            raw = workdir / f"raw{r}_j{w}"
            raw.mkdir()
            os.environ["nnUNet_raw"] = str(raw)
            per_source: dict[str, float] = {}
            steps = (("convert", _convert_all, (native, ids, w, per_source)), ("rerun", _convert_all, (native, ids, w)),
                     ("merge", _merge_all, (ids, w)))
            for step, fn, args in steps:
                times.setdefault(f"{step}_j{w}", []).append(_timed(fn, *args))
            if w == 1:
                for s, t in per_source.items():
                    times.setdefault(f"convert_{s}_j1", []).append(t)
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
        "repeats": repeats, "sources": sources,
        "native_bytes": sum(_bytes(t) for t in native.values()),
        "converted_bytes": sum(_bytes(p) for p in raw0.glob("Dataset50*")),
        "merged_bytes_apparent": _bytes(raw0 / "Dataset600_Bench"),
        "merged_image_files": len(linked),
        "seconds_min": best,
        "seconds_median": {k: round(statistics.median(v), 4) for k, v in times.items()},
        "seconds_all": {k: [round(x, 4) for x in v] for k, v in times.items()},
        "ratio_vs_copy_decompress_min": {f"convert_plus_merge_j{w}": round(
            (best[f"convert_j{w}"] + best[f"merge_j{w}"]) / best["copy_decompress"], 2) for w in workers},
        "ratio_vs_copy_decompress_median": {f"convert_plus_merge_j{w}": round(
            (statistics.median(times[f"convert_j{w}"]) + statistics.median(times[f"merge_j{w}"]))
            / statistics.median(times["copy_decompress"]), 2) for w in workers},
        "convert_ratio_per_source_min": {s: round(best[f"convert_{s}_j1"] / best[f"copy_decompress_{s}"], 2)
                                         for s in sources if f"convert_{s}_j1" in best},
        "ratio_vs_copy_min": {f"convert_plus_merge_j{w}": round((best[f"convert_j{w}"] + best[f"merge_j{w}"])
                                                                / best["copy"], 2) for w in workers},
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
                    "load_average_1min_at_end": round(os.getloadavg()[0], 2)},
    }


def _commit() -> str:
    """The checkout's commit, as every benchmark records it (``benchmark_accuracy.git_commit``)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from benchmark_accuracy import git_commit

    return git_commit()


def markdown(result: dict) -> str:
    """The README's table: seconds (best of the repeats, median in brackets) per step and worker count, and the
    ratios to the two yardsticks."""
    ws, lo, med = result["workers"], result["seconds_min"], result["seconds_median"]

    def cell(key: str) -> str:
        return f"{lo[key]:.2f} ({med[key]:.2f})" if key in lo else "—"

    rows = [("plain copy of the same bytes", lambda w: cell("copy") if w == ws[0] else "—"),
            ("copy + every file decompressed once", lambda w: cell("copy_decompress") if w == ws[0] else "—"),
            ("convert (every source)", lambda w: cell(f"convert_j{w}")),
            ("rerun with everything up to date", lambda w: cell(f"rerun_j{w}")),
            ("merge", lambda w: cell(f"merge_j{w}")),
            ("**(convert + merge) / (copy + one decompression)**", lambda w: (
                f"**{result['ratio_vs_copy_decompress_min'][f'convert_plus_merge_j{w}']:.2f}×** "
                f"({result['ratio_vs_copy_decompress_median'][f'convert_plus_merge_j{w}']:.2f}×)")),
            ("(convert + merge) / plain copy",
             lambda w: f"{result['ratio_vs_copy_min'][f'convert_plus_merge_j{w}']:.2f}×")]
    lines = [f"Conversion and merge cost: {len(result['sources'])} sources ({', '.join(result['sources'])}) × "
             f"{result['cases_per_source']} cases, {result['native_bytes'] / 1e6:.0f} MB of native files; seconds, "
             f"best of {result['repeats']} (median); commit {result.get('commit', 'unknown')}, 1-minute load average "
             f"at the end {result['machine']['load_average_1min_at_end']} on {result['machine']['cpus']} cores.", "",
             "| step | " + " | ".join(f"-j {w}" for w in ws) + " |", "|---|" + "---|" * len(ws)]
    lines += [f"| {name} | " + " | ".join(fn(w) for w in ws) + " |" for name, fn in rows]
    per = result.get("convert_ratio_per_source_min", {})
    if per:
        lines += ["", "convert -j 1 / (copy + one decompression) per source: "
                  + ", ".join(f"{s} {r:.2f}×" for s, r in per.items())]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", type=int, default=6, help="cases per source (default 6)")
    p.add_argument("--shape", type=int, nargs=3, default=None, help="volume shape (default: synthetic default)")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts to time (default 1 2)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--sources", nargs="+", choices=list(SOURCES), default=None,
                   help="synthetic sources to convert and merge (default: all five)")
    p.add_argument("--out", default="benchmarks/results/conversion.json")
    p.add_argument("--workdir", default=None, help="scratch folder (default: a temp folder, removed afterwards)")
    a = p.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with tempfile.TemporaryDirectory(dir=a.workdir) as tmp:
        result = run(a.cases, tuple(a.shape) if a.shape else None, a.workers, a.repeats, Path(tmp), a.sources)
    result["commit"] = _commit()
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(result))
    print(json.dumps({k: result[k] for k in ("seconds_min", "ratio_vs_copy_decompress_min",
                                             "ratio_vs_copy_decompress_median", "convert_ratio_per_source_min",
                                             "ratio_vs_copy_min", "native_bytes")}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
