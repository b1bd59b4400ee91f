"""Final validation of a universal model: per-domain metrics in oracle and dataset-free mode.

nnU-Net's ``perform_actual_validation`` scores every validation case against the full union label set,
which counts each unannotated class as background. Here every case is predicted twice with the trained
network, sliding window and test-time mirroring as in nnU-Net:

* **oracle**: the case's domain is given (its head alone; for a union-head baseline, the union prediction
  restricted to the domain's labels, unannotated classes merged into background);
* **dataset-free**: what ``nnUNetv2_predict`` does: case-level routing for gated models (``UniversalPredictor``),
  the plain union prediction for union-head baselines.

Segmentations are exported in the union label space (``validation_oracle/`` and ``validation/`` in the fold
folder, ``validation/`` being what stock inference would produce) and scored on the case's own domain with
``evaluation/report.py``; ``validation_universal.json`` and ``validation_universal.md`` summarize both modes.
Runs in-process (no export pool), each DDP rank on its share of the cases.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from nnunetv2.inference.export_prediction import convert_predicted_logits_to_segmentation_with_correct_shape
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
from nnunetv2.inference.sliding_window_prediction import compute_gaussian
from nnunetv2.utilities.label_handling.label_handling import convert_labelmap_to_one_hot
from tqdm import tqdm

from nnunet_universal.atomic_io import atomic_write_json, atomic_write_text
from nnunet_universal.nn.heads import restrict_to_domain
from nnunet_universal.nn.wrappers import unwrap
from nnunet_universal.trainers.schedule import validation_mirroring_from_env

#: (mode, output folder inside the fold folder)
MODES = (("oracle", "validation_oracle"), ("dataset_free", "validation"))
JSON_NAME = "validation_universal.json"
MARKDOWN_NAME = "validation_universal.md"


def _atomic_write_seg(rw: Any, seg: np.ndarray, path: Path, properties: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp{''.join(path.suffixes)}")
    rw.write_seg(seg, str(tmp), properties)
    os.replace(tmp, path)


class _CasePredictor:
    """Oracle and dataset-free logits of one preprocessed case, for gated and union-head networks."""

    def __init__(self, trainer: Any, network: torch.nn.Module) -> None:
        from nnunet_universal.inference.predictor import UniversalPredictor

        self.meta = trainer.universal_meta
        self.options = trainer.network_options(trainer.plans_manager.plans)
        self.union_head = self.options.head == "union"
        cls = nnUNetPredictor if self.union_head else UniversalPredictor
        self.predictor = cls(tile_step_size=0.5, use_gaussian=True, use_mirroring=validation_mirroring_from_env(),
                             perform_everything_on_device=True, device=trainer.device, verbose=False,
                             verbose_preprocessing=False, allow_tqdm=False)
        # the network's own state dict as the single "fold": loading it is a no-op copy
        self.predictor.manual_initialization(network, trainer.plans_manager, trainer.configuration_manager,
                                             [network.state_dict()], trainer.dataset_json, type(trainer).__name__,
                                             trainer.inference_allowed_mirroring_axes)

    def __call__(self, data: torch.Tensor, domain: str) -> dict[str, tuple[torch.Tensor, dict | None]]:
        """{mode: (union logits (U, *spatial) on the CPU, routing record or None)}."""
        if self.union_head:
            free = self.predictor.predict_logits_from_preprocessed_data(data).cpu()
            oracle = restrict_to_domain(free, self.meta.domain_label_ids(domain))
            return {"oracle": (oracle, None), "dataset_free": (free, None)}
        oracle = self.predictor.predict_logits_for_domain(data, domain).cpu()
        self.predictor.oracle_domain = None
        free = self.predictor.predict_logits_from_preprocessed_data(data).cpu()
        record = None
        if self.options.gate:
            rec = self.predictor.routing_record("")
            record = {k: rec[k] for k in ("mode", "rule", "inferred_domain", "confidence", "runner_up", "uncertain",
                                          "conflicting")}
            record["weights"] = rec["routing"]
        return {"oracle": (oracle, {"mode": "oracle", "given_domain": domain, "inferred_domain": None}),
                "dataset_free": (free, record)}


def nnunet_style_summary(mode_summary: dict[str, Any]) -> dict[str, Any]:
    """nnU-Net's ``validation/summary.json`` keys from a per-domain summary (dataset-free mode).

    ``nnUNetv2_export_model_to_zip`` ships this file and ``nnUNetv2_find_best_configuration`` reads
    ``foreground_mean.Dice``; here that is the mean over domains of each domain's mean Dice on its own
    classes (never counting unannotated classes as background). ``mean`` holds, per union label id, the mean
    Dice (and HD95 where defined) over the cases whose domain annotates that label; ``metric_per_case`` each
    case's Dice/HD95 per union label of its domain. The full per-domain summary is kept under ``universal``.
    """
    means = [d["dice"]["mean"] for d in mode_summary["domains"].values()
             if d["dice"]["mean"] is not None and np.isfinite(d["dice"]["mean"])]
    fg = float(np.mean(means)) if means else float("nan")
    per_case = mode_summary.get("per_case", [])
    labels = sorted({uid for pc in per_case for uid in pc["metrics"]}, key=int)
    mean: dict[str, dict[str, float | None]] = {}
    for uid in labels:
        values = [pc["metrics"][uid] for pc in per_case if uid in pc["metrics"]]
        hd = [v["HD95"] for v in values if v["HD95"] is not None]
        mean[uid] = {"Dice": float(np.mean([v["Dice"] for v in values])),
                     "HD95": float(np.mean(hd)) if hd else None, "n": len(values)}
    return {"foreground_mean": {"Dice": fg}, "mean": mean, "metric_per_case": per_case, "universal": mode_summary}


def run_final_validation(trainer: Any, save_probabilities: bool = False) -> dict[str, Any] | None:
    """Predict, export and score the fold's validation cases; write JSON + Markdown (rank 0). Returns the summary.

    Args:
        trainer: an initialized :class:`~nnunet_universal.trainers.universal_trainer.UniversalTrainer`.
        save_probabilities: also write ``.npz`` probabilities and ``.pkl`` properties next to each segmentation.
    """
    from nnunet_universal.evaluation.report import evaluate_case, summarize, to_markdown

    trainer.set_deep_supervision_enabled(False)
    network = unwrap(trainer.network)  # never the DDP wrapper: ranks predict different numbers of tiles
    network.eval()
    predict = _CasePredictor(trainer, network)
    meta = trainer.universal_meta
    _, val_keys = trainer.do_split()
    if trainer.is_ddp:
        val_keys = val_keys[trainer.local_rank::dist.get_world_size()]
    dataset = trainer.dataset_class(trainer.preprocessed_dataset_folder, val_keys,
                                    folder_with_segs_from_previous_stage=trainer.folder_with_segs_from_previous_stage)
    rw = trainer.plans_manager.image_reader_writer_class()
    ending = trainer.dataset_json["file_ending"]
    gt_folder = Path(trainer.preprocessed_dataset_folder_base) / "gt_segmentations"
    out_dirs = {mode: Path(trainer.output_folder) / folder for mode, folder in MODES}
    for d in out_dirs.values():
        d.mkdir(parents=True, exist_ok=True)

    records: dict[str, list[dict[str, Any]]] = {mode: [] for mode, _ in MODES}
    for key in tqdm(dataset.identifiers, desc="final validation", disable=trainer.local_rank != 0):
        data, _, seg_prev, properties = dataset.load_case(key)
        data = np.asarray(data[:])
        if trainer.is_cascaded:
            data = np.vstack((data, convert_labelmap_to_one_hot(seg_prev[:], trainer.label_manager.foreground_labels,
                                                                output_dtype=data.dtype)))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "The given NumPy array is not writable"
            data = torch.from_numpy(data)
        domain = meta.case(key).domain
        gt, gt_properties = rw.read_seg(str(gt_folder / f"{key}{ending}"))
        for mode, (logits, routing) in predict(data, domain).items():
            seg = convert_predicted_logits_to_segmentation_with_correct_shape(
                logits, trainer.plans_manager, trainer.configuration_manager, trainer.label_manager, properties,
                return_probabilities=save_probabilities)
            if save_probabilities:
                seg, probabilities = seg
                tmp = out_dirs[mode] / f".{key}.tmp.npz"
                np.savez_compressed(tmp, probabilities=probabilities)
                os.replace(tmp, out_dirs[mode] / f"{key}.npz")
                from batchgenerators.utilities.file_and_folder_operations import save_pickle

                save_pickle(properties, str(out_dirs[mode] / f"{key}.pkl"))
            _atomic_write_seg(rw, seg, out_dirs[mode] / f"{key}{ending}", properties)
            rec = evaluate_case(seg, gt[0], gt_properties["spacing"], domain, meta)
            rec["case"] = key
            if routing is not None:
                rec["routing"] = routing
            records[mode].append(rec)
        trainer.print_to_log_file(f"validated {key} ({domain}): oracle Dice {records['oracle'][-1]['mean_dice']:.4f}, "
                                  f"dataset-free Dice {records['dataset_free'][-1]['mean_dice']:.4f}",
                                  also_print_to_console=False)

    if trainer.is_ddp:
        gathered: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, records)
        records = {mode: [r for g in gathered for r in g[mode]] for mode, _ in MODES}

    summary = None
    if trainer.local_rank == 0:
        summary = {"trainer": type(trainer).__name__, "fold": trainer.fold,
                   "configuration": trainer.configuration_name,
                   "modes": {mode: summarize(records[mode], meta) for mode, _ in MODES},
                   "cases": records}
        atomic_write_json(summary, Path(trainer.output_folder) / JSON_NAME)
        free_summary = nnunet_style_summary(summary["modes"]["dataset_free"])
        atomic_write_json(free_summary, out_dirs["dataset_free"] / "summary.json")
        titles = {"oracle": "Oracle mode (domain given)", "dataset_free": "Dataset-free mode (domain inferred)"}
        md = [f"# Final validation: {type(trainer).__name__}, {trainer.configuration_name}, fold {trainer.fold}", ""]
        for mode, _ in MODES:
            md += [f"# {titles[mode]}", "", to_markdown(summary["modes"][mode])]
        atomic_write_text("\n".join(md), Path(trainer.output_folder) / MARKDOWN_NAME)
        for mode, _ in MODES:
            for dname, d in summary["modes"][mode]["domains"].items():
                mean = d["dice"]["mean"]
                trainer.logger.log_summary(f"final_val/{mode}/{dname}_dice", mean)
                trainer.print_to_log_file(f"final validation {mode}: {dname} mean Dice {mean}")
        trainer.print_to_log_file(f"Validation complete: {Path(trainer.output_folder) / MARKDOWN_NAME}")
    trainer.set_deep_supervision_enabled(True)
    compute_gaussian.cache_clear()
    return summary
