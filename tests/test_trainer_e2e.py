"""End to end on a tiny merged dataset (two MR domains with different slots and labels, one CT domain), on CPU.

One module-scoped fixture writes, plans and preprocesses the dataset with the planner API and shrinks the
planned U-Net (fewer features and convolutions; still nnU-Net's plans structure) so that CPU steps are fast.
Then: every trainer variant builds and trains one step in-process; the real ``nnUNetv2_train`` command
trains ``UniversalTrainer`` in a subprocess; ``--c`` continues and ``--val`` re-validates from its checkpoint.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from nnunet_universal.discovery import all_trainers, ext_trainer_value

DATASET_ID = 990
DATASET = "Dataset990_MergedFixture"
CONFIG = "3d_fullres"
PLANS = "nnUNetUniversalPlans"
TRAINERS = all_trainers()


@pytest.fixture(scope="module")
def planned(tmp_path_factory):
    """nnU-Net folders with the merged fixture dataset planned and preprocessed; yields the folder paths."""
    from merged_fixture import make_merged_dataset

    from nnunet_universal.planners.api import plan_and_preprocess

    root = tmp_path_factory.mktemp("nnunet")
    dirs = {k: root / k for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")}
    with pytest.MonkeyPatch.context() as mp:
        for k, v in dirs.items():
            v.mkdir()
            mp.setenv(k, str(v))
        mp.setenv("nnUNet_n_proc_DA", "0")
        mp.setenv("NNUNET_UNIVERSAL_FP_SAMPLES", "10000")  # the planner's fingerprint sample budget (default 1e8)
        mp.delenv("NNUNET_UNIVERSAL_SCHEDULE", raising=False)
        make_merged_dataset(dirs["nnUNet_raw"], DATASET_ID, cases_per_domain=3, shape=(20, 24, 24))
        plan_and_preprocess(DATASET_ID, configurations=[CONFIG], num_processes=1)
        plans_file = dirs["nnUNet_preprocessed"] / DATASET / f"{PLANS}.json"
        plans = json.loads(plans_file.read_text())
        arch = plans["configurations"][CONFIG]["architecture"]["arch_kwargs"]
        n = arch["n_stages"]
        arch["features_per_stage"] = [min(4 * 2**i, 16) for i in range(n)]
        arch["n_conv_per_stage"] = [1] * n
        arch["n_conv_per_stage_decoder"] = [1] * (n - 1)
        plans_file.write_text(json.dumps(plans, indent=2))
        yield dirs


def _load(dirs):
    pre = dirs["nnUNet_preprocessed"] / DATASET
    return json.loads((pre / f"{PLANS}.json").read_text()), json.loads((pre / "dataset.json").read_text())


def _trainer(cls, dirs, fold=1, plans=None):
    default_plans, dataset_json = _load(dirs)
    plans = copy.deepcopy(plans or default_plans)
    plans["continue_training"] = False
    return cls(plans=plans, configuration=CONFIG, fold=fold, dataset_json=dataset_json, device=torch.device("cpu"))


@pytest.mark.parametrize("cls", TRAINERS, ids=[t.__name__ for t in TRAINERS])
def test_each_trainer_builds_and_trains_one_step(planned, cls):
    tr = _trainer(cls, planned)
    tr.on_train_start()
    assert "(encoder)" in repr(tr.network)  # print(network) works for every variant (HarmonyNorm.extra_repr was broken)
    before = [p.detach().clone() for p in tr.network.parameters()]
    tr.on_epoch_start()
    tr.on_train_epoch_start()
    out = tr.train_step(next(tr.dataloader_train))
    assert np.isfinite(out["loss"]) and out["loss"] > 0
    assert any(not torch.equal(a, b) for a, b in zip(before, tr.network.parameters(), strict=True))
    with torch.no_grad():
        tr.on_validation_epoch_start()
        val = tr.validation_step(next(tr.dataloader_val))
    assert val["tp_hard"].shape == (tr.layout.size,) and np.isfinite(val["loss"])
    assert (val["gate_total"] > 0) == (tr.network_options(tr.plans_manager.plans).gate)


def test_network_sees_missing_slots_as_zero_and_modality_dropout(planned):
    from nnunet_universal.trainers.universal_trainer import UniversalTrainer

    tr = _trainer(UniversalTrainer, planned)
    tr.modality_dropout_p = 1.0  # every multi-slot sample loses some slots
    tr.on_train_start()
    seen = []
    core_forward = tr.network.forward_train

    def spy(x, domain, availability):
        seen.append((x.detach().clone(), availability.clone()))
        return core_forward(x, domain, availability)

    tr.network.forward_train = spy
    meta = tr.universal_meta
    # each slot of a sample is dropped with probability 1/2 (one kept if all would go): unseeded, a batch of two
    # 2-slot samples kept every slot 1 time in 16 and the last assert failed in a CI run
    torch.manual_seed(0)
    for _ in range(3):
        batch = next(tr.dataloader_train)
        tr.train_step(batch)
        x, avail = seen[-1]
        for b, key in enumerate(batch["keys"]):
            case_slots = meta.slot_mask(meta.cases[str(key)].slots)
            for c, present in enumerate(case_slots):
                if not present or not avail[b, c]:
                    assert torch.all(x[b, c] == 0), (key, c)  # missing or dropped: exactly zero
            assert avail[b].sum() >= 1 and all(a <= p for a, p in zip(avail[b].tolist(), case_slots, strict=True))
    n_multi = sum(int(sum(meta.slot_mask(meta.cases[str(k)].slots)) > 1) for k in batch["keys"])
    assert n_multi == 0 or (seen[-1][1].sum(1) < torch.tensor(
        [sum(meta.slot_mask(meta.cases[str(k)].slots)) for k in batch["keys"]])).any()


def test_domain_sampling_reaches_background_workers(planned, monkeypatch):
    """With nnU-Net's multi-process augmenter the probabilities must reach the (already forked) workers."""
    from collections import Counter

    from nnunet_universal.trainers.universal_trainer import UniversalTrainer

    monkeypatch.setenv("nnUNet_n_proc_DA", "1")
    tr = _trainer(UniversalTrainer, planned)
    tr.domain_alpha = 50.0  # p(domain) ~ n^50: only the largest domain of the fold is ever drawn
    tr.initialize()
    tr.do_split()  # writes splits_final.json
    splits = json.loads((Path(tr.preprocessed_dataset_folder_base) / "splits_final.json").read_text())
    for fold, split in enumerate(splits):  # a fold whose training cases have a unique largest domain
        counts = Counter(tr.universal_meta.cases[k].domain for k in split["train"]).most_common()
        if counts[0][1] > counts[1][1]:
            tr.fold = fold  # only do_split reads it; the output folder stays fold_1
            break
    else:
        pytest.fail(f"no fold with a unique largest domain in {splits}")
    loader_tr, loader_val = tr.get_dataloaders()
    try:
        drawn = [tr.universal_meta.cases[str(k)].domain for _ in range(4) for k in next(loader_tr)["keys"]]
    finally:
        loader_tr._finish()
        loader_val._finish()
    assert set(drawn) == {counts[0][0]}, drawn


def test_loss_ignores_the_heads_of_other_domains(planned):
    """A batch of mr_a cases: changing what the mr_b and CT heads predict leaves the loss unchanged."""
    from nnunet_universal.trainers.ddp import forward_train
    from nnunet_universal.trainers.universal_trainer import UniversalTrainer

    tr = _trainer(UniversalTrainer, planned)
    tr.initialize()
    tr.network.eval()
    ps = tr.configuration_manager.patch_size
    ds = tr.dataset_class(tr.preprocessed_dataset_folder, ["mr_a_000", "mr_a_001"])
    data, seg = [], []
    for k in ds.identifiers:
        d, s, _, _ = ds.load_case(k)
        d, s = np.asarray(d[:]), np.asarray(s[:])
        pad = [(0, 0)] + [(0, max(0, p - n)) for p, n in zip(ps, d.shape[1:], strict=True)]
        d, s = np.pad(d, pad), np.pad(s, pad)
        sl = (slice(None), *[slice(0, p) for p in ps])
        data.append(d[sl])
        seg.append(s[sl])
    x = torch.from_numpy(np.stack(data)).float()
    t0 = torch.from_numpy(np.stack(seg)).to(torch.int16).clamp_min(0)
    assert set(torch.unique(t0).tolist()) <= {0, 1}
    targets = [t0] + [t0[:, :, ::2, ::2, ::2], t0[:, :, ::4, ::4, ::4]][: len(tr.loss.ds_weights) - 1]
    domain = torch.zeros(2, dtype=torch.long)
    avail = torch.tensor([tr.universal_meta.slot_mask(["T1c", "FLAIR"])] * 2)
    heads = tr.network.heads

    def loss():
        with torch.no_grad():
            return tr.loss(forward_train(tr.network, x, domain, avail), targets, domain).item()

    base = loss()
    own = heads.sizes[0]  # mr_a's channels come first in every scale's head convolution
    with torch.no_grad():
        for conv in heads.heads:
            conv.weight[own:] += torch.randn_like(conv.weight[own:])
            conv.bias[own:] += 3.0
    assert loss() == pytest.approx(base, abs=1e-6)
    with torch.no_grad():
        heads.heads[0].weight[:own] += torch.randn_like(heads.heads[0].weight[:own])
    assert loss() != pytest.approx(base, abs=1e-4)


def test_plain_plans_get_a_universal_block_in_the_model_folder(planned):
    """Trained on plans without a universal block: plans.json of the model folder gets one; the network is
    rebuilt from the model folder alone."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnunet_universal.metadata import MetadataError
    from nnunet_universal.trainers.universal_trainer import UniversalTrainer

    plans, dataset_json = _load(planned)
    plain = copy.deepcopy(plans)
    del plain["universal"]
    plain["plans_name"] = "nnUNetPlainPlans"
    tr = _trainer(UniversalTrainer, planned, plans=plain)
    tr.on_train_start()
    saved = json.loads((Path(tr.output_folder_base) / "plans.json").read_text())
    assert saved["universal"]["domains"].keys() == plans["universal"]["domains"].keys()
    pm = PlansManager(saved)
    net = UniversalTrainer.build_network_architecture(pm, pm.get_configuration(CONFIG), 5, 7, False)
    net.load_state_dict(tr.network.state_dict())
    # a dataset.json without universal block: stop at once and say what to run
    bare = {k: v for k, v in dataset_json.items() if k != "universal"}
    with pytest.raises(MetadataError, match="nnunet-universal convert.*nnunet-universal plan"):
        UniversalTrainer(plans={**plans, "continue_training": False}, configuration=CONFIG, fold=0,
                         dataset_json=bare, device=torch.device("cpu"))


@pytest.fixture(scope="module")
def trained(planned):
    """``nnUNetv2_train 990 3d_fullres 0 -tr UniversalTrainer -p nnUNetUniversalPlans -device cpu`` (2 epochs)."""
    exe = shutil.which("nnUNetv2_train", path=str(Path(sys.executable).parent))
    assert exe, "nnUNetv2_train not found next to the Python interpreter"
    env = {**os.environ, **{k: str(v) for k, v in planned.items()}, "nnUNet_extTrainer": ext_trainer_value(""),
           "NNUNET_UNIVERSAL_SCHEDULE": "2:8:1", "NNUNET_UNIVERSAL_SEED": "0", "nnUNet_n_proc_DA": "0",
           "nnUNet_compile": "f",
           "nnUNet_def_n_proc": "1", "OMP_NUM_THREADS": "1",
           "NNUNET_UNIVERSAL_FUSED": "1"}  # the default CPU path: U-Harmony's C++ kernels (built by test_nn_harmony)
    res = subprocess.run([exe, str(DATASET_ID), CONFIG, "0", "-tr", "UniversalTrainer", "-p", PLANS, "-device", "cpu"],
                         capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    assert "kernels unavailable" not in res.stdout + res.stderr, res.stderr[-4000:]  # no fallback to eager
    return planned["nnUNet_results"] / DATASET / f"UniversalTrainer__{PLANS}__{CONFIG}" / "fold_0"


def test_nnunetv2_train_writes_per_domain_validation(trained):
    summary = json.loads((trained / "validation_universal.json").read_text())
    assert set(summary["modes"]) == {"oracle", "dataset_free"}
    val_keys = {r["case"] for r in summary["cases"]["oracle"]}
    assert val_keys and val_keys == {r["case"] for r in summary["cases"]["dataset_free"]}
    for mode in ("oracle", "dataset_free"):
        for dname, d in summary["modes"][mode]["domains"].items():
            assert d["n_cases"] >= 1, (mode, dname)
        # the trained model beats the trivial all-background prediction (Dice 0 on every class: each validation
        # case holds every class of its domain) on its best validation case. Unseeded (2 x 8 iterations) the best
        # case scored 0.46, 0.37 and once 0.044 (a CI failure): the fixture now trains with NNUNET_UNIVERSAL_SEED
        # and augmentation in-process, so the run is the same every time; 0.05 still fails for a model that
        # learned nothing or a routing/export that maps labels wrongly, which zero every case.
        best = max(max(c["dice"] for c in rec["classes"].values()) for rec in summary["cases"][mode])
        assert best > 0.05, (mode, summary["cases"][mode])
        for key in val_keys:
            assert (trained / ("validation_oracle" if mode == "oracle" else "validation") / f"{key}.nii.gz").is_file()
    free = summary["cases"]["dataset_free"]
    assert all(r["routing"]["inferred_domain"] in ("mr_a", "mr_b", "ct") for r in free)
    logs = "".join(p.read_text() for p in trained.glob("training_log_*.txt"))
    assert "NNUNET_UNIVERSAL_SEED=0: random, numpy and torch seeded" in logs
    md = (trained / "validation_universal.md").read_text()
    assert "Oracle mode" in md and "Dataset-free mode" in md and "| domain |" in md
    assert (trained / "progress.png").is_file() and (trained / "progress_domains.png").is_file()
    log = "".join(p.read_text() for p in trained.glob("training_log_*.txt"))
    assert "Pseudo dice per domain: mr_a" in log and "gate accuracy" in log


def test_checkpoint_holds_prototypes_and_predictor_rebuilds_it(trained, monkeypatch):
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    ckpt = torch.load(trained / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    weights = ckpt["network_weights"]
    assert weights["router.prototypes"].shape[0] == 3
    # every domain was seen in training: 2 x 8 iterations of batch 2 from 3 domains leave one unseen with
    # probability 3 * (2/3)^32 < 1e-5 (2 x 2 iterations did so in about 1 run in 8)
    assert weights["router.prototype_initialized"].all()
    assert ckpt["trainer_name"] == "UniversalTrainer"
    logging = ckpt["logging"]
    assert len(logging["dice_per_domain"]) == len(logging["gate_accuracy"]) == len(logging["mean_fg_dice"]) == 2
    # nnU-Net's predictor, from the model folder alone (plans.json + checkpoint; trainer found via the env var)
    monkeypatch.setenv("nnUNet_extTrainer", ext_trainer_value(""))
    predictor = nnUNetPredictor(device=torch.device("cpu"), perform_everything_on_device=False, allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(str(trained.parent), use_folds=(0,))
    assert torch.equal(predictor.network.router.prototypes, weights["router.prototypes"])


def test_continue_and_validation_only(trained, monkeypatch):
    """``--c`` resumes at epoch 2 with optimizer, prototypes and logs; ``--val`` re-runs only the validation."""
    from nnunet_universal.trainers.api import train

    before = torch.load(trained / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    monkeypatch.setenv("NNUNET_UNIVERSAL_SCHEDULE", "3:2:1")
    monkeypatch.setenv("nnUNet_extTrainer", "")  # train() sets it; monkeypatch restores it afterwards
    logs_before = set(trained.glob("training_log_*.txt"))
    train(str(DATASET_ID), CONFIG, "0", device="cpu", continue_training=True)
    after = torch.load(trained / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert before["current_epoch"] == 2 and after["current_epoch"] == 3
    for k in ("dice_per_domain", "gate_accuracy", "train_losses", "mean_fg_dice"):
        assert len(after["logging"][k]) == 3, k
        np.testing.assert_equal(after["logging"][k][:2], before["logging"][k][:2])
    new_log = (set(trained.glob("training_log_*.txt")) - logs_before) or set(trained.glob("training_log_*.txt"))
    text = "".join(p.read_text() for p in new_log)
    assert "Epoch 2" in text
    prototypes = [c["network_weights"]["router.prototypes"] for c in (before, after)]
    assert not torch.equal(*prototypes)  # epoch 2 updated the restored prototypes
    (trained / "validation_universal.json").unlink()
    train(str(DATASET_ID), CONFIG, "0", device="cpu", validation_only=True)
    assert (trained / "validation_universal.json").is_file()
    final = torch.load(trained / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert final["current_epoch"] == 3  # --val did not train


#: Ops ratios (universal / stock) of this fixture's tiny network, measured 1.57 / 0.83 (604 / 385 per step, 77.4 /
#: 93.25 per tile) since dataset-free prediction is one sliding window (tile 0.91 with the routing pass before;
#: 1.83 / 1.97 before the U-Harmony kernels were registered operators and ``UniversalUNet.to`` skipped a no-op move;
#: 2.17 / 2.42 before the grouped partial-label loss, single-head hard routing, one-function gate embedding and the
#: other cuts of issue 21; 2.46 / 4.55 before the op-count work); bounds just above: a regression guard. The step
#: goal of scripts/count_ops.py (1.3) is not met on this fixture: a tiny network makes the fixed per-step work
#: (gate, heads, loss, SGD's per-parameter loop on CPU) weigh more than at nnU-Net's planned size.
OPS_RATIO_BOUNDS = {"step": 1.6, "tile": 0.88}


def test_dispatched_operations_do_not_regress(planned, monkeypatch):
    """Host-overhead proxy (``scripts/count_ops.py``) on the production path (C++ U-Harmony kernels): ATen
    operations dispatched by a universal training step and sliding-window tile against nnU-Net's own, same batch
    and case. Catches a change that adds per-layer or per-domain operations."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    import count_ops
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    from nnunet_universal.trainers.universal_trainer import UniversalTrainer

    monkeypatch.setenv("NNUNET_UNIVERSAL_FUSED", "1")  # conftest turns the production kernels off
    universal = _trainer(UniversalTrainer, planned, fold=0)
    universal.initialize()
    np.random.seed(0)
    torch.manual_seed(0)
    batch = next(universal.get_dataloaders()[0])
    batch = {"data": batch["data"], "target": batch["target"], "keys": list(batch["keys"])}
    steps, tiles = {}, {}
    for key, cls in (("stock", nnUNetTrainer), ("universal", UniversalTrainer)):
        torch.manual_seed(0)
        tr = _trainer(cls, planned, fold=0)
        tr.initialize()
        steps[key] = sum(count_ops.step_ops(tr, dict(batch)).values())
        tiles[key], n_tiles = count_ops.tile_ops(count_ops.predictor_for(tr), count_ops.first_case(tr))
        assert n_tiles >= 2 and steps[key] > 100
    step_ratio, tile_ratio = steps["universal"] / steps["stock"], tiles["universal"] / tiles["stock"]
    print(f"ops per step {steps}, per tile {tiles}: ratios {step_ratio:.2f} / {tile_ratio:.2f}")  # pytest -s
    assert step_ratio <= OPS_RATIO_BOUNDS["step"], (steps, step_ratio)
    assert tile_ratio <= OPS_RATIO_BOUNDS["tile"], (tiles, tile_ratio)
