"""The plans' ``universal`` block: derive it from dataset.json and the plans' normalization schemes.

Pure functions on dicts (deep copies in, new dicts out); used by :class:`UniversalPlanner` when it writes plans
and by the trainer when it runs on plain ``nnUNetPlans`` without a block.
"""

from __future__ import annotations

import copy
from typing import Any

from nnunet_universal.metadata import MetadataError, UniversalMeta, load_universal, plans_universal_block


def check_channel_names(dataset_json: dict[str, Any], meta: UniversalMeta, where: str = "dataset.json") -> None:
    """Channel ``i`` of the dataset must be ``universal.slots[i]`` (``channel_names`` values are the slot names)."""
    channels = dataset_json.get("channel_names", dataset_json.get("modality"))
    if not isinstance(channels, dict):
        raise MetadataError(f"{where} has no 'channel_names'")
    names = [channels[k] for k in sorted(channels, key=int)]
    if [str(n).casefold() for n in names] != [s.casefold() for s in meta.slots]:
        raise MetadataError(
            f"{where}: channel_names {names} must be the slots of universal.slots {meta.slots}, in that order "
            "(channel i holds slot i). Re-run 'nnunet-universal merge' to rewrite the dataset."
        )


def slot_normalization_from_plans(plans: dict[str, Any], slots: list[str], where: str = "plans") -> dict[str, str]:
    """Map each slot to the normalization scheme nnU-Net planned for its channel (same in every configuration)."""
    schemes: list[str] | None = None
    first = ""
    for name, cfg in plans.get("configurations", {}).items():
        cfg_schemes = cfg.get("normalization_schemes")
        if cfg_schemes is None:  # e.g. 3d_cascade_fullres only names 'inherits_from'
            continue
        if schemes is None:
            schemes, first = list(cfg_schemes), name
        elif list(cfg_schemes) != schemes:
            raise MetadataError(
                f"{where}: configurations {first!r} and {name!r} normalize the channels differently "
                f"({schemes} vs {list(cfg_schemes)}); the universal network needs one scheme per slot"
            )
    if schemes is None:
        raise MetadataError(f"{where}: no configuration lists 'normalization_schemes'; is this an nnU-Net plans file?")
    if len(schemes) != len(slots):
        raise MetadataError(
            f"{where}: {len(schemes)} channels are planned but the dataset has {len(slots)} slots {slots}; "
            "plan the dataset again ('nnunet-universal plan -d ID')"
        )
    return dict(zip(slots, schemes, strict=True))


def universal_block(plans: dict[str, Any], dataset_json: dict[str, Any], where: str = "dataset.json") -> dict:
    """Build the plans' ``universal`` block for ``plans`` of the dataset described by ``dataset_json``."""
    meta = load_universal(dataset_json, where=where)
    check_channel_names(dataset_json, meta, where)
    return plans_universal_block(meta, slot_normalization_from_plans(plans, meta.slots))


def ensure_universal_plans(plans: dict[str, Any], dataset_json: dict[str, Any]) -> dict[str, Any]:
    """Return a deep copy of ``plans`` with a ``universal`` block (derived from ``dataset_json`` if absent).

    The trainer calls this for runs on plain ``nnUNetPlans`` and saves the result as the model folder's
    ``plans.json``, so that the network can be rebuilt from the model folder alone.
    """
    out = copy.deepcopy(plans)
    if "universal" not in out:
        out["universal"] = universal_block(out, dataset_json)
    return out
