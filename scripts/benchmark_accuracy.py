"""Accuracy benchmark: universal training vs single-dataset and joint nnU-Net baselines, ablations, missing slots.

    .venv/bin/python scripts/benchmark_accuracy.py --size small            # run (resumes; skips finished arms)
    .venv/bin/python scripts/benchmark_accuracy.py --size small --report   # tables from the results JSON only

A fixed synthetic suite (three brain MR domains with different sequence sets, label protocols and appearance:
BraTS-METS-like, UCSF-BMSR-like, BrainMetShare-like; ``--with-ct`` adds the LiTS-like CT domain, a separate suite
with its own work folder and ``accuracy_<size>_ct`` results) goes through the
commands a user runs, each as a subprocess: ``nnunet-universal synth/convert/merge/plan``, ``nnUNetv2_plan_and_
preprocess`` (single-dataset baselines), ``nnunet-universal train`` (= ``nnUNetv2_train``; every arm, fold 0,
resumed with ``--c``),
``nnunet-universal predict`` / ``nnUNetv2_predict`` and ``nnunet-universal evaluate`` on the merge's held-out
test cases (``--holdout``). Every arm trains for the same ``NNUNET_UNIVERSAL_SCHEDULE`` (epochs:iterations:
validation iterations) on the same fold-0 training cases (the single-dataset baselines get the merged split mapped
back to their case ids). Arms whose ``checkpoint_final.pth`` exists are not retrained, and evaluations already in
``benchmarks/results/accuracy_<size>.json`` are not redone, so an interrupted run continues where it stopped.

Stock nnU-Net arms (single-dataset baselines, plain joint nnU-Net) need a stock trainer that obeys the same
schedule: ``nnUNetTrainerScheduled`` (nnUNetTrainer + ``NNUNET_UNIVERSAL_SCHEDULE``), found through
``nnUNet_extTrainer``; they are skipped with a message while it is missing.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
RESULTS = REPO / "benchmarks" / "results"
STOCK_TRAINER = "nnUNetTrainerScheduled"
MERGED_ID, MERGED_NAME = 610, "BenchUniversal"
#: synthetic source -> (converted dataset id, domain name)
SOURCES = {"brats-mets": (611, "brats_mets"), "ucsf-bmsr": (612, "ucsf_bmsr"), "brainmetshare": (613, "brainmetshare"),
           "lits": (614, "lits")}
IDENTICAL = ["ucsf_bmsr.ET=brainmetshare.ET"]

#: cases per domain, synthetic shape (None: the sources' defaults), lesion radius scale (``synth --lesion-scale``),
#: held-out cases per domain, validation cases per domain in fold 0, schedule (epochs, iterations, val iterations),
#: U-Net features of the first stage (nnU-Net: 32), test-time mirroring.
#: At the default shapes (about 4 mm voxels) the sources' own metastases are a few voxels each; lesion scale 2.5
#: (radii x2.5, 0.2-3 % of the volume) keeps the task learnable within the CPU budget of 640 iterations (a stock
#: nnU-Net trained on the suite's UCSF-like cases alone reaches pseudo-Dice 0.7 within 64 iterations).
SIZES = {
    "tiny": {"cases": 5, "shape": None, "lesion_scale": 2.5, "holdout": 1, "val_per_domain": 1,
             "schedule": (1, 2, 1), "base_features": 8, "tta": False},  # a smoke test of the suite, not a benchmark
    "small": {"cases": 14, "shape": None, "lesion_scale": 2.5, "holdout": 4, "val_per_domain": 1,
              "schedule": (40, 16, 2), "base_features": 16, "tta": False},
    "medium": {"cases": 40, "shape": [120, 120, 78], "lesion_scale": 1.0, "holdout": 10, "val_per_domain": 3,
               "schedule": (100, 100, 10), "base_features": 32, "tta": True},
}


@dataclass(frozen=True)
class Arm:
    """One training run (per seed) and the predictions made with it."""

    name: str
    trainer: str
    kind: str  # "universal": merged dataset, nnunet-universal predict; "stock": merged, nnUNetv2_predict; "single"
    modes: tuple[str, ...] = ("dataset-free",)
    missing: bool = False  # also predict with each slot withheld
    label: str = ""


ARMS = {a.name: a for a in (
    Arm("universal", "UniversalTrainer", "universal", ("dataset-free", "oracle", "dataset-free-hard"), True,
        "UniversalTrainer"),
    Arm("single", STOCK_TRAINER, "single", ("oracle",), label="single-dataset nnU-Net (one model per domain)"),
    Arm("joint_naive", "UniversalTrainer_NaiveJoint", "universal", ("dataset-free", "oracle"),
        label="joint, naive loss (unknown = background)"),
    Arm("joint_marginal", "UniversalTrainer_MarginalJoint", "universal", ("dataset-free", "oracle"),
        label="joint, marginal loss"),
    Arm("joint_stock", STOCK_TRAINER, "stock", label="joint, plain nnU-Net (network and loss)"),
    Arm("no_modality_dropout", "UniversalTrainer_NoModalityDropout", "universal", missing=True,
        label="no modality dropout"),
    Arm("no_harmony", "UniversalTrainer_NoHarmony", "universal", label="no harmonization (InstanceNorm)"),
    Arm("first_stage", "UniversalTrainer_FirstStageHarmony", "universal", label="harmonization in stage 1 only"),
    Arm("no_poly_affine", "UniversalTrainer_NoPolyAffine", "universal", label="no polynomial affine"),
    Arm("no_restore", "UniversalTrainer_NoRestore", "universal", label="no restoration"),
    Arm("full_rate_harmony", "UniversalTrainer_FullRateHarmony", "universal",
        label="U-Harmony parameters at the full learning rate (paper; default before session 5)"),
    Arm("no_prompts", "UniversalTrainer_NoPrompts", "universal", label="no prompts"),
    Arm("no_harmony_no_prompts", "UniversalTrainer_NoHarmonyNoPrompts", "universal",
        label="no harmonization, no prompts (heads and gate only)"),
    Arm("no_gate", "UniversalTrainer_NoGate", "universal", ("oracle",), label="dataset-specific heads, no gate"),
)}


# ---- small helpers ---------------------------------------------------------------------------------

def _read_json(path: Path, default=None):
    return json.loads(path.read_text()) if path.is_file() else default


def _write_json(path: Path, obj) -> None:
    _write_text(path, json.dumps(obj, indent=1))


def _write_text(path: Path, text: str) -> None:
    from nnunet_universal.synthetic.io import atomic_write_bytes

    atomic_write_bytes(path, text.encode())


@contextlib.contextmanager
def _locked(path: Path):
    """Exclusive advisory lock on ``path``'s sibling ``.lock`` file for a read-modify-write of ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(f".{path.name}.lock"), "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def suite_name(size: str, with_ct: bool) -> str:
    """``small``, ``small_ct``, ...: names the work folder and the results files of one suite."""
    return size + ("_ct" if with_ct else "")


class Suite:
    """Paths, environment and command runner of one benchmark size in one work folder."""

    def __init__(self, work: Path, size: str, sources: list[str], threads: int, device: str, results: Path,
                 stock_trainer: str = STOCK_TRAINER) -> None:
        self.work, self.size, self.cfg, self.sources = work, size, SIZES[size], sources
        self.stock_trainer = stock_trainer
        self.device, self.threads = device, threads
        self.raw, self.pre = work / "nnUNet_raw", work / "nnUNet_preprocessed"
        # the CT suite is another dataset: its own results file (and, in main(), its own work folder)
        self.results_json = results / f"accuracy_{suite_name(size, 'lits' in sources)}.json"
        self.plans = "nnUNetUniversalPlans" + self._plans_suffix()
        self.stock_plans = "nnUNetPlans" + self._plans_suffix()

    def _plans_suffix(self) -> str:
        return "" if self.cfg["base_features"] == 32 else f"_f{self.cfg['base_features']}"

    def merged(self) -> Path:
        return self.raw / f"Dataset{MERGED_ID}_{MERGED_NAME}"

    def single(self, source: str) -> Path:
        did = SOURCES[source][0]
        return next(self.raw.glob(f"Dataset{did}_*"))

    def env(self, seed: int = 0) -> dict[str, str]:
        from nnunet_universal.trainers.discovery import ext_trainer_value

        e, s = dict(os.environ), self.cfg["schedule"]
        e.update(nnUNet_raw=str(self.raw), nnUNet_preprocessed=str(self.pre),
                 nnUNet_results=str(self.work / f"nnUNet_results_seed{seed}"), nnUNet_compile="f",
                 nnUNet_def_n_proc="1", nnUNet_universal_fp_samples="20000",
                 NNUNET_UNIVERSAL_SCHEDULE=f"{s[0]}:{s[1]}:{s[2]}", OMP_NUM_THREADS=str(self.threads),
                 nnUNet_extTrainer=ext_trainer_value(os.environ.get("nnUNet_extTrainer", "")))
        return e

    def run(self, cmd: list[str], log: str, seed: int = 0, extra_env: dict[str, str] | None = None) -> float:
        """Run a CLI command (stdout/stderr appended to logs/{log}.log); return its wall time in seconds."""
        logf = self.work / "logs" / f"{log}.log"
        logf.parent.mkdir(parents=True, exist_ok=True)
        t = time.perf_counter()
        with open(logf, "a") as f:
            f.write(f"\n$ {' '.join(cmd)}\n")
            f.flush()
            rc = subprocess.run(cmd, env={**self.env(seed), **(extra_env or {})}, stdout=f,
                                stderr=subprocess.STDOUT).returncode
        if rc != 0:
            raise RuntimeError(f"{' '.join(cmd[:3])} ... failed (exit {rc}); see {logf}")
        return time.perf_counter() - t


# ---- data ------------------------------------------------------------------------------------------

def _edit_features(plans_file: Path, out_name: str, base: int) -> None:
    """Copy nnU-Net plans under ``out_name`` with U-Net features ``base * 2**stage`` (capped as nnU-Net: 320)."""
    out = plans_file.with_name(f"{out_name}.json")
    if out.is_file() or out_name == plans_file.stem:
        return
    plans = json.loads(plans_file.read_text())
    plans["plans_name"] = out_name
    for cfg in plans["configurations"].values():
        kw = cfg.get("architecture", {}).get("arch_kwargs")
        if kw:
            kw["features_per_stage"] = [min(base * 2**i, 320) for i in range(kw["n_stages"])]
    _write_json(out, plans)


def prepare(s: Suite) -> None:
    """synth -> convert -> merge (hold-out) -> plan; fold-0 splits; stock plans for the single-dataset baselines."""
    from nnunet_universal.synthetic.api import png_slice_spacing

    cfg, nu = s.cfg, str(BIN / "nnunet-universal")
    for i, src in enumerate(s.sources):
        did, _ = SOURCES[src]
        native = s.work / "native" / src
        if not (native / ".done").is_file():
            shape = ["--shape", *map(str, cfg["shape"])] if cfg["shape"] else []
            s.run([nu, "synth", src, "-o", str(native), "--cases", str(cfg["cases"]), "--seed", str(i), *shape,
                   "--lesion-scale", str(cfg["lesion_scale"])], "prepare")
            (native / ".done").touch()
        top = next(p for p in native.iterdir() if p.is_dir())
        # BrainMetShare PNG slices carry no geometry: give the synthetic cases' true spacing (else nnU-Net's
        # resampling to the merged spacing shrinks them to about 12 x 10 x 9 voxels)
        spacing = (["--spacing", *map(str, png_slice_spacing(tuple(cfg["shape"]) if cfg["shape"] else None))]
                   if src == "brainmetshare" else [])
        s.run([nu, "convert", "msd" if src == "msd-braintumour" else src, str(top), "-d", str(did), "-j", "1",
               *spacing], "prepare")
    s.run([nu, "merge", *[str(SOURCES[x][0]) for x in s.sources], "-d", str(MERGED_ID), "-n", MERGED_NAME,
           "--identical", *IDENTICAL, "--holdout", str(cfg["holdout"]), "-j", "1"], "prepare")
    merged_pre = s.pre / s.merged().name
    if not (merged_pre / "nnUNetUniversalPlans.json").is_file() or not (merged_pre / "gt_segmentations").is_dir():
        s.run([nu, "plan", "-d", str(MERGED_ID), "-np", "1"], "prepare")
    _edit_features(merged_pre / "nnUNetUniversalPlans.json", s.plans, cfg["base_features"])
    fold0 = _write_merged_split(s, merged_pre)
    for src in s.sources:
        folder = s.single(src)
        pre = s.pre / folder.name
        if not (pre / "nnUNetPlans.json").is_file() or not (pre / "gt_segmentations").is_dir():
            s.run([str(BIN / "nnUNetv2_plan_and_preprocess"), "-d", str(SOURCES[src][0]), "-c", "3d_fullres",
                   "-np", "1"], "prepare")
        _edit_features(pre / "nnUNetPlans.json", s.stock_plans, cfg["base_features"])
        _write_json(pre / "splits_final.json", [_single_split(s, src, fold0)])
    _make_inputs(s)


def _write_merged_split(s: Suite, merged_pre: Path) -> dict[str, list[str]]:
    """Fold 0 = the merge's fold 0 with at most ``val_per_domain`` validation cases per domain (rest: training)."""
    meta = _read_json(s.merged() / "dataset.json")["universal"]
    splits = _read_json(s.merged() / "splits_final.json")
    val, per = [], {}
    for c in splits[0]["val"]:
        d = meta["cases"][c]["domain"]
        if per.get(d, 0) < s.cfg["val_per_domain"]:
            val.append(c)
            per[d] = per.get(d, 0) + 1
    train = sorted(c for c, i in meta["cases"].items() if i["split"] == "train" and c not in val)
    fold0 = {"train": train, "val": sorted(val)}
    _write_json(merged_pre / "splits_final.json", [fold0])
    return fold0


def _source_case(s: Suite) -> dict[str, tuple[str, str]]:
    """Merged case id -> (domain, case id in its converted dataset), from the merge's provenance."""
    prov = _read_json(s.merged() / "provenance.json")["cases"]
    return {m: (p["domain"], p["case"]) for m, p in prov.items()}


def _single_split(s: Suite, src: str, fold0: dict[str, list[str]]) -> dict[str, list[str]]:
    dom, back = SOURCES[src][1], _source_case(s)
    return {k: sorted(back[m][1] for m in v if back[m][0] == dom) for k, v in fold0.items()}


def _link_case(src_dir: Path, case: str, dst_dir: Path, dst_case: str, skip_channel: int | None = None) -> None:
    dst_dir.mkdir(parents=True, exist_ok=True)
    for f in sorted(src_dir.glob(f"{case}_[0-9][0-9][0-9][0-9].nii.gz")):
        ch = int(f.name[len(case) + 1:len(case) + 5])
        target = dst_dir / f"{dst_case}_{ch:04d}.nii.gz"
        if ch != skip_channel and not target.exists():
            os.link(f, target)


def _make_inputs(s: Suite) -> None:
    """Test input folders: per domain (merged channels), per withheld slot, per source (its own channels)."""
    dj = _read_json(s.merged() / "dataset.json")
    meta, slots = dj["universal"], list(dj["universal"]["slots"])
    test = sorted(c for c, i in meta["cases"].items() if i["split"] == "test")
    back = _source_case(s)
    inputs = s.work / "inputs"
    if (inputs / ".done").is_file():
        return
    shutil.rmtree(inputs, ignore_errors=True)
    for c in test:
        dom = meta["cases"][c]["domain"]
        _link_case(s.merged() / "imagesTs", c, inputs / f"domain_{dom}", c)
        for k, slot in enumerate(slots):
            # a slot is withheld only where the case keeps another one (a CT case without CT has no input left)
            if slot in meta["cases"][c]["slots"] and len(meta["cases"][c]["slots"]) > 1:
                _link_case(s.merged() / "imagesTs", c, inputs / f"without_{slot}", c, skip_channel=k)
        src = next(x for x in s.sources if SOURCES[x][1] == dom)
        _link_case(s.single(src) / "imagesTr", back[c][1], inputs / f"single_{dom}", c)
    (inputs / ".done").touch()


# ---- train, predict, evaluate ----------------------------------------------------------------------

def _trainer_available(s: Suite, name: str) -> bool:
    """Whether nnU-Net's own trainer lookup (with the suite's ``nnUNet_extTrainer``) finds ``name``."""
    code = ("import sys; from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name as f; "
            f"sys.exit(0 if f({name!r}) is not None else 1)")
    return subprocess.run([sys.executable, "-c", code], env=s.env(), stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL).returncode == 0


def train(s: Suite, dataset: int, trainer: str, plans: str, seed: int, log: str) -> Path:
    """``nnunet-universal train DATASET 3d_fullres 0`` (``--c`` after an interruption); skipped when finished."""
    name = s.merged().name if dataset == MERGED_ID else next(s.raw.glob(f"Dataset{dataset}_*")).name
    model = s.work / f"nnUNet_results_seed{seed}" / name / f"{trainer}__{plans}__3d_fullres"
    fold = model / "fold_0"
    if (fold / "checkpoint_final.pth").is_file():
        return model
    cont = ["--c"] if (fold / "checkpoint_latest.pth").is_file() else []
    # nnunet-universal train is nnUNetv2_train (same run_training) that keeps OMP_NUM_THREADS on CPU, where
    # nnUNetv2_train takes every core: on a shared machine, 2 OpenMP threads made the universal network's many
    # small element-wise ops up to 10x slower (scripts/benchmark_speed.py).
    cmd = [str(BIN / "nnunet-universal"), "train", str(dataset), "3d_fullres", "0", "-tr", trainer, "-p", plans,
           "-device", s.device, *cont]
    print(f"[{time.strftime('%H:%M:%S')}] train {log} {'(continued)' if cont else ''}", flush=True)
    wall = s.run(cmd, log, seed, {"nnUNet_n_proc_DA": "0"})  # augmentation in-process (planning needs >= 1)
    state = s.work / "state" / f"{log}.json"
    prev = _read_json(state, {"wall_s": 0.0, "sessions": 0})
    _write_json(state, {"wall_s": prev["wall_s"] + wall, "sessions": prev["sessions"] + 1, "command": " ".join(cmd)})
    return model


def _remap_to_union(s: Suite, src: str, raw_out: Path, out: Path) -> None:
    """Single-dataset predictions (own label ids, case ids as in inputs/) -> union label ids of the merge."""
    import numpy as np
    import SimpleITK as sitk

    dom = SOURCES[src][1]
    local = _read_json(s.single(src) / "dataset.json")["labels"]
    union = _read_json(s.merged() / "dataset.json")["universal"]["domains"][dom]["labels"]
    lut = np.zeros(max(local.values()) + 1, dtype=np.uint8)
    for cls, i in local.items():
        if cls != "background":
            lut[i] = union[cls]
    out.mkdir(parents=True, exist_ok=True)
    for f in sorted(raw_out.glob("*.nii.gz")):
        img = sitk.ReadImage(str(f))
        res = sitk.GetImageFromArray(lut[sitk.GetArrayFromImage(img)])
        res.CopyInformation(img)
        tmp = out / f".{f.name}.tmp.nii.gz"
        sitk.WriteImage(res, str(tmp))
        os.replace(tmp, out / f.name)


def predict(s: Suite, arm: Arm, model: Path | dict[str, Path], mode: str, withheld: str | None, seed: int,
            out: Path) -> float:
    """Predict the test cases of one (mode, withheld slot) into ``out``; returns the wall time."""
    tta = [] if s.cfg["tta"] else ["--disable-tta"]
    log, wall = f"{arm.name}_seed{seed}_predict", 0.0
    if arm.kind == "single":
        for src in s.sources:
            raw_out = out.parent / f".{out.name}_{SOURCES[src][1]}"
            wall += s.run([str(BIN / "nnUNetv2_predict"), "-i", str(s.work / "inputs" / f"single_{SOURCES[src][1]}"),
                           "-o", str(raw_out), "-d", str(SOURCES[src][0]), "-c", "3d_fullres", "-tr", arm.trainer,
                           "-p", s.stock_plans, "-f", "0", "-device", s.device, "-npp", "1", "-nps", "1",
                           *(["--disable_tta"] if tta else [])], log, seed)
            _remap_to_union(s, src, raw_out, out)
        return wall
    if arm.kind == "stock":
        return s.run([str(BIN / "nnUNetv2_predict"), "-i", str(s.merged() / "imagesTs"), "-o", str(out), "-d",
                      str(MERGED_ID), "-c", "3d_fullres", "-tr", arm.trainer, "-p", s.plans, "-f", "0", "-device",
                      s.device, "-npp", "1", "-nps", "1", *(["--disable_tta"] if tta else [])], log, seed)
    nu = str(BIN / "nnunet-universal")
    if withheld is not None:
        folders = [(s.work / "inputs" / f"without_{withheld}", [])]
    else:
        extra = ["--routing", "hard"] if mode == "dataset-free-hard" else []  # only the inferred domain's head
        folders = [(p, ["--domain", p.name.removeprefix("domain_")] if mode == "oracle" else extra)
                   for p in sorted((s.work / "inputs").glob("domain_*"))]
    for folder, extra in folders:
        wall += s.run([nu, "predict", "-m", str(model), "-i", str(folder), "-o", str(out), "-f", "0",
                       "-device", s.device, *extra, *tta], log, seed)
    return wall


def _condense(metrics: dict) -> dict:
    """The parts of ``metrics.json`` the tables need: per-domain summaries and compact per-case scores."""
    cases = [{"case": c["case"], "domain": c["domain"], "mean_dice": c["mean_dice"],
              "dice": {k: v["dice"] for k, v in {**c["classes"], **c["regions"]}.items()},
              "routing": (c.get("routing") or {}).get("inferred_domain")} for c in metrics["cases"]]
    doms = {d: {k: v[k] for k in ("n_cases", "dice", "hd95", "classes", "regions", "lesions", "routing",
                                  "cross_domain_fp", "lesion_headline")} for d, v in metrics["domains"].items()}
    return {"domains": doms, "routing": metrics.get("routing"), "cases": cases}


MODES = ("dataset-free", "oracle", "dataset-free-hard", "missing")


def run_arm(s: Suite, arm: Arm, seed: int, modes: tuple[str, ...] = MODES) -> None:
    """Train (or resume) one arm, then predict and evaluate every (mode, withheld slot) not yet in the results
    (of ``modes``; "missing" stands for the runs with one slot withheld)."""
    if arm.trainer == STOCK_TRAINER:
        arm = replace(arm, trainer=s.stock_trainer)
        if not _trainer_available(s, arm.trainer):
            print(f"skip {arm.name}: trainer {arm.trainer} not found (nnUNetTrainer obeying NNUNET_UNIVERSAL_SCHEDULE)")
            return
    log = f"{arm.name}_seed{seed}"
    if arm.kind == "single":
        model = {src: train(s, SOURCES[src][0], arm.trainer, s.stock_plans, seed, f"{log}_{SOURCES[src][1]}")
                 for src in s.sources}
    else:
        model = train(s, MERGED_ID, arm.trainer, s.plans, seed, log)
    slots = _read_json(s.merged() / "dataset.json")["universal"]["slots"]
    todo = [(m, None) for m in arm.modes if m in modes]
    todo += [("dataset-free", w) for w in (slots if arm.missing and "missing" in modes else [])
             if (s.work / "inputs" / f"without_{w}").is_dir()]
    for mode, withheld in todo:
        key = f"{arm.name}|seed{seed}|{mode}|{withheld or 'all'}"
        results = _read_json(s.results_json, {})
        if key in results.get("runs", {}):
            continue
        out = s.work / "predictions" / f"seed{seed}" / arm.name / (mode + (f"_without_{withheld}" if withheld else ""))
        shutil.rmtree(out, ignore_errors=True)
        print(f"[{time.strftime('%H:%M:%S')}] predict {key}", flush=True)
        wall = predict(s, arm, model, mode, withheld, seed, out)
        s.run([str(BIN / "nnunet-universal"), "evaluate", str(out), "-d", str(MERGED_ID), "--gt",
               str(s.merged() / "labelsTs"), "-o", str(out / "evaluation")], f"{log}_evaluate", seed)
        states = [_read_json(p) for p in sorted((s.work / "state").glob(f"{log}*.json"))]
        entry = {"arm": arm.name, "trainer": arm.trainer, "seed": seed, "mode": mode, "withheld": withheld,
                 "train_wall_s": sum(x["wall_s"] for x in states), "train_sessions": sum(x["sessions"] for x in states),
                 "train_commands": [x["command"] for x in states], "predict_wall_s": wall,
                 **_condense(_read_json(out / "evaluation" / "metrics.json"))}
        with _locked(s.results_json):  # several instances (disjoint --arms) may share one results file
            _record(s, key, entry)


def _record(s: Suite, key: str, entry: dict) -> None:
    """Add one evaluated run to ``accuracy_<size>.json`` (read-modify-write; the caller holds the lock)."""
    results = _read_json(s.results_json, {})
    results.setdefault("runs", {})[key] = entry
    results["config"] = {"size": s.size, **s.cfg, "sources": s.sources, "plans": s.plans,
                         "stock_trainer": s.stock_trainer,
                         "stock_plans": s.stock_plans, "threads": s.threads, "device": s.device}
    results.setdefault("machine", {}).update({platform.node(): f"{platform.platform()}, {os.cpu_count()} cores, "
                                                               f"device {s.device}"})
    _write_json(s.results_json, results)


# ---- report -----------------------------------------------------------------------------------------

def _entries(runs: dict, arm: str, mode: str, withheld: str | None = None) -> list[dict]:
    return [r for r in runs.values() if r["arm"] == arm and r["mode"] == mode and r["withheld"] == withheld]


def _stat(values: list[float]) -> tuple[float, float, int] | None:
    import numpy as np

    v = [x for x in values if x is not None]
    return (float(np.mean(v)), float(np.std(v)), len(v)) if v else None


def _fmt(st: tuple[float, float, int] | None, scale: float = 100.0) -> str:
    return "–" if st is None else f"{st[0] * scale:.1f} ± {st[1] * scale:.1f}"


def _domain_dice(entries: list[dict], domain: str, target: str | None = None,
                 cases: set[str] | None = None) -> tuple[float, float, int] | None:
    """Mean ± std of case Dice (``target`` class/region, or the case's mean over classes) for one domain.

    One seed: over test cases. Several seeds: of the per-seed means, over seeds.
    """
    per_seed = []
    for e in entries:
        vals = [(c["dice"].get(target) if target else c["mean_dice"]) for c in e["cases"]
                if c["domain"] == domain and (cases is None or c["case"] in cases)]
        per_seed.append(_stat(vals))
    per_seed = [p for p in per_seed if p is not None]
    if not per_seed:
        return None
    return per_seed[0] if len(per_seed) == 1 else _stat([p[0] for p in per_seed])


def _mean_over_domains(entries: list[dict], domains: list[str]) -> tuple[float, float, int] | None:
    """Mean over domains of the per-domain mean Dice (std: over seeds of that mean, or 0 for one seed)."""
    per_seed = []
    for e in entries:
        means = [_domain_dice([e], d) for d in domains]
        if all(m is not None for m in means):
            per_seed.append(sum(m[0] for m in means) / len(means))
    return _stat(per_seed)


def _paired(runs: dict, a: tuple[str, str], b: tuple[str, str], domains: list[str], draws: int = 10000,
            ) -> tuple[float, float, float, int] | None:
    """Paired difference of mean Dice, arm/mode ``a`` minus ``b``, on the test cases both have: each case's Dice
    averaged over the arm's repeats (two modes of one arm: the repeats both have), then the table's mean over
    domains; with a 95 % bootstrap interval over the
    test cases (resampled within each domain, fixed seed). The interval is the test set's uncertainty, not the
    run-to-run spread of training (the ± of the tables)."""
    import numpy as np

    # two modes of one arm: the same trained models, so only the repeats that have both
    seeds = ({e["seed"] for e in _entries(runs, *a)} & {e["seed"] for e in _entries(runs, *b)}
             if a[0] == b[0] else None)

    def per_case(arm: str, mode: str) -> dict[str, tuple[str, float]]:
        vals: dict[str, list[float]] = {}
        dom: dict[str, str] = {}
        for e in _entries(runs, arm, mode):
            if seeds is not None and e["seed"] not in seeds:
                continue
            for c in e["cases"]:
                vals.setdefault(c["case"], []).append(c["mean_dice"])
                dom[c["case"]] = c["domain"]
        return {k: (dom[k], float(np.mean(v))) for k, v in vals.items()}

    pa, pb = per_case(*a), per_case(*b)
    diffs = {d: np.array([pa[k][1] - pb[k][1] for k in sorted(pa.keys() & pb.keys()) if pa[k][0] == d])
             for d in domains}
    if not pa or not pb or any(len(v) == 0 for v in diffs.values()):
        return None
    rng = np.random.default_rng(0)
    boot = np.mean([np.mean(v[rng.integers(0, len(v), (draws, len(v)))], axis=1) for v in diffs.values()], axis=0)
    lo, hi = np.percentile(boot, [2.5, 97.5])
    return (float(np.mean([v.mean() for v in diffs.values()])), float(lo), float(hi),
            sum(len(v) for v in diffs.values()))


def _routing(entries: list[dict], domain: str | None) -> str:
    hits = [c["routing"] == c["domain"] for e in entries for c in e["cases"]
            if c["routing"] is not None and (domain is None or c["domain"] == domain)]
    return f"{100 * sum(hits) / len(hits):.0f}% ({sum(hits)}/{len(hits)})" if hits else "–"


def report(results: dict) -> str:
    """Markdown tables (paper Tables 1-3 style, missing slots, routing) from ``accuracy_<size>.json``."""
    runs, cfg = results.get("runs", {}), results.get("config", {})
    domains = sorted({c["domain"] for r in runs.values() for c in r["cases"]})
    lab = {a.name: a.label for a in ARMS.values()}
    seeds = sorted({r["seed"] for r in runs.values()})
    spread = ("over test cases" if len(seeds) <= 1 else
              "over the test cases for arms run once; over the repeats' means for arms run more than once; "
              "the mean column's ± is over repeats, 0.0 for one")
    e0 = next(iter(runs.values()), None)
    lines = [f"Accuracy benchmark `--size {cfg.get('size')}`: {len(domains)} synthetic domains, "
             f"{cfg.get('cases')} cases per domain ({cfg.get('holdout')} held out for testing), "
             f"schedule {cfg.get('schedule')} (epochs, iterations, validation iterations) for every arm, "
             f"first-stage features {cfg.get('base_features')}, "
             f"test-time mirroring {'on' if cfg.get('tta') else 'off'}, repeats {seeds}. Dice in % (mean ± std "
             f"{spread}). Machine: {'; '.join(results.get('machine', {}).values())}.", "",
             f"Command: `python scripts/benchmark_accuracy.py --size {cfg.get('size')}"
             f"{' --with-ct' if 'lits' in cfg.get('sources', []) else ''}` "
             f"(tables: `--report`).", ""]
    if e0 is None:
        return "\n".join(lines + ["No results yet."]) + "\n"

    def row(name: str, mode: str, extra: list[str] | None = None, ref: float | None = None) -> str | None:
        es = _entries(runs, name, mode)
        if not es:
            return None
        mean = _mean_over_domains(es, domains)
        cells = [f"{lab.get(name, name)} ({mode})", *[_fmt(_domain_dice(es, d)) for d in domains], _fmt(mean)]
        if ref is not None:
            cells.append("–" if mean is None else f"{100 * (mean[0] - ref):+.1f}")
        cells.append(f"{sum(e['train_wall_s'] for e in es) / len(es) / 60:.0f}")
        return "| " + " | ".join(cells + (extra or [])) + " |"

    head = "| arm | " + " | ".join(domains) + " | mean |"
    main = [("single", "oracle"), ("joint_stock", "dataset-free"), ("joint_naive", "dataset-free"),
            ("joint_marginal", "dataset-free"), ("joint_marginal", "oracle"), ("universal", "oracle"),
            ("universal", "dataset-free"), ("universal", "dataset-free-hard")]
    lines += ["### Universal model vs single-dataset and joint baselines (Dice %, per domain)", "",
              head + " train min |", "|---|" + "---:|" * (len(domains) + 2)]
    lines += [r for r in (row(a, m) for a, m in main) if r]

    targets = [(d, t) for d in domains for t in sorted(next(c["dice"] for r in runs.values() for c in r["cases"]
                                                            if c["domain"] == d))]
    lines += ["", "### Per class and region (Dice %)", "",
              "| arm | " + " | ".join(f"{d}.{t}" for d, t in targets) + " |", "|---|" + "---:|" * len(targets)]
    for a, m in main:
        es = _entries(runs, a, m)
        if es:
            lines.append(f"| {lab.get(a, a)} ({m}) | " + " | ".join(_fmt(_domain_dice(es, d, t)) for d, t in targets)
                         + " |")

    ref = _mean_over_domains(_entries(runs, "universal", "dataset-free"), domains)
    abl = [("universal", "dataset-free"), ("universal", "oracle"), ("no_gate", "oracle"),
           ("no_harmony", "dataset-free"), ("first_stage", "dataset-free"), ("no_poly_affine", "dataset-free"),
           ("no_restore", "dataset-free"), ("full_rate_harmony", "dataset-free"), ("no_prompts", "dataset-free"),
           ("no_harmony_no_prompts", "dataset-free"), ("no_modality_dropout", "dataset-free")]
    lines += ["", "### Ablations (Dice %; Δ: mean vs the full UniversalTrainer, dataset-free)", "",
              head + " Δ mean | train min |", "|---|" + "---:|" * (len(domains) + 3)]
    lines += [r for r in (row(a, m, ref=ref[0] if ref else None) for a, m in abl) if r]

    slots = [r["withheld"] for r in runs.values() if r["withheld"]]
    if slots:
        lines += ["", "### Missing modality: one slot withheld at test time (dataset-free; mean case Dice % over the "
                  "test cases that have the slot, full input -> withheld, averaged over the repeats that have both "
                  "runs; routing accuracy with the slot withheld, pooled over those repeats)", "",
                  "| withheld slot | cases | UniversalTrainer | routing | no modality dropout | routing |",
                  "|---|---:|---|---|---|---|"]
        for slot in dict.fromkeys(slots):
            cells = []
            for arm in ("universal", "no_modality_dropout"):
                full, wo = _entries(runs, arm, "dataset-free"), _entries(runs, arm, "dataset-free", slot)
                if not (full and wo):
                    cells += ["–", "–"]
                    continue
                cases = {c["case"] for c in wo[0]["cases"]}
                seeds = {e["seed"] for e in wo} & {e["seed"] for e in full}  # paired: repeats with both runs
                # mean over those repeats of the mean case Dice (full input on the same cases / slot withheld)
                a = _stat([_stat([c["mean_dice"] for c in e["cases"] if c["case"] in cases])[0]
                           for e in full if e["seed"] in seeds])
                b = _stat([_stat([c["mean_dice"] for c in e["cases"]])[0] for e in wo if e["seed"] in seeds])
                cells += [f"{100 * a[0]:.1f} -> {100 * b[0]:.1f} ({100 * (b[0] - a[0]):+.1f})",
                          _routing([e for e in wo if e["seed"] in seeds], None)]
                n = len(cases)
            lines.append(f"| {slot} | {n} | " + " | ".join(cells) + " |")

    gated = [a for a in ARMS if a not in ("single", "joint_stock", "joint_naive", "joint_marginal", "no_gate")]
    lines += ["", "### Gate routing accuracy per domain (dataset-free, all slots)", "",
              "| arm | " + " | ".join(domains) + " | all |", "|---|" + "---:|" * (len(domains) + 1)]
    for a in gated:
        es = _entries(runs, a, "dataset-free")
        if es:
            lines.append(f"| {lab[a]} | " + " | ".join(_routing(es, d) for d in domains) + f" | {_routing(es, None)} |")

    comparisons = [
        ("gated head (dataset-free) vs its own heads with the domain given (oracle) (paper: within 1.3)",
         ("universal", "dataset-free"), ("universal", "oracle")),
        ("gated head, only the inferred domain's head (dataset-free, --routing hard) vs oracle",
         ("universal", "dataset-free-hard"), ("universal", "oracle")),
        *[(f"UniversalTrainer (dataset-free) vs {lab[a]}", ("universal", "dataset-free"),
           (a, "oracle" if a == "single" else "dataset-free"))
          for a in ("joint_stock", "joint_naive", "joint_marginal", "single")],
        ("UniversalTrainer vs the same network without harmonization (paper: harmonization helps)",
         ("universal", "dataset-free"), ("no_harmony", "dataset-free")),
        ("UniversalTrainer vs the same network without prompts (UniSeg/Hermes: prompts help)",
         ("universal", "dataset-free"), ("no_prompts", "dataset-free")),
        ("without prompts: harmonization vs InstanceNorm (harmonization's effect without prompts)",
         ("no_prompts", "dataset-free"), ("no_harmony_no_prompts", "dataset-free")),
        ("without harmonization: prompts vs no prompts (the prompts' effect on nnU-Net's InstanceNorm network)",
         ("no_harmony", "dataset-free"), ("no_harmony_no_prompts", "dataset-free")),
        ("UniversalTrainer (every stage) vs harmonization in stage 1 only (paper: more layers help)",
         ("universal", "dataset-free"), ("first_stage", "dataset-free")),
        ("UniversalTrainer (U-Harmony parameters at 0.1x) vs the paper's full learning rate",
         ("universal", "dataset-free"), ("full_rate_harmony", "dataset-free")),
    ]
    claims = []
    for text, a, b in comparisons:
        d = _paired(runs, a, b, domains)
        if d:
            claims.append(f"{text}: {100 * d[0]:+.1f} Dice points (95 % interval over the {d[3]} test cases "
                          f"{100 * d[1]:+.1f} to {100 * d[2]:+.1f})")
    if claims:
        lines += ["", "### The paper's claims on this suite (paired per test case, each case averaged over the "
                  "repeats; the interval is a bootstrap over test cases within domains and leaves out the "
                  "run-to-run spread of training)", ""] + [f"- {c}" for c in claims]
    lines += ["", "### Runs", "", "| run | train wall (min) | sessions | predict wall (s) |", "|---|---:|---:|---:|"]
    for k, r in sorted(runs.items()):
        name = k.replace("|", " / ")
        lines.append(f"| {name} | {r['train_wall_s'] / 60:.1f} | {r['train_sessions']} | {r['predict_wall_s']:.0f} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=sorted(SIZES), default="small")
    p.add_argument("--work", type=Path, default=None,
                   help="work folder (default bench_work/accuracy_<size>[_ct])")
    p.add_argument("--arms", nargs="+", choices=sorted(ARMS), default=list(ARMS), help="arms to run, in this order")
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES),
                   help="prediction modes to run for each arm ('missing': one slot withheld); default all")
    p.add_argument("--seeds", type=int, nargs="+", default=[0],
                   help="repeat indices (nnU-Net training is not seeded: each index is an independent run)")
    p.add_argument("--with-ct", action="store_true",
                   help="add the LiTS-like CT domain (a separate suite: accuracy_<size>_ct.json/.md)")
    p.add_argument("--threads", type=int, default=1, help="torch/OpenMP threads of every subprocess")
    p.add_argument("-device", "--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--stock-trainer", default=STOCK_TRAINER,
                   help=f"trainer of the stock nnU-Net arms (default {STOCK_TRAINER}; it must obey the schedule)")
    p.add_argument("--results", type=Path, default=RESULTS, help="folder of accuracy_<size>.json/.md")
    p.add_argument("--prepare-only", action="store_true", help="only build the datasets and plans")
    p.add_argument("--report", action="store_true", help="only (re)write the Markdown tables from the JSON")
    args = p.parse_args()
    sources = ["brats-mets", "ucsf-bmsr", "brainmetshare", *(["lits"] if args.with_ct else [])]
    work = (args.work or REPO / "bench_work" / f"accuracy_{suite_name(args.size, args.with_ct)}").resolve()
    s = Suite(work, args.size, sources, args.threads, args.device, args.results.resolve(),
              args.stock_trainer)
    if not args.report:
        t0 = time.perf_counter()
        prepare(s)
        print(f"prepared in {time.perf_counter() - t0:.0f} s", flush=True)
        if not args.prepare_only:
            for seed in args.seeds:
                for name in args.arms:
                    try:
                        run_arm(s, ARMS[name], seed, tuple(args.modes))
                    except RuntimeError as e:  # one failing arm must not stop the others; rerun retries it
                        print(f"arm {name} seed {seed} failed: {e}", flush=True)
    if s.results_json.is_file():
        md = s.results_json.with_suffix(".md")
        _write_text(md, report(_read_json(s.results_json)))
        print(f"wrote {md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
