"""``nnunet-universal`` command line: argument parsing only.

Every subcommand parses its arguments, imports the heavy library lazily (fast ``--help``) and calls one
typed library function, the same one the tests call.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
from pathlib import Path

from nnunet_universal.dataset_conversion.layouts import LAYOUTS as CONVERT_LAYOUTS
from nnunet_universal.dataset_conversion.layouts import SPACING_FILE
from nnunet_universal.metadata import PLANS_NAME
from nnunet_universal.registry import CONVERT_SOURCES, SLOTS, SYNTH_SOURCES
from nnunet_universal.synthetic.shifts import INSTITUTION_SHIFTS


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Examples kept as written; every option with a default shows it, ``(default: X)``, unless its help already
    names one (``ArgumentDefaultsHelpFormatter`` would also print ``None``/``False`` and skip options without help)."""

    def _format_action(self, action: argparse.Action) -> str:
        if action.help is None and self._shows_default(action):
            action = copy.copy(action)
            action.help = "(default: %(default)s)"
        return super()._format_action(action)

    def _get_help_string(self, action: argparse.Action) -> str:
        help_ = action.help or ""
        if self._shows_default(action) and "default" not in help_:
            help_ += " (default: %(default)s)"
        return help_

    @staticmethod
    def _shows_default(action: argparse.Action) -> bool:
        return (bool(action.option_strings) and action.default not in (None, False, argparse.SUPPRESS)
                and not isinstance(action, argparse._HelpAction))


_FMT = _HelpFormatter


def _kv_pairs(values: list[str] | None, what: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for v in values or []:
        if "=" not in v:
            raise SystemExit(f"error: {what} expects KEY=VALUE, got {v!r}")
        k, val = v.split("=", 1)
        out[k.strip()] = val.strip()
    return out


# ---- subcommand handlers (one library call each) -------------------------------------------------

def _cmd_synth(a: argparse.Namespace) -> int:
    from nnunet_universal.synthetic.api import synthesize_dataset

    out = synthesize_dataset(a.source, Path(a.output), cases=a.cases, seed=a.seed,
                             shape=tuple(a.shape) if a.shape else None,
                             preview=Path(a.preview) if a.preview else None, lesion_scale=a.lesion_scale,
                             institution=a.institution)
    print(f"wrote synthetic {a.source} dataset ({len(out.spacings)} cases) to {out.top}")
    print(f"voxel spacing: {out.spacing_text()} (x, y, z; range over cases)")
    if out.spacing_file is not None:
        print(f"PNG slices carry no geometry: the spacing of each case is in {out.spacing_file}, which "
              "'nnunet-universal convert brainmetshare' reads (--spacing overrides it)")
    if out.preview is not None:
        print(f"preview: {out.preview}")
    return 0


def _cmd_convert(a: argparse.Namespace) -> int:
    from nnunet_universal.dataset_conversion.api import convert

    out = convert(a.source, Path(a.input_dir), a.dataset_id, name=a.name, workers=a.workers, skip_bad=a.skip_bad,
                  label_map=_kv_pairs(a.label_map, "--label-map"), slot_map=_kv_pairs(a.slot_map, "--slot-map"),
                  spacing=tuple(a.spacing) if a.spacing else None, domain=a.domain)
    from nnunet_universal.dataset_conversion.summary import convert_summary

    print("\n".join(convert_summary(out)))
    return 0


def _cmd_merge(a: argparse.Namespace) -> int:
    from nnunet_universal.dataset_conversion.merge import merge_datasets

    out = merge_datasets(a.dataset_id, a.name, a.datasets, identical=a.identical or [], slots=a.slots,
                         workers=a.workers, skip_bad=a.skip_bad, holdout=a.holdout, force=a.force)
    from nnunet_universal.dataset_conversion.summary import merge_summary

    print("\n".join(merge_summary(out)))
    return 0


def _cmd_extend(a: argparse.Namespace) -> int:
    from nnunet_universal.extension.api import extend_model

    out = extend_model(Path(a.model), a.datasets, a.dataset_id, a.name, holdout=a.holdout, fold=a.fold,
                       checkpoint=a.checkpoint, num_processes=a.num_processes, no_old_data=a.no_old_data)
    mode = ("NO-OLD-DATA mode: only the new data. UniversalTrainer_ExtendNoOldData keeps the old parts frozen (old "
            "domains' outputs unchanged); for a new domain that brings a new sequence the gate sends a scan there "
            "only when that sequence is present (new-slot prior), so old-domain scans keep the old model's routing\n"
            if a.no_old_data else "")
    for d in out.get("no_new_slot", []):
        mode += (f"WARNING: new domain {d} brings no sequence the old model lacks: without the old data its gate row "
                 "is set from the old domains' prototypes alone, which is not reliable (measured); extend with the "
                 "old data, or predict old-domain scans with --domain\n")
    print(f"{mode}wrote {out['raw']}, plans {out['plans']} (preprocessed) and the initial checkpoint {out['init']}\n"
          f"train the extension with (25 % of nnU-Net's epochs; -pretrained_weights is optional, the trainer starts "
          f"from that checkpoint):\n  {out['train']}\n"
          + "".join(f"  -tr {t}: trains {w}\n" for w, t in out["trainers"].items()))
    return 0


def _cmd_plan(a: argparse.Namespace) -> int:
    from nnunet_universal.planners.api import plan_and_preprocess

    plans = plan_and_preprocess(a.dataset_id, configurations=a.configurations, preset=a.preset,
                                num_processes=a.num_processes, verify=a.verify,
                                target_spacing=tuple(a.target_spacing) if a.target_spacing else None,
                                gpu_memory_gb=a.gpu_memory_gb)
    print(f"wrote plans {plans}")
    return 0


def _cmd_env(a: argparse.Namespace) -> int:
    from nnunet_universal.trainers.discovery import export_line

    print(export_line())
    return 0


def _cmd_train(a: argparse.Namespace) -> int:
    from nnunet_universal.trainers.api import train

    train(a.dataset, a.configuration, a.fold, trainer=a.trainer, plans=a.plans, device=a.device,
          continue_training=a.c, validation_only=a.val)
    return 0


def _predict_model_dir(a: argparse.Namespace) -> Path:
    """``-m MODEL_DIR``, or the folder nnU-Net's selectors ``-d -c -tr -p`` name under $nnUNet_results."""
    from nnunet_universal.inference.api import find_model_folder

    selectors = {"-d": a.dataset, "-c": a.configuration, "-tr": a.trainer, "-p": a.plans}
    given = [k for k, v in selectors.items() if v is not None]
    if a.model is not None:
        if given:
            raise ValueError(f"give the model either as -m MODEL_DIR or by -d/-c/-tr/-p, not both (got -m and "
                             f"{', '.join(given)})")
        return Path(a.model)
    if a.dataset is None:
        raise ValueError("no model given: pass -m MODEL_DIR, or -d DATASET [-c CONFIGURATION -tr TRAINER -p PLANS] "
                         "as for nnUNetv2_predict" + (f" ({', '.join(given)} without -d)" if given else ""))
    return find_model_folder(a.dataset, a.configuration or "3d_fullres", a.trainer or "UniversalTrainer",
                             a.plans or PLANS_NAME)


def _cmd_predict(a: argparse.Namespace) -> int:
    from nnunet_universal.inference.api import predict

    predict(model_dir=_predict_model_dir(a), output_dir=Path(a.output), input_dir=Path(a.input) if a.input else None,
            images=_kv_pairs(a.image, "--image"), case_id=a.case_id, folds=a.folds, checkpoint=a.checkpoint,
            domain=a.domain, save_domain_maps=a.save_domain_maps, device=a.device, step_size=a.step_size,
            mirroring=not a.disable_tta, routing=a.routing, save_probabilities=a.save_probabilities)
    return 0


def _cmd_postprocess(a: argparse.Namespace) -> int:
    from nnunet_universal.postprocessing import postprocess

    report = postprocess(Path(a.input), Path(a.output), Path(a.pp_pkl_file))
    for d in report["dropped"]:
        print(f"not applied (multi-lesion domain): {d}")
    print(f"post-processed {report['cases']} cases into {a.output} ({len(report['applied'])} steps applied, "
          f"{len(report['dropped'])} dropped; see postprocessing_report.json)")
    return 0


def _cmd_check_model(a: argparse.Namespace) -> int:
    from nnunet_universal.inference.checkpoints import check_model_checkpoints

    checked, problems, warnings = check_model_checkpoints(Path(a.model_dir))
    for w in warnings:
        print(f"nnunet-universal check-model: warning: {w}", file=sys.stderr)
    if not checked:
        raise FileNotFoundError(f"{a.model_dir} holds no checkpoint (*.pth) to check; pass a model folder "
                                "(…/Trainer__Plans__Configuration)")
    for p in problems:
        print(f"nnunet-universal check-model: error: {p}", file=sys.stderr)
    if problems:
        return 2
    print(f"OK: {len(checked)} checkpoint(s) in {a.model_dir} hold only weights and plain data "
          f"({', '.join(str(p.relative_to(a.model_dir)) for p in checked)})")
    return 0


def _cmd_evaluate(a: argparse.Namespace) -> int:
    from nnunet_universal.evaluation.api import evaluate
    from nnunet_universal.evaluation.report import domain_table

    out = Path(a.output) if a.output else Path(a.pred_dir) / "evaluation"
    if a.protocol == "brats2024":
        from nnunet_universal.evaluation.brats2024 import Brats2024Unavailable, _import

        try:
            _import()
        except Brats2024Unavailable as e:
            print(f"nnunet-universal evaluate: error: {e}", file=sys.stderr)
            return 2
    summary = evaluate(Path(a.pred_dir), gt_dir=Path(a.gt) if a.gt else None, dataset_id=a.dataset_id,
                       output_dir=out, lesion_protocol=a.protocol, brats2024_parser=a.brats2024_parser)
    print(f"{summary['dataset']}: {summary['n_cases']} cases, protocol {summary['protocol']}, lesion-wise protocol "
          f"{summary['lesion_protocol_detail']}\n")
    print("\n".join(domain_table(summary)))
    print(f"\nwrote {out / 'metrics.json'}, {out / 'metrics.md'} (per class and region, notes) and plots")
    return 0


def _cmd_demo(a: argparse.Namespace) -> int:
    from nnunet_universal.demo import run_demo

    run_demo(Path(a.output), epochs=a.epochs, device=a.device)
    return 0


# ---- parser ---------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="nnunet-universal", allow_abbrev=False,
        description="One nnU-Net v2 model from many heterogeneous, partially labelled datasets.",
        formatter_class=_FMT,
        epilog="Typical flow: synth/convert -> merge -> plan -> train (or nnUNetv2_train -tr UniversalTrainer) "
        "-> predict (or nnUNetv2_predict) -> evaluate. Run 'nnunet-universal demo' to see all of it.",
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def add(name: str, help_: str, example: str) -> argparse.ArgumentParser:
        # allow_abbrev=False: no prefix matching, so nnU-Net's '-d 600' is never read as '-device 600'
        return sub.add_parser(name, help=help_, description=help_, epilog=f"example:\n  {example}",
                              formatter_class=_FMT, allow_abbrev=False)

    s = add("synth", "write a synthetic dataset in the native layout of a public dataset",
            "nnunet-universal synth brats-mets -o /data/synth/brats --cases 3 --preview brats.png")
    s.add_argument("source", choices=SYNTH_SOURCES, help="the public dataset whose native layout to write")
    s.add_argument("-o", "--output", required=True, help="output folder (the dataset's top-level folder goes inside)")
    s.add_argument("--cases", type=int, default=4, help="number of cases (default 4)")
    s.add_argument("--seed", type=int, default=0, help="random seed; same seed, same bytes (default 0)")
    s.add_argument("--shape", type=int, nargs=3, metavar=("X", "Y", "Z"),
                   help="volume shape in voxels (default: small, fast shape for tests)")
    s.add_argument("--preview", help="also write a PNG with one slice per sequence and the label overlaid")
    s.add_argument("--lesion-scale", type=float, default=1.0,
                   help="multiply lesion radii (default 1; 2 makes lesions span several voxels at small shapes)")
    s.add_argument("--institution", choices=sorted(INSTITUTION_SHIFTS), default=None,
                   help="write the cases as another institution's scanner would (same layout and label protocol): "
                        "'unseen' = a contrast curve, bias field, noise level and voxel size outside every "
                        "training profile, for testing a model on new scans of a known domain (brain MR only)")
    s.set_defaults(func=_cmd_synth)

    s = add("convert", "convert a native public dataset to an nnU-Net raw dataset with universal metadata",
            "nnunet-universal convert brats-mets ASNR-MICCAI-BraTS2023-MET-Challenge-TrainingData -d 501")
    s.add_argument("source", choices=CONVERT_SOURCES, help="the public dataset to read (its layout: below)")
    s.add_argument("input_dir", help="the dataset folder as downloaded (layouts below)")
    s.add_argument("-d", "--dataset-id", type=int, required=True, help="nnU-Net dataset id to write")
    s.add_argument("-n", "--name", help="dataset name (default: derived from the source)")
    s.add_argument("-j", "--workers", type=int, default=2, help="parallel workers (default 2)")
    s.add_argument("--skip-bad", action="store_true", help="skip invalid cases and write a report instead of stopping")
    s.add_argument("--label-map", nargs="*", metavar="VALUE=CLASS", help="source label value -> class name")
    s.add_argument("--slot-map", nargs="*", metavar="CHANNEL=SLOT",
                   help=f"source channel name -> modality slot ({', '.join(SLOTS)})")
    s.add_argument("--spacing", type=float, nargs=3, metavar=("X", "Y", "Z"),
                   help="voxel spacing in mm for BrainMetShare PNG slices, which have no geometry (default: the "
                        f"{SPACING_FILE} file 'synth' writes next to the case folders, else the real "
                        "release's 0.94 0.94 1.0); overrides both")
    s.add_argument("--domain", help="domain name in the universal metadata (default: derived from the source)")
    s.epilog += "\n\nexpected layouts:\n" + "\n".join(f"  {k}: {v}" for k, v in CONVERT_LAYOUTS.items())
    s.set_defaults(func=_cmd_convert)

    s = add("merge", "merge converted datasets into one partial-label, mixed-modality nnU-Net raw dataset",
            "nnunet-universal merge -d 600 -n Universal 501 502 503 --identical ucsf_bmsr.ET=brainmetshare.ET")
    s.add_argument("datasets", nargs="+", help="dataset ids or names of converted datasets in $nnUNet_raw")
    s.add_argument("-d", "--dataset-id", type=int, required=True, help="nnU-Net dataset id of the merged dataset")
    s.add_argument("-n", "--name", required=True, help="name of the merged dataset (DatasetID_NAME)")
    s.add_argument("--identical", nargs="*", metavar="a.cls=b.cls",
                   help="classes that share one union label id (default: none; every domain's classes get own ids)")
    s.add_argument("--slots", nargs="*",
                   help="restrict/extend the merged slot set (canonical order is kept; default: the union of the "
                        "inputs' slots)")
    s.add_argument("--holdout", type=int, default=0,
                   help="cases per domain held out as a test set (imagesTs + labelsTs), chosen by a fixed rule "
                        "(default: 0, none)")
    s.add_argument("-j", "--workers", type=int, default=2, help="parallel workers")
    s.add_argument("--skip-bad", action="store_true",
                   help="skip invalid cases and list them in conversion_report.json instead of stopping")
    s.add_argument("--force", action="store_true",
                   help="re-merge into an existing dataset id even if that renumbers its classes/channels or changes a "
                        "dataset already planned or trained (then delete its preprocessed data and re-run 'plan')")
    s.set_defaults(func=_cmd_merge)

    s = add("extend", "add converted datasets (new domains, classes, slots) to a trained universal model: extended "
            "dataset, plans, preprocessing and an initial checkpoint the extension trainers start from",
            "nnunet-universal extend -m $nnUNet_results/Dataset600_Universal/UniversalTrainer__nnUNetUniversalPlans__"
            "3d_fullres 505 -d 610 -n UniversalPlusMSD --holdout 10")
    s.add_argument("-m", "--model", required=True, help="trained model folder (…/Trainer__Plans__Configuration)")
    s.add_argument("datasets", nargs="+", help="ids or names of the new converted datasets in $nnUNet_raw")
    s.add_argument("-d", "--dataset-id", type=int, required=True, help="id of the extended dataset to write")
    s.add_argument("-n", "--name", required=True, help="name of the extended dataset")
    s.add_argument("--holdout", type=int, default=0,
                   help="cases per new domain held out as a test set (the old dataset's test cases stay held out)")
    s.add_argument("-f", "--fold", default="0", help="fold of the old model whose weights start the extension")
    s.add_argument("-chk", "--checkpoint", default="checkpoint_final.pth", help="checkpoint file in that fold")
    s.add_argument("-np", "--num-processes", type=int, default=2)
    s.add_argument("--no-old-data", action="store_true",
                   help="the old training data are not available: the extended dataset holds only the new data, "
                        "trained with -tr UniversalTrainer_ExtendNoOldData (only the new parts train, the old "
                        "domains' outputs stay the old model's; old-domain scans keep their routing when each new "
                        "domain brings a new sequence, else extend warns); the mode is recorded in the dataset's "
                        "provenance and the model's plans")
    s.set_defaults(func=_cmd_extend)

    s = add("plan", "fingerprint, plan and preprocess a merged dataset (plans: nnUNetUniversalPlans)",
            "nnunet-universal plan -d 600 -c 3d_fullres --verify")
    s.add_argument("-d", "--dataset-id", type=int, required=True, help="id of the merged dataset in $nnUNet_raw")
    s.add_argument("-c", "--configurations", nargs="+", default=["3d_fullres"],
                   help="nnU-Net configurations to plan and preprocess, e.g. 2d 3d_fullres")
    s.add_argument("--preset", choices=["default", "resenc-m", "resenc-l"], default="default",
                   help="network: nnU-Net's PlainConvUNet (plans nnUNetUniversalPlans) or ResidualEncoderUNet "
                        "(resenc-m/-l: nnUNetUniversalResEncUNetM/LPlans)")
    s.add_argument("-np", "--num-processes", type=int, default=2, help="preprocessing processes")
    s.add_argument("--verify", action="store_true",
                   help="first check every image and label for truncation or a damaged gzip stream (which "
                        "nnU-Net's own check reads as valid), then run nnU-Net's dataset integrity check")
    s.add_argument("--target-spacing", type=float, nargs="+",
                   help="override nnU-Net's target spacing (default: nnU-Net's choice)")
    s.add_argument("--gpu-memory-gb", type=float, default=None, help="VRAM target for planning (nnU-Net default 8)")
    s.set_defaults(func=_cmd_plan)

    s = add("env", "print the 'export nnUNet_extTrainer=...' line that lets the stock nnUNetv2_train and "
            "nnUNetv2_predict find our trainers ('nnunet-universal train' and 'predict' do not need it)",
            'eval "$(nnunet-universal env)"')
    s.set_defaults(func=_cmd_env)

    s = add("train", "train with nnU-Net's training loop (sets nnUNet_extTrainer itself)",
            "nnunet-universal train 600 3d_fullres 0 -tr UniversalTrainer -device cpu")
    s.add_argument("dataset", help="dataset id or name, e.g. 600 or Dataset600_Universal")
    s.add_argument("configuration", help="nnU-Net configuration, e.g. 3d_fullres")
    s.add_argument("fold", help="fold 0-4, or 'all'")
    s.add_argument("-tr", "--trainer", default="UniversalTrainer",
                   help="trainer class: UniversalTrainer, one of its variants (README, 'Train') or any nnU-Net "
                        "trainer")
    s.add_argument("-p", "--plans", default=PLANS_NAME,
                   help="plans identifier written by 'nnunet-universal plan' (nnUNetUniversalResEncUNetMPlans, "
                        "... for the ResEnc presets)")
    s.add_argument("-device", "--device", default="cuda", choices=["cuda", "cpu", "mps"], help="device to train on")
    s.add_argument("--c", action="store_true", help="continue from the latest checkpoint")
    s.add_argument("--val", action="store_true", help="only run the final validation")
    s.set_defaults(func=_cmd_train)

    s = add("predict", "segment new scans: dataset-free or oracle (--domain), missing modalities by slot name",
            "nnunet-universal predict -m $nnUNet_results/Dataset600_Universal/UniversalTrainer__nnUNetUniversalPlans"
            "__3d_fullres --image T1c=a.nii.gz --image FLAIR=b.nii.gz -o out/")
    s.add_argument("-m", "--model", help="trained model folder (…/Trainer__Plans__Configuration); or select it "
                   "as nnUNetv2_predict does with -d/-c/-tr/-p")
    s.add_argument("-d", "--dataset", help="dataset id or name of the model under $nnUNet_results (instead of -m)")
    s.add_argument("-c", "--configuration", help="with -d: the model's configuration (default: 3d_fullres)")
    s.add_argument("-tr", "--trainer", help="with -d: the model's trainer (default: UniversalTrainer)")
    s.add_argument("-p", "--plans", help=f"with -d: the model's plans identifier (default: {PLANS_NAME})")
    s.add_argument("-o", "--output", required=True, help="output folder")
    s.add_argument("-i", "--input", help="folder of images in nnU-Net naming (CASE_0000.nii.gz, …)")
    s.add_argument("--image", action="append", metavar="SLOT=FILE", help="one image per slot for a single case")
    s.add_argument("--case-id", default="case", help="output name for --image input (default 'case')")
    s.add_argument("-f", "--folds", nargs="+", default=None, help="folds to ensemble (default: all found)")
    s.add_argument("-chk", "--checkpoint", default="checkpoint_final.pth", help="checkpoint file in each fold")
    s.add_argument("--domain", help="oracle mode: the domain is given, the gate is bypassed")
    s.add_argument("--routing", choices=["soft", "hard"], default=None,
                   help="dataset-free: use only the inferred domain's head (hard: a case is never painted with "
                        "another domain's labels; unsure cases are flagged in the routing report) or combine the "
                        "heads weighted by the case's routing (soft); default: the model's plans (hard)")
    s.add_argument("--save-domain-maps", action="store_true", help="also write each domain head's label map")
    s.add_argument("--save-probabilities", "--save_probabilities", action="store_true",
                   help="also write CASE.npz (softmax over the union labels) and CASE.pkl as nnUNetv2_predict does, "
                        "for nnUNetv2_ensemble")
    s.add_argument("-device", "--device", default="cuda", choices=["cuda", "cpu", "mps"], help="device to run on")
    s.add_argument("--step-size", "-step_size", type=float, default=0.5,
                   help="sliding-window step as a fraction of the patch size")
    s.add_argument("--disable-tta", "--disable_tta", action="store_true", help="no mirroring test-time augmentation")
    s.set_defaults(func=_cmd_predict)

    s = add("postprocess", "apply nnU-Net's postprocessing.pkl to a prediction folder, but never keep only the largest "
            "component of a class of a multi-lesion (lesion-wise) domain",
            "nnunet-universal postprocess -i pred -o pred_pp -pp_pkl_file $nnUNet_results/Dataset600_Universal/"
            "UniversalTrainer__nnUNetUniversalPlans__3d_fullres/crossval_results_folds_0_1_2_3_4/postprocessing.pkl")
    s.add_argument("-i", "--input", required=True,
                   help="prediction folder (nnunet-universal predict or nnUNetv2_predict)")
    s.add_argument("-o", "--output", required=True, help="output folder")
    s.add_argument("-pp_pkl_file", "--pp-pkl-file", required=True,
                   help="postprocessing.pkl written by nnUNetv2_find_best_configuration (read with an allow-list)")
    s.set_defaults(func=_cmd_postprocess)

    s = add("check-model", "check that a received model's checkpoints hold only weights and data (no code) before "
            "using it", "nnunet-universal check-model $nnUNet_results/Dataset600_Universal/UniversalTrainer__"
            "nnUNetUniversalPlans__3d_fullres")
    s.add_argument("model_dir", help="model folder (…/Trainer__Plans__Configuration); every *.pth below is checked")
    s.set_defaults(func=_cmd_check_model)

    s = add("evaluate", "per-domain Dice/HD95, BraTS regions, lesion-wise scores, cross-domain false positives",
            "nnunet-universal evaluate out/ -d 600 --gt $nnUNet_raw/Dataset600_Universal/labelsTs")
    s.add_argument("pred_dir")
    s.add_argument("-d", "--dataset-id", type=int, required=True, help="merged dataset id (for the universal block)")
    s.add_argument("--gt", help="ground-truth folder (default: the dataset's labelsTs, else labelsTr)")
    s.add_argument("-o", "--output", help="report folder (default: PRED_DIR/evaluation)")
    s.add_argument("--protocol", choices=("brats2023", "brats2024"), default="brats2023",
                   help="lesion-wise scoring: brats2023 (default; this project's BraTS 2023-style rules) or brats2024 "
                   "(the official BraTS 2024+ package: pip install 'nnunet-universal[brats2024]', needs numpy<2.3, "
                   "so its own environment); the two give numbers that are not comparable")
    s.add_argument("--brats2024-parser", choices=("auto", "mets", "seg"), default="auto",
                   help="official parser for --protocol brats2024: mets (lesions < 20 mm³ detection only), seg, or "
                   "auto (mets for domains whose name/source contains 'met', seg otherwise)")
    s.set_defaults(func=_cmd_evaluate)

    s = add("demo", "the whole pipeline on built-in synthetic data: synth, convert, merge, plan, train, predict, "
            "evaluate", "nnunet-universal demo -o demo_output")
    s.add_argument("-o", "--output", default="demo_output", help="working folder (default ./demo_output)")
    s.add_argument("--epochs", type=int, default=None, help="training epochs (default: the demo's short schedule)")
    s.add_argument("-device", "--device", default="cpu", choices=["cuda", "cpu", "mps"], help="device to train on")
    s.set_defaults(func=_cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (FileNotFoundError, FileExistsError, ValueError, KeyError, RuntimeError) as e:
        if os.environ.get("NNUNET_UNIVERSAL_DEBUG"):
            raise
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"nnunet-universal {args.command}: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
