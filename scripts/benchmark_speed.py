"""Benchmark: training step, inference and peak memory of UniversalTrainer vs nnUNetTrainer (same plans, patch, batch).

    .venv/bin/python scripts/benchmark_speed.py --device cpu --threads 2 --steps 6 --warmup 2 --rounds 2

Both trainers are instantiated exactly as ``nnUNetv2_train`` does (``get_trainer_from_args`` on the same merged
synthetic dataset and ``nnUNetUniversalPlans``) and ``initialize()``d; then, each in a fresh subprocess per
measurement (so that peak memory belongs to one arm alone):

* ``train``: ``trainer.train_step(batch)`` (forward + loss + backward + gradient clipping + SGD step, nnU-Net's own
  step for the stock trainer, the universal loss with deep supervision and gate loss for ours) on ONE fixed batch
  drawn once from nnU-Net's training loader and saved to disk, ``--warmup`` steps untimed, ``--steps`` timed;
* ``infer`` / ``infer_tta``: the sliding window of one preprocessed case (``predict_sliding_window_return_logits``:
  Gaussian weighting, without / with nnU-Net's mirroring TTA; for ours ``UniversalPredictor`` with case-level
  routing, i.e. dataset-free mode).
  Preprocessing and export are the same code for both and are left out, so the ratio is the network's cost.
  Ours predicts in one sliding window (hard routing, the default: every head aggregated, the routing decided at
  the end; ``nn/case_embedding.py``).
* ``infer_two_pass`` / ``infer_two_pass_nocache`` (ours only): the two-pass prediction it replaced (a routing pass,
  then the sliding window with the chosen head; ``NNUNET_UNIVERSAL_ONE_PASS=0``, what soft routing uses), with the
  encoding cache that keeps the routing pass's encoder outputs for the prediction pass and without it
  (``NNUNET_UNIVERSAL_ENCODING_CACHE_MB=0``: every tile encoded twice).
* peak memory of the timed steps (after the warm-up, as on a GPU): on CPU the peak RSS (``VmHWM``, reset after the
  warm-up) of the subprocess, and its increase over the RSS before the first step (removes the interpreter + torch
  + network + data baseline, which is the same for both arms; what remains is activations, gradients, optimizer
  state, allocator caches and whatever the warm-up loaded, e.g. the compiler); on GPU
  ``torch.cuda.max_memory_allocated``, reset after the warm-up. On CPU the peak including the warm-up (where the
  fused U-Harmony kernels are compiled, a one-time cost per process) is reported beside it.

Arms alternate (A B B A ...) for ``--rounds`` rounds so that load changes on a shared machine hit both; the ratios
use the fastest timed run of each arm (the least disturbed by other processes, as ``timeit`` does), medians are
reported beside them. Writes ``benchmarks/results/speed_{device}.json`` and ``.md`` (ratios universal / stock,
goals: step <= 1.10x, inference <= 1.05x, peak memory of training and inference <= 1.15x). ``--profile`` adds
torch.profiler tables (self CPU time) of both arms' training step and inference
(``speed_{device}_profile_{arm}_{train,infer}.txt``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ARMS = ("nnUNetTrainer", "UniversalTrainer")
WHATS = ("train", "infer", "infer_tta")  # training step; sliding window without / with mirroring (nnU-Net default)
#: the universal arm only: the two-pass dataset-free inference (``NNUNET_UNIVERSAL_ONE_PASS=0``) with and without the
#: encoding cache (``NNUNET_UNIVERSAL_ENCODING_CACHE_MB=0``)
UNIVERSAL_ONLY = ("infer_two_pass", "infer_two_pass_nocache")
GOALS = {"train_step": 1.10, "inference": 1.05, "peak_memory": 1.15, "peak_memory_inference": 1.15}
DATASET_ID, DATASET_NAME = 590, "SpeedBench"
SOURCES = (("brats-mets", 591), ("ucsf-bmsr", 592), ("brainmetshare", 593))


def _set_paths(work: Path) -> None:
    for key in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        (work / key).mkdir(parents=True, exist_ok=True)
        os.environ[key] = str(work / key)
    os.environ.setdefault("nnUNet_compile", "f")
    os.environ["nnUNet_n_proc_DA"] = "0"  # loaders in-process: nothing else competes for the cores


def prepare(work: Path, cases: int, shape: tuple[int, int, int] | None) -> None:
    """Synthesize, convert, merge and plan the benchmark dataset once (skipped when the plans exist)."""
    from nnunet_universal.metadata import PLANS_NAME

    plans = work / "nnUNet_preprocessed" / f"Dataset{DATASET_ID}_{DATASET_NAME}" / f"{PLANS_NAME}.json"
    if plans.is_file():
        return
    from nnunet_universal.dataset_conversion.api import convert
    from nnunet_universal.dataset_conversion.merge import merge_datasets
    from nnunet_universal.planners.api import plan_and_preprocess
    from nnunet_universal.synthetic.api import png_slice_spacing, synthesize

    for seed, (source, did) in enumerate(SOURCES):
        # BrainMetShare PNG slices carry no geometry: give the synthetic cases' true spacing
        spacing = png_slice_spacing(shape) if source == "brainmetshare" else None
        convert(source, synthesize(source, work / "native" / source, cases=cases, seed=seed, shape=shape), did,
                workers=1, spacing=spacing)
    merge_datasets(DATASET_ID, DATASET_NAME, [str(d) for _, d in SOURCES], identical=["ucsf_bmsr.ET=brainmetshare.ET"],
                   workers=1)
    plan_and_preprocess(DATASET_ID, configurations=("3d_fullres",), num_processes=1)


def _trainer(name: str, device: str, inference: bool = False):
    """The trainer, initialized (network, optimizer, loss): for training exactly as ``nnUNetv2_train`` builds it; for
    ``inference`` its class found as the predictors find it (``discovery.trainer_class``: ours without a module scan,
    nnU-Net's by its lookup), then built as ``nnUNetv2_train`` builds it. (nnU-Net's lookup of an external trainer
    imports every module of its trainer package, timm and torchvision among them: about 50 MB of RSS that
    ``nnunet-universal predict`` does not pay.)"""
    import torch
    from batchgenerators.utilities.file_and_folder_operations import join, load_json
    from nnunetv2.paths import nnUNet_preprocessed
    from nnunetv2.run.run_training import get_trainer_from_args
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    from nnunet_universal.discovery import set_ext_trainer_env, trainer_class
    from nnunet_universal.metadata import PLANS_NAME

    set_ext_trainer_env()
    if inference:
        folder = join(nnUNet_preprocessed, maybe_convert_to_dataset_name(DATASET_ID))
        plans = load_json(join(folder, PLANS_NAME + ".json"))
        plans["continue_training"] = False
        trainer = trainer_class(name)(plans=plans, configuration="3d_fullres", fold=0,
                                      dataset_json=load_json(join(folder, "dataset.json")), device=torch.device(device))
    else:
        trainer = get_trainer_from_args(str(DATASET_ID), "3d_fullres", 0, name, PLANS_NAME,
                                        device=torch.device(device))
    trainer.initialize()
    return trainer


def make_batch(work: Path, device: str) -> Path:
    """Draw one training batch from nnU-Net's loader (seeded) and save it; both arms train on these tensors."""
    import numpy as np
    import torch

    path = work / "batch.pt"
    if path.is_file():
        return path
    np.random.seed(0)
    torch.manual_seed(0)
    trainer = _trainer("nnUNetTrainer", device)
    loader, _ = trainer.get_dataloaders()
    batch = next(loader)
    torch.save({"data": batch["data"], "target": batch["target"], "keys": [str(k) for k in batch["keys"]]}, path)
    return path


def _status_mb(field: str) -> float:
    """``VmRSS`` (now) or ``VmHWM`` (peak) of this process in MB, from /proc/self/status (Linux)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0: ``5 > /proc/self/clear_refs``); False where unsupported.

    ``ru_maxrss`` cannot be used: Linux keeps the parent's high-water mark across fork + exec, so every worker
    would report the parent's peak (planning and preprocessing).
    """
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def worker(work: Path, arm: str, what: str, device: str, threads: int, steps: int, warmup: int,
           profile: Path | None) -> dict:
    """One measurement in this (fresh) process: ``train`` steps or ``infer`` of one case; returns times + memory."""
    import numpy as np
    import torch

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    trainer = _trainer(arm, device, inference=what != "train")
    cuda = device == "cuda"
    rss_before = _status_mb("VmRSS")  # network, optimizer and data in memory; activations not yet
    peak_reset = _reset_peak_rss()
    case_info: dict = {}
    if what == "train":
        saved = torch.load(work / "batch.pt", weights_only=True)  # tensors and a list of str keys only
        batch = {"data": saved["data"], "target": saved["target"], "keys": np.array(saved["keys"])}
        for _ in range(warmup):
            trainer.train_step(batch)
        work_fn = lambda: trainer.train_step(batch)  # noqa: E731
    else:
        from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

        trainer.set_deep_supervision_enabled(False)
        trainer.network.eval()
        folder = trainer.preprocessed_dataset_folder
        ds = infer_dataset_class(folder)(folder)
        # the largest case (most sliding-window tiles), the same one for both arms
        key = max(sorted(ds.identifiers), key=lambda k: int(np.prod(ds.load_case(k)[0].shape)))
        data = torch.from_numpy(np.asarray(ds.load_case(key)[0][:], dtype=np.float32))
        # nnU-Net sets the mirroring axes in on_train_start (not in initialize): the same call, without training
        trainer.configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        predictor = _predictor(trainer, device, mirroring=what == "infer_tta")
        if what.startswith("infer_two_pass"):
            predictor.one_pass = False
        if what == "infer_two_pass_nocache":
            predictor.encoding_cache_mb = 0
        from nnunet_universal.inference.routing import case_tiles

        patch = trainer.configuration_manager.patch_size
        case_info = {"case": key, "case_shape": list(data.shape[1:]),
                     "tiles": case_tiles(data.shape, patch, predictor.tile_step_size)}
        for _ in range(warmup):
            predictor.predict_sliding_window_return_logits(data)
        work_fn = lambda: predictor.predict_sliding_window_return_logits(data)  # noqa: E731
    warmup_peak = _status_mb("VmHWM")  # includes compiling the fused kernels (first step of a process)
    peak_reset = _reset_peak_rss() and peak_reset  # the timed steps' own peak, as on a GPU
    times = time_calls(work_fn, steps, cuda)
    out = {"arm": arm, "what": what, "times_s": times, "rss_before_mb": rss_before, **case_info,
           "max_rss_mb": _status_mb("VmHWM"), "peak_reset_before_timing": peak_reset,
           "max_rss_incl_warmup_mb": max(warmup_peak, _status_mb("VmHWM")),
           "patch_size": list(trainer.configuration_manager.patch_size),
           "batch_size": trainer.configuration_manager.batch_size,
           "n_params": sum(p.numel() for p in trainer.network.parameters())}
    if cuda:
        out["cuda_max_allocated_mb"] = torch.cuda.max_memory_allocated() / 2**20
    if profile is not None:
        out["profile"] = _profile(work_fn, profile.with_name(f"{profile.stem}_{what}{profile.suffix}"))
    return out


def time_calls(fn, repeats: int, cuda: bool) -> list[float]:
    """Wall seconds of ``repeats`` calls of ``fn`` (device work included on CUDA); resets the CUDA peak first."""
    import torch

    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return times


def _predictor(trainer, device: str, mirroring: bool):
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    from nnunet_universal.inference.predictor import UniversalPredictor

    cls = UniversalPredictor if type(trainer).__name__ != "nnUNetTrainer" else nnUNetPredictor
    predictor = cls(tile_step_size=0.5, use_gaussian=True, use_mirroring=mirroring,
                    perform_everything_on_device=device == "cuda", device=torch.device(device), verbose=False,
                    allow_tqdm=False)
    predictor.manual_initialization(trainer.network, trainer.plans_manager, trainer.configuration_manager, None,
                                    trainer.dataset_json, type(trainer).__name__,
                                    trainer.inference_allowed_mirroring_axes)
    return predictor


def _profile(fn, path: Path) -> str:
    """torch.profiler table of two calls of ``fn`` (self CPU time; self CUDA time on a GPU), written to ``path``."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities, profile_memory=True, record_shapes=False) as prof:
        for _ in range(2):
            fn()
        if cuda:
            torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="self_cuda_time_total" if cuda else "self_cpu_time_total", row_limit=30)
    path.write_text(table)
    return str(path)


def _run_worker(args: argparse.Namespace, arm: str, what: str, profile: Path | None) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = Path(f.name)
    cmd = [sys.executable, __file__, "--worker", what, "--arm", arm, "--work", str(args.work), "--device", args.device,
           "--threads", str(args.threads), "--steps", str(args.steps if what == "train" else args.infer_repeats),
           "--warmup", str(args.warmup if what == "train" else 1), "--worker-out", str(out)]
    if profile is not None:
        cmd += ["--profile-to", str(profile)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
    res = json.loads(out.read_text())
    out.unlink()
    return res


def summarize(runs: list[dict], device: str) -> dict:
    """Medians per arm and measurement, and the universal / stock ratios against the goals."""
    per: dict[str, dict] = {}
    for what in (*WHATS, *UNIVERSAL_ONLY):
        for arm in ARMS:
            rs = [r for r in runs if r["arm"] == arm and r["what"] == what]
            if not rs:
                continue
            times = [t for r in rs for t in r["times_s"]]
            mem_key = "cuda_max_allocated_mb" if device == "cuda" else "max_rss_mb"
            per.setdefault(arm, {})[what] = {
                "median_s": statistics.median(times), "min_s": min(times), "n": len(times),
                "peak_mb": statistics.median(r[mem_key] for r in rs),
                "peak_over_baseline_mb": statistics.median(r["max_rss_mb"] - r["rss_before_mb"] for r in rs),
                "peak_incl_warmup_mb": statistics.median(r.get("max_rss_incl_warmup_mb", r["max_rss_mb"]) for r in rs),
                "n_params": rs[0]["n_params"]}
    u, s = per["UniversalTrainer"], per["nnUNetTrainer"]
    ratios = {"train_step": u["train"]["min_s"] / s["train"]["min_s"],
              "inference": u["infer"]["min_s"] / s["infer"]["min_s"],
              "train_step_median": u["train"]["median_s"] / s["train"]["median_s"],
              "inference_median": u["infer"]["median_s"] / s["infer"]["median_s"],
              "peak_memory": u["train"]["peak_mb"] / s["train"]["peak_mb"],
              "inference_tta": u["infer_tta"]["min_s"] / s["infer_tta"]["min_s"],
              "inference_tta_median": u["infer_tta"]["median_s"] / s["infer_tta"]["median_s"],
              "peak_memory_inference": u["infer"]["peak_mb"] / s["infer"]["peak_mb"]}
    for what in UNIVERSAL_ONLY:
        if what in u:
            key = what.removeprefix("infer_")
            ratios[f"inference_{key}"] = u[what]["min_s"] / s["infer"]["min_s"]
            ratios[f"inference_{key}_median"] = u[what]["median_s"] / s["infer"]["median_s"]
            ratios[f"peak_memory_inference_{key}"] = u[what]["peak_mb"] / s["infer"]["peak_mb"]
    if device != "cuda":
        ratios["peak_memory_over_baseline"] = (u["train"]["peak_over_baseline_mb"]
                                               / max(s["train"]["peak_over_baseline_mb"], 1e-9))
        ratios["peak_memory_incl_warmup"] = u["train"]["peak_incl_warmup_mb"] / s["train"]["peak_incl_warmup_mb"]
    met = {k: ratios[k] <= g for k, g in GOALS.items()}
    return {"per_arm": per, "ratios": ratios, "goals": GOALS, "goals_met": met}


def _case_text(res: dict) -> str:
    c = res.get("inference_case")
    return "–" if not c else f"`{c['case']}`, {' x '.join(map(str, c['case_shape']))} voxels, {c['tiles']} tiles"


def _goal(res: dict, key: str) -> str:
    met = res["summary"]["goals_met"][key]
    return f"<= {GOALS[key]:.2f}x ({'met' if met else 'missed'})"


def _times(m: dict) -> str:
    """One arm's time cell: fastest (median) seconds."""
    return f"{m['min_s']:.3f} ({m['median_s']:.3f})"


def _ratio(r: dict, key: str) -> str:
    """A time ratio cell: of the fastest runs (of the medians)."""
    return f"{r[key]:.3f}x ({r[key + '_median']:.3f}x)"


def to_markdown(res: dict) -> str:
    per, r = res["summary"]["per_arm"], res["summary"]["ratios"]
    s, u = per["nnUNetTrainer"], per["UniversalTrainer"]
    mem = "CUDA max allocated" if res["device"] == "cuda" else "peak RSS of the process"
    tta_met = "met" if r["inference_tta"] <= GOALS["inference"] else "missed"
    lines = [f"Speed on `{res['machine']}` ({res['device']}, {res['threads']} torch threads), patch "
             f"{res['patch_size']}, batch {res['batch_size']}; {s['train']['n']} steps / {s['infer']['n']} cases per "
             f"arm, arms alternating. Times: fastest (median) run; the ratio uses the fastest runs, the least "
             f"disturbed by other processes on a shared machine (median ratio in brackets). "
             f"Inference case: {_case_text(res)}. "
             f"Command: `{res['command']}` ({res['wall_s'] / 60:.1f} min), commit {res.get('commit', 'unknown')}.", "",
             "| | nnUNetTrainer | UniversalTrainer | ratio | goal |", "|---|---|---|---|---|",
             f"| parameters | {s['train']['n_params']:,} | {u['train']['n_params']:,} | "
             f"{u['train']['n_params'] / s['train']['n_params']:.2f}x | |",
             f"| training step (s) | {_times(s['train'])} | {_times(u['train'])} | {_ratio(r, 'train_step')} | "
             f"{_goal(res, 'train_step')} |",
             f"| sliding-window inference per case, no mirroring (s) | {_times(s['infer'])} | {_times(u['infer'])} | "
             f"{_ratio(r, 'inference')} | {_goal(res, 'inference')} |",
             f"| sliding-window inference per case, mirroring TTA (s) | {_times(s['infer_tta'])} | "
             f"{_times(u['infer_tta'])} | {_ratio(r, 'inference_tta')} | <= {GOALS['inference']:.2f}x ({tta_met}) |",
             f"| training peak memory (MB, {mem}) | {s['train']['peak_mb']:.0f} | {u['train']['peak_mb']:.0f} | "
             f"{r['peak_memory']:.3f}x | {_goal(res, 'peak_memory')} |",
             f"| inference peak memory (MB, no mirroring) | {s['infer']['peak_mb']:.0f} | "
             f"{u['infer']['peak_mb']:.0f} | {r['peak_memory_inference']:.3f}x | "
             f"{_goal(res, 'peak_memory_inference')} |"]
    for what, label in (("infer_two_pass", "two-pass inference with the encoding cache "
                                           "(`NNUNET_UNIVERSAL_ONE_PASS=0`)"),
                        ("infer_two_pass_nocache", "two-pass inference without the encoding cache (also "
                                                   "`NNUNET_UNIVERSAL_ENCODING_CACHE_MB=0`)")):
        key = what.removeprefix("infer_")
        if f"inference_{key}" in r:
            lines += [f"| {label} (s) | {_times(s['infer'])} | {_times(u[what])} | {_ratio(r, f'inference_{key}')} | |",
                      f"| its peak memory (MB) | {s['infer']['peak_mb']:.0f} | {u[what]['peak_mb']:.0f} | "
                      f"{r[f'peak_memory_inference_{key}']:.3f}x | |"]
    if "peak_memory_incl_warmup" in r:
        lines.append(f"| training peak memory incl. the warm-up step (MB; first-use kernel builds happen there) | "
                     f"{s['train']['peak_incl_warmup_mb']:.0f} | {u['train']['peak_incl_warmup_mb']:.0f} | "
                     f"{r['peak_memory_incl_warmup']:.3f}x | |")
    if "peak_memory_over_baseline" in r:
        lines.append(f"| training memory above the pre-step RSS (MB) | {s['train']['peak_over_baseline_mb']:.0f} | "
                     f"{u['train']['peak_over_baseline_mb']:.0f} | {r['peak_memory_over_baseline']:.2f}x | |")
    return "\n".join(lines) + "\n"


def _write(path: Path, text: str) -> None:
    """Atomic write (temp file + rename), the package's helper."""
    from nnunet_universal.atomic_io import atomic_write_bytes

    atomic_write_bytes(path, text.encode())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, default=REPO / "bench_work" / "speed")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: on a shared machine more threads measure the contention)")
    p.add_argument("--steps", type=int, default=6, help="timed training steps per round and arm")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--infer-repeats", type=int, default=2, help="timed sliding windows per round and arm")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--cases", type=int, default=4, help="synthetic cases per domain")
    p.add_argument("--shape", type=int, nargs=3, default=None, help="synthetic volume shape (default: the sources')")
    p.add_argument("--profile", action="store_true", help="also profile the universal training step")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    p.add_argument("--worker", choices=(*WHATS, *UNIVERSAL_ONLY), help=argparse.SUPPRESS)
    p.add_argument("--arm", help=argparse.SUPPRESS)
    p.add_argument("--worker-out", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--profile-to", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    args.work = args.work.resolve()
    _set_paths(args.work)
    if args.worker:
        res = worker(args.work, args.arm, args.worker, args.device, args.threads, args.steps, args.warmup,
                     args.profile_to)
        args.worker_out.write_text(json.dumps(res))
        return 0

    t0 = time.perf_counter()
    from benchmark_accuracy import git_commit  # a sibling script (this script's folder is on sys.path)

    commit = git_commit()  # the code measured: the checkout at the start (-dirty with uncommitted package changes)
    prepare(args.work, args.cases, tuple(args.shape) if args.shape else None)
    make_batch(args.work, args.device)
    runs = []
    for r in range(args.rounds):
        for what in (*WHATS, *UNIVERSAL_ONLY):
            for arm in ARMS if r % 2 == 0 else ARMS[::-1]:
                if what in UNIVERSAL_ONLY and arm != "UniversalTrainer":
                    continue
                runs.append(_run_worker(args, arm, what, None))
                print(f"round {r} {what} {arm}: median {statistics.median(runs[-1]['times_s']):.3f} s, "
                      f"max RSS {runs[-1]['max_rss_mb']:.0f} MB", flush=True)
    if args.profile:
        for what in WHATS:
            for arm in ARMS:
                _run_worker(args, arm, what, args.out / f"speed_{args.device}_profile_{arm}.txt")
    import torch

    res = {"commit": commit,
           "machine": f"{platform.node()} {platform.processor() or platform.machine()}, {os.cpu_count()} cores"
           + (f", {torch.cuda.get_device_name()}" if args.device == "cuda" else ""),
           "device": args.device, "threads": args.threads, "torch": torch.__version__,
           "command": " ".join(["python", "scripts/benchmark_speed.py", *sys.argv[1:]]),
           "patch_size": runs[0]["patch_size"], "batch_size": runs[0]["batch_size"],
           "inference_case": {k: next(r[k] for r in runs if "case" in r) for k in ("case", "case_shape", "tiles")},
           "load_average_at_end": os.getloadavg(), "wall_s": time.perf_counter() - t0,
           "summary": summarize(runs, args.device), "runs": runs,
           "profiles": sorted(p.name for p in args.out.glob(f"speed_{args.device}_profile_*"))
           if args.profile else []}
    _write(args.out / f"speed_{args.device}.json", json.dumps(res, indent=2))
    _write(args.out / f"speed_{args.device}.md", to_markdown(res))
    print(to_markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
