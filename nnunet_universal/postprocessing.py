"""``nnunet-universal postprocess``: nnU-Net's post-processing, never "largest component only" on lesion classes.

``nnUNetv2_find_best_configuration`` decides per label (and region) whether keeping only the largest connected
component raises the validation Dice, pooled over the whole merged dataset. For a domain with many lesions per case
(brain metastases: ``lesion_wise`` in the universal block) that step deletes every lesion but one, and a pooled
Dice gain on the other domains can select it. This module applies a ``postprocessing.pkl`` of nnU-Net to a
prediction folder of ``nnunet-universal predict`` (or ``nnUNetv2_predict``) **without** every step that keeps only
the largest component of a label or region that holds a class of a lesion-wise domain; the other steps run
unchanged, with nnU-Net's own functions. The domains come from the plans' ``universal`` block in the prediction
folder (``plans.json``, copied there by both predict commands).

The pkl is read with an allow-list (nnU-Net's post-processing functions, numpy scalars): a received file cannot
run code here, unlike ``nnUNetv2_apply_postprocessing``, which unpickles it as is.
"""

from __future__ import annotations

import json
import logging
import pickle
from collections.abc import Callable
from pathlib import Path

from tqdm import tqdm

from nnunet_universal.metadata import MetadataError, UniversalMeta, atomic_write_json, read_plans_universal
from nnunet_universal.synthetic.io import atomic_write_bytes

logger = logging.getLogger(__name__)

_PP_MODULE = "nnunetv2.postprocessing.remove_connected_components"
_LARGEST = "remove_all_but_largest_component_from_segmentation"
_ALLOWED = {(_PP_MODULE, _LARGEST), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
            ("numpy._core.multiarray", "scalar")}


class _PostprocessingUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in _ALLOWED:
            raise pickle.UnpicklingError(f"{module}.{name} is not one of nnU-Net's post-processing functions")
        return super().find_class(module, name)


def load_postprocessing(pkl_file: Path) -> tuple[list[Callable], list[dict]]:
    """``(functions, kwargs)`` of an nnU-Net ``postprocessing.pkl``, read with an allow-list (no code runs)."""
    try:
        with open(pkl_file, "rb") as f:
            fns, kwargs = _PostprocessingUnpickler(f).load()
    except FileNotFoundError:
        raise FileNotFoundError(f"postprocessing file {pkl_file} does not exist (nnUNetv2_find_best_configuration "
                                "writes one per configuration or ensemble)") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as e:
        raise ValueError(f"{pkl_file} is not an nnU-Net postprocessing.pkl, refused: {e}") from None
    if len(fns) != len(kwargs):
        raise ValueError(f"{pkl_file}: {len(fns)} functions but {len(kwargs)} argument sets")
    return list(fns), [dict(k) for k in kwargs]


def _ids(labels_or_regions: int | tuple | list) -> set[int]:
    items = labels_or_regions if isinstance(labels_or_regions, list) else [labels_or_regions]
    return {int(i) for item in items for i in (item if isinstance(item, tuple | list) else [item])}


def lesion_label_ids(meta: UniversalMeta) -> dict[int, str]:
    """Union label id -> ``domain.class`` for every class of a lesion-wise (multi-lesion) domain."""
    return {i: f"{name}.{cls}" for name, dom in meta.domains.items() if dom.lesion_wise
            for cls, i in dom.labels.items()}


def lesion_safe_steps(fns: list[Callable], kwargs: list[dict], meta: UniversalMeta
                      ) -> tuple[list[Callable], list[dict], list[str]]:
    """Drop each largest-component step that touches a lesion-wise class; return (fns, kwargs, what was dropped)."""
    lesion = lesion_label_ids(meta)
    kept_fns, kept_kwargs, dropped = [], [], []
    for fn, kw in zip(fns, kwargs, strict=True):
        touched = sorted(_ids(kw.get("labels_or_regions", [])) & set(lesion))
        if getattr(fn, "__name__", "") == _LARGEST and touched:
            dropped.append(f"largest component only of {kw['labels_or_regions']} (lesion classes "
                           f"{', '.join(lesion[i] for i in touched)})")
            continue
        kept_fns.append(fn)
        kept_kwargs.append(kw)
    return kept_fns, kept_kwargs, dropped


def postprocess(input_dir: Path, output_dir: Path, pp_pkl_file: Path) -> dict:
    """Apply ``pp_pkl_file`` to the label maps of ``input_dir`` without largest-component steps on lesion classes.

    Writes the post-processed maps, copies of ``dataset.json``, ``plans.json`` and the ``*.routing.json`` reports
    (so ``nnunet-universal evaluate`` and nnU-Net's tools run on ``output_dir``) and ``postprocessing_report.json``
    (steps applied and dropped); returns that report.
    """
    from nnunetv2.postprocessing.remove_connected_components import apply_postprocessing
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    input_dir, output_dir = Path(input_dir), Path(output_dir)
    if input_dir.resolve() == output_dir.resolve():
        raise ValueError(f"the output folder -o {output_dir} is the input folder -i {input_dir}; pass another -o")
    for name in ("plans.json", "dataset.json"):
        if not (input_dir / name).is_file():
            raise FileNotFoundError(f"{input_dir} has no {name}: pass a prediction folder of nnunet-universal "
                                    "predict or nnUNetv2_predict (both copy the model's plans.json and dataset.json)")
    plans = json.loads((input_dir / "plans.json").read_text())
    dataset_json = json.loads((input_dir / "dataset.json").read_text())
    try:
        meta, _ = read_plans_universal(plans, where=str(input_dir / "plans.json"))
    except MetadataError as e:
        raise MetadataError(f"{input_dir} does not hold a universal model's prediction: {e}") from None
    fns, kwargs = load_postprocessing(Path(pp_pkl_file))
    fns, kwargs, dropped = lesion_safe_steps(fns, kwargs, meta)
    for d in dropped:
        logger.warning("not applied: %s", d)
    ending = dataset_json["file_ending"]
    files = sorted(p for p in input_dir.iterdir() if p.name.endswith(ending) and p.is_file())
    if not files:
        raise FileNotFoundError(f"{input_dir} holds no label maps (*{ending})")
    rw = PlansManager(plans).image_reader_writer_class()
    output_dir.mkdir(parents=True, exist_ok=True)
    for src in tqdm(files, desc="postprocess", unit="case"):
        seg, props = rw.read_seg(str(src))
        seg = apply_postprocessing(seg[0], fns, kwargs)
        stem = src.name[: -len(ending)]
        tmp = output_dir / f".{stem}.tmp{ending}"  # the ending stays last: the writer picks the format by it
        rw.write_seg(seg, str(tmp), props)
        tmp.replace(output_dir / src.name)
    for extra in ("dataset.json", "plans.json", *(p.name for p in input_dir.glob("*.routing.json"))):
        atomic_write_bytes(output_dir / extra, (input_dir / extra).read_bytes())
    report = {"input_folder": str(input_dir.resolve()), "postprocessing_pkl": str(Path(pp_pkl_file).resolve()),
              "applied": [f"{getattr(f, '__name__', f)}({k})" for f, k in zip(fns, kwargs, strict=True)],
              "dropped": dropped, "cases": len(files)}
    atomic_write_json(report, output_dir / "postprocessing_report.json")
    return report
