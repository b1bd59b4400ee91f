"""Accuracy benchmark: universal training vs single-dataset and joint nnU-Net baselines, ablations, missing slots.

    .venv/bin/python scripts/benchmark_accuracy.py --size small                 # run (resumes; skips finished arms)
    .venv/bin/python scripts/benchmark_accuracy.py --size small --suite shared  # the shared-sequence suite
    .venv/bin/python scripts/benchmark_accuracy.py --size small --report        # tables from the results JSON only
    .venv/bin/python scripts/benchmark_accuracy.py --size small --unseen        # trained arms on an unseen institution

Suites (``--suite``; each has its own work folder ``bench_work/accuracy_<size>[_<suite>]`` and results
``benchmarks/results/accuracy_<size>[_<suite>].{json,md}``):

- ``mr`` (default, no suffix): three brain MR domains with different sequence sets, label protocols and
  appearance (BraTS-METS-like, UCSF-BMSR-like, BrainMetShare-like; UCSF and BrainMetShare ET merged with
  ``--identical``).
- ``shared`` (``_shared``): two brain MR domains with the same four sequences (T1, T1c, T2, FLAIR) but different
  institutions and label protocols (BraTS-METS-like and MSD-BrainTumour-like, converted with
  ``nnunet-universal convert msd``); no ``--identical`` pairs. The gate cannot route by which channels are
  present, only by the images' appearance; the report's routing section says so.
- ``ct`` (``_ct``): ``mr`` plus the LiTS-like CT domain (``--with-ct`` is a deprecated alias).

The suite goes through the commands a user runs, each as a subprocess: ``nnunet-universal synth/convert/merge/
plan``, ``nnUNetv2_plan_and_preprocess`` (single-dataset baselines), ``nnunet-universal train`` (=
``nnUNetv2_train``; every arm, fold 0, resumed with ``--c``), ``nnunet-universal predict`` / ``nnUNetv2_predict``
and ``nnunet-universal evaluate`` on the merge's held-out test cases (``--holdout``). Every arm trains for the same
``NNUNET_UNIVERSAL_SCHEDULE`` (epochs:iterations:validation iterations) on the same fold-0 training cases (the
single-dataset baselines get the merged split mapped back to their case ids), except the equal-compute arm, which
trains the number-of-domains multiple of the epochs (as many iterations as all single-dataset models together).
Arms whose ``checkpoint_final.pth`` exists are not retrained, and evaluations already in the results JSON are not
redone, so an interrupted run continues where it stopped. ``--time-budget MINUTES`` makes that a plan: the run
stops itself at the budget (the running command and its workers are stopped; a training resumes from its last
checkpoint, saved every fifth of its epochs), writes the report, and the same command continues it, e.g. on a lent
GPU, whose calls are limited to 15 minutes of device time: ``--size medium -device cuda --threads 8
--time-budget 12``, repeated until it prints no "stopped after" line.

Arms (``--arms``): ``universal`` (UniversalTrainer: harmonization, no prompts, hard routing; predicted
dataset-free, with the domain given (oracle) and with ``--routing soft``), ``single`` (one stock nnU-Net per
domain), ``joint_stock`` / ``joint_naive`` / ``joint_marginal`` (joint baselines), ``universal_equal_compute``
(UniversalTrainer, equal total compute) and the ablations (``prompts``: bounded modality and task FiLM prompts;
``no_harmony``: InstanceNorm; ``first_stage``, ``no_poly_affine``, ``no_restore``, ``full_rate_harmony``,
``no_modality_dropout``, ``no_gate``).

Unseen institution (``--unseen``, brain MR suites): the trained arms predict new scans of the known domains from
an institution never seen in training (``synth``'s institution shift ``unseen``, ``synthetic/shifts.py``: other
contrast curve, stronger bias field, more noise, thicker slices; ``--unseen-cases`` per domain, default 10, other
patients), converted with each domain's converter and merged into a test-only dataset in ``<work>/unseen`` (its own
``nnUNet_raw``; the suite's datasets and models are not touched). Nothing is trained: arms without a final
checkpoint in the work folder are skipped. Entries ``<arm>|seed<n>|<mode>|all|unseen`` (``test_set: "unseen"``)
feed the report's "Unseen institution" sections only (Dice per domain next to the arm's held-out mean, routing,
paired comparisons); every other table is the held-out cases'. Those sections state their commits ("trained at X,
predicted at Y" when all arms share them) and refuse runs of different commits as the other tables do.

Provenance: every run entry records ``train_commit`` and ``predict_commit`` (``git rev-parse HEAD``, ``-dirty``
when ``nnunet_universal``, ``scripts`` or ``pyproject.toml`` have uncommitted changes; entries written before
this field count as ``unknown``). The report refuses to put runs of different commits into one table or
comparison unless ``--allow-mixed-commits`` is given (the table's title then lists the commits).

Statistics: ± is the sample standard deviation (ddof 1; 0.0 for one value), over the test cases for an arm run once
and over the repeats' means otherwise. Each paired comparison gets two 95 % bootstrap intervals (fixed RNG seed):
over the test cases (resampled within domains; the test set's uncertainty only) and a hierarchical one that per
draw resamples each arm's repeats, then the test cases within domains, so it includes the run-to-run variance of
training; with it a two-sided bootstrap p-value, "significant" when the interval excludes 0, and the smallest
detectable effect (2.8 x bootstrap SE: α 0.05 two-sided, 80 % power). An arm with one run has no run-level
interval ("one run: training variance unknown"). The routing section gives, per gated arm and pooled over the
repeats, the routing accuracy, the mean top routing weight, its expected calibration error (10 equal-width bins),
the cases flagged uncertain and the Dice the misrouted cases lose against the oracle.

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
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
RESULTS = REPO / "benchmarks" / "results"
STOCK_TRAINER = "nnUNetTrainerScheduled"
MERGED_ID, MERGED_NAME = 610, "BenchUniversal"
#: synthetic source -> (converted dataset id, domain name)
SOURCES = {"brats-mets": (611, "brats_mets"), "ucsf-bmsr": (612, "ucsf_bmsr"), "brainmetshare": (613, "brainmetshare"),
           "lits": (614, "lits"), "msd-braintumour": (615, "msd_braintumour")}
IDENTICAL = ["ucsf_bmsr.ET=brainmetshare.ET"]
#: ``--unseen``: the named institution shift (``synthetic.shifts``), the synth seed of source ``i`` (other patients
#: than the training and held-out cases, seeds 0..), the converted datasets' ids (source id + 100) and the merged
#: test-only dataset, all in ``<work>/unseen/nnUNet_raw`` (never in the suite's nnUNet_raw), the prediction modes
UNSEEN_INSTITUTION, UNSEEN_SEED, UNSEEN_ID_OFFSET = "unseen", 100, 100
UNSEEN_MERGED_ID, UNSEEN_MERGED_NAME = 710, "BenchUnseen"
UNSEEN_MODES = ("dataset-free", "oracle", "dataset-free-soft")


@dataclass(frozen=True)
class SuiteSpec:
    """The synthetic sources of one suite and the classes its merge declares identical."""

    sources: tuple[str, ...]
    identical: tuple[str, ...]
    description: str


#: ``--suite`` -> sources; the work folder and results are ``accuracy_<size>`` (mr) or ``accuracy_<size>_<suite>``
SUITES = {
    "mr": SuiteSpec(("brats-mets", "ucsf-bmsr", "brainmetshare"), tuple(IDENTICAL),
                    "brain MR domains with different sequence sets, label protocols and appearance"),
    "shared": SuiteSpec(("brats-mets", "msd-braintumour"), (),
                        "brain MR domains with the same four sequences (T1, T1c, T2, FLAIR) but different "
                        "institutions and label protocols"),
    "ct": SuiteSpec(("brats-mets", "ucsf-bmsr", "brainmetshare", "lits"), tuple(IDENTICAL),
                    "domains: the three brain MR domains and a LiTS-like CT domain"),
}
SHARED_ROUTING_NOTE = ("In this suite both domains have the same four sequences (T1, T1c, T2, FLAIR): routing "
                       "cannot use which channels are present, only the images' appearance.")

#: cases per domain, synthetic shape (None: the sources' defaults), lesion radius scale (``synth --lesion-scale``),
#: held-out cases per domain, validation cases per domain in fold 0, schedule (epochs, iterations, val iterations),
#: U-Net features of the first stage (nnU-Net: 32), test-time mirroring.
#: At the default shapes (about 4 mm voxels) the sources' own metastases are a few voxels each; lesion scale 2.5
#: (radii x2.5, 0.2-3 % of the volume) keeps the task learnable within the CPU budget of 640 iterations (a stock
#: nnU-Net trained on the suite's UCSF-like cases alone reaches pseudo-Dice 0.7 within 64 iterations).
#: ``small``: 10 test cases per domain (power for the paired comparisons), 10 for training (1 of them validation).
SIZES = {
    "tiny": {"cases": 5, "shape": None, "lesion_scale": 2.5, "holdout": 1, "val_per_domain": 1,
             "schedule": (1, 2, 1), "base_features": 8, "tta": False},  # a smoke test of the suite, not a benchmark
    "small": {"cases": 20, "shape": None, "lesion_scale": 2.5, "holdout": 10, "val_per_domain": 1,
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
    #: epochs of the schedule times this; "domains": times the suite's number of domains (equal total compute)
    schedule_multiplier: int | str = 1


ARMS = {a.name: a for a in (
    Arm("universal", "UniversalTrainer", "universal", ("dataset-free", "oracle", "dataset-free-soft"), True,
        "UniversalTrainer"),
    Arm("single", STOCK_TRAINER, "single", ("oracle",), label="single-dataset nnU-Net (one model per domain)"),
    Arm("joint_naive", "UniversalTrainer_NaiveJoint", "universal", ("dataset-free", "oracle"),
        label="joint, naive loss (unknown = background)"),
    Arm("joint_marginal", "UniversalTrainer_MarginalJoint", "universal", ("dataset-free", "oracle"),
        label="joint, marginal loss"),
    Arm("joint_stock", STOCK_TRAINER, "stock", label="joint, plain nnU-Net (network and loss)"),
    Arm("universal_equal_compute", "UniversalTrainer", "universal",
        label="UniversalTrainer, equal total compute ({k} x iterations)", schedule_multiplier="domains"),
    Arm("prompts", "UniversalTrainer_Prompts", "universal", label="with prompts (bounded modality and task FiLM)"),
    Arm("no_modality_dropout", "UniversalTrainer_NoModalityDropout", "universal", missing=True,
        label="no modality dropout"),
    Arm("no_harmony", "UniversalTrainer_NoHarmony", "universal", label="no harmonization (InstanceNorm)"),
    Arm("first_stage", "UniversalTrainer_FirstStageHarmony", "universal", label="harmonization in stage 1 only"),
    Arm("no_poly_affine", "UniversalTrainer_NoPolyAffine", "universal", label="no polynomial affine"),
    Arm("no_restore", "UniversalTrainer_NoRestore", "universal", label="no restoration"),
    Arm("full_rate_harmony", "UniversalTrainer_FullRateHarmony", "universal",
        label="U-Harmony parameters at the full learning rate (paper; default before session 5)"),
    Arm("no_gate", "UniversalTrainer_NoGate", "universal", ("oracle",), label="dataset-specific heads, no gate"),
)}
#: arms of earlier results files whose trainers no longer exist (``--report`` still renders them)
LEGACY_LABELS = {"no_prompts": "no prompts",
                 "no_harmony_no_prompts": "no harmonization, no prompts (heads and gate only)"}
#: arms without a routing gate of their own (the routing section leaves them out)
UNGATED = ("single", "joint_stock", "joint_naive", "joint_marginal", "no_gate")


# ---- small helpers ---------------------------------------------------------------------------------

def _read_json(path: Path, default: Any = None) -> Any:
    return json.loads(path.read_text()) if path.is_file() else default


def _write_json(path: Path, obj: Any) -> None:
    _write_text(path, json.dumps(obj, indent=1))


def _write_text(path: Path, text: str) -> None:
    from nnunet_universal.atomic_io import atomic_write_bytes

    atomic_write_bytes(path, text.encode())


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Exclusive advisory lock on ``path``'s sibling ``.lock`` file for a read-modify-write of ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(f".{path.name}.lock"), "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def git_commit(repo: Path = REPO) -> str:
    """``git rev-parse HEAD`` of ``repo``, with ``-dirty`` when the package, scripts or pyproject.toml have
    uncommitted changes; ``unknown`` outside a git checkout."""
    try:
        head = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--", "nnunet_universal", "scripts",
                                "pyproject.toml"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("-dirty" if dirty else "") if head else "unknown"


def suite_name(size: str, suite: str = "mr") -> str:
    """``small``, ``small_shared``, ``small_ct``, ...: names the work folder and the results files of one suite."""
    if suite not in SUITES:
        raise ValueError(f"unknown suite {suite!r}; expected one of {sorted(SUITES)}")
    return size + ("" if suite == "mr" else f"_{suite}")


def suite_of(sources: list[str] | tuple[str, ...]) -> str:
    """The suite whose sources these are (results files from before ``--suite`` record only the sources)."""
    if "lits" in sources:
        return "ct"
    return "shared" if "msd-braintumour" in sources else "mr"


class BudgetExhausted(Exception):
    """``--time-budget`` ran out: the running command was stopped; rerunning the same command continues."""


def _stop_group(proc: subprocess.Popen, grace: float = 20.0) -> None:
    """SIGTERM the command's process group (nnU-Net's data-loader workers included), SIGKILL after ``grace`` s."""
    import signal

    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, None)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


class Suite:
    """Paths, environment and command runner of one benchmark size in one work folder."""

    def __init__(self, work: Path, size: str, suite: str, threads: int, device: str, results: Path,
                 stock_trainer: str = STOCK_TRAINER) -> None:
        self.work, self.size, self.cfg, self.suite = work, size, SIZES[size], suite
        self.sources, self.identical = list(SUITES[suite].sources), list(SUITES[suite].identical)
        self.stock_trainer = stock_trainer
        self.device, self.threads = device, threads
        self.deadline: float | None = None  # time.monotonic() after which no command may run (--time-budget)
        self.raw, self.pre = work / "nnUNet_raw", work / "nnUNet_preprocessed"
        # every suite is another dataset: its own results file (and, in main(), its own work folder)
        self.results_json = results / f"accuracy_{suite_name(size, suite)}.json"
        self.plans = "nnUNetUniversalPlans" + self._plans_suffix()
        self.stock_plans = "nnUNetPlans" + self._plans_suffix()

    def _plans_suffix(self) -> str:
        return "" if self.cfg["base_features"] == 32 else f"_f{self.cfg['base_features']}"

    def multiplier(self, arm: Arm) -> int:
        """The factor on the schedule's epochs of ``arm`` in this suite."""
        m = arm.schedule_multiplier
        return len(self.sources) if m == "domains" else int(m)

    def results_dir(self, seed: int, k: int = 1) -> Path:
        """``nnUNet_results`` of one repeat (``_x{k}``: trained for k times the epochs)."""
        return self.work / (f"nnUNet_results_seed{seed}" + (f"_x{k}" if k != 1 else ""))

    def merged(self) -> Path:
        return self.raw / f"Dataset{MERGED_ID}_{MERGED_NAME}"

    def single(self, source: str) -> Path:
        did = SOURCES[source][0]
        return next(self.raw.glob(f"Dataset{did}_*"))

    def env(self, seed: int = 0, k: int = 1) -> dict[str, str]:
        """Environment of every subprocess: the suite's nnU-Net folders, the schedule (epochs times ``k``)."""
        from nnunet_universal.discovery import ext_trainer_value

        e, s = dict(os.environ), self.cfg["schedule"]
        e.update(nnUNet_raw=str(self.raw), nnUNet_preprocessed=str(self.pre),
                 nnUNet_results=str(self.results_dir(seed, k)), nnUNet_compile="f",
                 nnUNet_def_n_proc="1", NNUNET_UNIVERSAL_FP_SAMPLES="20000",
                 NNUNET_UNIVERSAL_SCHEDULE=f"{s[0] * k}:{s[1]}:{s[2]}", OMP_NUM_THREADS=str(self.threads),
                 nnUNet_extTrainer=ext_trainer_value(os.environ.get("nnUNet_extTrainer", "")))
        return e

    def run(self, cmd: list[str], log: str, seed: int = 0, extra_env: dict[str, str] | None = None,
            k: int = 1) -> float:
        """Run a CLI command (stdout/stderr appended to logs/{log}.log); return its wall time in seconds."""
        logf = self.work / "logs" / f"{log}.log"
        logf.parent.mkdir(parents=True, exist_ok=True)
        left = None if self.deadline is None else self.deadline - time.monotonic()
        if left is not None and left <= 0:
            raise BudgetExhausted(f"time budget used up before {' '.join(cmd[:3])} ...")
        t = time.perf_counter()
        with open(logf, "a") as f:
            f.write(f"\n$ {' '.join(cmd)}\n")
            f.flush()
            proc = subprocess.Popen(cmd, env={**self.env(seed, k), **(extra_env or {})}, stdout=f,
                                    stderr=subprocess.STDOUT, start_new_session=True)
            try:
                rc = proc.wait(timeout=left)
            except subprocess.TimeoutExpired:
                _stop_group(proc)
                f.write(f"\n[stopped: the time budget ran out after {time.perf_counter() - t:.0f} s]\n")
                raise BudgetExhausted(f"time budget ran out during {' '.join(cmd[:3])} ... (see {logf})") from None
            except BaseException:  # Ctrl-C: take the command's whole process group down with us
                _stop_group(proc)
                raise
        if rc != 0:
            raise RuntimeError(f"{' '.join(cmd[:3])} ... failed (exit {rc}); see {logf}")
        return time.perf_counter() - t


@dataclass(frozen=True)
class TestSet:
    """Where one test set's prediction inputs and ground truth live.

    ``holdout``: the merge's held-out cases (``imagesTs``/``labelsTs`` of the suite's merged dataset). ``unseen``:
    the known domains' cases synthesized with an institution shift never seen in training, converted and merged in
    ``<work>/unseen/nnUNet_raw`` (a test-only merged dataset with the same union labels and channels).
    """

    name: str
    inputs: Path  # domain_<d>/ (merged channels), single_<d>/ (the domain's own channels), without_<slot>/
    images: Path  # every case in merged channels (the joint stock nnU-Net's input)
    labels: Path  # ground truth in union label ids
    raw: Path  # the nnUNet_raw whose merged dataset (``dataset_id``) the evaluation reads
    dataset_id: int


def holdout_set(s: Suite) -> TestSet:
    return TestSet("holdout", s.work / "inputs", s.merged() / "imagesTs", s.merged() / "labelsTs", s.raw, MERGED_ID)


def unseen_root(s: Suite) -> Path:
    """``<work>/unseen``: native files, nnU-Net folders, inputs and predictions of the unseen-institution set."""
    return s.work / "unseen"


def unseen_merged(s: Suite) -> Path:
    return unseen_root(s) / "nnUNet_raw" / f"Dataset{UNSEEN_MERGED_ID}_{UNSEEN_MERGED_NAME}"


def unseen_set(s: Suite) -> TestSet:
    m = unseen_merged(s)
    return TestSet("unseen", unseen_root(s) / "inputs", m / "imagesTr", m / "labelsTr", unseen_root(s) / "nnUNet_raw",
                   UNSEEN_MERGED_ID)


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


def prepare(s: Suite, singles: bool = True) -> None:
    """synth -> convert -> merge (hold-out) -> plan; fold-0 splits; stock plans for the single-dataset baselines
    (only with ``singles``: preprocessing every source again costs as much as planning the merge)."""
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
    identical = ["--identical", *s.identical] if s.identical else []
    s.run([nu, "merge", *[str(SOURCES[x][0]) for x in s.sources], "-d", str(MERGED_ID), "-n", MERGED_NAME,
           *identical, "--holdout", str(cfg["holdout"]), "-j", "1"], "prepare")
    merged_pre = s.pre / s.merged().name
    if not (merged_pre / "nnUNetUniversalPlans.json").is_file() or not (merged_pre / "gt_segmentations").is_dir():
        s.run([nu, "plan", "-d", str(MERGED_ID), "-np", "1"], "prepare")
    _edit_features(merged_pre / "nnUNetUniversalPlans.json", s.plans, cfg["base_features"])
    fold0 = _write_merged_split(s, merged_pre)
    for src in s.sources if singles else []:
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


def _source_case(s: Suite, merged: Path | None = None) -> dict[str, tuple[str, str]]:
    """Merged case id -> (domain, case id in its converted dataset), from the merge's provenance (default: the
    suite's merged dataset)."""
    prov = _read_json((merged or s.merged()) / "provenance.json")["cases"]
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


def model_dir(s: Suite, dataset: int, trainer: str, plans: str, seed: int, k: int = 1) -> Path:
    """The nnU-Net model folder (``<trainer>__<plans>__3d_fullres``) of one dataset, trainer and repeat."""
    name = s.merged().name if dataset == MERGED_ID else next(s.raw.glob(f"Dataset{dataset}_*")).name
    return s.results_dir(seed, k) / name / f"{trainer}__{plans}__3d_fullres"


def train(s: Suite, dataset: int, trainer: str, plans: str, seed: int, log: str, k: int = 1) -> Path:
    """``nnunet-universal train DATASET 3d_fullres 0`` (``--c`` after an interruption); skipped when finished.

    ``k``: epochs of the schedule times ``k``, into ``nnUNet_results_seed{seed}_x{k}``. Each session adds its wall
    time and the code's commit to ``state/{log}.json``.
    """
    model = model_dir(s, dataset, trainer, plans, seed, k)
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
    commit = git_commit()
    wall = s.run(cmd, log, seed, {"nnUNet_n_proc_DA": "0"}, k)  # augmentation in-process (planning needs >= 1)
    state = s.work / "state" / f"{log}.json"
    prev = _read_json(state, {"wall_s": 0.0, "sessions": 0})
    # a model trained over several sessions at different commits keeps them all (the report then sees them mixed)
    commits = list(dict.fromkeys([*prev.get("commits", [prev.get("commit", "unknown")] if prev["sessions"] else []),
                                  commit]))
    _write_json(state, {"wall_s": prev["wall_s"] + wall, "sessions": prev["sessions"] + 1, "command": " ".join(cmd),
                        "commit": commit, "commits": commits, "schedule_multiplier": k})
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
            out: Path, test: TestSet | None = None) -> float:
    """Predict the test cases of one (mode, withheld slot) into ``out``; returns the wall time.

    ``test``: the test set (default: the merge's held-out cases, :func:`holdout_set`)."""
    test = test or holdout_set(s)
    tta = [] if s.cfg["tta"] else ["--disable-tta"]
    log, wall, k = f"{arm.name}_seed{seed}_predict", 0.0, s.multiplier(arm)
    if arm.kind == "single":
        for src in s.sources:
            raw_out = out.parent / f".{out.name}_{SOURCES[src][1]}"
            wall += s.run([str(BIN / "nnUNetv2_predict"), "-i", str(test.inputs / f"single_{SOURCES[src][1]}"),
                           "-o", str(raw_out), "-d", str(SOURCES[src][0]), "-c", "3d_fullres", "-tr", arm.trainer,
                           "-p", s.stock_plans, "-f", "0", "-device", s.device, "-npp", "1", "-nps", "1",
                           *(["--disable_tta"] if tta else [])], log, seed, k=k)
            _remap_to_union(s, src, raw_out, out)
        return wall
    if arm.kind == "stock":
        return s.run([str(BIN / "nnUNetv2_predict"), "-i", str(test.images), "-o", str(out), "-d",
                      str(MERGED_ID), "-c", "3d_fullres", "-tr", arm.trainer, "-p", s.plans, "-f", "0", "-device",
                      s.device, "-npp", "1", "-nps", "1", *(["--disable_tta"] if tta else [])], log, seed, k=k)
    nu = str(BIN / "nnunet-universal")
    if withheld is not None:
        folders = [(test.inputs / f"without_{withheld}", [])]
    else:
        # dataset-free: the model's default routing (hard); dataset-free-soft: heads weighted by the routing
        extra = ["--routing", "soft"] if mode == "dataset-free-soft" else []
        folders = [(p, ["--domain", p.name.removeprefix("domain_")] if mode == "oracle" else extra)
                   for p in sorted(test.inputs.glob("domain_*"))]
    for folder, extra in folders:
        wall += s.run([nu, "predict", "-m", str(model), "-i", str(folder), "-o", str(out), "-f", "0",
                       "-device", s.device, *extra, *tta], log, seed, k=k)
    return wall


#: fields of a case's routing record (``metrics.json``) kept as ``routing_<field>`` where present
ROUTING_FIELDS = ("mode", "rule", "confidence", "runner_up", "uncertain", "conflicting", "decision")


def _condense(metrics: dict) -> dict:
    """The parts of ``metrics.json`` the tables need: per-domain summaries and compact per-case scores (with the
    routing record's inferred domain as ``routing``, its gate weights as ``routing_weights`` and, where present,
    ``routing_<field>`` of :data:`ROUTING_FIELDS`, e.g. ``routing_uncertain``)."""
    cases = []
    for c in metrics["cases"]:
        r = c.get("routing") or {}
        cases.append({"case": c["case"], "domain": c["domain"], "mean_dice": c["mean_dice"],
                      "dice": {k: v["dice"] for k, v in {**c["classes"], **c["regions"]}.items()},
                      "routing": r.get("inferred_domain"), "routing_weights": r.get("weights") or None,
                      **{f"routing_{k}": r[k] for k in ROUTING_FIELDS if k in r}})
    doms = {d: {k: v[k] for k in ("n_cases", "dice", "hd95", "classes", "regions", "lesions", "routing",
                                  "cross_domain_fp", "lesion_headline")} for d, v in metrics["domains"].items()}
    return {"domains": doms, "routing": metrics.get("routing"), "cases": cases}


#: prediction modes; "missing" stands for the runs with one slot withheld (dataset-free)
MODES = ("dataset-free", "oracle", "dataset-free-soft", "missing")


def _train_states(s: Suite, log: str) -> list[dict]:
    """The ``state/`` records of one arm and repeat (``{log}.json``; the single-dataset arm: ``{log}_<domain>``)."""
    state = s.work / "state"
    paths = [state / f"{log}.json", *sorted(state.glob(f"{log}_*.json"))]
    return [_read_json(p) for p in paths if p.is_file()]


def run_arm(s: Suite, arm: Arm, seed: int, modes: tuple[str, ...] = MODES) -> None:
    """Train (or resume) one arm, then predict and evaluate every (mode, withheld slot) not yet in the results
    (of ``modes``; "missing" stands for the runs with one slot withheld)."""
    if arm.trainer == STOCK_TRAINER:
        arm = replace(arm, trainer=s.stock_trainer)
        if not _trainer_available(s, arm.trainer):
            print(f"skip {arm.name}: trainer {arm.trainer} not found (nnUNetTrainer obeying NNUNET_UNIVERSAL_SCHEDULE)")
            return
    log, k = f"{arm.name}_seed{seed}", s.multiplier(arm)
    if arm.kind == "single":
        model = {src: train(s, SOURCES[src][0], arm.trainer, s.stock_plans, seed, f"{log}_{SOURCES[src][1]}", k)
                 for src in s.sources}
    else:
        model = train(s, MERGED_ID, arm.trainer, s.plans, seed, log, k)
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
        _predict_and_record(s, arm, model, mode, withheld, seed, out, key, holdout_set(s))


def _predict_and_record(s: Suite, arm: Arm, model: Path | dict[str, Path], mode: str, withheld: str | None,
                        seed: int, out: Path, key: str, test: TestSet, unseen: dict | None = None) -> None:
    """Predict one (mode, withheld slot) of ``test`` into ``out``, evaluate it (``nnunet-universal evaluate``) and
    record it under ``key`` with its commits (``unseen``: the unseen set's description, see :func:`run_unseen`)."""
    log, k = f"{arm.name}_seed{seed}", s.multiplier(arm)
    shutil.rmtree(out, ignore_errors=True)
    print(f"[{time.strftime('%H:%M:%S')}] predict {key}", flush=True)
    predict_commit = git_commit()
    wall = predict(s, arm, model, mode, withheld, seed, out, test)
    s.run([str(BIN / "nnunet-universal"), "evaluate", str(out), "-d", str(test.dataset_id), "--gt",
           str(test.labels), "-o", str(out / "evaluation")], f"{log}_evaluate", seed,
          None if test.raw == s.raw else {"nnUNet_raw": str(test.raw)}, k=k)
    states = _train_states(s, log)
    train_commits = dict.fromkeys(c for x in states for c in x.get("commits", [x.get("commit", "unknown")]))
    sched = s.cfg["schedule"]
    entry = {"arm": arm.name, "trainer": arm.trainer, "seed": seed, "mode": mode, "withheld": withheld,
             "train_wall_s": sum(x["wall_s"] for x in states), "train_sessions": sum(x["sessions"] for x in states),
             "train_commands": [x["command"] for x in states], "predict_wall_s": wall,
             "train_commit": ",".join(train_commits) or "unknown", "predict_commit": predict_commit,
             "schedule_multiplier": k, "schedule": [sched[0] * k, sched[1], sched[2]],
             **({"test_set": test.name, "institution": unseen["institution"]} if unseen else {}),
             **_condense(_read_json(out / "evaluation" / "metrics.json"))}
    with _locked(s.results_json):  # several instances (disjoint --arms) may share one results file
        _record(s, key, entry, unseen)


def _record(s: Suite, key: str, entry: dict, unseen: dict | None = None) -> None:
    """Add one evaluated run to ``accuracy_<suite>.json`` (read-modify-write; the caller holds the lock);
    ``unseen``: the unseen-institution set's description, kept as the file's ``unseen`` block."""
    results = _read_json(s.results_json, {})
    results.setdefault("runs", {})[key] = entry
    if unseen:
        results["unseen"] = unseen
    results["config"] = {"size": s.size, "suite": s.suite, **s.cfg, "sources": s.sources, "identical": s.identical,
                         "plans": s.plans, "stock_trainer": s.stock_trainer,
                         "stock_plans": s.stock_plans, "threads": s.threads, "device": s.device}
    results.setdefault("machine", {}).update({platform.node(): f"{platform.platform()}, {os.cpu_count()} cores, "
                                                               f"device {s.device}"})
    _write_json(s.results_json, results)


# ---- unseen institution ------------------------------------------------------------------------------

def unseen_description(s: Suite, cases: int) -> dict[str, Any]:
    """What ``--unseen`` synthesizes: the institution shift's parameters, cases per domain, seeds, shape."""
    from nnunet_universal.synthetic.shifts import INSTITUTION_SHIFTS

    shift = INSTITUTION_SHIFTS[UNSEEN_INSTITUTION]
    desc = {"institution": shift.name, "description": shift.description, "parameters": shift.as_dict(),
            "cases_per_domain": int(cases), "seeds": {src: UNSEEN_SEED + i for i, src in enumerate(s.sources)},
            "shape": s.cfg["shape"], "lesion_scale": s.cfg["lesion_scale"],
            "dataset": f"Dataset{UNSEEN_MERGED_ID}_{UNSEEN_MERGED_NAME}"}
    return json.loads(json.dumps(desc))  # as the JSON file reads back (lists, not tuples)


def prepare_unseen(s: Suite, cases: int) -> dict[str, Any]:
    """Build the unseen-institution test set in ``<work>/unseen`` (resumable); return its description.

    Per source: ``synthesize(..., institution="unseen")`` (``synthetic.shifts``; seed ``UNSEEN_SEED + i``, the
    suite's shape and lesion scale), ``nnunet-universal convert`` with the source's converter (BrainMetShare: the
    cases' own spacing file), ``nnunet-universal merge`` of them (``--holdout 0``: every case is a test case, in
    ``imagesTr``/``labelsTr``), all with ``nnUNet_raw``/``_preprocessed``/``_results`` in ``<work>/unseen``: the
    suite's datasets and trained models are never touched. The merge must give the trained models' union labels and
    channels (checked). Inputs as for the held-out cases: ``domain_<d>`` (merged channels), ``single_<d>``.
    """
    from nnunet_universal.synthetic.api import synthesize_dataset

    if any(src not in ("brats-mets", "ucsf-bmsr", "brainmetshare", "msd-braintumour") for src in s.sources):
        raise SystemExit(f"--unseen: suite {s.suite} has a CT domain; institution shifts exist for brain MR only")
    if cases < 1:
        raise SystemExit(f"--unseen-cases must be at least 1, got {cases}")
    trained = _read_json(s.merged() / "dataset.json")
    if trained is None:
        raise SystemExit(f"--unseen: {s.merged()} has no dataset.json; run the suite (train its arms) first")
    root, desc = unseen_root(s), unseen_description(s, cases)
    old = _read_json(root / "set.json")
    if old is not None and old != desc:
        raise SystemExit(f"--unseen: {root} holds another unseen set ({root / 'set.json'}: {old}); pass the same "
                         f"--unseen-cases, or delete {root} and the results' '|unseen' entries")
    _write_json(root / "set.json", desc)
    env = {k: str(root / k) for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")}
    for p in env.values():
        Path(p).mkdir(parents=True, exist_ok=True)
    nu = str(BIN / "nnunet-universal")
    for src in s.sources:
        native = root / "native" / src
        if not (native / ".done").is_file():
            shutil.rmtree(native, ignore_errors=True)
            synthesize_dataset(src, native, cases=cases, seed=desc["seeds"][src],
                               shape=tuple(s.cfg["shape"]) if s.cfg["shape"] else None,
                               lesion_scale=s.cfg["lesion_scale"], institution=UNSEEN_INSTITUTION)
            (native / ".done").touch()
        top = next(p for p in native.iterdir() if p.is_dir())
        s.run([nu, "convert", "msd" if src == "msd-braintumour" else src, str(top), "-d",
               str(SOURCES[src][0] + UNSEEN_ID_OFFSET), "-j", "1"], "unseen_prepare", extra_env=env)
    identical = ["--identical", *s.identical] if s.identical else []
    s.run([nu, "merge", *[str(SOURCES[x][0] + UNSEEN_ID_OFFSET) for x in s.sources], "-d", str(UNSEEN_MERGED_ID),
           "-n", UNSEEN_MERGED_NAME, *identical, "--holdout", "0", "-j", "1"], "unseen_prepare", extra_env=env)
    merged = _read_json(unseen_merged(s) / "dataset.json")
    for what in ("labels", "channel_names"):
        if merged[what] != trained[what]:
            raise RuntimeError(f"the unseen set's merge has other {what} than the trained models' dataset: "
                               f"{merged[what]} != {trained[what]}")
    if {d: v["labels"] for d, v in merged["universal"]["domains"].items()} != {
            d: v["labels"] for d, v in trained["universal"]["domains"].items()}:
        raise RuntimeError("the unseen set's merge maps the domains' classes to other union labels than the trained "
                           "models' dataset")
    _make_unseen_inputs(s, merged)
    return desc


def _make_unseen_inputs(s: Suite, merged: dict) -> None:
    test = unseen_set(s)
    if (test.inputs / ".done").is_file():
        return
    shutil.rmtree(test.inputs, ignore_errors=True)
    back = _source_case(s, unseen_merged(s))
    raw = test.raw
    for c, info in sorted(merged["universal"]["cases"].items()):
        dom = info["domain"]
        _link_case(test.images, c, test.inputs / f"domain_{dom}", c)
        src = next(x for x in s.sources if SOURCES[x][1] == dom)
        single = next(raw.glob(f"Dataset{SOURCES[src][0] + UNSEEN_ID_OFFSET:03d}_*"))
        _link_case(single / "imagesTr", back[c][1], test.inputs / f"single_{dom}", c)
    (test.inputs / ".done").touch()


def trained_model(s: Suite, arm: Arm, seed: int) -> Path | dict[str, Path] | None:
    """The arm's trained model(s) of one repeat (``checkpoint_final.pth`` present), else None (never trains)."""
    k = s.multiplier(arm)
    if arm.kind == "single":
        models = {src: model_dir(s, SOURCES[src][0], arm.trainer, s.stock_plans, seed, k) for src in s.sources}
    else:
        models = {"": model_dir(s, MERGED_ID, arm.trainer, s.plans, seed, k)}
    if not all((m / "fold_0" / "checkpoint_final.pth").is_file() for m in models.values()):
        return None
    return models if arm.kind == "single" else models[""]


def trained_seeds(s: Suite) -> list[int]:
    """The repeat indices with a results folder in the work folder (``nnUNet_results_seed<n>[_x<k>]``)."""
    found = {p.name.removeprefix("nnUNet_results_seed").split("_")[0] for p in s.work.glob("nnUNet_results_seed*")}
    return sorted(int(x) for x in found if x.isdigit())


def run_unseen(s: Suite, arm: Arm, seed: int, unseen: dict[str, Any], modes: tuple[str, ...] = MODES) -> None:
    """Predict and evaluate the unseen-institution set with one arm's trained model (of ``modes``, all inputs; no
    missing-slot runs), recorded as ``<arm>|seed<seed>|<mode>|all|unseen`` with ``test_set: "unseen"``. An arm
    that is not trained in the work folder is skipped: nothing is (re)trained."""
    if arm.trainer == STOCK_TRAINER:
        arm = replace(arm, trainer=s.stock_trainer)
    try:
        model = trained_model(s, arm, seed)
    except StopIteration:  # a single-dataset folder that the suite never converted
        model = None
    if model is None:
        print(f"unseen: skip {arm.name} seed {seed}: not trained in {s.work}", flush=True)
        return
    for mode in [m for m in arm.modes if m in modes and m in UNSEEN_MODES]:
        key = f"{arm.name}|seed{seed}|{mode}|all|unseen"
        if key in _read_json(s.results_json, {}).get("runs", {}):
            continue
        out = unseen_root(s) / "predictions" / f"seed{seed}" / arm.name / mode
        _predict_and_record(s, arm, model, mode, None, seed, out, key, unseen_set(s), unseen)


# ---- report -----------------------------------------------------------------------------------------

class MixedCommitsError(ValueError):
    """Runs of different code commits in one table or comparison (without ``--allow-mixed-commits``)."""


def _entries(runs: dict, arm: str, mode: str, withheld: str | None = None) -> list[dict]:
    return [r for r in runs.values() if r["arm"] == arm and r["mode"] == mode and r["withheld"] == withheld]


def _commits_of(entry: dict) -> list[str]:
    """The training and prediction commits of one run entry (``unknown`` where the entry predates the fields)."""
    train = [c for c in str(entry.get("train_commit") or "unknown").split(",") if c] or ["unknown"]
    return list(dict.fromkeys([*train, entry.get("predict_commit") or "unknown"]))


def _short(commit: str) -> str:
    """A commit hash cut to 12 hex digits (keeping ``-dirty``)."""
    if commit == "unknown":
        return commit
    dirty = commit.endswith("-dirty")
    return commit.removesuffix("-dirty")[:12] + ("-dirty" if dirty else "")


def _commit_note(what: str, entries: list[dict], allow: bool) -> str:
    """``""`` when ``entries`` share one commit; else, with ``allow``, a note listing the commits and their arms
    (for the table's title); without it a :class:`MixedCommitsError` naming them."""
    by: dict[str, list[str]] = {}
    for e in entries:
        for c in _commits_of(e):
            arms = by.setdefault(c, [])
            if e["arm"] not in arms:
                arms.append(e["arm"])
    if len(by) <= 1:
        return ""
    listing = "; ".join(f"{_short(c)}: {', '.join(arms)}" for c, arms in by.items())
    if not allow:
        raise MixedCommitsError(f"{what} would mix runs of different commits ({listing}); rerun those arms at one "
                                "commit, or pass --allow-mixed-commits to render it with the commits listed")
    return f" (mixed commits: {listing})"


def _stat(values: list[float | None]) -> tuple[float, float, int] | None:
    """Mean, sample standard deviation (ddof 1; 0.0 for one value) and count of the values that are not None."""
    import numpy as np

    v = [x for x in values if x is not None]
    if not v:
        return None
    return float(np.mean(v)), (float(np.std(v, ddof=1)) if len(v) > 1 else 0.0), len(v)


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


def _shared_seeds(runs: dict, a: tuple[str, str], b: tuple[str, str]) -> set[int] | None:
    """Two modes of one arm: the repeats that have both (the same trained models); two arms: None (all)."""
    if a[0] != b[0]:
        return None
    return {e["seed"] for e in _entries(runs, *a)} & {e["seed"] for e in _entries(runs, *b)}


def _paired(runs: dict, a: tuple[str, str], b: tuple[str, str], domains: list[str], draws: int = 10000,
            ) -> tuple[float, float, float, int] | None:
    """Paired difference of mean Dice, arm/mode ``a`` minus ``b``, on the test cases both have: each case's Dice
    averaged over the arm's repeats (two modes of one arm: the repeats both have), then the table's mean over
    domains; with a 95 % bootstrap interval over the
    test cases (resampled within each domain, fixed seed). The interval is the test set's uncertainty, not the
    run-to-run spread of training (the ± of the tables; see :func:`_hierarchical`)."""
    import numpy as np

    seeds = _shared_seeds(runs, a, b)

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


def _hierarchical(runs: dict, a: tuple[str, str], b: tuple[str, str], domains: list[str], draws: int = 10000,
                  ) -> dict[str, Any] | None:
    """Hierarchical paired bootstrap of the difference of mean Dice, arm/mode ``a`` minus ``b``, that includes the
    run-to-run variance of training.

    Per draw (numpy, fixed seed): resample each arm's repeats with replacement (two modes of one arm: one resample
    of their shared repeats, the same models), then the test cases within each domain; the statistic is the mean
    over domains of the mean over the resampled cases of (mean over A's resampled runs of the case Dice - the same
    for B). Returns the point estimate, the 95 % interval (``lo``, ``hi``), the two-sided bootstrap p-value
    ``2 min(P(≤ 0), P(≥ 0))``, ``significant`` (the interval excludes 0), the bootstrap SE and the smallest
    detectable effect ``2.8 SE`` (α 0.05 two-sided, 80 % power); ``{"one_run": [arms]}`` when an arm has a single
    run (training variance unknown); None when an arm or a domain has no test case.
    """
    import numpy as np

    seeds = _shared_seeds(runs, a, b)

    def per_run(arm: str, mode: str) -> dict[int, dict[str, tuple[str, float]]]:
        return {e["seed"]: {c["case"]: (c["domain"], c["mean_dice"]) for c in e["cases"]}
                for e in _entries(runs, arm, mode) if seeds is None or e["seed"] in seeds}

    ra, rb = per_run(*a), per_run(*b)
    if not ra or not rb:
        return None
    common = set.intersection(*(set(r) for r in (*ra.values(), *rb.values())))
    cases = sorted(common)
    dom = {c: next(iter(ra.values()))[c][0] for c in cases}
    groups = [np.array([i for i, c in enumerate(cases) if dom[c] == d]) for d in domains]
    if any(len(g) == 0 for g in groups):
        return None
    if len(ra) < 2 or len(rb) < 2:
        return {"one_run": list(dict.fromkeys(x[0] for x, r in ((a, ra), (b, rb)) if len(r) < 2))}
    sa, sb = sorted(ra), sorted(rb)
    mat_a = np.array([[ra[s][c][1] for c in cases] for s in sa], dtype=float)  # runs x cases
    mat_b = np.array([[rb[s][c][1] for c in cases] for s in sb], dtype=float)
    rng = np.random.default_rng(0)
    ia = rng.integers(0, len(sa), (draws, len(sa)))
    ib = ia if seeds is not None else rng.integers(0, len(sb), (draws, len(sb)))
    diff = mat_a[ia].mean(axis=1) - mat_b[ib].mean(axis=1)  # draws x cases: run-resampled per-case difference
    boot = np.mean([np.take_along_axis(diff, g[rng.integers(0, len(g), (draws, len(g)))], axis=1).mean(axis=1)
                    for g in groups], axis=0)
    point = float(np.mean([(mat_a.mean(axis=0) - mat_b.mean(axis=0))[g].mean() for g in groups]))
    lo, hi = (float(x) for x in np.percentile(boot, [2.5, 97.5]))
    se = float(np.std(boot, ddof=1))
    return {"diff": point, "lo": lo, "hi": hi, "p": min(1.0, 2 * min(float(np.mean(boot <= 0)),
                                                                     float(np.mean(boot >= 0)))),
            "significant": not lo <= 0 <= hi, "se": se, "mde": 2.8 * se, "runs": (len(sa), len(sb)),
            "n": len(cases), "draws": draws}


def _fmt_p(p: float, draws: int) -> str:
    return f"p < {2 / draws:.2g}" if p == 0 else f"p = {p:.3f}" if p < 0.1 else f"p = {p:.2f}"


def _routing(entries: list[dict], domain: str | None) -> str:
    hits = [c["routing"] == c["domain"] for e in entries for c in e["cases"]
            if c["routing"] is not None and (domain is None or c["domain"] == domain)]
    return f"{100 * sum(hits) / len(hits):.0f}% ({sum(hits)}/{len(hits)})" if hits else "–"


def _ece(confidence: list[float], correct: list[bool], bins: int = 10) -> float:
    """Expected calibration error: over ``bins`` equal-width confidence bins of [0, 1] (1.0 in the last), the
    case-weighted mean of |accuracy - mean confidence| of each bin."""
    import numpy as np

    conf, hit = np.asarray(confidence, dtype=float), np.asarray(correct, dtype=float)
    if conf.size == 0:
        raise ValueError("ECE of no cases")
    idx = np.minimum((conf * bins).astype(int), bins - 1)
    return float(sum(np.sum(idx == b) / conf.size * abs(hit[idx == b].mean() - conf[idx == b].mean())
                     for b in range(bins) if np.any(idx == b)))


def _routing_stats(runs: dict, arm: str) -> dict[str, Any] | None:
    """Routing of one arm's dataset-free runs (all slots), pooled over the repeats: cases, accuracy, mean top weight
    and its ECE (cases with weights), cases flagged uncertain (None when no record has the field), and the misrouted
    cases' mean Dice dataset-free and oracle (same repeat's oracle run; None without one)."""
    free = _entries(runs, arm, "dataset-free")
    oracle = {e["seed"]: {c["case"]: c["mean_dice"] for c in e["cases"]} for e in _entries(runs, arm, "oracle")}
    routed = [(e["seed"], c) for e in free for c in e["cases"] if c.get("routing") is not None]
    if not routed:
        return None
    weighted = [c for _, c in routed if c.get("routing_weights") or c.get("routing_confidence") is not None]
    top = [max(c["routing_weights"].values()) if c.get("routing_weights") else c["routing_confidence"]
           for c in weighted]
    flags = [c.get("routing_uncertain") for _, c in routed if c.get("routing_uncertain") is not None]
    wrong = [(s, c) for s, c in routed if c["routing"] != c["domain"]]
    cost = [(c["mean_dice"], oracle[s][c["case"]]) for s, c in wrong if c["case"] in oracle.get(s, {})]
    return {"n": len(routed), "correct": len(routed) - len(wrong),
            "mean_top": sum(top) / len(top) if top else None,
            "ece": _ece(top, [c["routing"] == c["domain"] for c in weighted]) if top else None,
            "uncertain": sum(map(bool, flags)) if flags else None, "misrouted": len(wrong),
            "misrouted_free": sum(x for x, _ in cost) / len(cost) if cost else None,
            "misrouted_oracle": sum(y for _, y in cost) / len(cost) if cost else None, "misrouted_paired": len(cost)}


def _arm_order(runs: dict) -> list[str]:
    """The arms in ``ARMS`` order, then arms of older results whose trainers no longer exist."""
    present = {r["arm"] for r in runs.values()}
    return [*ARMS, *sorted(present - set(ARMS))]


#: Classes shown in the per-class table but left out of the domain means (the "mean" Dice of a case), with the
#: reason: a class no arm learns, not even single-dataset nnU-Net, caps its domain for everyone and hides
#: differences between arms.
SEPARATE_CLASSES: dict[str, dict[str, str]] = {
    "brats_mets": {"NETC": "in the first version of this suite every arm, single-dataset nnU-Net included, scored 0 on "
                           "it (accuracy_small_v1.md), and here every arm trained for the schedule's 640 iterations "
                           "stays near 0 (per-class table): at 4 mm voxels the necrotic cores (about 100-450 voxels, "
                           "inside enhancing rims) are predicted as background or ET; it is learnable with more "
                           "training (the equal-compute arm, 3 x the iterations, scores far higher on it), so it "
                           "measures training length, not the arms' differences, and would swamp the domain means"},
}


def _without_separate_classes(runs: dict) -> tuple[dict, list[str]]:
    """Runs whose cases' ``mean_dice`` leaves out :data:`SEPARATE_CLASSES` (recomputed from the per-class Dice);
    returns (runs, notes). Cases without per-class values keep their mean."""
    notes: dict[str, str] = {}
    out = {}
    for key, r in runs.items():
        r = dict(r)
        cases = []
        for c in r["cases"]:
            drop = SEPARATE_CLASSES.get(c["domain"], {})
            classes = list((r.get("domains", {}).get(c["domain"], {}).get("classes") or {}).keys())
            keep = [k for k in classes if k not in drop]
            vals = [c.get("dice", {}).get(k) for k in keep]
            if drop and keep and all(v is not None for v in vals) and len(keep) < len(classes):
                c = {**c, "mean_dice": sum(vals) / len(vals)}
                notes.update({f"{c['domain']}.{k}": why for k, why in drop.items() if k in classes})
            cases.append(c)
        r["cases"] = cases
        out[key] = r
    return out, [f"`{k}` is in the per-class table but not in the domain means: {why}." for k, why in notes.items()]


#: rows (arm, mode) of the main table, in order (``-hard``: results before v2)
MAIN_ROWS = (("single", "oracle"), ("joint_stock", "dataset-free"), ("joint_naive", "dataset-free"),
             ("joint_marginal", "dataset-free"), ("joint_marginal", "oracle"),
             ("universal_equal_compute", "dataset-free"), ("universal", "oracle"), ("universal", "dataset-free"),
             ("universal", "dataset-free-soft"), ("universal", "dataset-free-hard"))


def report(results: dict, allow_mixed_commits: bool = False) -> str:
    """Markdown tables (paper Tables 1-3 style, missing slots, routing, claims) from ``accuracy_<suite>.json``.

    Raises :class:`MixedCommitsError` when a table or comparison would mix runs of different commits, unless
    ``allow_mixed_commits``.
    """
    runs, cfg = results.get("runs", {}), results.get("config", {})
    runs, separate_notes = _without_separate_classes(runs)
    # the unseen-institution runs (--unseen) have their own sections; every other table is the held-out cases'
    unseen = {k: r for k, r in runs.items() if r.get("test_set", "holdout") == "unseen"}
    runs = {k: r for k, r in runs.items() if r.get("test_set", "holdout") != "unseen"}
    suite = cfg.get("suite") or suite_of(cfg.get("sources", []))
    domains = sorted({c["domain"] for r in runs.values() for c in r["cases"]})
    seeds = sorted({r["seed"] for r in runs.values()})

    def lab(name: str) -> str:
        arm = ARMS.get(name)
        text = arm.label if arm else LEGACY_LABELS.get(name, name)
        if "{k}" in text:
            ks = sorted({r.get("schedule_multiplier") for r in runs.values() if r["arm"] == name} - {None})
            text = text.format(k="/".join(map(str, ks)) if ks else len(domains))
        return text

    spread = ("over test cases" if len(seeds) <= 1 else
              "over the test cases for arms run once; over the repeats' means for arms run more than once; "
              "the mean column's ± is over repeats, 0.0 for one")
    e0 = next(iter(runs.values()), None)
    spec = SUITES.get(suite)
    what = f" ({spec.description})" if spec else ""
    suite_flag = "" if suite == "mr" else f" --suite {suite}"
    equal = ("(the equal-compute arm: epochs x the number of domains)"
             if any(r["arm"] == "universal_equal_compute" for r in runs.values()) else "")
    lines = [f"Accuracy benchmark `--size {cfg.get('size')}{suite_flag}`: {len(domains)} synthetic domains{what}, "
             f"{cfg.get('cases')} cases per domain ({cfg.get('holdout')} held out for testing), "
             f"schedule {cfg.get('schedule')} (epochs, iterations, validation iterations) for every arm"
             f"{' ' + equal if equal else ''}, "
             f"first-stage features {cfg.get('base_features')}, "
             f"test-time mirroring {'on' if cfg.get('tta') else 'off'}, repeats {seeds}. Dice in % (mean ± sample "
             f"std, ddof 1, {spread}). Machine: {'; '.join(results.get('machine', {}).values())}.", "",
             f"Command: `python scripts/benchmark_accuracy.py --size {cfg.get('size')}{suite_flag}` "
             "(tables: `--report`).", "", *[n + "\n" for n in separate_notes]]
    if e0 is None:
        return "\n".join(lines + ["No results yet."]
                         + _unseen_section(unseen, runs, results.get("unseen"), lab, allow_mixed_commits)) + "\n"

    lines += ["Runs per arm (repeats; commits of training and prediction):", ""]
    for a in _arm_order(runs):
        es = [r for r in runs.values() if r["arm"] == a]
        if es:
            commits = dict.fromkeys(c for e in es for c in _commits_of(e))
            n = len({e["seed"] for e in es})
            lines.append(f"- {lab(a)} (`{a}`): {n} run{'s' if n != 1 else ''}; "
                         f"commit{'s' if len(commits) > 1 else ''} {', '.join(map(_short, commits))}")
    if any("unknown" in _commits_of(e) for e in runs.values()):
        lines += ["", "Commit `unknown`: runs recorded before the results kept their commit (trained with the arms' "
                  "trainers as they were then; the labels describe the current trainers)."]
    lines.append("")

    def row(name: str, mode: str, extra: list[str] | None = None, ref: float | None = None) -> str | None:
        es = _entries(runs, name, mode)
        if not es:
            return None
        mean = _mean_over_domains(es, domains)
        cells = [f"{lab(name)} ({mode})", *[_fmt(_domain_dice(es, d)) for d in domains], _fmt(mean)]
        if ref is not None:
            cells.append("–" if mean is None else f"{100 * (mean[0] - ref):+.1f}")
        cells.append(f"{sum(e['train_wall_s'] for e in es) / len(es) / 60:.0f}")
        return "| " + " | ".join(cells + (extra or [])) + " |"

    def title(text: str, rows: list) -> str:
        """The section's ``###`` line, with the commits listed when its runs mix them (or the refusal)."""
        es = [e for x in rows for e in ([x] if isinstance(x, dict) else _entries(runs, *x))]
        name = text.split(" (")[0]
        return f"### {text}{_commit_note(f'table {name!r}', es, allow_mixed_commits)}"

    head = "| arm | " + " | ".join(domains) + " | mean |"
    main = list(MAIN_ROWS)
    lines += [title("Universal model vs single-dataset and joint baselines (Dice %, per domain)", main), "",
              head + " train min |", "|---|" + "---:|" * (len(domains) + 2)]
    lines += [r for r in (row(a, m) for a, m in main) if r]

    targets = [(d, t) for d in domains for t in sorted(next(c["dice"] for r in runs.values() for c in r["cases"]
                                                            if c["domain"] == d))]
    lines += ["", title("Per class and region (Dice %)", main), "",
              "| arm | " + " | ".join(f"{d}.{t}" for d, t in targets) + " |", "|---|" + "---:|" * len(targets)]
    for a, m in main:
        es = _entries(runs, a, m)
        if es:
            lines.append(f"| {lab(a)} ({m}) | " + " | ".join(_fmt(_domain_dice(es, d, t)) for d, t in targets)
                         + " |")

    ref = _mean_over_domains(_entries(runs, "universal", "dataset-free"), domains)
    abl = [("universal", "dataset-free"), ("universal", "oracle"), ("universal", "dataset-free-soft"),
           ("universal", "dataset-free-hard"), ("no_gate", "oracle"), ("prompts", "dataset-free"),
           ("no_harmony", "dataset-free"), ("first_stage", "dataset-free"), ("no_poly_affine", "dataset-free"),
           ("no_restore", "dataset-free"), ("full_rate_harmony", "dataset-free"), ("no_prompts", "dataset-free"),
           ("no_harmony_no_prompts", "dataset-free"), ("no_modality_dropout", "dataset-free"),
           ("universal_equal_compute", "dataset-free")]
    lines += ["", title("Ablations (Dice %; Δ: mean vs the full UniversalTrainer, dataset-free)", abl), "",
              head + " Δ mean | train min |", "|---|" + "---:|" * (len(domains) + 3)]
    lines += [r for r in (row(a, m, ref=ref[0] if ref else None) for a, m in abl) if r]

    slots = [r["withheld"] for r in runs.values() if r["withheld"]]
    if slots:
        miss = [r for r in runs.values() if r["arm"] in ("universal", "no_modality_dropout")
                and r["mode"] == "dataset-free"]
        lines += ["", title("Missing modality: one slot withheld at test time (dataset-free; mean case Dice % over "
                            "the test cases that have the slot, full input -> withheld, averaged over the repeats "
                            "that have both runs; routing accuracy with the slot withheld, pooled over those "
                            "repeats)", miss), "",
                  "| withheld slot | cases | UniversalTrainer | routing | no modality dropout | routing |",
                  "|---|---:|---|---|---|---|"]
        for slot in dict.fromkeys(slots):
            cells, n = [], "–"
            for arm in ("universal", "no_modality_dropout"):
                full, wo = _entries(runs, arm, "dataset-free"), _entries(runs, arm, "dataset-free", slot)
                if not (full and wo):
                    cells += ["–", "–"]
                    continue
                cases = {c["case"] for c in wo[0]["cases"]}
                both = {e["seed"] for e in wo} & {e["seed"] for e in full}  # paired: repeats with both runs
                # mean over those repeats of the mean case Dice (full input on the same cases / slot withheld)
                a = _stat([_stat([c["mean_dice"] for c in e["cases"] if c["case"] in cases])[0]
                           for e in full if e["seed"] in both])
                b = _stat([_stat([c["mean_dice"] for c in e["cases"]])[0] for e in wo if e["seed"] in both])
                cells += [f"{100 * a[0]:.1f} -> {100 * b[0]:.1f} ({100 * (b[0] - a[0]):+.1f})",
                          _routing([e for e in wo if e["seed"] in both], None)]
                n = str(len(cases))
            lines.append(f"| {slot} | {n} | " + " | ".join(cells) + " |")

    gated = [a for a in _arm_order(runs) if a not in UNGATED]
    free = [(a, "dataset-free") for a in gated]
    lines += ["", title("Gate routing accuracy per domain (dataset-free, all slots)", free), "",
              "| arm | " + " | ".join(domains) + " | all |", "|---|" + "---:|" * (len(domains) + 1)]
    for a in gated:
        es = _entries(runs, a, "dataset-free")
        if es:
            lines.append(f"| {lab(a)} | " + " | ".join(_routing(es, d) for d in domains) + f" | {_routing(es, None)} |")
    lines += _routing_section(runs, gated, suite, lab, title, free + [(a, "oracle") for a in gated])
    lines += _claims(runs, domains, lab, allow_mixed_commits)
    lines += _unseen_section(unseen, runs, results.get("unseen"), lab, allow_mixed_commits)
    lines += ["", "### Runs", "", "| run | train wall (min) | sessions | predict wall (s) | commit (train / predict) |",
              "|---|---:|---:|---:|---|"]
    for k, r in sorted(runs.items()):
        name = k.replace("|", " / ")
        commits = f"{_short(r.get('train_commit') or 'unknown')} / {_short(r.get('predict_commit') or 'unknown')}"
        lines.append(f"| {name} | {r['train_wall_s'] / 60:.1f} | {r['train_sessions']} | {r['predict_wall_s']:.0f} "
                     f"| {commits} |")
    return "\n".join(lines) + "\n"


def _routing_section(runs: dict, gated: list[str], suite: str, lab: Callable[[str], str],
                     title: Callable[[str, list], str], rows: list[tuple[str, str]]) -> list[str]:
    """The routing section: per gated arm, accuracy, mean top weight, ECE, uncertain cases, cost of misrouting."""
    stats = {a: _routing_stats(runs, a) for a in gated}
    lines = ["", title("Gate routing: confidence, calibration and the cost of misrouting (dataset-free, all "
                       "slots, pooled over the repeats)", rows), ""]
    if suite == "shared":
        lines += [SHARED_ROUTING_NOTE, ""]
    lines += ["Top weight: the routing weight of the inferred domain; ECE: expected calibration error of the top "
              "weight as the confidence that the inferred domain is the case's (10 equal-width bins); misrouted: "
              "mean case Dice % of the misrouted cases dataset-free -> with the domain given (oracle, same repeat), "
              "what a wrong routing costs.", "",
              "| arm | cases | accuracy | mean top weight | ECE | flagged uncertain "
              "| misrouted: dataset-free -> oracle |",
              "|---|---:|---:|---:|---:|---:|---|"]
    for a in gated:
        st = stats[a]
        if st is None:
            continue
        lines.append(f"| {lab(a)} | {st['n']} | {100 * st['correct'] / st['n']:.0f}% | "
                     + " | ".join(_routing_cells(st)) + " |")
    return lines


def _routing_cells(st: dict[str, Any]) -> list[str]:
    """Mean top weight, ECE, flagged uncertain, misrouted cost: the cells of :func:`_routing_stats`' table rows."""
    if st["misrouted"] == 0:
        cost = "none"
    elif st["misrouted_free"] is None:
        cost = f"{st['misrouted']} cases, no oracle run"
    else:
        f, o = 100 * st["misrouted_free"], 100 * st["misrouted_oracle"]
        cost = f"{st['misrouted_paired']} cases: {f:.1f} -> {o:.1f} ({o - f:+.1f})"
    return ["–" if st["mean_top"] is None else f"{st['mean_top']:.2f}",
            "–" if st["ece"] is None else f"{st['ece']:.3f}",
            "–" if st["uncertain"] is None else str(st["uncertain"]), cost]


#: (claim, arm/mode a, arm/mode b): the paired comparisons of the claims section (absent arms are left out)
COMPARISONS = [
    ("gated head (dataset-free, hard routing) vs its own heads with the domain given (oracle) (paper: within 1.3)",
     ("universal", "dataset-free"), ("universal", "oracle")),
    ("soft routing (heads weighted by the routing weights) vs hard routing (the default)",
     ("universal", "dataset-free-soft"), ("universal", "dataset-free")),
    ("gated head, only the inferred domain's head (dataset-free, --routing hard) vs oracle",  # results before v2
     ("universal", "dataset-free-hard"), ("universal", "oracle")),
    *[(f"UniversalTrainer (dataset-free) vs {{{a}}}", ("universal", "dataset-free"),
       (a, "oracle" if a == "single" else "dataset-free"))
      for a in ("joint_stock", "joint_naive", "joint_marginal", "single")],
    ("UniversalTrainer with equal total compute (dataset-free) vs single-dataset nnU-Net (one model per domain; "
     "the same total iterations)", ("universal_equal_compute", "dataset-free"), ("single", "oracle")),
    ("UniversalTrainer with equal total compute vs UniversalTrainer (the schedule's iterations)",
     ("universal_equal_compute", "dataset-free"), ("universal", "dataset-free")),
    ("UniversalTrainer vs the same network without harmonization (paper: harmonization helps)",
     ("universal", "dataset-free"), ("no_harmony", "dataset-free")),
    ("with prompts vs UniversalTrainer without (UniSeg/Hermes: prompts help)",
     ("prompts", "dataset-free"), ("universal", "dataset-free")),
    # arms of results before v2 (UniversalTrainer then had prompts)
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


def claim_text(runs: dict, text: str, a: tuple[str, str], b: tuple[str, str], domains: list[str],
               lab: Callable[[str], str], allow_mixed_commits: bool = False, check_commits: bool = True) -> str | None:
    """One line of the claims section: the paired difference with its per-case and hierarchical intervals
    (``check_commits=False``: the caller has checked the runs' commits, e.g. :func:`_unseen_commits`)."""
    d = _paired(runs, a, b, domains)
    if d is None:
        return None
    text = text.format(**{x: lab(x) for x in {a[0], b[0]}}) if "{" in text else text
    note = (_commit_note(f"comparison {text!r}", _entries(runs, *a) + _entries(runs, *b), allow_mixed_commits)
            if check_commits else "")
    h = _hierarchical(runs, a, b, domains)
    if h is None:
        hier = "run-level interval not computed (no test cases common to all runs)"
    elif "one_run" in h:
        hier = (f"run-level interval not computed ({', '.join(lab(x) for x in h['one_run'])}: one run: training "
                "variance unknown)")
    else:
        hier = (f"with the run-to-run variance ({h['runs'][0]} and {h['runs'][1]} runs, {h['n']} cases) "
                f"{100 * h['lo']:+.1f} to {100 * h['hi']:+.1f}, {_fmt_p(h['p'], h['draws'])}, "
                f"{'significant' if h['significant'] else 'not significant'}, smallest detectable effect "
                f"≈ {100 * h['mde']:.1f} points")
    return (f"{text}{note}: {100 * d[0]:+.1f} Dice points (95 % interval over the {d[3]} test cases "
            f"{100 * d[1]:+.1f} to {100 * d[2]:+.1f}; {hier})")


def _claims(runs: dict, domains: list[str], lab: Callable[[str], str], allow_mixed_commits: bool) -> list[str]:
    """The claims section (empty when no comparison has both sides)."""
    claims = [c for text, a, b in COMPARISONS
              if (c := claim_text(runs, text, a, b, domains, lab, allow_mixed_commits)) is not None]
    if not claims:
        return []
    return ["", "### The paper's claims on this suite (paired per test case, each case averaged over the repeats; "
            "first interval: bootstrap over the test cases within domains, the test set's uncertainty only; second: "
            "hierarchical bootstrap over each arm's repeats and then the test cases, which includes the run-to-run "
            "variance of training, with its two-sided bootstrap p-value, significant when the interval excludes 0, "
            "and the smallest detectable effect, 2.8 x bootstrap SE for α 0.05 and 80 % power)", ""] + [
        f"- {c}" for c in claims]


def _unseen_commits(entries: list[dict], allow: bool) -> str:
    """The unseen runs' commits for the section titles: ``commit X`` or ``trained at X, predicted at Y`` when every
    run shares them (models trained earlier and predicted on the unseen set later: one code version per step for
    all arms); else, with ``allow``, ``mixed commits: ...`` per arm, without it a :class:`MixedCommitsError`."""
    by: dict[tuple[str, str], list[str]] = {}
    for e in entries:
        train = [c for c in str(e.get("train_commit") or "unknown").split(",") if c] or ["unknown"]
        sig = (",".join(map(_short, train)), _short(e.get("predict_commit") or "unknown"))
        arms = by.setdefault(sig, [])
        if e["arm"] not in arms:
            arms.append(e["arm"])
    if len(by) == 1 and "," not in next(iter(by))[0]:
        t, p = next(iter(by))
        return f"commit {t}" if t == p else f"trained at {t}, predicted at {p}"
    listing = "; ".join(f"trained at {t}, predicted at {p}: {', '.join(arms)}" for (t, p), arms in by.items())
    if not allow:
        raise MixedCommitsError(f"table 'Unseen institution' would mix runs of different commits ({listing}); rerun "
                                "those arms at one commit, or pass --allow-mixed-commits to render it with the commits "
                                "listed")
    return f"mixed commits: {listing}"


def _unseen_section(unseen: dict, holdout: dict, meta: dict | None, lab: Callable[[str], str],
                    allow: bool) -> list[str]:
    """The unseen-institution sections (``--unseen``): Dice per domain next to the same arms' held-out means, gate
    routing, paired comparisons and the runs; empty without unseen runs."""
    if not unseen:
        return []
    domains = sorted({c["domain"] for r in unseen.values() for c in r["cases"]})
    commits = _unseen_commits(list(unseen.values()), allow)
    lines = ["", f"### Unseen institution: Dice % per domain on new scans of the known domains from an institution "
                 f"never seen in training (the trained models above, nothing retrained; {commits})", ""]
    if meta:
        par = meta.get("parameters", {})
        xyz = {k: "/".join(f"{v:g}" for v in par.get(k) or []) for k in ("spacing", "blur_mm")}
        lines += [f"{meta.get('cases_per_domain')} cases per domain synthesized with institution "
                  f"`{meta.get('institution')}` ({meta.get('description', '')}; `synthetic/shifts.py`: contrast "
                  f"curve gamma x{par.get('gamma')}, grey/white contrast x{par.get('tissue_contrast')}, bias field "
                  f"{par.get('bias')}, noise x{par.get('noise')}, voxel size x{xyz['spacing']} (x/y/z), blur "
                  f"+{xyz['blur_mm']} mm, intensity units x{par.get('scale')}), seeds "
                  f"{meta.get('seeds')} (other patients than the training and held-out cases), converted with each "
                  f"domain's converter into a test-only merged dataset (`{meta.get('dataset')}`). Command: "
                  "`python scripts/benchmark_accuracy.py --size <size> --unseen`.", ""]
    rows = [(a, m) for a, m in MAIN_ROWS if _entries(unseen, a, m)]
    pairs = {(a, m): [e for e in _entries(holdout, a, m) if e["seed"] in {x["seed"] for x in _entries(unseen, a, m)}]
             for a, m in rows}
    held_commits = {c for es in pairs.values() for e in es for c in _commits_of(e)}
    unseen_commits = {c for e in unseen.values() for c in _commits_of(e)}
    show_gap = held_commits <= unseen_commits or allow
    if not show_gap:
        lines += ["Held-out column left out: the held-out runs were predicted at other commits "
                  f"({', '.join(map(_short, sorted(held_commits - unseen_commits)))}) than the unseen ones "
                  "(--allow-mixed-commits shows it).", ""]
    elif not held_commits <= unseen_commits:
        lines += ["Held-out column: runs of other commits "
                  f"({', '.join(map(_short, sorted(held_commits - unseen_commits)))}) than the unseen ones.", ""]
    lines += ["| arm | " + " | ".join(domains) + " | mean | held-out mean | Δ unseen - held-out |",
              "|---|" + "---:|" * (len(domains) + 3)]
    for a, m in rows:
        mean = _mean_over_domains(_entries(unseen, a, m), domains)
        held = _mean_over_domains(pairs[(a, m)], domains) if show_gap else None
        gap = "–" if mean is None or held is None else f"{100 * (mean[0] - held[0]):+.1f}"
        lines.append(f"| {lab(a)} ({m}) | " + " | ".join(_fmt(_domain_dice(_entries(unseen, a, m), d))
                                                         for d in domains)
                     + f" | {_fmt(mean)} | {_fmt(held)} | {gap} |")
    gated = [a for a in _arm_order(unseen) if a not in UNGATED and _entries(unseen, a, "dataset-free")]
    if gated:
        lines += ["", f"### Unseen institution: gate routing (dataset-free, pooled over the repeats; {commits})", "",
                  "Accuracy per domain; top weight, ECE (10 bins) and the misrouted cases' Dice dataset-free -> "
                  "oracle as in the held-out routing table.", "",
                  "| arm | " + " | ".join(domains) + " | all | mean top weight | ECE | flagged uncertain "
                  "| misrouted: dataset-free -> oracle |", "|---|" + "---:|" * (len(domains) + 4) + "---|"]
        for a in gated:
            es, st = _entries(unseen, a, "dataset-free"), _routing_stats(unseen, a)
            if st is not None:
                lines.append(f"| {lab(a)} | " + " | ".join([*(_routing(es, d) for d in domains), _routing(es, None),
                                                           *_routing_cells(st)]) + " |")
    claims = [c for text, a, b in COMPARISONS
              if (c := claim_text(unseen, text, a, b, domains, lab, check_commits=False)) is not None]
    if claims:
        lines += ["", f"### Unseen institution: paired comparisons (per unseen case, intervals as in the claims "
                      f"above; {commits})", "", *[f"- {c}" for c in claims]]
    lines += ["", "### Unseen institution: runs", "", "| unseen run | predict wall (s) | commit (train / predict) |",
              "|---|---:|---|"]
    for k, r in sorted(unseen.items()):
        lines.append(f"| {k.replace('|', ' / ')} | {r['predict_wall_s']:.0f} | "
                     f"{_short(r.get('train_commit') or 'unknown')} / {_short(r.get('predict_commit') or 'unknown')} |")
    return lines


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=sorted(SIZES), default="small")
    p.add_argument("--suite", choices=list(SUITES), default=None,
                   help="mr (default): three brain MR domains with different sequence sets; shared: two brain MR "
                        "domains with the same four sequences (accuracy_<size>_shared); ct: mr plus a CT domain "
                        "(accuracy_<size>_ct)")
    p.add_argument("--work", type=Path, default=None,
                   help="work folder (default bench_work/accuracy_<size>[_<suite>])")
    p.add_argument("--arms", nargs="+", choices=sorted(ARMS), default=list(ARMS), help="arms to run, in this order")
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES),
                   help="prediction modes to run for each arm ('missing': one slot withheld); default all")
    p.add_argument("--seeds", type=int, nargs="+", default=None,
                   help="repeat indices (nnU-Net training is not seeded: each index is an independent run); default "
                        "0, with --unseen every repeat the work folder has (nnUNet_results_seed<n>*)")
    p.add_argument("--with-ct", action="store_true", help="deprecated alias of --suite ct")
    p.add_argument("--threads", type=int, default=1, help="torch/OpenMP threads of every subprocess")
    p.add_argument("-device", "--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--stock-trainer", default=STOCK_TRAINER,
                   help=f"trainer of the stock nnU-Net arms (default {STOCK_TRAINER}; it must obey the schedule)")
    p.add_argument("--results", type=Path, default=RESULTS, help="folder of accuracy_<size>[_<suite>].json/.md")
    p.add_argument("--prepare-only", action="store_true", help="only build the datasets and plans")
    p.add_argument("--report", action="store_true", help="only (re)write the Markdown tables from the JSON")
    p.add_argument("--unseen", action="store_true",
                   help="the unseen-institution test set instead of training: synthesize --unseen-cases cases per "
                        "domain with an institution never seen in training (synthetic/shifts.py 'unseen'), convert "
                        "and merge them in <work>/unseen, predict them with every arm of --arms already trained in "
                        "the work folder (untrained arms are skipped; nothing is trained) and record them as "
                        "'<arm>|seed<n>|<mode>|all|unseen' (brain MR suites: mr, shared)")
    p.add_argument("--unseen-cases", type=int, default=10, help="cases per domain of the unseen set (default 10)")
    p.add_argument("--time-budget", type=float, default=None, metavar="MINUTES",
                   help="stop after this many minutes of wall time (the running training or prediction is stopped; "
                        "a training resumes from its last checkpoint, saved every fifth of its epochs, when the same "
                        "command is run again): for a lent GPU's per-call limit, e.g. --time-budget 12 per call")
    p.add_argument("--allow-mixed-commits", action="store_true",
                   help="let the report put runs of different code commits into one table or comparison (their "
                        "titles list the commits); without it the report stops with the arms and commits")
    args = p.parse_args()
    if args.with_ct:
        if args.suite not in (None, "ct"):
            p.error(f"--with-ct (deprecated alias of --suite ct) contradicts --suite {args.suite}")
        print("--with-ct is deprecated: use --suite ct", file=sys.stderr)
    suite = "ct" if args.with_ct else args.suite or "mr"
    work = (args.work or REPO / "bench_work" / f"accuracy_{suite_name(args.size, suite)}").resolve()
    s = Suite(work, args.size, suite, args.threads, args.device, args.results.resolve(), args.stock_trainer)
    if args.time_budget is not None:
        if args.time_budget <= 0:
            p.error(f"--time-budget must be positive (got {args.time_budget})")
        s.deadline = time.monotonic() + 60 * args.time_budget
    try:
        _run_suite(s, args)
    except BudgetExhausted as e:
        print(f"{e}: stopped after the {args.time_budget:g}-minute budget; run the same command again to "
              "continue (finished arms and evaluations are kept, trainings resume from their last checkpoint)",
              flush=True)
    _write_report(s, args)
    return 0


def _run_suite(s: Suite, args: argparse.Namespace) -> None:
    """The training/prediction part of :func:`main` (everything but the report)."""
    if args.unseen and not args.report:
        t0 = time.perf_counter()
        unseen = prepare_unseen(s, args.unseen_cases)
        print(f"prepared the unseen-institution set in {time.perf_counter() - t0:.0f} s", flush=True)
        for seed in (args.seeds or trained_seeds(s)) if not args.prepare_only else []:
            for name in args.arms:
                try:
                    run_unseen(s, ARMS[name], seed, unseen, tuple(args.modes))
                except RuntimeError as e:  # one failing arm must not stop the others; rerun retries it
                    print(f"unseen: arm {name} seed {seed} failed: {e}", flush=True)
    elif not args.report:
        t0 = time.perf_counter()
        prepare(s, singles="single" in args.arms)
        print(f"prepared in {time.perf_counter() - t0:.0f} s", flush=True)
        if not args.prepare_only:
            for seed in args.seeds or [0]:
                for name in args.arms:
                    try:
                        run_arm(s, ARMS[name], seed, tuple(args.modes))
                    except RuntimeError as e:  # one failing arm must not stop the others; rerun retries it
                        print(f"arm {name} seed {seed} failed: {e}", flush=True)


def _write_report(s: Suite, args: argparse.Namespace) -> None:
    """Rewrite the Markdown tables from the results JSON (exit with a message when runs' commits are mixed)."""
    if s.results_json.is_file():
        md = s.results_json.with_suffix(".md")
        try:
            text = report(_read_json(s.results_json), args.allow_mixed_commits)
        except MixedCommitsError as e:
            sys.exit(f"{s.results_json}: {e}")
        _write_text(md, text)
        print(f"wrote {md}")
    elif args.report:
        sys.exit(f"{s.results_json} does not exist (run the benchmark first)")


if __name__ == "__main__":
    sys.exit(main())
