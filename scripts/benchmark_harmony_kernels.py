"""Micro-benchmark of the three CPU paths of one HarmonyNorm -> HarmonyRestore pair (forward + backward).

Paths: ``cpp`` (the C++ kernels of ``nn/harmony_cpu.py``, the default for fp32 CPU tensors), ``compiled`` (the
``torch.compile``d functions of ``nn/harmony_fused.py``, the GPU's path) and ``eager`` (the chunked path of
``nn/harmony_functions.py``, ``NNUNET_UNIVERSAL_FUSED=0``). Each path runs in a fresh process (rounds alternate
the order); reported: the fastest step (median in brackets) and the process's peak RSS (``VmHWM``), which shows
what the compiler keeps resident. The first two steps (building/compiling) are not timed.

    python scripts/benchmark_harmony_kernels.py [--shape 2 32 56 40 40] [--rounds 3]

Writes ``benchmarks/results/harmony_kernels_cpu.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import benchmark_speed  # same folder: its RSS reader and atomic write

REPO = Path(__file__).resolve().parents[1]
PATHS = ("cpp", "compiled", "eager")


def child(path: str, shape: list[int], steps: int) -> dict:
    """Time ``steps`` forward+backward passes of one layer pair on ``path`` (run in its own process)."""
    os.environ["NNUNET_UNIVERSAL_FUSED"] = "0" if path == "eager" else "1"
    import torch

    from nnunet_universal.nn import harmony_cpu
    from nnunet_universal.nn.harmony import HarmonyNorm, HarmonyRestore

    torch.set_num_threads(1)
    if path == "compiled":
        harmony_cpu.serves = lambda x: False  # this process only
    torch.manual_seed(0)
    c = shape[1]
    norm, restore = HarmonyNorm(c), HarmonyRestore(c, mix_init=0.5)
    with torch.no_grad():  # away from the identity initialization, as after training
        norm.poly_weight.normal_(0, 0.1)
        restore.gamma.normal_(0, 0.1)
        restore.delta.normal_(0, 0.1)
    x = torch.randn(*shape, requires_grad=True)
    mu, sigma = torch.randn(shape[:2]), torch.rand(shape[:2]) + 0.5

    def step() -> None:
        restore(norm(x), mu, sigma).sum().backward()

    for _ in range(2):
        step()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    used = "cpp" if harmony_cpu.serves(x) else path
    return {"path": path, "served_by": used, "times_s": times, "peak_rss_mb": benchmark_speed._status_mb("VmHWM")}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", type=int, nargs="+", default=[2, 32, 56, 40, 40], help="activation (B, C, *spatial)")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    p.add_argument("--child", choices=PATHS, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.shape, args.steps)))
        return 0
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    runs = []
    for r in range(args.rounds):
        for path in PATHS if r % 2 == 0 else PATHS[::-1]:
            cmd = [sys.executable, __file__, "--child", path, "--shape", *map(str, args.shape), "--steps",
                   str(args.steps)]
            out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
            runs.append(json.loads(out.strip().splitlines()[-1]))
            print(f"round {r} {path}: min {1000 * min(runs[-1]['times_s']):.1f} ms, "
                  f"peak RSS {runs[-1]['peak_rss_mb']:.0f} MB", flush=True)
    summary = {}
    for path in PATHS:
        rs = [x for x in runs if x["path"] == path]
        summary[path] = {"min_ms": 1000 * min(min(x["times_s"]) for x in rs),
                         "median_ms": 1000 * statistics.median(t for x in rs for t in x["times_s"]),
                         "peak_rss_mb": statistics.median(x["peak_rss_mb"] for x in rs),
                         "served_by": sorted({x["served_by"] for x in rs})}
    res = {"machine": f"{platform.node()} {platform.machine()}, {os.cpu_count()} cores",
           "command": " ".join(["python", "scripts/benchmark_harmony_kernels.py", *sys.argv[1:]]),
           "shape": args.shape, "load_average_at_end": os.getloadavg(), "summary": summary, "runs": runs}
    lines = [f"One HarmonyNorm -> HarmonyRestore pair (J = 3, residual mix), activation {args.shape}, forward + "
             f"backward, one thread, on `{res['machine']}`. Command: `{res['command']}`.", "",
             "| path | step (ms), fastest (median) | vs cpp | peak RSS (MB) |", "|---|---|---|---|"]
    base = summary["cpp"]["min_ms"]
    for path in PATHS:
        s = summary[path]
        lines.append(f"| {path} | {s['min_ms']:.1f} ({s['median_ms']:.1f}) | {s['min_ms'] / base:.2f}x | "
                     f"{s['peak_rss_mb']:.0f} |")
    benchmark_speed._write(args.out / "harmony_kernels_cpu.json", json.dumps(res, indent=2))
    benchmark_speed._write(args.out / "harmony_kernels_cpu.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
