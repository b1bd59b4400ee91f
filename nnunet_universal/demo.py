"""The one-command demo: the whole pipeline on built-in synthetic data.

Synthesizes three brain MR "institutions" with different sequence and label sets (BraTS-METS-like,
UCSF-BMSR-like, BrainMetShare-like) and a CT liver set (LiTS-like) in their native layouts, converts and
merges them (a few cases per domain held out), plans, trains ``UniversalTrainer`` on a short schedule,
segments the held-out cases dataset-free and evaluates them per domain.
"""

from __future__ import annotations

import logging
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tqdm import tqdm

logger = logging.getLogger(__name__)

#: (synthetic source, converter source, dataset id, cases). Ids 701-704 for the sources, 700 for the merge.
DEMO_SOURCES: tuple[tuple[str, str, int, int], ...] = (
    ("brats-mets", "brats-mets", 701, 10),
    ("ucsf-bmsr", "ucsf-bmsr", 702, 10),
    ("brainmetshare", "brainmetshare", 703, 10),
    ("lits", "lits", 704, 10),
)
DEMO_DATASET_ID = 700
DEMO_HOLDOUT = 2
#: Lesion radii x2.5 (``synth --lesion-scale``): at the small default shapes (about 4 mm voxels) the sources' own
#: metastases are a few voxels each, too small to learn in a few minutes of CPU training.
DEMO_LESION_SCALE = 2.5
#: Short schedule: epochs, iterations per epoch, validation iterations per epoch (about 9 minutes on 2 CPU cores).
DEMO_SCHEDULE = (18, 12, 1)


@contextmanager
def _stage(bar: tqdm, name: str):
    bar.set_description(name)
    t0 = time.perf_counter()
    yield
    bar.update(1)
    logger.info("%s took %.1f s", name, time.perf_counter() - t0)
    tqdm.write(f"[demo] {name}: {time.perf_counter() - t0:.1f} s")


def run_demo(work_dir: Path, epochs: int | None = None, device: str = "cpu") -> dict[str, Any]:
    """Run the full pipeline in ``work_dir`` (its own nnUNet_raw/preprocessed/results) and return the metrics."""
    from nnunet_universal.dataset_conversion.api import convert
    from nnunet_universal.dataset_conversion.merge import merge_datasets
    from nnunet_universal.evaluation.api import evaluate
    from nnunet_universal.inference.api import predict
    from nnunet_universal.metadata import PLANS_NAME
    from nnunet_universal.planners.api import plan_and_preprocess
    from nnunet_universal.synthetic.api import png_slice_spacing, synthesize
    from nnunet_universal.trainers.api import train

    work_dir = Path(work_dir).resolve()
    work_dir.mkdir(parents=True, exist_ok=True)
    for key in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        (work_dir / key).mkdir(exist_ok=True)
        os.environ[key] = str(work_dir / key)
    os.environ.setdefault("nnUNet_compile", "f")
    os.environ.setdefault("NNUNET_UNIVERSAL_FP_SAMPLES", "1000000")  # fingerprint budget: plenty for ~40 small cases
    n_epochs, iters, val_iters = DEMO_SCHEDULE
    if epochs is not None:
        n_epochs = epochs
    os.environ["NNUNET_UNIVERSAL_SCHEDULE"] = f"{n_epochs}:{iters}:{val_iters}"
    os.environ.setdefault("NNUNET_UNIVERSAL_VAL_MIRRORING", "0")  # no test-time mirroring: 8x fewer passes on a CPU

    t_start = time.perf_counter()
    stages = tqdm(total=7, desc="demo", unit="stage", position=0)
    with _stage(stages, "synthesize native datasets"):
        native = {src: synthesize(src, work_dir / "native" / src, cases=n, seed=i, lesion_scale=DEMO_LESION_SCALE)
                  for i, (src, _, _, n) in enumerate(DEMO_SOURCES)}
    with _stage(stages, "convert to nnU-Net raw datasets"):
        for src, conv, did, _ in DEMO_SOURCES:
            # PNG slices have no geometry: give the synthetic cases' true spacing (not the real release's 1 mm)
            spacing = png_slice_spacing() if src == "brainmetshare" else None
            convert(conv, native[src], did, workers=2, spacing=spacing)
    with _stage(stages, "merge into one partial-label dataset"):
        merged = merge_datasets(DEMO_DATASET_ID, "UniversalDemo", [str(d) for _, _, d, _ in DEMO_SOURCES],
                                identical=["ucsf_bmsr.ET=brainmetshare.ET"], workers=2, holdout=DEMO_HOLDOUT)
    with _stage(stages, "plan and preprocess"):
        plan_and_preprocess(DEMO_DATASET_ID, configurations=["3d_fullres"], num_processes=2)
    with _stage(stages, f"train UniversalTrainer ({n_epochs} epochs x {iters} iterations)"):
        train(str(DEMO_DATASET_ID), "3d_fullres", "0", trainer="UniversalTrainer", plans=PLANS_NAME, device=device)
    model_dir = (work_dir / "nnUNet_results" / merged.name / f"UniversalTrainer__{PLANS_NAME}__3d_fullres")
    pred_dir = work_dir / "predictions"
    with _stage(stages, "predict held-out cases dataset-free"):
        predict(model_dir=model_dir, output_dir=pred_dir, input_dir=merged / "imagesTs", folds=["0"],
                device=device, mirroring=False)
    with _stage(stages, "evaluate per domain"):
        metrics = evaluate(pred_dir, gt_dir=merged / "labelsTs", dataset_id=DEMO_DATASET_ID)
    stages.close()
    wall = time.perf_counter() - t_start
    report = pred_dir / "evaluation" / "metrics.md"
    print()
    print(report.read_text())
    print(f"demo finished in {wall / 60:.1f} min")
    print(f"  merged dataset : {merged}")
    print(f"  trained model  : {model_dir}")
    print(f"  predictions    : {pred_dir} (routing reports: *.routing.json)")
    print(f"  evaluation     : {report.parent}")
    return metrics
