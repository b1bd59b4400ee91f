"""Host-overhead proxy: operations dispatched per training step and per sliding-window tile, universal vs stock.

    .venv/bin/python scripts/count_ops.py                     # writes benchmarks/results/ops_cpu.{json,md}
    .venv/bin/python scripts/count_ops.py --json ops.json     # the JSON there instead (nothing in results/)

On a GPU a universal training step was host-bound (README "Benchmarks": 84 ms of host time against 52 ms of GPU
time per step on an H200): every operator PyTorch dispatches costs host time whether or not its kernel is
small. The number of ATen operations dispatched is the same on CPU and GPU for the same code path (each becomes one
kernel launch or one metadata-only call there), so it can be measured and kept from regressing on a CPU-only
machine. Counted with a ``TorchDispatchMode`` (every ATen call below autograd: forward, backward, optimizer):

* ``step``: one ``trainer.train_step(batch)`` (nnU-Net's own step for ``nnUNetTrainer``, ours for
  ``UniversalTrainer``: forward, loss, backward, gradient clipping, SGD) on the same batch, after one warm-up step;
* ``tile``: ``predict_sliding_window_return_logits`` of one preprocessed case (our predictor: dataset-free, hard
  routing, one sliding window that aggregates every head and routes at the end; no mirroring) divided by its number
  of sliding-window tiles; the case
  with the most voxels, as ``benchmark_speed.py`` times (per-case work such as nnU-Net's ``network.to(device)``
  weighs less there than on a one-tile case).

Ratios are universal / stock (JSON keys ``step_ops_ratio``, ``tile_ops_ratio``, with the raw counts ``step_ops``
and ``tile_ops`` of each arm and the operations the universal step and tile dispatch beyond stock's, by name);
goals: <= 1.3 and <= 1.2. The trainers are built as ``nnUNetv2_train`` builds them, on
``scripts/benchmark_speed.py``'s synthetic dataset (``--shape`` as there). The CPU path of the U-Harmony layers is
the C++ one (``nn/harmony_cpu.py``: one registered operator per layer and direction, as an ATen kernel is); on a GPU
the compiled one dispatches its own glue. SGD runs one loop per
parameter on CPU tensors (5 operations each) but PyTorch's multi-tensor (foreach) implementation on CUDA ones;
``step_ops_optimizer`` counts the first, so that part of the ratio is a CPU artefact (the universal network has more
parameter tensors: HarmonyNorm's polynomial, HarmonyRestore, heads, gate).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
GOALS = {"step_ops_ratio": 1.3, "tile_ops_ratio": 1.2}


def count_ops(fn: Callable[[], Any]) -> collections.Counter:
    """Run ``fn()`` and count the ATen operations it dispatches (name -> calls)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class _Counter(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.counts: collections.Counter = collections.Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.counts[str(func.overloadpacket)] += 1
            return func(*args, **(kwargs or {}))

    mode = _Counter()
    with mode:
        fn()
    return mode.counts


def step_ops(trainer: Any, batch: dict) -> collections.Counter:
    """Ops of one ``trainer.train_step(batch)`` after one untimed warm-up step (lazy initialisations excluded)."""
    trainer.network.train()
    trainer.train_step(batch)
    return count_ops(lambda: trainer.train_step(batch))


def _sliding_window_tiles(predictor: Any, data: Any) -> int:
    from nnunet_universal.inference.routing import case_tiles

    return case_tiles(data.shape, predictor.configuration_manager.patch_size, predictor.tile_step_size)


def tile_ops(predictor: Any, data: Any, with_counts: bool = False) -> tuple:
    """(ops per tile, tiles) of ``predict_sliding_window_return_logits(data)``; data: (C, *spatial). With
    ``with_counts`` also the counts by name (whole case)."""
    import torch

    with torch.no_grad():
        predictor.predict_sliding_window_return_logits(data)  # warm-up
        counts = count_ops(lambda: predictor.predict_sliding_window_return_logits(data))
    tiles = _sliding_window_tiles(predictor, data)
    return (sum(counts.values()) / tiles, tiles, counts) if with_counts else (sum(counts.values()) / tiles, tiles)


def predictor_for(trainer: Any) -> Any:
    """nnU-Net's predictor (stock trainer) or ours (universal), on the trainer's network, dataset-free, no TTA."""
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    from nnunet_universal.inference.predictor import UniversalPredictor

    universal = type(trainer).__name__ != "nnUNetTrainer"
    cls = UniversalPredictor if universal else nnUNetPredictor
    pred = cls(tile_step_size=0.5, use_gaussian=True, use_mirroring=False, perform_everything_on_device=False,
               device=trainer.device, verbose=False, allow_tqdm=False)
    trainer.set_deep_supervision_enabled(False)
    trainer.network.eval()
    pred.manual_initialization(trainer.network, trainer.plans_manager, trainer.configuration_manager,
                               [trainer.network.state_dict()], trainer.dataset_json, type(trainer).__name__, None)
    torch.set_grad_enabled(True)
    return pred


def first_case(trainer: Any) -> Any:
    """(C, *spatial) float tensor: the first preprocessed case of the trainer's dataset."""
    import numpy as np
    import torch
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

    folder = str(trainer.preprocessed_dataset_folder)
    dataset = infer_dataset_class(folder)(folder)
    data = dataset.load_case(sorted(dataset.identifiers)[0])[0]
    return torch.from_numpy(np.ascontiguousarray(data[:])).float()


def largest_case(trainer: Any) -> Any:
    """(C, *spatial) float tensor: the preprocessed case with the most voxels, as ``benchmark_speed.py`` predicts (so
    that the per-case work, e.g. nnU-Net moving the network to the device, is spread over as many tiles)."""
    import numpy as np
    import torch
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

    folder = str(trainer.preprocessed_dataset_folder)
    dataset = infer_dataset_class(folder)(folder)
    key = max(sorted(dataset.identifiers), key=lambda k: int(np.prod(dataset.load_case(k)[0].shape)))
    return torch.from_numpy(np.ascontiguousarray(dataset.load_case(key)[0][:])).float()


def _commit() -> str:
    """The checkout's commit, as every benchmark records it (``benchmark_accuracy.git_commit``)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from benchmark_accuracy import git_commit

    return git_commit(REPO)


def to_markdown(res: dict) -> str:
    rows = [f"| training step | {res['stock']['step_ops']} | {res['universal']['step_ops']} | "
            f"{res['step_ops_ratio']:.2f}x | <= {GOALS['step_ops_ratio']}x |",
            f"| inference, per tile | {res['stock']['tile_ops']:.0f} | {res['universal']['tile_ops']:.0f} | "
            f"{res['tile_ops_ratio']:.2f}x | <= {GOALS['tile_ops_ratio']}x |"]
    top = ", ".join(f"{k} {v}" for k, v in res["universal"]["step_top"][:8])
    opt = (f"SGD's per-parameter loop (CPU tensors; one multi-tensor call per group on CUDA) is "
           f"{res['stock']['step_ops_optimizer']} of the stock step's operations and "
           f"{res['universal']['step_ops_optimizer']} of the universal one's.")
    move = (f"nnU-Net's predictor calls `network.to(device)` for every case; where the network already is, that "
            f"dispatches {res['stock'].get('case_move_ops', '?')} operations for nnU-Net's network and "
            f"{res['universal'].get('case_move_ops', '?')} for ours (`UniversalUNet.to` returns at once), counted in "
            f"the tile column divided by the {res['tiles']} tiles.")
    return "\n".join([
        f"Operations dispatched (ATen calls, forward + backward + optimizer), UniversalTrainer vs nnUNetTrainer, "
        f"same plans and batch; commit {res['commit']}, {res['machine']}. Tiles: {res['tiles']} per case.",
        "",
        f"Command: `{res['command']}`",
        "",
        "| what | nnUNetTrainer | UniversalTrainer | ratio | goal |",
        "|---|---:|---:|---:|---|",
        *rows,
        "",
        f"Most frequent operations of the universal step: {top}.",
        "",
        opt,
        "",
        move,
        "",
    ])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, default=REPO / "bench_work" / "speed", help="benchmark_speed's work folder")
    p.add_argument("--results", type=Path, default=REPO / "benchmarks" / "results")
    p.add_argument("--cases", type=int, default=4, help="synthetic cases per source (first run only)")
    p.add_argument("--shape", type=int, nargs=3, default=None,
                   help="synthetic volume shape, first run only (default: the sources'; as benchmark_speed --shape)")
    p.add_argument("--threads", type=int, default=1, help="CPU threads (the counts do not depend on them)")
    p.add_argument("--json", type=Path, default=None,
                   help="write the results (JSON) to this file only, instead of RESULTS/ops_cpu.{json,md}")
    args = p.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    sys.path.insert(0, str(REPO / "scripts"))
    import benchmark_speed as bs
    import torch

    torch.set_num_threads(args.threads)
    bs._set_paths(args.work.resolve())
    bs.prepare(args.work.resolve(), args.cases, tuple(args.shape) if args.shape else None)
    batch_file = bs.make_batch(args.work.resolve(), "cpu")
    batch = torch.load(batch_file, weights_only=True)
    res: dict[str, Any] = {"commit": _commit(), "machine": f"{platform.platform()}, {os.cpu_count()} cores",
                           "command": " ".join(["python scripts/count_ops.py", *sys.argv[1:]])}
    counts = {}
    for key, name in (("stock", "nnUNetTrainer"), ("universal", "UniversalTrainer")):
        torch.manual_seed(0)
        trainer = bs._trainer(name, "cpu")
        steps = step_ops(trainer, dict(batch))
        per_tile, tiles, tile_counts = tile_ops(predictor_for(trainer), largest_case(trainer), with_counts=True)
        res[key] = {"step_ops": sum(steps.values()), "tile_ops": per_tile,
                    "step_ops_optimizer": optimizer_ops(trainer), "step_top": steps.most_common(15),
                    "case_move_ops": move_ops(trainer)}
        res["tiles"] = tiles
        counts[key] = (steps, tile_counts)
    res["step_ops_ratio"] = res["universal"]["step_ops"] / res["stock"]["step_ops"]
    res["tile_ops_ratio"] = res["universal"]["tile_ops"] / res["stock"]["tile_ops"]
    res["step_extra_by_op"] = _extra(counts["stock"][0], counts["universal"][0], 1)
    res["tile_extra_by_op"] = _extra(counts["stock"][1], counts["universal"][1], res["tiles"])
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(res, indent=1))
        print(to_markdown(res))
        return 0
    from nnunet_universal.atomic_io import atomic_write_bytes

    args.results.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(args.results / "ops_cpu.json", json.dumps(res, indent=1).encode())
    atomic_write_bytes(args.results / "ops_cpu.md", to_markdown(res).encode())
    print(to_markdown(res))
    return 0


def move_ops(trainer: Any) -> int:
    """Operations of ``network.to(device)`` where the network already is, under inference mode: what nnU-Net's
    predictor dispatches for it once per case (part of every tile count: divided by the tiles)."""
    import torch

    with torch.inference_mode():
        return sum(count_ops(lambda: trainer.network.to(trainer.device)).values())


def optimizer_ops(trainer: Any) -> int:
    """Operations of one ``optimizer.step()`` alone (SGD's per-parameter loop on CPU tensors); gradients kept."""
    import torch

    with torch.no_grad():
        saved = [(p, p.detach().clone()) for g in trainer.optimizer.param_groups for p in g["params"]]
        state = {p: {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in trainer.optimizer.state[p].items()}
                 for p, _ in saved}
    n = sum(count_ops(trainer.optimizer.step).values())
    with torch.no_grad():  # undo the step: the next measurement sees the same weights
        for p, v in saved:
            p.copy_(v)
        for p, st in state.items():
            trainer.optimizer.state[p] = st
    return n


def _extra(stock: collections.Counter, universal: collections.Counter, per: int) -> dict[str, float]:
    """Operations the universal arm dispatches beyond the stock one, by name (per ``per``: tiles), largest first."""
    diff = {k: (universal[k] - stock[k]) / per for k in set(stock) | set(universal) if universal[k] != stock[k]}
    return dict(sorted(diff.items(), key=lambda kv: -kv[1]))


if __name__ == "__main__":
    sys.exit(main())
