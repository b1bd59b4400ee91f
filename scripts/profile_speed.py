"""Where UniversalTrainer's extra time and memory go, beside nnUNetTrainer (the diagnosis behind benchmark_speed.py).

    python scripts/profile_speed.py --work bench_work/speed --device cuda --out bench_work/profile

Uses the dataset and the fixed batch that ``scripts/benchmark_speed.py`` prepared in ``--work`` (run it first).
In one fresh process per arm: the training step (time, peak memory, host-device synchronizations per step with
their call sites, a torch.profiler table) and the sliding-window inference of the benchmark case (time and peak
memory; for UniversalTrainer in dataset-free mode with and without the encoding cache and in oracle mode; a
profiler table and the synchronizations of one dataset-free pass). Writes ``OUT/profile_{device}.json`` and
``OUT/profile_{device}_{arm}_{train,infer}.txt`` (tables sorted by self device time).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchmark_speed as bench  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def _sync_sites(fn) -> dict[str, int]:
    """Host-device synchronizations of one call of ``fn``, counted per call site (CUDA only)."""
    import torch

    if not torch.cuda.is_available():
        return {}
    sites: collections.Counter = collections.Counter()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fn()
            torch.cuda.synchronize()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    for w in caught:
        if "synchroniz" in str(w.message):
            sites[f"{os.path.relpath(w.filename, REPO) if str(REPO) in w.filename else w.filename}:{w.lineno}"] += 1
    return dict(sites.most_common())


def _timed(fn, repeats: int, cuda: bool) -> dict:
    import torch

    times = bench.time_calls(fn, repeats, cuda)
    out = {"min_s": min(times), "times_s": times}
    if cuda:
        out["max_allocated_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def _table(fn, path: Path, cuda: bool) -> None:
    import torch
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts) as prof:
        fn()
        if cuda:
            torch.cuda.synchronize()
    key = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    path.write_text(prof.key_averages().table(sort_by=key, row_limit=40))


def run_arm(work: Path, arm: str, device: str, threads: int, out: Path) -> dict:
    """Everything measured for one arm, in this process."""
    import numpy as np
    import torch
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    cuda = device == "cuda"
    arm, _, variant = arm.partition(":")
    if variant == "restore_half":  # experiment: HarmonyRestore writes the autocast dtype instead of fp32
        import nnunet_universal.nn.harmony as harmony

        harmony._output_dtype = lambda x: x.dtype
    elif variant:
        raise SystemExit(f"unknown variant {variant!r} (known: restore_half)")
    trainer = bench._trainer(arm, device)
    res: dict = {"arm": arm + (f":{variant}" if variant else "")}
    saved = torch.load(work / "batch.pt", weights_only=True)  # tensors and a list of str keys only
    batch = {"data": saved["data"], "target": saved["target"], "keys": np.array(saved["keys"])}
    step = lambda: trainer.train_step(batch)  # noqa: E731
    for _ in range(3):
        step()
    res["train"] = _timed(step, 5, cuda)
    res["train_syncs"] = _sync_sites(step)
    tag = arm + (f"_{variant}" if variant else "")
    _table(step, out / f"profile_{device}_{tag}_train.txt", cuda)

    trainer.set_deep_supervision_enabled(False)
    trainer.network.eval()
    trainer.configure_rotation_dummyDA_mirroring_and_inital_patch_size()
    folder = trainer.preprocessed_dataset_folder
    ds = infer_dataset_class(folder)(folder)
    key = max(sorted(ds.identifiers), key=lambda k: int(np.prod(ds.load_case(k)[0].shape)))
    data = torch.from_numpy(np.asarray(ds.load_case(key)[0][:], dtype=np.float32))
    predictor = bench._predictor(trainer, device, mirroring=False)
    infer = lambda: predictor.predict_sliding_window_return_logits(data)  # noqa: E731
    # (mode, encoding cache MB, oracle domain): dataset-free with and without the cache, oracle (no routing pass)
    cache_mb = predictor.encoding_cache_mb if hasattr(predictor, "encoding_cache_mb") else 0
    modes = [("default", cache_mb, None)]
    if arm != "nnUNetTrainer":
        modes += [("no_encoding_cache", 0, None), ("oracle", cache_mb, predictor.meta.domain_names[0])]
    res["infer"] = {}
    for mode, mb, oracle in modes:
        predictor.encoding_cache_mb, predictor.oracle_domain = mb, oracle
        infer()  # warm-up (compiles the fused kernels for new shapes)
        res["infer"][mode] = _timed(infer, 3, cuda)
    predictor.encoding_cache_mb, predictor.oracle_domain = cache_mb, None
    res["infer_syncs"] = _sync_sites(infer)
    _table(infer, out / f"profile_{device}_{tag}_infer.txt", cuda)
    return res


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, default=REPO / "bench_work" / "speed")
    p.add_argument("--device", default="cuda", choices=["cpu", "cuda"])
    p.add_argument("--threads", type=int, default=8)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--arms", nargs="+", default=list(bench.ARMS),
                   help="trainer names; NAME:restore_half runs NAME with HarmonyRestore in the autocast dtype")
    p.add_argument("--arm", help=argparse.SUPPRESS)
    p.add_argument("--arm-out", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    args.work = args.work.resolve()
    bench._set_paths(args.work)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.arm:
        args.arm_out.write_text(json.dumps(run_arm(args.work, args.arm, args.device, args.threads, args.out)))
        return 0
    if not (args.work / "batch.pt").is_file():
        raise SystemExit(f"{args.work} holds no prepared benchmark: run scripts/benchmark_speed.py --work {args.work} "
                         "first")
    results = []
    for arm in args.arms:
        with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
            tmp = Path(f.name)
        cmd = [sys.executable, __file__, "--arm", arm, "--arm-out", str(tmp), "--work", str(args.work),
               "--device", args.device, "--threads", str(args.threads), "--out", str(args.out)]
        subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
        results.append(json.loads(tmp.read_text()))
        tmp.unlink()
        r = results[-1]
        print(f"{arm}: train {r['train']['min_s']:.4f} s, "
              + ", ".join(f"infer[{m}] {v['min_s']:.4f} s" for m, v in r["infer"].items())
              + f"; syncs/step {sum(r['train_syncs'].values())}, syncs/inference {sum(r['infer_syncs'].values())}",
              flush=True)
    (args.out / f"profile_{args.device}.json").write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
