"""Micro-benchmark of UniversalUNet against the plain planned nnU-Net network (issue 5).

Forward+backward time and peak memory of one training step on the same input, as ratios to the plain
network; goal: time <= 1.10x, memory <= 1.15x. Each variant runs in its own subprocess together with the
plain network, steps interleaved (paired comparison on a shared machine). Time is CPU time of the process
(``time.process_time``; wall time is reported too); memory is (a) the bytes of the tensors autograd saves
for backward (exact, allocator-independent) and (b) the peak RSS (CPU: ``VmHWM`` after resetting it)
or peak allocated memory (CUDA) during the step, above the level before it.

``--quality`` adds the harmony-order (J) sweep: a small 2D two-domain joint-training proxy (synthetic
disks under two different intensity transforms, different label sets), Dice per J over seeds.

Commands that produced benchmarks/results/network_micro.json (CPU, this repository's shared 2-core machine)::

    OMP_NUM_THREADS=1 .venv/bin/python scripts/benchmark_network.py --configuration 3d_fullres \
        --patch 64 64 64 --batch 2 --reps 5 --variants universal
    OMP_NUM_THREADS=1 .venv/bin/python scripts/benchmark_network.py --configuration 3d_fullres \
        --patch 64 64 64 --batch 2 --reps 3 --variants no_polynomial no_restore no_prompts J1 --quality
    OMP_NUM_THREADS=1 .venv/bin/python scripts/benchmark_network.py --configuration 2d \
        --patch 192 160 --batch 4 --reps 5 --variants universal
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DEFAULT_PLANS = REPO / "tests" / "data" / "plans_plain_unet.json"
DEFAULT_OUT = REPO / "benchmarks" / "results" / "network_micro.json"

#: variant name -> NetworkOptions overrides (applied to the plans' defaults)
VARIANTS: dict[str, dict[str, Any]] = {
    "universal": {},
    "no_polynomial": {"polynomial": False},
    "no_restore": {"restore": False},
    "no_harmony": {"harmony": False},
    "no_prompts": {"modality_prompt": False, "task_prompt": False},
    "no_gate": {"gate": False},
    **{f"J{j}": {"harmony_order": j} for j in range(1, 4)},
}


# ---- one measurement (runs in a child process) ------------------------------------------------------
def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def _measure_child(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnunet_universal.metadata import read_plans_universal
    from nnunet_universal.nn.universal_unet import UniversalUNet

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    pm = PlansManager(json.loads(Path(args.plans).read_text()))
    cm = pm.get_configuration(args.configuration)
    meta, planned = read_plans_universal(pm.plans)
    options = dataclasses.replace(planned, **VARIANTS[args.child])
    n_in, n_out = len(meta.slots), meta.num_union_labels()
    domains = [meta.domain_label_ids(n) for n in meta.domain_names]

    def backbone():
        return get_network_from_plans(cm.network_arch_class_name, cm.network_arch_init_kwargs,
                                      cm.network_arch_init_kwargs_req_import, n_in, n_out, deep_supervision=True)

    plain = backbone().to(device)
    net = UniversalUNet(backbone(), domains, n_out, n_in, options).to(device)
    with torch.no_grad():  # trained-like polynomial coefficients (zero at init would flatter nothing, but be honest)
        for name, p in net.named_parameters():
            if name.split(".")[-1] in ("poly_weight", "gamma", "delta"):
                p.normal_(0.0, 0.05)
    x = torch.randn(args.batch, n_in, *args.patch, device=device)
    x[:, -1] = 0.0  # last slot missing (CT for the MR domains)
    domain = torch.arange(args.batch, device=device) % len(domains)
    avail = torch.ones(args.batch, n_in, dtype=torch.bool, device=device)
    avail[:, -1] = False

    def step_plain():
        out = plain(x)
        sum(o.float().mean() for o in out).backward()

    def step_universal():
        o = net.forward_train(x, domain, avail)
        loss = sum(v.float().mean() for h in o.heads for v in h.values())
        if o.gate_logits is not None:
            loss = loss + o.gate_logits.float().mean()
        loss.backward()

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def saved_bytes(step) -> int:
        seen: dict[int, int] = {}

        def pack(t):
            try:
                st = t.untyped_storage()
                seen[st.data_ptr()] = max(seen.get(st.data_ptr(), 0), st.nbytes())
            except (RuntimeError, NotImplementedError):
                pass
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            step()
        return sum(seen.values())

    def peak_bytes(step) -> int:
        sync()
        if device.type == "cuda":
            torch.cuda.empty_cache()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            step()
            sync()
            return torch.cuda.max_memory_allocated() - base
        _trim()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
        base = _rss_kb("VmRSS")
        step()
        return (_rss_kb("VmHWM") - base) * 1024

    steps = {"plain": step_plain, "variant": step_universal}
    for s in steps.values():  # warm-up
        s()
        plain.zero_grad(set_to_none=True)
        net.zero_grad(set_to_none=True)
    res: dict[str, Any] = {k: {"cpu_s": [], "wall_s": []} for k in steps}
    for _ in range(args.reps):
        for k, s in steps.items():
            plain.zero_grad(set_to_none=True)
            net.zero_grad(set_to_none=True)
            sync()
            t0, c0 = time.perf_counter(), time.process_time()
            s()
            sync()
            res[k]["wall_s"].append(time.perf_counter() - t0)
            res[k]["cpu_s"].append(time.process_time() - c0)
    for k, s in steps.items():
        plain.zero_grad(set_to_none=True)
        net.zero_grad(set_to_none=True)
        res[k]["saved_bytes"] = saved_bytes(s)
        plain.zero_grad(set_to_none=True)
        net.zero_grad(set_to_none=True)
        res[k]["peak_bytes"] = peak_bytes(s)
    res["params"] = {"plain": sum(p.numel() for p in plain.parameters()),
                     "variant": sum(p.numel() for p in net.parameters())}
    return res


def _summarize(name: str, raw: dict[str, Any]) -> dict[str, Any]:
    p, v = raw["plain"], raw["variant"]
    clock = "cpu_s"
    return {
        "variant": name, "overrides": VARIANTS[name],
        "time_ratio": min(v[clock]) / min(p[clock]),
        "time_ratio_median": sorted(v[clock])[len(v[clock]) // 2] / sorted(p[clock])[len(p[clock]) // 2],
        "wall_ratio": min(v["wall_s"]) / min(p["wall_s"]),
        "saved_tensors_ratio": v["saved_bytes"] / p["saved_bytes"],
        "peak_memory_ratio": v["peak_bytes"] / max(p["peak_bytes"], 1),
        "plain": p, "universal": v, "params": raw["params"],
    }


# ---- harmony order (J) quality proxy ------------------------------------------------------------------
#: harmony-order sweep: name -> (NetworkOptions overrides, HarmonyNorm/HarmonyRestore kwargs)
QUALITY_CONFIGS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "no_harmony": ({"harmony": False, "restore": False}, {}),
    **{f"J{j}": ({"harmony_order": j}, {}) for j in range(1, 6)},
    "J3_power_basis": ({"harmony_order": 3}, {"basis": "power"}),
    "J3_unbounded_denominator": ({"harmony_order": 3}, {"denominator_bound": 0.0}),
    "J3_power_basis_unbounded": ({"harmony_order": 3}, {"basis": "power", "denominator_bound": 0.0}),
    "J3_no_restore": ({"harmony_order": 3, "restore": False}, {}),
}


def _quality_sweep(names: list[str], seeds: int, steps: int, threads: int) -> dict[str, Any]:
    """Tiny 2D joint training: domain 0 and 1 see the same kind of disks through different intensity
    transforms and annotate different classes; Dice of each domain's class on held-out images per config."""
    import torch
    import torch.nn.functional as F
    from dynamic_network_architectures.architectures.unet import PlainConvUNet

    from nnunet_universal.metadata import NetworkOptions
    from nnunet_universal.nn.universal_unet import UniversalUNet

    torch.set_num_threads(threads)
    size = 32

    def make(n: int, dom: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
        img = torch.zeros(n, 1, size, size)
        seg = torch.zeros(n, size, size, dtype=torch.long)
        for i in range(n):
            for k, cls in ((0, 1), (1, 2)):  # class 1: small bright disk, class 2: large dim disk
                r = 3 + 5 * k + float(torch.rand(1, generator=gen)) * 2
                cy, cx = (torch.rand(2, generator=gen) * (size - 2 * r) + r).tolist()
                disk = ((yy - cy) ** 2 + (xx - cx) ** 2) < r * r
                img[i, 0][disk] = 1.0 if cls == 1 else 0.5
                seg[i][disk & (seg[i] == 0)] = cls
        img = img + 0.25 * torch.randn(img.shape, generator=gen)
        if dom == 1:  # another scanner: non-linear, non-monotonic intensity response
            img = torch.sin(2.5 * img) * 3.0 + 1.0
        target = (seg == (1 if dom == 0 else 2)).long()  # domain 0 annotates class 1 only, domain 1 class 2
        return img, target

    results: dict[str, Any] = {}
    for name in names:
        over, harmony_kwargs = QUALITY_CONFIGS[name]
        dice_runs = []
        t0 = time.process_time()
        for seed in range(seeds):
            torch.manual_seed(seed)
            gen = torch.Generator().manual_seed(1000 + seed)
            backbone = PlainConvUNet(1, 4, [8, 16, 32, 64], torch.nn.Conv2d, 3, [1, 2, 2, 2], 2, 3, 1, True,
                                     torch.nn.InstanceNorm2d, {"eps": 1e-5, "affine": True}, None, None,
                                     torch.nn.LeakyReLU, {"inplace": True}, deep_supervision=False)
            opts = dataclasses.replace(NetworkOptions(), modality_prompt=False, task_prompt=False, **over)
            net = UniversalUNet(backbone, [[1], [2]], 3, 1, opts, harmony_kwargs=harmony_kwargs)
            # nnU-Net's optimizer and gradient clipping (nnUNetTrainer.configure_optimizers / train_step)
            optim = torch.optim.SGD(net.parameters(), lr=1e-2, momentum=0.99, nesterov=True, weight_decay=3e-5)
            for _ in range(steps):
                xs, ys, ds = [], [], []
                for dom in (0, 1):
                    x, y = make(4, dom, gen)
                    xs.append(x)
                    ys.append(y)
                    ds.append(torch.full((4,), dom))
                x, y, d = torch.cat(xs), torch.cat(ys), torch.cat(ds)
                out = net.forward_train(x, d, torch.ones(8, 1, dtype=torch.bool))
                loss = sum(F.cross_entropy(out.heads[0][k], y[idx]) for k, idx in out.samples.items())
                loss = loss + F.cross_entropy(out.gate_logits, d)
                optim.zero_grad()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(net.parameters(), 12)
                optim.step()
            net.eval()
            dice = {}
            with torch.no_grad():
                for dom in (0, 1):
                    x, y = make(32, dom, torch.Generator().manual_seed(99 + dom))
                    pred = net(x, domain=torch.full((32,), dom)).argmax(1)
                    fg = pred == (1 if dom == 0 else 2)
                    tp = (fg & (y == 1)).sum().item()
                    dice[f"domain{dom}"] = 2 * tp / max(fg.sum().item() + (y == 1).sum().item(), 1)
            dice_runs.append(dice)
        mean = {k: sum(r[k] for r in dice_runs) / len(dice_runs) for k in dice_runs[0]}
        results[name] = {"overrides": over, "harmony_kwargs": harmony_kwargs, "dice_per_seed": dice_runs,
                         "mean_dice": mean,
                         "mean_dice_both": sum(mean.values()) / len(mean),
                         "cpu_s_per_run": (time.process_time() - t0) / seeds}
        print(f"[quality] {name}: {results[name]['mean_dice_both']:.4f} {mean}", flush=True)
    task = ("2D 32x32, 2 domains (intensity transform sin(2.5x)*3+1 for domain 1), PlainConvUNet [8,16,32,64], "
            "nnU-Net's SGD (1e-2, momentum 0.99, nesterov) + clip 12, batch 4+4, oracle Dice on 32+32 held-out images")
    return {"task": task, "steps": steps, "seeds": seeds, "results": results}


# ---- driver -------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--plans", default=str(DEFAULT_PLANS))
    ap.add_argument("--configuration", default="3d_fullres")
    ap.add_argument("--patch", type=int, nargs="+", default=[64, 64, 64])
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--variants", nargs="+", default=["universal"], choices=sorted(VARIANTS))
    ap.add_argument("--quality", action="store_true", help="run the harmony-order quality sweep too")
    ap.add_argument("--quality-configs", nargs="+", default=list(QUALITY_CONFIGS), choices=list(QUALITY_CONFIGS))
    ap.add_argument("--quality-seeds", type=int, default=3)
    ap.add_argument("--quality-steps", type=int, default=150)
    ap.add_argument("--out", default=str(DEFAULT_OUT))
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--child-out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.child:
        Path(args.child_out).write_text(json.dumps(_measure_child(args)))
        return

    out_path = Path(args.out)
    report = json.loads(out_path.read_text()) if out_path.exists() else {}
    setup = {"plans": os.path.relpath(args.plans, REPO), "configuration": args.configuration, "patch": args.patch,
             "batch": args.batch, "reps": args.reps, "threads": args.threads, "device": args.device,
             "step": "forward_train + backward (universal) vs forward + backward (plain), deep supervision on"}
    for name in args.variants:
        with tempfile.TemporaryDirectory() as tmp:
            child_out = Path(tmp) / "r.json"
            cmd = [sys.executable, __file__, "--child", name, "--child-out", str(child_out), "--plans", args.plans,
                   "--configuration", args.configuration, "--patch", *map(str, args.patch), "--batch",
                   str(args.batch), "--reps", str(args.reps), "--threads", str(args.threads), "--device", args.device]
            subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
            summary = _summarize(name, json.loads(child_out.read_text()))
        report.setdefault("runs", {})[f"{args.device}:{args.configuration}:{name}"] = {"setup": setup, **summary}
        print(f"{name}: time x{summary['time_ratio']:.3f} (median x{summary['time_ratio_median']:.3f}), "
              f"saved tensors x{summary['saved_tensors_ratio']:.3f}, peak x{summary['peak_memory_ratio']:.3f}",
              flush=True)
        _write(out_path, report)
    if args.quality:
        report["harmony_order_quality"] = _quality_sweep(args.quality_configs, args.quality_seeds,
                                                         args.quality_steps, args.threads)
        _write(out_path, report)


def _write(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=2)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


if __name__ == "__main__":
    main()
