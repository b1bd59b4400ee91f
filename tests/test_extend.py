"""``nnunet-universal extend``: a trained two-domain model grown by a third domain with a new class and a new slot.

Through the real commands in subprocesses: ``nnunet-universal plan`` + ``nnUNetv2_train`` on the old merged
dataset (domains ``mr_a``, ``mr_b`` of the merged fixture, slots T1 T1c T2 FLAIR), ``nnunet-universal extend``
with a converted dataset of the fixture's ``ct`` domain (new slot CT, new classes liver and tumor) and new data of
the old domain ``mr_b`` that brings a new class (``cavity``), then ``nnUNetv2_train`` with the extension trainers
(everything, only the new parts; ``--no-old-data`` with distillation), ``nnunet-universal predict`` on all three
domains and ``nnunet-universal evaluate``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from nnunet_universal.metadata import PLANS_NAME, CaseInfo, DomainInfo, UniversalMeta

OLD_ID, CT_ID, NEW_ID, MRB_ID, NOOLD_ID, HOLDOUT_ID, MRC_ID, NOSLOT_ID = 981, 982, 983, 984, 985, 986, 987, 988
SCHEDULE = "1:3:1"
TINY_FEATURES = [8, 16, 32]
OLD_SLOTS = ["T1", "T1c", "T2", "FLAIR"]


def _bin(name: str) -> str:
    exe = Path(sys.executable).parent / name
    return str(exe) if exe.exists() else shutil.which(name)


def _run(args: list[str], env: dict, timeout: int = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _old_and_ct_datasets(raw: Path) -> tuple[Path, Path]:
    """Split the merged fixture into an old merged dataset (mr_a, mr_b; 4 channels; one fold) and a converted
    dataset of the ct domain (one CT channel, local labels liver 1, tumor 2)."""
    from merged_fixture import DOMAINS, SLOTS, make_merged_dataset

    full = make_merged_dataset(raw, 980, cases_per_domain=3)
    old = raw / f"Dataset{OLD_ID}_ExtOld"
    ct = raw / f"Dataset{CT_ID}_ExtCT"
    for d in (old, ct):
        (d / "imagesTr").mkdir(parents=True)
        (d / "labelsTr").mkdir()
    meta = json.loads((full / "dataset.json").read_text())["universal"]
    old_cases, ct_cases = {}, {}
    for case, info in meta["cases"].items():
        if info["domain"] == "ct":
            cid = case.removeprefix("ct_")
            shutil.copy(full / "imagesTr" / f"{case}_{SLOTS.index('CT'):04d}.nii.gz",
                        ct / "imagesTr" / f"{cid}_0000.nii.gz")
            lab = sitk.ReadImage(str(full / "labelsTr" / f"{case}.nii.gz"))
            arr = sitk.GetArrayFromImage(lab)
            out = sitk.GetImageFromArray(np.select([arr == 5, arr == 6], [1, 2], 0).astype(np.uint8))
            out.CopyInformation(lab)
            sitk.WriteImage(out, str(ct / "labelsTr" / f"{cid}.nii.gz"))
            ct_cases[cid] = CaseInfo(domain="ct", slots=["CT"], source_id=cid)
        else:
            for ch, slot in enumerate(OLD_SLOTS):
                shutil.copy(full / "imagesTr" / f"{case}_{SLOTS.index(slot):04d}.nii.gz",
                            old / "imagesTr" / f"{case}_{ch:04d}.nii.gz")
            shutil.copy(full / "labelsTr" / f"{case}.nii.gz", old / "labelsTr" / f"{case}.nii.gz")
            old_cases[case] = CaseInfo(domain=info["domain"], slots=info["slots"], source_id=case, group=case)
    old_meta = UniversalMeta(slots=OLD_SLOTS, domains={d: DOMAINS[d] for d in ("mr_a", "mr_b")}, cases=old_cases)
    labels = {"background": 0, **{f"{d}.{c}": i for d in ("mr_a", "mr_b") for c, i in DOMAINS[d].labels.items()}}
    (old / "dataset.json").write_text(json.dumps({
        "name": "ExtOld", "channel_names": {str(i): s for i, s in enumerate(OLD_SLOTS)}, "labels": labels,
        "numTraining": len(old_cases), "file_ending": ".nii.gz", "universal": old_meta.to_dict()}))
    train = sorted(c for c in old_cases if not c.endswith("_000"))
    (old / "splits_final.json").write_text(json.dumps([{"train": train, "val": ["mr_a_000", "mr_b_000"]}]))
    ct_meta = UniversalMeta(slots=["CT"], domains={"ct": DomainInfo(source="synthetic CT", slots=["CT"],
                                                                     labels={"liver": 1, "tumor": 2}, modality="CT")},
                            cases=ct_cases)
    (ct / "dataset.json").write_text(json.dumps({
        "name": "ExtCT", "channel_names": {"0": "CT"}, "labels": {"background": 0, "liver": 1, "tumor": 2},
        "numTraining": len(ct_cases), "file_ending": ".nii.gz", "universal": ct_meta.to_dict()}))
    _mr_b_with_cavity(full, raw / f"Dataset{MRB_ID}_ExtMrB")
    shutil.rmtree(full)
    return old, ct


#: the new class the new mr_b data bring: a small box of background inside the head
CAVITY = (slice(9, 12), slice(11, 14), slice(4, 7))


def _mr_b_with_cavity(full: Path, out: Path) -> None:
    """A converted dataset of the old domain mr_b (its own label ids NETC 1, SNFH 2, ET 3) with a new class
    cavity (4): the fixture's mr_b images again, relabelled."""
    from merged_fixture import DOMAINS, SLOTS

    (out / "imagesTr").mkdir(parents=True)
    (out / "labelsTr").mkdir()
    slots = DOMAINS["mr_b"].slots
    cases = {}
    for i in range(3):
        case = f"mr_b_{i:03d}"
        for ch, slot in enumerate(slots):
            shutil.copy(full / "imagesTr" / f"{case}_{SLOTS.index(slot):04d}.nii.gz",
                        out / "imagesTr" / f"p{i}_{ch:04d}.nii.gz")
        lab = sitk.ReadImage(str(full / "labelsTr" / f"{case}.nii.gz"))
        arr = sitk.GetArrayFromImage(lab)
        new = np.select([arr == 2, arr == 3, arr == 4], [1, 2, 3], 0).astype(np.uint8)
        box = np.zeros_like(new, dtype=bool)
        box[CAVITY] = True
        new[box & (new == 0)] = 4
        img = sitk.GetImageFromArray(new)
        img.CopyInformation(lab)
        sitk.WriteImage(img, str(out / "labelsTr" / f"p{i}.nii.gz"))
        cases[f"p{i}"] = CaseInfo(domain="mr_b", slots=list(slots), source_id=f"p{i}")
    labels = {"NETC": 1, "SNFH": 2, "ET": 3, "cavity": 4}
    meta = UniversalMeta(slots=list(slots), domains={"mr_b": DomainInfo(
        source="synthetic MR B, second release", slots=list(slots), labels=labels,
        regions=dict(DOMAINS["mr_b"].regions))}, cases=cases)
    (out / "dataset.json").write_text(json.dumps({
        "name": "ExtMrB", "channel_names": {str(i): s for i, s in enumerate(slots)},
        "labels": {"background": 0, **labels}, "numTraining": len(cases), "file_ending": ".nii.gz",
        "universal": meta.to_dict()}))


@pytest.fixture(scope="module")
def extended(tmp_path_factory):
    from nnunet_universal.planners.fingerprint import SAMPLES_ENV
    from nnunet_universal.trainers.discovery import ext_trainer_value
    from nnunet_universal.trainers.schedule import ENV_VAR as SCHEDULE_ENV

    root = tmp_path_factory.mktemp("extend")
    dirs = {k: root / k for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")}
    for d in dirs.values():
        d.mkdir()
    old_raw, _ = _old_and_ct_datasets(dirs["nnUNet_raw"])
    base = {k: v for k, v in os.environ.items() if k != "nnUNet_extTrainer"}
    env = {**base, **{k: str(v) for k, v in dirs.items()}, "OMP_NUM_THREADS": "1", "nnUNet_def_n_proc": "1",
           "nnUNet_compile": "f", SAMPLES_ENV: "20000"}
    # seeded: three-step trainings decide routing assertions (one of four unseeded runs routed a case otherwise)
    train_env = {**env, "nnUNet_extTrainer": ext_trainer_value(""), "nnUNet_n_proc_DA": "0", SCHEDULE_ENV: SCHEDULE,
                 "NNUNET_UNIVERSAL_VAL_MIRRORING": "0", "NNUNET_UNIVERSAL_SEED": "0"}
    _run([_bin("nnunet-universal"), "plan", "-d", str(OLD_ID), "-c", "3d_fullres", "-np", "1"], env)
    plans_file = dirs["nnUNet_preprocessed"] / old_raw.name / f"{PLANS_NAME}.json"
    plans = json.loads(plans_file.read_text())
    plans["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]["features_per_stage"] = TINY_FEATURES
    plans_file.write_text(json.dumps(plans, indent=2))
    _run([_bin("nnUNetv2_train"), str(OLD_ID), "3d_fullres", "0", "-tr", "UniversalTrainer", "-p", PLANS_NAME,
          "-device", "cpu"], train_env)
    old_model = dirs["nnUNet_results"] / old_raw.name / f"UniversalTrainer__{PLANS_NAME}__3d_fullres"

    proc = _run([_bin("nnunet-universal"), "extend", "-m", str(old_model), str(CT_ID), str(MRB_ID), "-d",
                 str(NEW_ID), "-n", "ExtNew", "--holdout", "1", "-np", "1"], env)
    new_raw = dirs["nnUNet_raw"] / f"Dataset{NEW_ID}_ExtNew"
    pre = dirs["nnUNet_preprocessed"] / new_raw.name
    init = next(pre.glob("extension_init_*.pth"))
    assert f"-pretrained_weights {init}" in proc.stdout
    assert "-tr UniversalTrainer_ExtendNewParts -p" in proc.stdout  # the default: the best measured
    return {"root": root, "dirs": dirs, "env": env, "train_env": train_env, "old_raw": old_raw,
            "old_model": old_model, "new_raw": new_raw, "pre": pre, "init": init, "extend_stdout": proc.stdout}


def test_extended_dataset_keeps_old_ids_and_appends(extended):
    dj = json.loads((extended["new_raw"] / "dataset.json").read_text())
    assert dj["channel_names"] == {"0": "T1", "1": "T1c", "2": "T2", "3": "FLAIR", "4": "CT"}
    assert dj["labels"] == {"background": 0, "mr_a.ET": 1, "mr_b.NETC": 2, "mr_b.SNFH": 3, "mr_b.ET": 4,
                            "ct.liver": 5, "ct.tumor": 6, "mr_b.cavity": 7}
    uni = dj["universal"]
    assert list(uni["domains"]) == ["mr_a", "mr_b", "ct"]
    assert uni["domains"]["ct"]["labels"] == {"liver": 5, "tumor": 6}
    # new data of the old domain mr_b: old ids kept, the new class appended; its old cases annotate the old classes
    assert uni["domains"]["mr_b"]["labels"] == {"NETC": 2, "SNFH": 3, "ET": 4, "cavity": 7}
    partial = uni["provenance"]["partial_annotation"]
    assert partial == {"mr_b": {"classes": ["NETC", "SNFH", "ET"], "cases": ["mr_b_000", "mr_b_001", "mr_b_002"]}}
    ext = sorted(c for c, i in uni["cases"].items() if i["domain"] == "mr_b" and c.startswith("mr_b_ext_"))
    assert len(ext) == 3
    train = next(c for c in ext if uni["cases"][c]["split"] == "train")
    lab = sitk.GetArrayFromImage(sitk.ReadImage(str(extended["new_raw"] / "labelsTr" / f"{train}.nii.gz")))
    assert set(np.unique(lab[CAVITY]).tolist()) <= {2, 3, 4, 7} and (lab == 7).any()
    splits = json.loads((extended["new_raw"] / "splits_final.json").read_text())
    assert len(splits) == 1 and {"mr_a_000", "mr_b_000"} <= set(splits[0]["val"])
    ct_train = [c for c, i in uni["cases"].items() if i["domain"] == "ct" and i["split"] == "train"]
    ct_test = [c for c, i in uni["cases"].items() if i["domain"] == "ct" and i["split"] == "test"]
    assert len(ct_train) == 2 and len(ct_test) == 1
    assert any(c in splits[0]["train"] for c in ct_train)  # the new domain trains in fold 0
    # old cases: images are links of the old files, the new CT slot zero-filled; labels unchanged
    old_img = extended["old_raw"] / "imagesTr" / "mr_b_001_0002.nii.gz"
    new_img = extended["new_raw"] / "imagesTr" / "mr_b_001_0002.nii.gz"
    assert os.path.samefile(old_img, new_img) or old_img.read_bytes() == new_img.read_bytes()
    ct_slot = sitk.GetArrayFromImage(sitk.ReadImage(str(extended["new_raw"] / "imagesTr" / "mr_b_001_0004.nii.gz")))
    assert not ct_slot.any()
    # plans: old plans transferred, new slot planned from its data
    old_plans = json.loads((extended["old_model"] / "plans.json").read_text())
    plans = json.loads((extended["pre"] / f"{PLANS_NAME}.json").read_text())
    oc, nc = old_plans["configurations"]["3d_fullres"], plans["configurations"]["3d_fullres"]
    assert nc["patch_size"] == oc["patch_size"] and nc["spacing"] == oc["spacing"]
    assert nc["architecture"] == oc["architecture"]
    assert nc["normalization_schemes"] == [*oc["normalization_schemes"], "CTNormalization"]
    assert plans["universal"]["slots"] == ["T1", "T1c", "T2", "FLAIR", "CT"]
    assert plans["universal"]["modules"] == old_plans["universal"]["modules"]
    assert plans["dataset_name"] == extended["new_raw"].name


def _load_case(folder: Path, key: str) -> np.ndarray:
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

    data, *_ = infer_dataset_class(str(folder))(str(folder)).load_case(key)
    return np.asarray(data)


def _patch(x: np.ndarray, patch: list[int]) -> torch.Tensor:
    """(C, *shape) -> (1, C, *patch): the case's first patch, zero-padded where the case is smaller."""
    sl = tuple(slice(0, min(p, s)) for p, s in zip(patch, x.shape[1:], strict=True))
    out = torch.zeros(1, x.shape[0], *patch)
    out[(0, slice(None), *sl)] = torch.from_numpy(np.ascontiguousarray(x[(slice(None), *sl)])).float()
    return out


def _nets(extended):
    from nnunetv2.run.load_pretrained_weights import load_pretrained_weights
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnunet_universal.inference.checkpoints import load_checkpoint
    from nnunet_universal.trainers.universal_trainer import UniversalTrainer

    def build(plans, dj):
        pm = PlansManager(plans)
        return UniversalTrainer.build_network_architecture(
            pm, pm.get_configuration("3d_fullres"), len(dj["channel_names"]),
            pm.get_label_manager(dj).num_segmentation_heads, False)

    old_plans = json.loads((extended["old_model"] / "plans.json").read_text())
    old_dj = json.loads((extended["old_model"] / "dataset.json").read_text())
    old = build(old_plans, old_dj)
    old.load_state_dict(load_checkpoint(extended["old_model"] / "fold_0" / "checkpoint_final.pth")["network_weights"])
    new = build(json.loads((extended["pre"] / f"{PLANS_NAME}.json").read_text()),
                json.loads((extended["pre"] / "dataset.json").read_text()))
    load_pretrained_weights(new, str(extended["init"]))  # nnU-Net 2.8.1's own loader and shape rules
    return old.eval(), new.eval(), old_plans["configurations"]["3d_fullres"]["patch_size"]


def test_extend_holds_out_the_cases_merge_would(extended):
    """The new data's test cases (``--holdout``) are the ones ``nnunet-universal merge --holdout`` picks from the
    same converted datasets, so an extended model and a joint model merged from scratch are scored on the same
    scans."""
    _run([_bin("nnunet-universal"), "merge", str(CT_ID), str(MRB_ID), "-d", str(HOLDOUT_ID), "-n", "ExtHoldoutCheck",
          "--holdout", "1", "-j", "1"], extended["env"])
    merged_dir = extended["dirs"]["nnUNet_raw"] / f"Dataset{HOLDOUT_ID}_ExtHoldoutCheck"
    merged = json.loads((merged_dir / "dataset.json").read_text())
    ext = json.loads((extended["new_raw"] / "dataset.json").read_text())["universal"]["cases"]

    def held(cases: dict, prefixes: tuple[str, ...]) -> set[str]:
        out = set()
        for c, i in cases.items():
            if i["split"] == "test" and c.startswith(prefixes):
                out.add(next(c.removeprefix(p) for p in prefixes if c.startswith(p)))
        return out

    for dom, prefixes in (("ct", ("ct_",)), ("mr_b", ("mr_b_ext_", "mr_b_"))):
        m = held({c: i for c, i in merged["universal"]["cases"].items() if i["domain"] == dom}, prefixes)
        e = held({c: i for c, i in ext.items() if i["domain"] == dom and c not in OLD_MR_B}, prefixes)
        assert m and m == e, (dom, m, e)


#: the old dataset's mr_b cases (all training cases of the old model)
OLD_MR_B = {"mr_b_000", "mr_b_001", "mr_b_002"}


def test_initial_checkpoint_predicts_like_the_old_model_on_old_domains(extended):
    old, new, patch = _nets(extended)
    cfg = "nnUNetUniversalPlans_3d_fullres"
    for case in ("mr_a_001", "mr_b_002"):
        x_old = _load_case(extended["dirs"]["nnUNet_preprocessed"] / extended["old_raw"].name / cfg, case)
        x_new = _load_case(extended["pre"] / cfg, case)
        # the transferred plans preprocess the old channels exactly as before; the new CT slot is constant
        np.testing.assert_allclose(x_new[:4], x_old, atol=1e-6)
        assert np.ptp(x_new[4]) == 0
        xo, xn = _patch(x_old, patch), _patch(x_new, patch)
        # the case's slots, as training and 'nnunet-universal predict' give them (derived per tile, the zero padding
        # of a case smaller than the patch would make the constant CT slot look present)
        slots = json.loads((extended["new_raw"] / "dataset.json").read_text())["universal"]["cases"][case]["slots"]
        ao = torch.tensor([[s in slots for s in OLD_SLOTS]])
        an = torch.tensor([[s in slots for s in [*OLD_SLOTS, "CT"]]])
        with torch.no_grad():
            a, b = old(xo, availability=ao), new(xn, availability=an)  # default: dataset-free, hard routing
            assert b.shape[1] == a.shape[1] + 3  # ct.liver, ct.tumor, mr_b.cavity
            torch.testing.assert_close(b[:, :a.shape[1]], a, atol=1e-4, rtol=1e-5)
            for d in (0, 1):  # oracle: each old domain's head
                a = old(xo, domain=torch.tensor([d]), availability=ao)
                b = new(xn, domain=torch.tensor([d]), availability=an)
                torch.testing.assert_close(b[:, :a.shape[1]], a, atol=1e-4, rtol=1e-5)
            ro = old.routing_weights(old.embed(xo, ao))
            rn = new.routing_weights(new.embed(xn, an))
            assert int(rn.argmax()) == int(ro.argmax())
            torch.testing.assert_close(rn[:, :2], ro, atol=1e-4, rtol=0)  # the new domain starts below e^-10
            for net in (old, new):
                net.options = dataclasses.replace(net.options, routing="soft")
            a, b = old(xo, availability=ao), new(xn, availability=an)
            torch.testing.assert_close(b[:, :a.shape[1]].exp(), a.exp(), atol=1e-4, rtol=0)
            for net in (old, new):
                net.options = dataclasses.replace(net.options, routing="hard")


def test_train_extension_with_pretrained_weights_and_predict_all_domains(extended):
    proc = _run([_bin("nnUNetv2_train"), str(NEW_ID), "3d_fullres", "0", "-tr", "UniversalTrainer", "-p", PLANS_NAME,
                 "-device", "cpu", "-pretrained_weights", str(extended["init"])], extended["train_env"])
    assert "Loading pretrained weights" in proc.stdout
    model = (extended["dirs"]["nnUNet_results"] / extended["new_raw"].name
             / f"UniversalTrainer__{PLANS_NAME}__3d_fullres")
    assert (model / "fold_0" / "checkpoint_final.pth").is_file()
    raw = extended["new_raw"]
    uni = json.loads((raw / "dataset.json").read_text())["universal"]
    inputs = extended["root"] / "ext_inputs"
    inputs.mkdir()
    cases = {"mr_a_001": "mr_a", "mr_b_002": "mr_b",
             next(c for c, i in uni["cases"].items() if i["domain"] == "ct" and i["split"] == "test"): "ct"}
    for case in cases:
        folder = "imagesTr" if uni["cases"][case]["split"] == "train" else "imagesTs"
        for ch, slot in enumerate(uni["slots"]):
            if slot in uni["cases"][case]["slots"]:  # only the case's own slots, by channel number
                shutil.copy(raw / folder / f"{case}_{ch:04d}.nii.gz", inputs / f"{case}_{ch:04d}.nii.gz")
    out = extended["root"] / "ext_pred"
    _run([_bin("nnunet-universal"), "predict", "-m", str(model), "-i", str(inputs), "-o", str(out), "-device", "cpu",
          "--disable-tta"], extended["env"])
    for case in cases:
        pred = sitk.GetArrayFromImage(sitk.ReadImage(str(out / f"{case}.nii.gz")))
        assert set(np.unique(pred).tolist()) <= set(range(8))
        rec = json.loads((out / f"{case}.routing.json").read_text())
        assert list(rec["routing"]) == ["mr_a", "mr_b", "ct"]
        assert rec["slots"] == uni["cases"][case]["slots"]


# ---- extension trainers ------------------------------------------------------------------------------------

#: one old case per old domain
OLD_CASES = {"mr_a_001": "mr_a", "mr_b_002": "mr_b"}


def _case_inputs(raw: Path, cases: dict[str, str], inputs: Path) -> Path:
    """imagesTr files of ``cases`` of raw dataset ``raw`` in its channel numbering (each case's own slots only)."""
    uni = json.loads((raw / "dataset.json").read_text())["universal"]
    if not inputs.is_dir():
        inputs.mkdir()
        for case in cases:
            for ch, slot in enumerate(uni["slots"]):
                if slot in uni["cases"][case]["slots"]:
                    shutil.copy(raw / "imagesTr" / f"{case}_{ch:04d}.nii.gz", inputs / f"{case}_{ch:04d}.nii.gz")
    return inputs


def _old_domain_inputs(extended, root: Path) -> tuple[Path, dict[str, str]]:
    """The old cases in the extended dataset's channel numbering."""
    return _case_inputs(extended["new_raw"], OLD_CASES, root / "old_domain_inputs"), OLD_CASES


def _new_domain_test_inputs(extended, root: Path) -> Path:
    """The extended dataset's held-out ct case (imagesTs, its CT channel only)."""
    raw = extended["new_raw"]
    uni = json.loads((raw / "dataset.json").read_text())["universal"]
    inputs = root / "new_domain_inputs"
    if not inputs.is_dir():
        inputs.mkdir()
        case = next(c for c, i in uni["cases"].items() if i["domain"] == "ct" and i["split"] == "test")
        ch = uni["slots"].index("CT")
        shutil.copy(raw / "imagesTs" / f"{case}_{ch:04d}.nii.gz", inputs / f"{case}_{ch:04d}.nii.gz")
    return inputs


def _old_model_inputs(extended, root: Path, cases: dict[str, str]) -> Path:
    """The same cases in the old model's channel numbering (4 slots)."""
    return _case_inputs(extended["old_raw"], cases, root / "old_model_inputs")


def test_new_parts_trainer_freezes_the_old_model_and_defaults_to_a_quarter_schedule(extended, monkeypatch):
    """In process: the extension trainer starts from extend's checkpoint by itself, trains 25 % of nnU-Net's epochs
    and, in new-parts mode, only the new slots' columns, new head channels and new gate rows."""
    from nnunet_universal.inference.checkpoints import load_checkpoint
    from nnunet_universal.trainers.extension_trainer import UniversalTrainer_ExtendNewParts
    from nnunet_universal.trainers.schedule import ENV_VAR

    monkeypatch.delenv(ENV_VAR, raising=False)
    for k, v in extended["dirs"].items():  # nnU-Net 2.8.1 reads its folders from the environment on every use
        monkeypatch.setenv(k, str(v if k != "nnUNet_results" else extended["root"] / "inproc_results"))
    plans = json.loads((extended["pre"] / f"{PLANS_NAME}.json").read_text())
    plans["continue_training"] = False
    dj = json.loads((extended["pre"] / "dataset.json").read_text())
    tr = UniversalTrainer_ExtendNewParts(plans=plans, configuration="3d_fullres", fold=0, dataset_json=dj,
                                         device=torch.device("cpu"))
    tr.initialize()
    assert tr.num_epochs == 250  # a quarter of nnU-Net's 1000
    init = load_checkpoint(extended["init"])["network_weights"]
    net = tr.network
    for k, v in net.state_dict().items():
        torch.testing.assert_close(v, init[k], rtol=0, atol=0)  # started from extend's checkpoint
    trained = {n for n, p in net.named_parameters() if p.requires_grad}
    assert {n.rsplit(".", 2)[0] for n in trained if n.startswith("heads.")} == {"heads.heads"}
    assert {"router.gate.weight", "router.gate.bias"} <= trained and "router.log_scale" not in trained
    assert len([n for n in trained if not n.startswith(("heads.", "router."))]) == 1  # the first convolution
    # one step: frozen entries unchanged, the new slot's column and the new domain's gate row move
    before = {k: v.clone() for k, v in net.state_dict().items()}
    tr.on_train_start()
    tr.on_epoch_start()
    tr.on_train_epoch_start()
    for _ in range(2):
        tr.train_step(next(tr.dataloader_train))
    after = net.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed, "nothing trained"
    ct = plans["universal"]["slots"].index("CT")
    n_slots = len(plans["universal"]["slots"])
    first = next(k for k in after if k.endswith("conv.weight") and after[k].shape[1] == n_slots)
    old_cols = [i for i in range(after[first].shape[1]) if i != ct]
    torch.testing.assert_close(after[first][:, old_cols], before[first][:, old_cols], rtol=0, atol=0)
    torch.testing.assert_close(after["router.gate.weight"][:2, :-5], before["router.gate.weight"][:2, :-5],
                               rtol=0, atol=0)
    torch.testing.assert_close(after["router.prototypes"][:2], before["router.prototypes"][:2], rtol=0, atol=0)
    assert all(k.startswith(("heads.", "router.", "encoder.stages.0.0.convs.0")) or "decoder.encoder" in k
               for k in changed), sorted(changed)
    # the gate loss leaves out a new-domain sample whose new slot (CT) was hidden, as the new-slot prior wants
    ct_domain = tr.domain_names.index("ct")
    tr._step_availability = torch.ones(3, n_slots, dtype=torch.bool)
    tr._step_availability[0, ct] = False
    assert tr._gate_targets(torch.tensor([ct_domain, ct_domain, 0])).tolist() == [-100, ct_domain, 0]
    tr.on_train_end()


def test_new_parts_extension_predicts_old_domains_as_before(extended):
    """``nnUNetv2_train … -tr UniversalTrainer_ExtendNewParts`` (no -pretrained_weights: the trainer starts from
    extend's checkpoint): the new domain's gate row is calibrated on its first samples, so its held-out scan is
    routed to it after three steps (extend starts the row offset + s nats down, about 20 with the fixture's
    scale near its initial 10: without the calibration it never was);
    mr_a's predictions are exactly the old model's; every old-domain scan is routed to the domain the old model
    chose; evaluate runs on the extended model's predictions."""
    proc = _run([_bin("nnUNetv2_train"), str(NEW_ID), "3d_fullres", "0", "-tr", "UniversalTrainer_ExtendNewParts",
                 "-p", PLANS_NAME, "-device", "cpu"], extended["train_env"])
    model = (extended["dirs"]["nnUNet_results"] / extended["new_raw"].name
             / f"UniversalTrainer_ExtendNewParts__{PLANS_NAME}__3d_fullres")
    log = next((model / "fold_0").glob("training_log_*.txt")).read_text()
    assert "initial weights extension_init_" in log and "trainable=new" in log, proc.stdout[-2000:]
    assert "gate row of new domain ct: bias" in log and "nats when its new slot(s) are present" in log, log[-3000:]
    assert "(separable by the bias alone; new-slot prior" in log, log[-3000:]  # phi's normalized availability
    root = extended["root"]
    out_ct = root / "pred_new_parts_ct"
    _run([_bin("nnunet-universal"), "predict", "-m", str(model), "-i", str(_new_domain_test_inputs(extended, root)),
          "-o", str(out_ct), "-device", "cpu", "--disable-tta"], extended["env"])
    rec = json.loads(next(out_ct.glob("*.routing.json")).read_text())
    assert rec["inferred_domain"] == "ct", rec
    assert rec["extension"]["mode"] == "with-old-data" and rec["extension"]["new_domains"] == ["ct"]
    inputs, cases = _old_domain_inputs(extended, root)
    old_inputs = _old_model_inputs(extended, root, cases)
    out_new, out_old = root / "pred_new_parts", root / "pred_old_model"
    for m, i, o in ((model, inputs, out_new), (extended["old_model"], old_inputs, out_old)):
        _run([_bin("nnunet-universal"), "predict", "-m", str(m), "-i", str(i), "-o", str(o), "-device", "cpu",
              "--disable-tta"], extended["env"])
        _run([_bin("nnunet-universal"), "predict", "-m", str(m), "-i", str(i), "-o", str(o) + "_oracle",
              "-device", "cpu", "--disable-tta", "--domain", "mr_a"], extended["env"])
    for case in cases:
        new_rec = json.loads((out_new / f"{case}.routing.json").read_text())
        old_rec = json.loads((out_old / f"{case}.routing.json").read_text())
        assert new_rec["inferred_domain"] == old_rec["inferred_domain"]
        a = sitk.GetArrayFromImage(sitk.ReadImage(str(out_new) + f"_oracle/{case}.nii.gz"))
        b = sitk.GetArrayFromImage(sitk.ReadImage(str(out_old) + f"_oracle/{case}.nii.gz"))
        np.testing.assert_array_equal(a, b)  # mr_a's head and everything under it are frozen
    gt = root / "gt_old_domains"
    gt.mkdir(exist_ok=True)
    for case in cases:
        shutil.copy(extended["new_raw"] / "labelsTr" / f"{case}.nii.gz", gt / f"{case}.nii.gz")
    _run([_bin("nnunet-universal"), "evaluate", str(out_new), "-d", str(NEW_ID), "--gt", str(gt), "-o",
          str(root / "eval_new_parts")], extended["env"])
    metrics = json.loads((root / "eval_new_parts" / "metrics.json").read_text())
    assert set(metrics["domains"]) == {"mr_a", "mr_b"}


def test_no_old_data_extension(extended):
    """``extend --no-old-data``: only the new data (the old raw dataset is not read), the mode recorded in the
    dataset, plans and model. The default ``UniversalTrainer_ExtendNoOldData`` trains only the new parts with the
    new-slot prior on the gate: every old-domain scan keeps the old model's domain, the new domain's scan is routed
    to it; ``UniversalTrainer_ExtendNoOldDataAll`` distils the old heads; predict runs on every domain."""
    env = extended["env"]
    old_raw = extended["old_raw"]
    hidden = old_raw.with_name(old_raw.name + "_away")
    old_raw.rename(hidden)  # the old data are not available
    try:
        proc = _run([_bin("nnunet-universal"), "extend", "-m", str(extended["old_model"]), str(CT_ID), "-d",
                     str(NOOLD_ID), "-n", "ExtNoOld", "--holdout", "1", "-np", "1", "--no-old-data"], env)
    finally:
        hidden.rename(old_raw)
    assert "NO-OLD-DATA" in proc.stdout and "-tr UniversalTrainer_ExtendNoOldData " in proc.stdout
    assert "-tr UniversalTrainer_ExtendNoOldDataAll" in proc.stdout and "WARNING" not in proc.stdout
    raw = extended["dirs"]["nnUNet_raw"] / f"Dataset{NOOLD_ID}_ExtNoOld"
    dj = json.loads((raw / "dataset.json").read_text())
    uni = dj["universal"]
    assert list(uni["domains"]) == ["mr_a", "mr_b", "ct"] and uni["slots"] == [*OLD_SLOTS, "CT"]
    assert {i["domain"] for i in uni["cases"].values()} == {"ct"}
    assert uni["provenance"]["mode"].startswith("no-old-data")
    pre = extended["dirs"]["nnUNet_preprocessed"] / raw.name
    plans = json.loads((pre / f"{PLANS_NAME}.json").read_text())
    old_plans = json.loads((extended["old_model"] / "plans.json").read_text())
    assert plans["universal"]["extension"]["mode"] == "no-old-data"
    oc, nc = old_plans["configurations"]["3d_fullres"], plans["configurations"]["3d_fullres"]
    assert nc["normalization_schemes"] == [*oc["normalization_schemes"], "CTNormalization"]
    assert plans["foreground_intensity_properties_per_channel"]["0"] == \
        old_plans["foreground_intensity_properties_per_channel"]["0"]
    root = extended["root"]
    inputs, cases = _old_domain_inputs(extended, root)
    ct_case = next(c for c, i in uni["cases"].items() if i["split"] == "test")
    ct_slot = uni["slots"].index("CT")
    ct_file = root / "noold_ct_0004.nii.gz"
    shutil.copy(raw / "imagesTs" / f"{ct_case}_{ct_slot:04d}.nii.gz", ct_file)
    out_old = root / "pred_noold_old_model"
    _run([_bin("nnunet-universal"), "predict", "-m", str(extended["old_model"]), "-i",
          str(_old_model_inputs(extended, root, cases)), "-o", str(out_old), "-device", "cpu", "--disable-tta"], env)
    prior = "nats when its new slot(s) are present"
    for trainer, log_says in (("UniversalTrainer_ExtendNoOldData", ["trainable=new", prior]),
                              ("UniversalTrainer_ExtendNoOldDataAll", ["no-old-data mode", "soft targets", prior])):
        _run([_bin("nnUNetv2_train"), str(NOOLD_ID), "3d_fullres", "0", "-tr", trainer, "-p", PLANS_NAME,
              "-device", "cpu"], extended["train_env"])
        model = extended["dirs"]["nnUNet_results"] / raw.name / f"{trainer}__{PLANS_NAME}__3d_fullres"
        log = next((model / "fold_0").glob("training_log_*.txt")).read_text()
        assert all(s in log for s in log_says), (trainer, log)
        assert json.loads((model / "plans.json").read_text())["universal"]["extension"]["mode"] == "no-old-data"
        out = root / f"pred_{trainer}"
        _run([_bin("nnunet-universal"), "predict", "-m", str(model), "-i", str(inputs), "-o", str(out), "-device",
              "cpu", "--disable-tta"], env)
        _run([_bin("nnunet-universal"), "predict", "-m", str(model), "--image", f"CT={ct_file}", "--case-id",
              "ct_case", "-o", str(out), "-device", "cpu", "--disable-tta"], env)
        for case in [*cases, "ct_case"]:
            rec = json.loads((out / f"{case}.routing.json").read_text())
            assert list(rec["routing"]) == ["mr_a", "mr_b", "ct"]
            assert rec["extension"] == {"mode": "no-old-data", "from_dataset": extended["old_raw"].name,
                                        "new_domains": ["ct"]}
            expect = "ct" if case == "ct_case" else \
                json.loads((out_old / f"{case}.routing.json").read_text())["inferred_domain"]
            assert rec["inferred_domain"] == expect, (trainer, case, rec)


def test_no_old_data_extension_warns_for_a_new_domain_without_a_new_sequence(extended):
    """``extend --no-old-data`` with a new domain that has only the old model's sequences (mr_b's data under a new
    name): there is no new-slot prior for it, so its routing against old scans would rest on the old prototypes
    alone; extend says so in a WARNING naming the domain and what to do."""
    raw = extended["dirs"]["nnUNet_raw"]
    src, dst = raw / f"Dataset{MRB_ID}_ExtMrB", raw / f"Dataset{MRC_ID}_ExtMrC"
    shutil.copytree(src, dst)
    dj = json.loads((dst / "dataset.json").read_text())
    uni = dj["universal"]
    uni["domains"] = {"mr_c": uni["domains"]["mr_b"]}
    for info in uni["cases"].values():
        info["domain"] = "mr_c"
    dj["name"] = "ExtMrC"
    (dst / "dataset.json").write_text(json.dumps(dj))
    proc = _run([_bin("nnunet-universal"), "extend", "-m", str(extended["old_model"]), str(MRC_ID), "-d",
                 str(NOSLOT_ID), "-n", "ExtNoSlot", "--holdout", "1", "-np", "1", "--no-old-data"], extended["env"])
    assert "NO-OLD-DATA" in proc.stdout
    assert "WARNING: new domain mr_c brings no sequence the old model lacks" in proc.stdout, proc.stdout[-2000:]
    assert "predict old-domain scans with --domain" in proc.stdout
