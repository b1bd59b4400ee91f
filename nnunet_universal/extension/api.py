"""``nnunet-universal extend``: add datasets (new domains, classes, slots) to a trained universal model.

From a trained model folder (``…/Trainer__Plans__Configuration`` with plans.json, dataset.json and
``fold_F/checkpoint_final.pth``) and converted datasets:

1. the extended raw dataset: the old merged dataset (named by the model's plans, in $nnUNet_raw) + the new data
   (:mod:`.dataset`; old ids, names and order kept, everything new appended);
2. its plans: the old model's plans moved to the new dataset as ``nnUNetv2_move_plans_between_datasets`` does
   (architecture, patch and batch size, spacing, the old slots' normalization and intensity properties kept), a
   new slot's normalization planned from its own data by nnU-Net's rule (availability-aware fingerprint), the
   ``universal`` block extended; then nnU-Net's stock preprocessing;
3. an initial checkpoint: the old weights grown to the new network (:mod:`.weights`), which is built from the new
   plans by the trainer class itself, so that ``nnUNetv2_train … -pretrained_weights INIT`` loads it under nnU-Net
   2.8.1's rule (every key present with the same shape).

Training is nnU-Net's command with an extension trainer (``trainers/extension_trainer.py``: it starts from the
initial checkpoint named in the plans' ``universal.extension`` block, trains 25 % of nnU-Net's epochs, and
trains everything or only the new parts); the old domains' cases are in the extended dataset, so the domain
sampler replays them (p(domain) ∝ n^0.5, as in any universal training).

No-old-data mode (``no_old_data``): the extended dataset holds only the new data (the old one need not be in
$nnUNet_raw); ``UniversalTrainer_ExtendNoOldData`` trains only the new parts (the old domains keep the old model's
function) and, for a new domain that brings new slots, routes a scan to it only when they are present (the
new-slot prior of ``extension/gate_calibration.py``; a new domain without one is reported in ``no_new_slot``);
``UniversalTrainer_ExtendNoOldDataAll`` trains everything with distillation from the old model. The mode is
written into the dataset's provenance, the plans' extension block (copied into the model folder) and
``extension.json``.
"""

from __future__ import annotations

import copy
import json
import logging
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from nnunet_universal.atomic_io import atomic_write_json
from nnunet_universal.dataset_conversion.common import ConversionError, raw_root
from nnunet_universal.extension.dataset import build_extended_dataset
from nnunet_universal.extension.weights import DEFAULT_OFFSET, grow_state_dict, new_domain_slots
from nnunet_universal.metadata import (
    MetadataError,
    NetworkOptions,
    UniversalMeta,
    load_universal,
    plans_universal_block,
    read_plans_universal,
)

logger = logging.getLogger(__name__)


def parse_model_folder(model_dir: Path) -> tuple[str, str, str]:
    """``Trainer__Plans__Configuration`` -> (trainer, plans name, configuration)."""
    parts = Path(model_dir).resolve().name.split("__")
    if len(parts) != 3:
        raise ValueError(f"{model_dir} is not an nnU-Net model folder (Trainer__Plans__Configuration)")
    return parts[0], parts[1], parts[2]


def extended_plans(old_plans: dict[str, Any], dataset_name: str, meta: UniversalMeta, old_slots: int,
                   schemes: list[str], masks: list[bool], fingerprint: dict[str, Any],
                   extension: dict[str, Any], options: NetworkOptions | None = None) -> dict[str, Any]:
    """The old plans moved to ``dataset_name`` (a deep copy): new channels' normalization from ``schemes`` /
    ``masks`` / ``fingerprint`` (nnU-Net's choices on the extended dataset), the old channels' unchanged.
    ``options``: the old model's network options (its trainer's overrides applied; default the plans')."""
    plans = copy.deepcopy(old_plans)
    plans["dataset_name"] = dataset_name
    n = len(meta.slots)
    for cfg in plans["configurations"].values():
        if "normalization_schemes" in cfg:
            cfg["normalization_schemes"] = list(cfg["normalization_schemes"][:old_slots]) + schemes[old_slots:n]
            cfg["use_mask_for_norm"] = list(cfg["use_mask_for_norm"][:old_slots]) + masks[old_slots:n]
    props = plans.get("foreground_intensity_properties_per_channel", {})
    new_props = fingerprint["foreground_intensity_properties_per_channel"]
    for i in range(old_slots, n):
        props[str(i)] = new_props[str(i)]
    plans["foreground_intensity_properties_per_channel"] = props
    if options is None:
        _, options = read_plans_universal(old_plans)
    slot_norm = dict(zip(meta.slots, next(c["normalization_schemes"] for c in plans["configurations"].values()
                                          if "normalization_schemes" in c), strict=True))
    plans["universal"] = {**plans_universal_block(meta, slot_norm, options), "extension": extension}
    return plans


def _network(trainer_cls: type, plans: dict, dataset_json: dict, configuration: str) -> torch.nn.Module:
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    pm = PlansManager(plans)
    return trainer_cls.build_network_architecture(
        pm, pm.get_configuration(configuration), len(dataset_json["channel_names"]),
        pm.get_label_manager(dataset_json).num_segmentation_heads, True)


#: extension trainers by what they train (``trainers/extension_trainer.py``)
EXTENSION_TRAINERS = {"all": "UniversalTrainer_Extend", "new": "UniversalTrainer_ExtendNewParts",
                      "new+harmony": "UniversalTrainer_ExtendNewPartsHarmony",
                      "no-old-data": "UniversalTrainer_ExtendNoOldData",
                      "no-old-data, everything (distillation)": "UniversalTrainer_ExtendNoOldDataAll"}


def extend_model(model_dir: Path, new_datasets: list[str], dataset_id: int, name: str, holdout: int = 0,
                 fold: str = "0", checkpoint: str = "checkpoint_final.pth", num_processes: int = 1,
                 offset: float = DEFAULT_OFFSET, no_old_data: bool = False) -> dict[str, Any]:
    """Build the extended dataset, plans, preprocessed data and initial checkpoint (module docstring).

    ``no_old_data``: the extended dataset holds only the new data (module docstring).
    Returns ``{"raw": folder, "plans": file, "init": checkpoint, "train": the nnUNetv2_train command line,
    "trainers": {what is trained: trainer}, "mode": ..., "no_new_slot": new domains without a new slot (no-old-data
    mode: their gate row has no prior)}``.
    """
    from nnunetv2.experiment_planning.plan_and_preprocess_api import extract_fingerprint_dataset, preprocess_dataset
    from nnunetv2.paths import nnUNet_preprocessed

    from nnunet_universal.discovery import trainer_class
    from nnunet_universal.extension.fingerprint import NoOldDataFingerprintExtractor
    from nnunet_universal.inference.checkpoints import load_checkpoint
    from nnunet_universal.planners.fingerprint import UniversalFingerprintExtractor
    from nnunet_universal.planners.planner import UniversalPlanner

    model_dir = Path(model_dir)
    trainer_name, plans_name, configuration = parse_model_folder(model_dir)
    ckpt_file = model_dir / f"fold_{fold}" / checkpoint
    for f in (model_dir / "plans.json", model_dir / "dataset.json", ckpt_file):
        if not f.is_file():
            raise FileNotFoundError(f"{f} not found: pass a trained model folder (…/Trainer__Plans__Configuration) "
                                    "and an existing --fold / --checkpoint")
    old_plans = json.loads((model_dir / "plans.json").read_text())
    old_dj = json.loads((model_dir / "dataset.json").read_text())
    old_meta, _ = read_plans_universal(old_plans, where=str(model_dir / "plans.json"))
    cls = trainer_class(trainer_name)
    if getattr(cls, "objective", "domain_heads") != "domain_heads":
        raise ValueError(f"{trainer_name} has one union head ({cls.objective} objective): only models with "
                         "per-domain heads (UniversalTrainer and its variants with heads) can be extended")
    old_options = cls.network_options(old_plans)  # the trainer's overrides kept in the extended plans
    old_raw = None
    if not no_old_data:
        old_raw = raw_root() / old_plans["dataset_name"]
        if not (old_raw / "dataset.json").is_file():
            raise ConversionError(
                f"the model's dataset {old_plans['dataset_name']} is not in $nnUNet_raw ({old_raw})",
                fix="set nnUNet_raw to the folder that holds the merged dataset the model was trained on, or pass "
                    "--no-old-data to extend with the new data only (distillation from the old model)")
        raw_meta = load_universal(old_raw / "dataset.json")
        raw_labels = json.loads((old_raw / "dataset.json").read_text())["labels"]
        if raw_labels != old_dj["labels"] or raw_meta.domain_names != old_meta.domain_names or \
                raw_meta.slots != old_meta.slots:
            raise MetadataError(f"{old_raw} no longer matches the model {model_dir} (labels, domains or slots differ)")

    root = build_extended_dataset(old_raw, [str(d) for d in new_datasets], dataset_id, name, holdout,
                                  old_dataset_json=old_dj)
    new_dj = json.loads((root / "dataset.json").read_text())
    meta = load_universal(new_dj, where=str(root / "dataset.json"))
    extractor = NoOldDataFingerprintExtractor if no_old_data else UniversalFingerprintExtractor
    extract_fingerprint_dataset(dataset_id, extractor, num_processes, check_dataset_integrity=False, clean=True,
                                verbose=False)
    planner = UniversalPlanner(dataset_id)  # also copies splits_final.json to $nnUNet_preprocessed
    schemes, masks = planner.determine_normalization_scheme_and_whether_mask_is_used_for_norm()
    schemes = [s if isinstance(s, str) else s.__name__ for s in schemes]
    init_name = f"extension_init_{trainer_name}__{plans_name}__{configuration}_fold_{fold}.pth"
    new_classes = {d: [c for c in meta.domains[d].labels if c not in old_meta.domains[d].labels]
                   for d in old_meta.domain_names}
    mode = "no-old-data" if no_old_data else "with-old-data"
    extension = {"from_model": str(model_dir), "from_trainer": trainer_name, "from_fold": str(fold),
                 "from_dataset": old_plans["dataset_name"], "mode": mode,
                 "old_slots": list(old_meta.slots), "old_domains": old_meta.domain_names,
                 "new_slots": [s for s in meta.slots if s not in old_meta.slots],
                 "new_domains": [d for d in meta.domain_names if d not in old_meta.domains],
                 "new_classes": {d: c for d, c in new_classes.items() if c},
                 "init": init_name,
                 "old_universal": {**{k: v for k, v in old_plans["universal"].items() if k != "extension"},
                                   "modules": asdict(old_options)}}
    plans = extended_plans(old_plans, root.name, meta, len(old_meta.slots), schemes, masks,
                           planner.dataset_fingerprint, extension, old_options)
    out_dir = Path(nnUNet_preprocessed) / root.name
    shutil.copy(root / "dataset.json", out_dir / "dataset.json")  # nnU-Net's planner does this; we do not plan
    plans_file = out_dir / f"{plans_name}.json"
    atomic_write_json(plans, plans_file)
    preprocess_dataset(dataset_id, plans_name, [configuration], [num_processes], verbose=False)

    old_net = _network(cls, old_plans, old_dj, configuration)
    old_net.load_state_dict(load_checkpoint(ckpt_file)["network_weights"])
    new_net = _network(cls, plans, new_dj, configuration)
    new_meta, _ = read_plans_universal(plans)
    state, grown = grow_state_dict(old_net.state_dict(), new_net, old_meta, new_meta, offset)
    new_net.load_state_dict(state)  # exactly the new network's keys and shapes
    init = out_dir / init_name
    tmp = init.with_suffix(".tmp")
    torch.save({"network_weights": state, "trainer_name": trainer_name,
                "init_args": {"plans": plans, "configuration": configuration, "fold": str(fold),
                              "dataset_json": new_dj, "device": "cpu"},
                "extension": {**extension, "offset": offset, "grown": grown}}, tmp)
    tmp.replace(init)
    trainers = {k: v for k, v in EXTENSION_TRAINERS.items() if k.startswith("no-old-data") == no_old_data}
    # only the new parts, with or without the old data: the best measured (scripts/benchmark_extension.py)
    default = trainers["no-old-data" if no_old_data else "new"]
    no_new_slot = [d for d, s in new_domain_slots(old_meta, meta).items() if not s] if no_old_data else []
    command = (f"nnUNetv2_train {dataset_id} {configuration} FOLD -tr {default} -p {plans_name} "
               f"-pretrained_weights {init}")
    atomic_write_json({**{k: v for k, v in extension.items() if k != "old_universal"}, "offset": offset,
                       "grown": grown, "raw": str(root), "plans": str(plans_file), "init": str(init),
                       "train": command, "trainers": trainers,
                       "slots": meta.slots, "domains": {d: asdict(v) for d, v in meta.domains.items()}},
                      out_dir / "extension.json")
    return {"raw": root, "plans": plans_file, "init": init, "train": command, "trainers": trainers, "mode": mode,
            "no_new_slot": no_new_slot}
