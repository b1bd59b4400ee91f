"""Extension benchmark: grow a trained two-domain model by a third domain instead of training from scratch.

    .venv/bin/python scripts/benchmark_extension.py --size small            # run (resumes; skips finished steps)
    .venv/bin/python scripts/benchmark_extension.py --size tiny --work /tmp/ext_tiny --results /tmp/ext_res  # smoke
    .venv/bin/python scripts/benchmark_extension.py --size small --report   # Markdown from the results JSON only
    .venv/bin/python scripts/benchmark_extension.py --size small --seed 1   # a repeat (own work folder, results)
    .venv/bin/python scripts/benchmark_extension.py --size small --combine  # every repeat: run-level intervals

The three synthetic brain MR domains of ``benchmark_accuracy.py``'s ``mr`` suite (BraTS-METS-like, UCSF-BMSR-like,
BrainMetShare-like), through the commands a user runs, each as a subprocess:

1. ``nnunet-universal synth`` / ``convert`` for each source; ``merge`` of the first two (the *old* dataset) and of
   all three (the *joint* dataset, UCSF and BrainMetShare ET declared ``--identical`` as in the accuracy suite), both
   with the same ``--holdout`` rule, so the held-out test cases are the same cases in every dataset;
2. ``nnunet-universal plan`` of both (U-Net features cut as in the accuracy suite); ``nnunet-universal train`` of
   the **old** model (UniversalTrainer, two domains) and of the **joint** model from scratch on all three, for the
   same schedule ``NNUNET_UNIVERSAL_SCHEDULE`` (the from-scratch iterations);
3. ``nnunet-universal extend -m OLD brainmetshare`` (and ``--no-old-data``), then ``nnunet-universal train`` of each
   extension variant for ``EXT_FRACTION`` of the from-scratch epochs (at most 30 %): ``full``
   (UniversalTrainer_Extend), ``new_parts`` (UniversalTrainer_ExtendNewParts), ``no_old_data``
   (UniversalTrainer_ExtendNoOldData: the new parts on the new data only), ``no_old_data_all``
   (UniversalTrainer_ExtendNoOldDataAll: everything, distillation); ``new_parts_harmony``
   (UniversalTrainer_ExtendNewPartsHarmony) with ``--variants``;
4. ``nnunet-universal predict`` (dataset-free) of every model on the held-out test cases of the domains it knows
   (images linked by slot name into each model's channel numbering) and ``nnunet-universal evaluate``.

Reported per variant: old-domain Dice before (the old model) and after the extension (forgetting), new-domain Dice
against the joint model from scratch, the routing accuracy, and the compute (iterations, training wall time). The
issue's goal: at <= 30 % of the from-scratch iterations, the new domain within 2 Dice points of from-scratch and every
old domain within 1 point of its pre-extension Dice.

Repeats (``--seed N``): the whole pipeline again with ``NNUNET_UNIVERSAL_SEED=N`` for every training (the same
synthetic data and test cases), in ``bench_work/extension_<size>_seed<N>``, results in
``extension_<size>_seed<N>.json/.md``. ``--combine`` reads ``extension_<size>.json`` and every seed file and writes
``extension_<size>_runs.md``: per variant and domain the mean over runs, and the goal's differences with a
hierarchical bootstrap interval (runs resampled, then test cases) that includes the run-to-run variance of training.

Resumable: a model whose ``checkpoint_final.pth`` exists is not retrained (``--c`` after an interruption), an
evaluation already in the results JSON is not redone. Every run entry records ``train_commit`` and
``predict_commit`` (``git rev-parse HEAD``, ``-dirty`` with uncommitted changes in the package or scripts).
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchmark_accuracy import _edit_features, _read_json, _write_json, _write_text, git_commit  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
RESULTS = REPO / "benchmarks" / "results"
#: synthetic source -> (converted dataset id, domain name); the last one is the new domain
SOURCES = {"brats-mets": (631, "brats_mets"), "ucsf-bmsr": (632, "ucsf_bmsr"), "brainmetshare": (633, "brainmetshare")}
OLD_SOURCES, NEW_SOURCE = ("brats-mets", "ucsf-bmsr"), "brainmetshare"
OLD_ID, JOINT_ID, EXT_ID, NOOLD_ID = 630, 634, 635, 636
IDENTICAL = ["ucsf_bmsr.ET=brainmetshare.ET"]
#: fraction of the from-scratch epochs an extension trains (the goal allows 30 %)
EXT_FRACTION, EXT_MAX_FRACTION = 0.25, 0.30

#: cases per domain, lesion scale, held-out cases per domain, from-scratch schedule (epochs, iterations, val
#: iterations), U-Net features of the first stage. ``small``: about 40 core-minutes at one thread.
SIZES = {
    "tiny": {"cases": 5, "lesion_scale": 2.5, "holdout": 1, "schedule": (4, 2, 1), "base_features": 8},
    "small": {"cases": 20, "lesion_scale": 2.5, "holdout": 10, "schedule": (30, 16, 2), "base_features": 16},
}


@dataclass(frozen=True)
class Variant:
    name: str
    trainer: str
    dataset: int
    label: str


VARIANTS = {v.name: v for v in (
    Variant("full", "UniversalTrainer_Extend", EXT_ID, "extension, everything trained (old data replayed)"),
    Variant("new_parts", "UniversalTrainer_ExtendNewParts", EXT_ID, "extension, only the new parts trained"),
    Variant("new_parts_harmony", "UniversalTrainer_ExtendNewPartsHarmony", EXT_ID,
            "extension, new parts + U-Harmony parameters"),
    Variant("no_old_data", "UniversalTrainer_ExtendNoOldData", NOOLD_ID,
            "extension WITHOUT the old data, only the new parts (new-slot gate prior)"),
    Variant("no_old_data_all", "UniversalTrainer_ExtendNoOldDataAll", NOOLD_ID,
            "extension WITHOUT the old data, everything trained (distillation from the old model)"),
)}
DEFAULT_VARIANTS = ("full", "new_parts", "no_old_data", "no_old_data_all")


def results_name(size: str, seed: int | None = None) -> str:
    """``extension_<size>.json`` (the first run, unseeded) or ``extension_<size>_seed<N>.json`` (a repeat)."""
    return f"extension_{size}.json" if seed is None else f"extension_{size}_seed{seed}.json"


def extension_epochs(epochs: int) -> int:
    """Epochs of an extension: ``EXT_FRACTION`` of the from-scratch epochs, rounded up, never above 30 %."""
    return max(1, min(math.ceil(epochs * EXT_FRACTION), math.floor(epochs * EXT_MAX_FRACTION)))


class Bench:
    """Paths, environment and command runner of one benchmark size."""

    def __init__(self, work: Path, size: str, threads: int, device: str, results: Path,
                 seed: int | None = None) -> None:
        self.work, self.size, self.cfg, self.seed = work, size, SIZES[size], seed
        self.threads, self.device = threads, device
        self.raw, self.pre, self.res = work / "nnUNet_raw", work / "nnUNet_preprocessed", work / "nnUNet_results"
        self.results_json = results / results_name(size, seed)
        self.plans = "nnUNetUniversalPlans" + ("" if self.cfg["base_features"] == 32 else
                                               f"_f{self.cfg['base_features']}")

    def schedule(self, extension: bool) -> tuple[int, int, int]:
        e, i, v = self.cfg["schedule"]
        return (extension_epochs(e) if extension else e), i, v

    def env(self, extension: bool = False) -> dict[str, str]:
        from nnunet_universal.discovery import ext_trainer_value

        e = dict(os.environ)
        s = self.schedule(extension)
        e.update(nnUNet_raw=str(self.raw), nnUNet_preprocessed=str(self.pre), nnUNet_results=str(self.res),
                 nnUNet_compile="f", nnUNet_def_n_proc="1", NNUNET_UNIVERSAL_FP_SAMPLES="20000",
                 NNUNET_UNIVERSAL_SCHEDULE=f"{s[0]}:{s[1]}:{s[2]}", NNUNET_UNIVERSAL_VAL_MIRRORING="0",
                 OMP_NUM_THREADS=str(self.threads), nnUNet_n_proc_DA="0",
                 nnUNet_extTrainer=ext_trainer_value(os.environ.get("nnUNet_extTrainer", "")))
        if self.seed is not None:
            e["NNUNET_UNIVERSAL_SEED"] = str(self.seed)
        return e

    def run(self, cmd: list[str], log: str, extension: bool = False) -> float:
        """Run a CLI command (output appended to logs/{log}.log); return its wall time in seconds."""
        logf = self.work / "logs" / f"{log}.log"
        logf.parent.mkdir(parents=True, exist_ok=True)
        t = time.perf_counter()
        with open(logf, "a") as f:
            f.write(f"\n$ {' '.join(cmd)}\n")
            f.flush()
            rc = subprocess.run(cmd, env=self.env(extension), stdout=f, stderr=subprocess.STDOUT).returncode
        if rc != 0:
            raise RuntimeError(f"{' '.join(cmd[:3])} ... failed (exit {rc}); see {logf}")
        return time.perf_counter() - t

    def dataset(self, did: int) -> Path:
        return next(self.raw.glob(f"Dataset{did}_*"))


NU = str(BIN / "nnunet-universal")


# ---- data --------------------------------------------------------------------------------------------------

def prepare(b: Bench) -> None:
    """synth -> convert (three sources) -> merge old (two) and joint (three) -> plan both (features cut)."""
    cfg = b.cfg
    for i, src in enumerate(SOURCES):
        did, _ = SOURCES[src]
        native = b.work / "native" / src
        if not (native / ".done").is_file():
            b.run([NU, "synth", src, "-o", str(native), "--cases", str(cfg["cases"]), "--seed", str(i),
                   "--lesion-scale", str(cfg["lesion_scale"])], "prepare")
            (native / ".done").touch()
        if not list(b.raw.glob(f"Dataset{did}_*")):
            top = next(p for p in native.iterdir() if p.is_dir())
            # synth writes BrainMetShare's true spacing (spacing_mm.json), which convert reads
            b.run([NU, "convert", src, str(top), "-d", str(did), "-j", "1"], "prepare")
    for did, name, sources, identical in ((OLD_ID, "ExtBenchOld", OLD_SOURCES, []),
                                          (JOINT_ID, "ExtBenchJoint", tuple(SOURCES), IDENTICAL)):
        if not list(b.raw.glob(f"Dataset{did}_*")):
            b.run([NU, "merge", *[str(SOURCES[s][0]) for s in sources], "-d", str(did), "-n", name,
                   *(["--identical", *identical] if identical else []), "--holdout", str(cfg["holdout"]), "-j", "1"],
                  "prepare")
        pre = b.pre / b.dataset(did).name
        if not (pre / "nnUNetUniversalPlans.json").is_file() or not (pre / "gt_segmentations").is_dir():
            b.run([NU, "plan", "-d", str(did), "-np", "1"], "prepare")
        _edit_features(pre / "nnUNetUniversalPlans.json", b.plans, cfg["base_features"])


def model_dir(b: Bench, did: int, trainer: str) -> Path:
    return b.res / b.dataset(did).name / f"{trainer}__{b.plans}__3d_fullres"


def train(b: Bench, did: int, trainer: str, log: str, extension: bool = False) -> Path:
    """``nnunet-universal train DID 3d_fullres 0`` (``--c`` after an interruption); skipped when finished. Adds its
    wall time and commit to ``state/{log}.json``."""
    model = model_dir(b, did, trainer)
    if (model / "fold_0" / "checkpoint_final.pth").is_file():
        return model
    cont = ["--c"] if (model / "fold_0" / "checkpoint_latest.pth").is_file() else []
    cmd = [NU, "train", str(did), "3d_fullres", "0", "-tr", trainer, "-p", b.plans, "-device", b.device, *cont]
    print(f"[{time.strftime('%H:%M:%S')}] train {log}{' (continued)' if cont else ''}", flush=True)
    commit = git_commit()
    wall = b.run(cmd, log, extension)
    state = b.work / "state" / f"{log}.json"
    prev = _read_json(state, {"wall_s": 0.0, "sessions": 0, "commits": []})
    e, i, _ = b.schedule(extension)
    _write_json(state, {"wall_s": prev["wall_s"] + wall, "sessions": prev["sessions"] + 1, "command": " ".join(cmd),
                        "commits": list(dict.fromkeys([*prev["commits"], commit])), "epochs": e, "iterations": e * i})
    return model


def extend(b: Bench, old_model: Path, did: int, no_old_data: bool) -> None:
    if not (list(b.raw.glob(f"Dataset{did}_*")) and (b.pre / b.dataset(did).name / "extension.json").is_file()):
        b.run([NU, "extend", "-m", str(old_model), str(SOURCES[NEW_SOURCE][0]), "-d", str(did), "-n",
               "ExtBenchNoOld" if no_old_data else "ExtBenchExt", "--holdout", str(b.cfg["holdout"]), "-np", "1",
               *(["--no-old-data"] if no_old_data else [])], "prepare")
    check_same_test_cases(b, did)


def test_cases(b: Bench, did: int) -> dict[str, set[str]]:
    """Held-out case ids per domain of dataset ``did``."""
    out: dict[str, set[str]] = {}
    for case, info in _read_json(b.dataset(did) / "dataset.json")["universal"]["cases"].items():
        if info["split"] == "test":
            out.setdefault(info["domain"], set()).add(case)
    return out


def check_same_test_cases(b: Bench, did: int) -> None:
    """The extended dataset must hold out the joint dataset's test cases of every domain it has (``extend`` and
    ``merge`` share the hold-out rule), so that the extension and the from-scratch model are scored on the same
    scans; a RuntimeError naming the difference otherwise."""
    joint, ext = test_cases(b, JOINT_ID), test_cases(b, did)
    for domain, cases in ext.items():
        if cases != joint.get(domain):
            raise RuntimeError(f"{b.dataset(did).name} holds out other {domain} cases than {b.dataset(JOINT_ID).name}: "
                               f"{sorted(cases ^ joint.get(domain, set()))}")


# ---- predict, evaluate ---------------------------------------------------------------------------------------

def _link_inputs(b: Bench, did: int, domains: list[str], out: Path) -> Path:
    """The joint dataset's held-out cases of ``domains``, linked into dataset ``did``'s channel numbering."""
    joint = b.dataset(JOINT_ID)
    jdj = _read_json(joint / "dataset.json")
    slots = _read_json(b.dataset(did) / "dataset.json")["universal"]["slots"]
    if out.is_dir():
        return out
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for case, info in sorted(jdj["universal"]["cases"].items()):
        if info["split"] != "test" or info["domain"] not in domains:
            continue
        for slot in info["slots"]:
            if slot in slots:
                src = joint / "imagesTs" / f"{case}_{jdj['universal']['slots'].index(slot):04d}{jdj['file_ending']}"
                os.link(src, tmp / f"{case}_{slots.index(slot):04d}{jdj['file_ending']}")
    tmp.rename(out)
    return out


def evaluate(b: Bench, name: str, model: Path, did: int, domains: list[str], state_logs: list[str],
             eval_did: int | None = None) -> None:
    """Predict (dataset-free) and evaluate ``model`` on the test cases of ``domains``; record it. ``eval_did``: the
    dataset whose case metadata and labels score it (default ``did``; the no-old-data dataset lacks the old test
    cases, the extended dataset with old data has them under the same union ids)."""
    results = _read_json(b.results_json, {})
    if name in results.get("runs", {}):
        return
    print(f"[{time.strftime('%H:%M:%S')}] predict {name}", flush=True)
    inputs = _link_inputs(b, did, domains, b.work / "inputs" / f"{b.dataset(did).name}_{'_'.join(domains)}")
    out = b.work / "predictions" / name
    shutil.rmtree(out, ignore_errors=True)
    predict_commit = git_commit()
    wall = b.run([NU, "predict", "-m", str(model), "-i", str(inputs), "-o", str(out), "-f", "0", "-device",
                  b.device, "--disable-tta"], f"{name}_predict")
    gt = b.work / "gt" / name
    shutil.rmtree(gt, ignore_errors=True)
    gt.mkdir(parents=True)
    eval_did = did if eval_did is None else eval_did
    own = b.dataset(eval_did)
    for f in sorted(out.glob("*.nii.gz")):  # the model's own dataset's labels (its union ids)
        src = own / "labelsTs" / f.name
        if not src.is_file():
            raise RuntimeError(f"{f.name} is not a held-out case of {own.name}: the scored cases must be test cases "
                               "of the dataset whose labels score them")
        os.link(src, gt / f.name)
    b.run([NU, "evaluate", str(out), "-d", str(eval_did), "--gt", str(gt), "-o", str(out / "evaluation")],
          f"{name}_evaluate")
    metrics = _read_json(out / "evaluation" / "metrics.json")
    states = [_read_json(b.work / "state" / f"{s}.json") for s in state_logs]
    states = [s for s in states if s]
    cases = [{"case": c["case"], "domain": c["domain"], "mean_dice": c["mean_dice"],
              "routing": (c.get("routing") or {}).get("inferred_domain")} for c in metrics["cases"]]
    entry = {"variant": name, "model": str(model.relative_to(b.work)), "dataset": did,
             "iterations": [s["iterations"] for s in states], "epochs": [s["epochs"] for s in states],
             "train_wall_s": [s["wall_s"] for s in states],
             "train_commit": ",".join(dict.fromkeys(c for s in states for c in s["commits"])) or "unknown",
             "predict_commit": predict_commit, "predict_wall_s": wall, "cases": cases}
    results = _read_json(b.results_json, {})
    results.setdefault("runs", {})[name] = entry
    results["config"] = {"size": b.size, "seed": b.seed, **b.cfg, "schedule": list(b.cfg["schedule"]),
                         "extension_schedule": list(b.schedule(True)), "plans": b.plans, "threads": b.threads,
                         "device": b.device, "old_domains": [SOURCES[s][1] for s in OLD_SOURCES],
                         "new_domain": SOURCES[NEW_SOURCE][1]}
    results.setdefault("machine", {})[platform.node()] = f"{platform.platform()}, {os.cpu_count()} cores"
    _write_json(b.results_json, results)


def run(b: Bench, variants: list[str]) -> None:
    prepare(b)
    old_domains = [SOURCES[s][1] for s in OLD_SOURCES]
    new_domain = SOURCES[NEW_SOURCE][1]
    old = train(b, OLD_ID, "UniversalTrainer", "old")
    evaluate(b, "old", old, OLD_ID, old_domains, ["old"])
    joint = train(b, JOINT_ID, "UniversalTrainer", "joint")
    evaluate(b, "joint", joint, JOINT_ID, [*old_domains, new_domain], ["joint"])
    for name in variants:
        v = VARIANTS[name]
        try:
            extend(b, old, EXT_ID, no_old_data=False)  # also scores the no-old-data model (same union ids)
            if v.dataset == NOOLD_ID:
                extend(b, old, NOOLD_ID, no_old_data=True)
                labels = [_read_json(b.dataset(d) / "dataset.json")["labels"] for d in (EXT_ID, NOOLD_ID)]
                if labels[0] != labels[1]:
                    raise RuntimeError("the no-old-data and the extended dataset have different union labels")
            model = train(b, v.dataset, v.trainer, name, extension=True)
            evaluate(b, name, model, v.dataset, [*old_domains, new_domain], ["old", name], eval_did=EXT_ID)
        except RuntimeError as e:  # one failing variant must not stop the others; a rerun retries it
            print(f"variant {name} failed: {e}", flush=True)


# ---- report --------------------------------------------------------------------------------------------------

def _domain_dice(entry: dict, domain: str) -> float | None:
    vals = [c["mean_dice"] for c in entry["cases"] if c["domain"] == domain and c["mean_dice"] is not None
            and not math.isnan(c["mean_dice"])]
    return sum(vals) / len(vals) if vals else None


def _routing(entry: dict, domain: str) -> str:
    rows = [c for c in entry["cases"] if c["domain"] == domain and c["routing"] is not None]
    return f"{sum(c['routing'] == domain for c in rows)}/{len(rows)}" if rows else "–"


def paired_interval(a: dict, b: dict, domain: str, draws: int = 10000) -> tuple[float, float, float, int] | None:
    """Mean paired difference of case Dice, run ``a`` minus run ``b``, over ``domain``'s test cases both scored, with
    a 95 % bootstrap interval over those cases (fixed seed): (mean, lo, hi, cases). One run per model: the interval
    is the test set's uncertainty, not the run-to-run variance of training."""
    import numpy as np

    va = {c["case"]: c["mean_dice"] for c in a["cases"] if c["domain"] == domain and c["mean_dice"] is not None}
    vb = {c["case"]: c["mean_dice"] for c in b["cases"] if c["domain"] == domain and c["mean_dice"] is not None}
    d = np.array([va[k] - vb[k] for k in sorted(va.keys() & vb.keys())
                  if not (math.isnan(va[k]) or math.isnan(vb[k]))])
    if len(d) == 0:
        return None
    boot = d[np.random.default_rng(0).integers(0, len(d), (draws, len(d)))].mean(axis=1)
    lo, hi = np.percentile(boot, [2.5, 97.5])
    return float(d.mean()), float(lo), float(hi), len(d)


def _interval(x: tuple[float, float, float, int] | None) -> str:
    return "–" if x is None else f"{100 * x[0]:+.1f} ({100 * x[1]:+.1f} to {100 * x[2]:+.1f}, {x[3]} cases)"


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}"


def _delta(a: float | None, b: float | None) -> str:
    return "–" if a is None or b is None else f"{100 * (a - b):+.1f}"


def report(results: dict) -> str:
    """Markdown: per variant old-domain Dice before/after, new-domain Dice vs from scratch, compute, goals."""
    cfg, runs = results["config"], results["runs"]
    old_domains, new = cfg["old_domains"], cfg["new_domain"]
    scratch_iters = cfg["schedule"][0] * cfg["schedule"][1]
    before, joint = runs.get("old"), runs.get("joint")
    commits = sorted({c for r in runs.values() for c in [*r["train_commit"].split(","), r["predict_commit"]]})
    lines = [f"# Extension benchmark ({cfg['size']}): {len(old_domains)} old domains + {new}", "",
             f"From scratch: {cfg['schedule'][0]} epochs x {cfg['schedule'][1]} iterations = {scratch_iters} "
             f"iterations (old model on {', '.join(old_domains)}; joint model on all three). Extensions: "
             f"{cfg['extension_schedule'][0]} epochs x {cfg['extension_schedule'][1]} = "
             f"{cfg['extension_schedule'][0] * cfg['extension_schedule'][1]} iterations. Dice % per domain: mean over "
             f"its held-out test cases ({cfg['holdout']} per domain) of the case's mean Dice over its classes, "
             f"dataset-free (routing by the gate). {cfg['threads']} thread(s), {cfg['device']}. "
             f"Commits: {', '.join(commits)}.", ""]
    head = ["model", "iterations (% of scratch)", "train wall s", "trained at",
            *[f"{d} Dice (Δ vs before)" for d in old_domains], f"{new} Dice (Δ vs scratch)", "routing (test cases)"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    order = ["old", "joint", *[v for v in VARIANTS if v in runs]]
    labels = {"old": "old model (before the extension)", "joint": "joint model from scratch (all three)",
              **{k: v.label for k, v in VARIANTS.items()}}
    goals = []
    for name in order:
        r = runs.get(name)
        if r is None:
            continue
        ext = name not in ("old", "joint")
        it = r["iterations"][-1] if r["iterations"] else 0
        cells = [labels[name], f"{it} ({100 * it / scratch_iters:.0f} %)" + (" + old model's" if ext else ""),
                 f"{r['train_wall_s'][-1]:.0f}" if r["train_wall_s"] else "–",
                 ", ".join(c[:7] for c in r["train_commit"].split(","))]
        for d in old_domains:
            v = _domain_dice(r, d)
            ref = _domain_dice(before, d) if before and name != "old" else None
            cells.append(_pct(v) + (f" ({_delta(v, ref)})" if ref is not None else ""))
        v = _domain_dice(r, new)
        ref = _domain_dice(joint, new) if joint and name != "joint" else None
        cells.append("–" if name == "old" else _pct(v) + (f" ({_delta(v, ref)})" if ref is not None else ""))
        domains = old_domains + ([] if name == "old" else [new])
        cells.append(", ".join(f"{d} {_routing(r, d)}" for d in domains))
        lines.append("| " + " | ".join(cells) + " |")
        if ext and before and joint:
            forget = [(d, _domain_dice(r, d), _domain_dice(before, d)) for d in old_domains]
            ok_old = all(a is not None and b is not None and a >= b - 0.01 for _, a, b in forget)
            vn, vj = _domain_dice(r, new), _domain_dice(joint, new)
            ok_new = vn is not None and vj is not None and vn >= vj - 0.02
            ok_it = it <= 0.3 * scratch_iters
            goals.append(f"- {labels[name]}: {'≤' if ok_it else '>'} 30 % of the iterations; new domain "
                         f"{'within' if ok_new else 'NOT within'} 2 points of from scratch ({_delta(vn, vj)}); old "
                         f"domains {'all within' if ok_old else 'NOT all within'} 1 point of before ("
                         + ", ".join(f"{d} {_delta(a, b)}" for d, a, b in forget) + ")")
    lines += ["", "Goals (issue 19: ≤ 30 % of the from-scratch iterations, new domain within 2 Dice points of "
              "from scratch, every old domain within 1 point of its pre-extension Dice):", "", *goals, ""]
    if before and joint:
        lines += ["Paired differences per test case (Dice points, 95 % bootstrap interval over the cases; one run per "
                  "model, so the run-to-run variance of training is not in them):", ""]
        for name in order:
            r = runs.get(name)
            if r is None or name in ("old", "joint"):
                continue
            parts = [f"{d} vs before {_interval(paired_interval(r, before, d))}" for d in old_domains]
            parts.append(f"{new} vs from scratch {_interval(paired_interval(r, joint, new))}")
            lines.append(f"- {labels[name]}: " + "; ".join(parts))
        lines.append("")
    if any(name.startswith("no_old_data") for name in runs):
        lines += ["The no-old-data variants train on the new domain's data only (the old cases are never seen by the "
                  "extension); their gate sends a scan to the new domain only when its new slot is present. The one "
                  "training everything has the old model's head outputs on the new scans as the old heads' "
                  "targets.", ""]
    return "\n".join(lines)


# ---- several runs ----------------------------------------------------------------------------------------------

def _case_matrix(entries: list[dict], domain: str) -> tuple[list[str], np.ndarray]:
    """Runs x cases matrix of case Dice over ``domain``'s test cases scored (not NaN) in every one of ``entries``."""

    per = [{c["case"]: c["mean_dice"] for c in e["cases"] if c["domain"] == domain and c["mean_dice"] is not None
            and not math.isnan(c["mean_dice"])} for e in entries]
    cases = sorted(set.intersection(*(set(v) for v in per))) if per else []
    return cases, np.array([[v[c] for c in cases] for v in per], dtype=float).reshape(len(per), len(cases))


def run_level_interval(a: list[dict], b: list[dict], domain: str, draws: int = 10000,
                       ) -> tuple[float, float, float, int, int] | None:
    """Difference of mean case Dice over ``domain``, runs ``a`` minus runs ``b`` (``a[k]`` and ``b[k]`` from the same
    repeat: the extension of repeat k starts from its old model k), with a hierarchical paired bootstrap 95 %
    interval: per draw the repeats are resampled with replacement, then the test cases (fixed seed). Returns (mean,
    lo, hi, runs, cases); with one run the interval is over the test cases only (no training variance in it); None
    when no test case of ``domain`` is scored on both sides."""

    if len(a) != len(b) or not a:
        raise ValueError("run_level_interval needs the same number (>= 1) of runs on both sides, paired by repeat")
    ca, ma = _case_matrix(a, domain)
    cb, mb = _case_matrix(b, domain)
    cases = sorted(set(ca) & set(cb))
    if not cases:
        return None
    diff = ma[:, [ca.index(c) for c in cases]] - mb[:, [cb.index(c) for c in cases]]  # runs x cases
    rng = np.random.default_rng(0)
    runs = diff[rng.integers(0, diff.shape[0], (draws, diff.shape[0]))].mean(axis=1)  # draws x cases
    boot = np.take_along_axis(runs, rng.integers(0, len(cases), (draws, len(cases))), axis=1).mean(axis=1)
    lo, hi = np.percentile(boot, [2.5, 97.5])
    return float(diff.mean()), float(lo), float(hi), diff.shape[0], len(cases)


def combined_report(files: list[tuple[str, dict]]) -> str:
    """Markdown over every run of the benchmark (``--combine``): per model the mean Dice over runs, and the goal's
    differences with run-level intervals (:func:`run_level_interval`)."""
    cfg = files[0][1]["config"]
    old_domains, new = cfg["old_domains"], cfg["new_domain"]
    for name, res in files[1:]:
        c = res["config"]
        if (c["old_domains"], c["new_domain"], c["schedule"], c["holdout"]) != \
                (old_domains, new, cfg["schedule"], cfg["holdout"]):
            raise ValueError(f"{name} is another configuration than {files[0][0]}: not combined")
    names = ["old", "joint", *[v for v in VARIANTS if any(v in r["runs"] for _, r in files)]]
    labels = {"old": "old model (before the extension)", "joint": "joint model from scratch (all three)",
              **{k: v.label for k, v in VARIANTS.items()}}
    lines = [f"# Extension benchmark ({cfg['size']}), every run: {len(files)} run(s)", "",
             "Runs: " + "; ".join(f"`{n}` (seed {r['config'].get('seed')})" for n, r in files) + ". Each run trains "
             "its own old model, joint model and extensions on the same data and test cases "
             f"({cfg['holdout']} per domain); an extension is compared with the old model and the joint model of its "
             "own run. Dice % per domain: mean over runs of the mean over test cases, dataset-free. Train wall s: a "
             "model's own training, mean over runs (one thread per run, runs side by side; an extension's excludes "
             "the old model it starts from).", ""]
    head = ["model", "runs", "iterations (% of scratch)", "train wall s (mean)", "trained at",
            *[f"{d} Dice (Δ vs before)" for d in old_domains],
            f"{new} Dice (Δ vs scratch)", "routed right (all runs)"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    goals = []
    for name in names:
        both = [(r["runs"][name], r["runs"].get("old"), r["runs"].get("joint")) for _, r in files
                if name in r["runs"]]
        entries = [e for e, _, _ in both]
        commits = dict.fromkeys(c[:7] for e in entries for c in e["train_commit"].split(","))
        scratch = cfg["schedule"][0] * cfg["schedule"][1]
        its = sorted({e["iterations"][-1] for e in entries if e["iterations"]})
        walls = [e["train_wall_s"][-1] for e in entries if e["train_wall_s"]]
        ext = name not in ("old", "joint")
        cells = [labels[name], str(len(entries)),
                 "/".join(f"{it} ({100 * it / scratch:.0f} %)" for it in its) + (" + old model's" if ext else ""),
                 f"{sum(walls) / len(walls):.0f}" if walls else "–", ", ".join(commits)]
        rows = []
        for d in [*old_domains, new]:
            if name == "old" and d == new:
                cells.append("–")
                continue
            vals = [_domain_dice(e, d) for e in entries]
            mean = sum(vals) / len(vals) if None not in vals else None
            ref_key = 2 if d == new else 1
            refs = [x[ref_key] for x in both]
            paired = name not in ("old", "joint") or (name == "joint" and d != new)
            if paired and None not in refs:
                ri = run_level_interval(entries, refs, d)
                rows.append((d, ri))
                cells.append(f"{_pct(mean)} ({f'{100 * ri[0]:+.1f}' if ri else '–'})")
            else:
                cells.append(_pct(mean))
        domains = old_domains + ([] if name == "old" else [new])
        right = {d: sum(c["routing"] == d for e in entries for c in e["cases"] if c["domain"] == d) for d in domains}
        total = {d: sum(c["domain"] == d and c["routing"] is not None for e in entries for c in e["cases"])
                 for d in domains}
        cells.append(", ".join(f"{d} {right[d]}/{total[d]}" for d in domains))
        lines.append("| " + " | ".join(cells) + " |")
        if name not in ("old", "joint") and rows:
            parts = []
            for d, ri in rows:
                if ri is None:
                    continue
                what = "vs from scratch" if d == new else "vs before"
                span = (f"run-level {100 * ri[1]:+.1f} to {100 * ri[2]:+.1f}" if ri[3] >= 2
                        else f"one run: case-level {100 * ri[1]:+.1f} to {100 * ri[2]:+.1f}")
                per_run = [_delta(_domain_dice(e, d), _domain_dice(x[2 if d == new else 1], d))
                           for e, x in zip(entries, both, strict=True)]
                goal = 0.02 if d == new else 0.01
                held = sum(1 for e, x in zip(entries, both, strict=True)
                           if _domain_dice(e, d) is not None and _domain_dice(x[2 if d == new else 1], d) is not None
                           and _domain_dice(e, d) >= _domain_dice(x[2 if d == new else 1], d) - goal)
                parts.append(f"{d} {what} {100 * ri[0]:+.1f} ({span}; per run {', '.join(per_run)}; within "
                             f"{100 * goal:.0f} point{'s' if goal > 0.01 else ''} in {held} of {ri[3]} runs)")
            goals.append(f"- {labels[name]}: " + "; ".join(parts))
    lines += ["", "### Goal differences over the runs", "",
              "Issue 19's goal: the new domain within 2 Dice points of from scratch, every old domain within 1 point "
              "of before. Mean over runs of the paired per-case differences, 95 % hierarchical bootstrap interval "
              "(repeats resampled, then test cases), each run's difference, and in how many runs the goal held:", "",
              *goals, ""]
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=sorted(SIZES), default="small",
                   help="small: the benchmark (about 40 core-minutes at one thread); tiny: a smoke test of the script")
    p.add_argument("--work", type=Path, default=None, help="work folder (default bench_work/extension_<size>)")
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(DEFAULT_VARIANTS),
                   help="extension variants to train, in this order")
    p.add_argument("--threads", type=int, default=1, help="torch/OpenMP threads of every subprocess")
    p.add_argument("-device", "--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--results", type=Path, default=RESULTS, help="folder of extension_<size>.json/.md")
    p.add_argument("--report", action="store_true", help="only (re)write the Markdown from the JSON")
    p.add_argument("--seed", type=int, default=None,
                   help="a repeat: NNUNET_UNIVERSAL_SEED for every training, its own work folder and results file")
    p.add_argument("--combine", action="store_true",
                   help="only write extension_<size>_runs.md from every run's results (run-level intervals)")
    args = p.parse_args()
    if args.combine:
        files = sorted(args.results.resolve().glob(f"extension_{args.size}_seed*.json"))
        first = args.results.resolve() / results_name(args.size)
        files = ([first] if first.is_file() else []) + files
        if not files:
            sys.exit(f"no extension_{args.size}*.json in {args.results} (run the benchmark first)")
        md = args.results.resolve() / f"extension_{args.size}_runs.md"
        _write_text(md, combined_report([(f.name, _read_json(f)) for f in files]))
        print(f"wrote {md}")
        return 0
    suffix = "" if args.seed is None else f"_seed{args.seed}"
    work = (args.work or REPO / "bench_work" / f"extension_{args.size}{suffix}").resolve()
    b = Bench(work, args.size, args.threads, args.device, args.results.resolve(), args.seed)
    if not args.report:
        t0 = time.perf_counter()
        run(b, args.variants)
        print(f"done in {time.perf_counter() - t0:.0f} s", flush=True)
    if not b.results_json.is_file():
        sys.exit(f"{b.results_json} does not exist (run the benchmark first)")
    md = b.results_json.with_suffix(".md")
    _write_text(md, report(_read_json(b.results_json)))
    print(f"wrote {md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
