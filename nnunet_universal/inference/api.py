"""``nnunet-universal predict``: segment new scans with a universal model, dataset-free or oracle.

Per case, in this process (no spawn pools: simple, and CPU-friendly): read the given images, zero-fill the
missing slots, preprocess with the plans' own preprocessor, predict with :class:`UniversalPredictor`
(case-level routing or a given domain), export with nnU-Net's ``export_prediction_from_logits``, and write
``{case}.routing.json``::

    {"case": "case", "mode": "dataset-free", "rule": "hard", "given_domain": null, "inferred_domain": "mr_a",
     "confidence": 0.62, "confidence_threshold": 0.8, "runner_up": "mr_b", "uncertain": true,
     "conflicting": true, "action": "uncertain: only mr_a's head was used (hard routing), ...",
     "routing": {"mr_a": 0.62, "mr_b": 0.37, "ct": 0.01}, "applied": {"mr_a": 1.0, "mr_b": 0.0, "ct": 0.0},
     "slots": ["T1c", "FLAIR"]}

A model grown by ``nnunet-universal extend`` adds ``"extension": {"mode": "with-old-data" | "no-old-data",
"from_dataset": ..., "new_domains": [...]}`` (the plans' extension block), so a record says when its old-domain heads
were trained without the old data.

An uncertain case whose runner-up domain annotates other labels (``conflicting``) also gets the runner-up's
label map, ``uncertain_alternatives/{domain}/{case}{ending}`` (``domain_maps/`` with ``save_domain_maps``),
named in the record's ``alternative``. ``routing`` holds the gate's weights, ``applied`` the head weights the
rule made of them (``mode`` "oracle": the given domain's one-hot, ``rule`` "uniform": a network without gate).
Uncertain cases are also logged as warnings. With ``save_domain_maps`` each domain head's oracle label map
(union ids) goes to ``domain_maps/{domain}/{case}{file_ending}``. The output folder holds what
``nnUNetv2_predict`` writes, so nnU-Net's tools run on it unchanged: copies of the model's ``dataset.json`` and
``plans.json`` (``nnUNetv2_apply_postprocessing`` and ``nnUNetv2_ensemble`` read them from there),
``predict_from_raw_data_args.json`` (this run's arguments) and, with ``save_probabilities``, ``{case}.npz`` (key
``probabilities``: softmax over the union labels, (C, *original image shape) in nnU-Net's axis order) and
``{case}.pkl`` (the case's properties), exactly as ``export_prediction_from_logits`` writes them.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from tqdm import tqdm

from nnunet_universal.inference.inputs import (
    CaseInput,
    cases_from_folder,
    cases_from_images,
    check_case_files,
    check_geometry,
    read_case,
)
from nnunet_universal.metadata import (
    PLANS_NAME,
    MetadataError,
    UniversalMeta,
    atomic_write_json,
    read_plans_universal,
)
from nnunet_universal.synthetic.io import atomic_write_bytes

if TYPE_CHECKING:  # torch and nnU-Net's predictor load only once the inputs are checked (fast errors)
    import torch

    from nnunet_universal.inference.predictor import UniversalPredictor

logger = logging.getLogger(__name__)

_EXPECTED = ("a model folder written by nnUNetv2_train / nnunet-universal train, e.g. "
             "$nnUNet_results/DatasetXXX_Name/UniversalTrainer__nnUNetUniversalPlans__3d_fullres, holding "
             "plans.json, dataset.json and fold_X/{checkpoint}")


def find_model_folder(dataset: str, configuration: str = "3d_fullres", trainer: str = "UniversalTrainer",
                      plans: str = PLANS_NAME) -> Path:
    """The model folder nnU-Net's selectors name, as ``nnUNetv2_predict -d -c -tr -p`` finds it.

    ``$nnUNet_results/DatasetXXX_Name/{trainer}__{plans}__{configuration}`` (nnU-Net's ``get_output_folder``);
    ``dataset`` is an id (``"600"``) or a full name (``"Dataset600_Universal"``). Errors name the path looked for.
    """
    results = os.environ.get("nnUNet_results")
    if not results:
        raise ValueError("-d/-c/-tr/-p find the model under $nnUNet_results, which is not set; set it (where "
                         "nnUNetv2_train wrote the model) or pass the model folder with -m MODEL_DIR")
    root = Path(results)
    name = str(dataset)
    if not name.startswith("Dataset"):
        try:
            dataset_id = int(name)
        except ValueError:
            raise ValueError(f"-d expects a dataset id (e.g. 600) or name (e.g. Dataset600_Universal), got "
                             f"{dataset!r}") from None
        pattern = f"Dataset{dataset_id:03d}_*"
        found = sorted(p.name for p in root.glob(pattern) if p.is_dir()) if root.is_dir() else []
        if not found:
            raise FileNotFoundError(f"no trained model of dataset {dataset_id}: no folder {root / pattern} "
                                    "($nnUNet_results); train it first, or pass the model folder with -m MODEL_DIR")
        if len(found) > 1:
            raise ValueError(f"dataset id {dataset_id} is ambiguous in {root}: {', '.join(found)}; pass -d with the "
                             "full dataset name")
        name = found[0]
    folder = root / name / f"{trainer}__{plans}__{configuration}"
    if not folder.is_dir():
        trained = sorted(p.name for p in (root / name).iterdir() if p.is_dir() and p.name.count("__") == 2) \
            if (root / name).is_dir() else []
        hint = f"; trained models of {name}: {', '.join(trained)}" if trained else ""
        raise FileNotFoundError(f"model folder {folder} does not exist (-d {dataset} -c {configuration} -tr {trainer} "
                                f"-p {plans}){hint}")
    return folder


def check_model_folder(model_dir: Path, folds: list[str] | None,
                       checkpoint: str) -> tuple[list[str], UniversalMeta, dict]:
    """Check that ``model_dir`` is a trained universal model; return (folds to use, metadata, dataset.json).

    Errors name the folder and say what is expected: missing folder/files, plans without a ``universal``
    block, or no ``fold_X/{checkpoint}``.
    """
    model_dir = Path(model_dir)
    expected = _EXPECTED.format(checkpoint=checkpoint)
    if not model_dir.is_dir():
        raise FileNotFoundError(f"model folder {model_dir} does not exist; expected {expected}")
    for name in ("plans.json", "dataset.json"):
        if not (model_dir / name).is_file():
            raise FileNotFoundError(f"{model_dir} is not an nnU-Net model folder: no {name}; expected {expected}")
    with open(model_dir / "plans.json") as f:
        plans = json.load(f)
    with open(model_dir / "dataset.json") as f:
        dataset_json = json.load(f)
    try:
        meta, _ = read_plans_universal(plans, where=str(model_dir / "plans.json"))
    except MetadataError as e:
        raise MetadataError(f"{model_dir} is not a universal model: {e}") from None
    if folds is None:
        folds = sorted((p.parent.name.removeprefix("fold_") for p in model_dir.glob(f"fold_*/{checkpoint}")
                        if p.parent.name != "fold_all"), key=lambda f: (not f.isdigit(), int(f) if f.isdigit() else 0))
        if not folds:
            raise FileNotFoundError(f"{model_dir} has no fold_X/{checkpoint}: train the model first (or pass "
                                    "--checkpoint / --folds); expected " + expected)
    for f in folds:
        if not (model_dir / f"fold_{f}" / checkpoint).is_file():
            raise FileNotFoundError(f"{model_dir}: fold {f} has no {checkpoint} (looked for "
                                    f"{model_dir / f'fold_{f}' / checkpoint})")
    return [str(f) for f in folds], meta, dataset_json


def _device(name: str) -> torch.device:
    import torch

    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("CUDA is not available on this machine; run with -device cpu")
    if name == "mps" and not torch.backends.mps.is_available():
        raise RuntimeError("MPS is not available on this machine; run with -device cpu")
    return torch.device(name)


def _export(logits: torch.Tensor, properties: dict, predictor: UniversalPredictor, target: Path,
            save_probabilities: bool = False) -> None:
    """nnU-Net's export (resample, argmax, uncrop, write) to a temp name, then an atomic rename to ``target``;
    with ``save_probabilities`` also nnU-Net's ``{case}.npz`` and ``{case}.pkl`` next to it (renamed first, so a
    complete label map means complete probabilities)."""
    from nnunetv2.inference.export_prediction import export_prediction_from_logits

    ending = predictor.dataset_json["file_ending"]
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=".export_", dir=target.parent))
    try:
        stem = target.name[: -len(ending)]
        export_prediction_from_logits(logits, properties, predictor.configuration_manager, predictor.plans_manager,
                                      predictor.dataset_json, str(tmp_dir / stem), save_probabilities)
        if save_probabilities:
            for suffix in (".npz", ".pkl"):
                os.replace(tmp_dir / f"{stem}{suffix}", target.parent / f"{stem}{suffix}")
        os.replace(tmp_dir / target.name, target)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


def _routing_record(case: CaseInput, predictor: UniversalPredictor) -> dict:
    """The ``{case}.routing.json`` content (schema in the module docstring)."""
    # slots used: given as a file and holding data (a zero-filled file, e.g. in a merged imagesTs, is missing)
    slots = case.slots(predictor.meta.slots)
    available = predictor.last_availability
    if available is not None:
        slots = [s for s in slots if bool(available[predictor.meta.slots.index(s)])]
    return predictor.routing_record(case.case_id, slots)


#: Sub-folder of the output with the runner-up domain's label map of each uncertain, conflicting case (hard rule).
ALTERNATIVES = "uncertain_alternatives"

#: Files ``nnUNetv2_predict`` writes into every output folder (nnU-Net's tools read the first two from there).
RUN_FILES = ("dataset.json", "plans.json", "predict_from_raw_data_args.json")


def _check_output_folder(output_dir: Path, input_dir: Path | None, cases: list[CaseInput], ending: str,
                         save_domain_maps: bool, domains: list[str], save_probabilities: bool = False) -> None:
    """Refuse an output folder that is the input folder, or outputs that would overwrite an input file."""
    out = output_dir.resolve()
    if input_dir is not None and out == Path(input_dir).resolve():
        raise ValueError(f"the output folder -o {output_dir} is the input folder -i {input_dir}: the label maps would "
                         "be written among the images (and read as images by the next run); pass another -o")
    inputs = {Path(f).resolve(): f for case in cases for f in case.files.values()}
    for name in RUN_FILES:
        if (out / name).resolve() in inputs:
            raise ValueError(f"the output {out / name} would overwrite the input image {inputs[(out / name).resolve()]}"
                             "; pass another -o")
    for case in cases:
        targets = [out / f"{case.case_id}{ending}", out / f"{case.case_id}.routing.json"]
        if save_probabilities:
            targets += [out / f"{case.case_id}.npz", out / f"{case.case_id}.pkl"]
        if save_domain_maps:
            targets += [out / "domain_maps" / d / f"{case.case_id}{ending}" for d in domains]
        for t in targets:
            if t.resolve() in inputs:
                raise ValueError(f"case {case.case_id}: the output {t} would overwrite the input image "
                                 f"{inputs[t.resolve()]}; pass another -o (or --case-id)")


def predict(model_dir: Path, output_dir: Path, input_dir: Path | None = None, images: dict[str, str] | None = None,
            case_id: str = "case", folds: list[str] | None = None, checkpoint: str = "checkpoint_final.pth",
            domain: str | None = None, save_domain_maps: bool = False, device: str = "cuda",
            step_size: float = 0.5, mirroring: bool = True, routing: str | None = None,
            save_probabilities: bool = False) -> list[Path]:
    """Segment new scans with a trained universal model; return the written label maps.

    Inputs: ``input_dir`` (nnU-Net naming ``CASE_XXXX{ending}``, missing channel files allowed) or ``images``
    (``{slot: file}`` for one case named ``case_id``). Missing slots are zero-filled as in training.
    ``domain`` selects oracle mode (that domain's head, the gate bypassed); otherwise the domain is inferred
    once per case and ``routing`` ("soft": the heads weighted by it, "hard": only the inferred domain's head; default:
    the plans' setting) says how the heads are combined. Writes ``{case}{ending}`` and ``{case}.routing.json`` into
    ``output_dir``, the model's ``dataset.json`` and ``plans.json``, ``predict_from_raw_data_args.json`` and, with
    ``save_probabilities``, ``{case}.npz`` + ``{case}.pkl`` as ``nnUNetv2_predict --save_probabilities`` does.
    """
    if (input_dir is None) == (not images):
        raise ValueError("give either an input folder (-i) or --image SLOT=FILE pairs, not both or neither")
    model_dir, output_dir = Path(model_dir), Path(output_dir)
    fold_list, meta, dataset_json = check_model_folder(model_dir, folds, checkpoint)
    if not 0 < step_size <= 1:
        raise ValueError(f"--step-size must be in (0, 1], got {step_size}")
    if routing not in (None, "soft", "hard"):
        raise ValueError(f"--routing must be 'soft' or 'hard', got {routing!r}")
    if domain is not None:
        meta.domain_index(domain)  # unknown domain: error listing the model's domains
    num_channels = len(dataset_json["channel_names"])
    ending = dataset_json["file_ending"]
    if input_dir is not None:
        cases = cases_from_folder(Path(input_dir), num_channels, ending)
    else:
        cases = cases_from_images(images, meta.slots, case_id)
    _check_output_folder(output_dir, input_dir, cases, ending, save_domain_maps, meta.domain_names,
                         save_probabilities)
    for case in cases:
        check_geometry(case, meta.slots)
        check_case_files(case)  # truncated/corrupt files, NaN/Inf voxels: before any model is loaded
    dev = _device(device)

    import torch

    from nnunet_universal.inference.predictor import UniversalPredictor

    predictor = UniversalPredictor(tile_step_size=step_size, use_mirroring=mirroring, device=dev,
                                   perform_everything_on_device=dev.type == "cuda", allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(
        str(model_dir), [f if f == "all" else int(f) for f in fold_list], checkpoint)
    predictor.oracle_domain = domain
    if routing is not None:
        predictor.set_routing(routing)

    preprocessor = predictor.configuration_manager.preprocessor_class(verbose=False)
    output_dir.mkdir(parents=True, exist_ok=True)
    for name in ("dataset.json", "plans.json"):  # byte copies of the model's files, as nnUNetv2_predict leaves them
        atomic_write_bytes(output_dir / name, (model_dir / name).read_bytes())
    atomic_write_json({"command": "nnunet-universal predict", "model_folder": str(model_dir.resolve()),
                       "input_folder": str(Path(input_dir).resolve()) if input_dir is not None else None,
                       "images": {s: str(Path(f).resolve()) for s, f in (images or {}).items()},
                       "output_folder": str(output_dir.resolve()), "folds": fold_list, "checkpoint_name": checkpoint,
                       "domain": domain, "routing": routing or predictor.network_options.routing,
                       "tile_step_size": step_size, "use_mirroring": mirroring,
                       "save_probabilities": save_probabilities, "save_domain_maps": save_domain_maps,
                       "device": str(dev)},
                      output_dir / "predict_from_raw_data_args.json")
    written: list[Path] = []
    uncertain: list[str] = []
    for case in tqdm(cases, desc="predict", unit="case"):
        raw, properties = read_case(case, predictor.plans_manager, num_channels, verify=False)
        data, _, properties = preprocessor.run_case_npy(raw, None, properties, predictor.plans_manager,
                                                        predictor.configuration_manager, predictor.dataset_json)
        data = torch.from_numpy(data)
        logits = predictor.predict_logits_from_preprocessed_data(data).cpu()
        target = output_dir / f"{case.case_id}{ending}"
        _export(logits, properties, predictor, target, save_probabilities)
        record = _routing_record(case, predictor)
        if record.get("uncertain") and record.get("conflicting") and record.get("rule") == "hard":
            # the choice between two label protocols is a coin flip: keep the runner-up's map beside the output
            alt = output_dir / ALTERNATIVES / record["runner_up"] / target.name
            if save_domain_maps:
                alt = output_dir / "domain_maps" / record["runner_up"] / target.name
            else:
                alt_logits = predictor.predict_logits_for_domain(data, record["runner_up"]).cpu()
                _export(alt_logits, properties, predictor, alt)
            record["alternative"] = str(alt.relative_to(output_dir))
            record["action"] += f"; the runner-up's label map is {record['alternative']}"
        atomic_write_json(record, output_dir / f"{case.case_id}.routing.json")
        logger.info("%s: %s domain %s", case.case_id, record["mode"], record["inferred_domain"])
        if record.get("uncertain"):
            uncertain.append(case.case_id)
            logger.warning("%s: routing uncertain (%s %.2f, runner-up %s): %s", case.case_id,
                           record["inferred_domain"], record["confidence"], record["runner_up"], record["action"])
        written.append(target)
        if save_domain_maps:
            for name in meta.domain_names:
                d_logits = predictor.predict_logits_for_domain(data, name).cpu()
                _export(d_logits, properties, predictor, output_dir / "domain_maps" / name / target.name)
    if uncertain:
        logger.warning("%d of %d cases were routed with low confidence (see their .routing.json): %s",
                       len(uncertain), len(cases), ", ".join(uncertain))
    return written
