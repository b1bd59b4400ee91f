"""``nnunet-universal merge``: union labels and slots, zero-filled channels, hold-out, splits, provenance,
validation, an interrupted merge that resumes to the same result, and nnU-Net's own integrity check."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from test_conversion import make_synth_trees, read, run, tree_digest

from nnunet_universal.cli import main
from nnunet_universal.dataset_conversion import merge as merge_module
from nnunet_universal.dataset_conversion.common import ConversionError
from nnunet_universal.dataset_conversion.splits import choose_holdout, fold_notes, make_splits
from nnunet_universal.dataset_conversion.union import build_label_union
from nnunet_universal.metadata import DomainInfo, UniversalMeta, load_universal

CONVERTED = {501: ("brats-mets", "brats-mets"), 502: ("ucsf-bmsr", "ucsf-bmsr"),
             503: ("brainmetshare", "brainmetshare"), 504: ("lits", "lits"), 505: ("msd", "msd-braintumour")}
IDENTICAL = "ucsf_bmsr.ET=brainmetshare.ET"
EXPECTED_LABELS = {"background": 0, "brats_mets.NETC": 1, "brats_mets.SNFH": 2, "brats_mets.ET": 3, "ucsf_bmsr.ET": 4,
                   "lits.liver": 5, "lits.tumor": 6, "msd_braintumour.edema": 7,
                   "msd_braintumour.non-enhancing tumor": 8, "msd_braintumour.enhancing tumour": 9}


@pytest.fixture(scope="module")
def converted_raw(tmp_path_factory) -> Path:
    """$nnUNet_raw with the five synthetic sources converted (ids 501-505); shared by this module's tests."""
    trees = make_synth_trees(tmp_path_factory.getbasetemp() / "synth_native")
    raw = tmp_path_factory.mktemp("merge_raw")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("nnUNet_raw", str(raw))
        for did, (cli_source, synth_source) in CONVERTED.items():
            assert main(["convert", cli_source, str(trees[synth_source]), "-d", str(did), "-j", "1"]) == 0
    return raw


@pytest.fixture
def raw(converted_raw, monkeypatch) -> Path:
    monkeypatch.setenv("nnUNet_raw", str(converted_raw))
    return converted_raw


def _inputs_digest(raw: Path) -> dict[str, str]:
    return {d.name: json.dumps(tree_digest(d)) for d in sorted(raw.glob("Dataset50*"))}


def _dataset(raw: Path, did: int) -> Path:
    return next(raw.glob(f"Dataset{did}_*"))


def test_merge_full(raw, capsys):
    before = _inputs_digest(raw)
    rc, err = run(capsys, "merge", "-d", 600, "-n", "Universal", *CONVERTED, "--identical", IDENTICAL,
                  "--holdout", 1, "-j", 2)
    assert rc == 0, err
    assert _inputs_digest(raw) == before  # converted datasets untouched
    folder = raw / "Dataset600_Universal"
    dj = json.loads((folder / "dataset.json").read_text())
    meta = load_universal(dj, where=str(folder))
    assert dj["labels"] == EXPECTED_LABELS
    assert meta.slots == ["T1", "T1c", "T1c_GRE", "T2", "FLAIR", "SUB", "CT"]
    assert dj["channel_names"] == {str(i): s for i, s in enumerate(meta.slots)}
    assert meta.domains["brainmetshare"].labels == {"ET": 4} == meta.domains["ucsf_bmsr"].labels
    assert meta.domains["brats_mets"].regions["TC"] == ["NETC", "ET"] and meta.domains["lits"].modality == "CT"

    train = [c for c, i in meta.cases.items() if i.split == "train"]
    test = [c for c, i in meta.cases.items() if i.split == "test"]
    assert dj["numTraining"] == len(train) == len(list((folder / "labelsTr").iterdir()))
    assert {meta.cases[c].domain for c in test} == set(meta.domains)  # >= 1 held-out case per domain
    prov = json.loads((folder / "provenance.json").read_text())["cases"]
    for cid, info in meta.cases.items():
        img_dir, lab_dir = ("imagesTr", "labelsTr") if info.split == "train" else ("imagesTs", "labelsTs")
        src_prov = prov[cid]
        src_folder = raw / src_prov["dataset"]
        src_meta = load_universal(src_folder / "dataset.json")
        assert info.slots == [s for s in meta.slots if s in src_meta.cases[src_prov["case"]].slots]
        lab_file = folder / lab_dir / f"{cid}.nii.gz"
        for i, slot in enumerate(meta.slots):
            f = folder / img_dir / f"{cid}_{i:04d}.nii.gz"
            if slot in info.slots:  # the converted file, byte for byte, in a copy of its own (never a hard link)
                src = src_folder / "imagesTr" / f"{src_prov['case']}_{src_meta.slots.index(slot):04d}.nii.gz"
                assert f.read_bytes() == src.read_bytes() and f.stat().st_ino != src.stat().st_ino
            else:  # zero-filled with the case's geometry
                z, lab = sitk.ReadImage(str(f)), sitk.ReadImage(str(lab_file))
                assert not sitk.GetArrayViewFromImage(z).any() and z.GetSize() == lab.GetSize()
                assert z.GetSpacing() == lab.GetSpacing() and z.GetOrigin() == lab.GetOrigin()
        src_lab = read(src_folder / "labelsTr" / f"{src_prov['case']}.nii.gz")
        lut = np.zeros(16, np.uint8)
        for k, v in src_prov["label_map"].items():
            lut[int(k)] = v
        assert np.array_equal(read(lab_file), lut[src_lab])
        for entry in src_prov["sources"].values():
            assert hashlib.sha256(Path(entry["file"]).read_bytes()).hexdigest() == entry["sha256"]

    splits = json.loads((folder / "splits_final.json").read_text())
    assert len(splits) == 5
    for fold in splits:
        assert sorted(fold["train"] + fold["val"]) == sorted(train) and not set(fold["train"]) & set(fold["val"])
        assert {meta.cases[c].domain for c in fold["train"]} == set(meta.domains)
    groups: dict[str, set[int]] = {}
    for f, fold in enumerate(splits):
        for c in fold["val"]:
            groups.setdefault(meta.cases[c].group, set()).add(f)
    assert all(len(v) == 1 for v in groups.values())  # a patient's exams share one fold


class _ThreadContext:
    """Stands in for ``multiprocessing.get_context("spawn")`` inside nnU-Net's integrity check: the same checks
    (``verify_labels``, ``check_cases``) run in threads, sparing two child interpreters that each import torch."""

    from multiprocessing.pool import ThreadPool as Pool


def test_merge_passes_nnunet_integrity_check(raw, capfd, monkeypatch):
    import nnunetv2.experiment_planning.verify_dataset_integrity as vdi

    monkeypatch.setattr(vdi.multiprocessing, "get_context", lambda method: _ThreadContext)
    assert run(capfd, "merge", "-d", 601, "-n", "Check", 501, 502, 504, "--holdout", 1, "-j", 1)[0] == 0
    vdi.verify_dataset_integrity(str(raw / "Dataset601_Check"), num_processes=1)  # raises on any error
    vdi.verify_dataset_integrity(str(_dataset(raw, 502)), num_processes=1)  # a converted one (zero-filled SUB)
    out = capfd.readouterr().out
    assert out.count("verify_dataset_integrity Done") == 2 and "Warning" not in out and "Error" not in out


def _merged_files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and ".nnunet_universal" not in p.parts}


def test_interrupted_merge_resumes_to_the_same_result(raw, monkeypatch, capsys):
    args = ["--identical", IDENTICAL, "--holdout", "1", "-j", "1", *map(str, CONVERTED)]
    assert run(capsys, "merge", "-d", 610, "-n", "Whole", *args)[0] == 0
    whole = _merged_files(raw / "Dataset610_Whole")

    real, done = merge_module.merge_case, []

    def crash_after_three(job):
        if len(done) == 3:
            raise RuntimeError("worker died")
        out = real(job)
        done.append(job.case_id)
        return out

    monkeypatch.setattr(merge_module, "merge_case", crash_after_three)
    rc, err = run(capsys, "merge", "-d", 611, "-n", "Resumed", *args)
    assert rc == 2 and "worker died" in err
    folder = raw / "Dataset611_Resumed"
    assert not (folder / "dataset.json").exists()
    assert sorted(m.stem for m in (folder / ".nnunet_universal" / "cases").glob("*.json")) == sorted(done)
    assert not list((folder / ".nnunet_universal" / "tmp").iterdir())

    redone: list[str] = []
    monkeypatch.setattr(merge_module, "merge_case", lambda job: redone.append(job.case_id) or real(job))
    rc, err = run(capsys, "merge", "-d", 611, "-n", "Resumed", *args)
    assert rc == 0, err
    n_cases = len(load_universal(folder / "dataset.json").cases)
    assert len(redone) == n_cases - 3 and not set(redone) & set(done)
    resumed = _merged_files(folder)
    assert resumed.keys() == whole.keys()
    for k in whole:
        if k == "dataset.json":
            a, b = json.loads(whole[k]), json.loads(resumed[k])
            assert a.pop("name") == "Whole" and b.pop("name") == "Resumed" and a == b
        else:
            assert resumed[k] == whole[k], k

    redone.clear()  # up to date: nothing to do
    assert run(capsys, "merge", "-d", 611, "-n", "Resumed", *args)[0] == 0 and redone == []


def test_merge_redoes_stale_cases_and_slots_option(raw, tmp_path, monkeypatch, capsys):
    src = tmp_path / "Dataset520_LiTSCopy"
    shutil.copytree(_dataset(raw, 504), src)
    shutil.move(src, raw / src.name)
    src = raw / src.name
    dj = json.loads((src / "dataset.json").read_text())
    dj["universal"]["domains"]["lits_copy"] = dj["universal"]["domains"].pop("lits")
    for c in dj["universal"]["cases"].values():
        c["domain"] = "lits_copy"
    (src / "dataset.json").write_text(json.dumps(dj))
    try:
        assert run(capsys, "merge", "-d", 620, "-n", "Slots", 501, 520, "--slots", "T1c", "CT", "MR", "-j", 1)[0] == 0
        meta = load_universal(raw / "Dataset620_Slots" / "dataset.json")
        assert meta.slots == ["T1c", "CT", "MR"] and meta.domains["brats_mets"].slots == ["T1c"]
        redone: list[str] = []
        real = merge_module.merge_case
        monkeypatch.setattr(merge_module, "merge_case", lambda job: redone.append(job.case_id) or real(job))
        lab = sorted((src / "labelsTr").iterdir())[0]
        img = sitk.ReadImage(str(lab))
        sitk.WriteImage(img, str(lab))  # rewritten: new mtime, so the merged case is stale
        assert run(capsys, "merge", "-d", 620, "-n", "Slots", 501, 520, "--slots", "T1c", "CT", "MR", "-j", 1)[0] == 0
        assert redone == [f"lits_copy_{lab.name[:-7]}"]
    finally:
        shutil.rmtree(src)


def test_merge_errors(raw, tmp_path, capsys):
    cases = [
        (["501", "502", "--identical", "ucsf_bmsr.XX=brats_mets.ET"], "unknown class 'ucsf_bmsr.XX'"),
        (["501", "--identical", "brats_mets.ET=brats_mets.NETC"], "joins two classes of one domain"),
        (["501", "501"], "domain 'brats_mets' occurs in"),
        (["599"], "dataset id 599 matches 0 folders"),
        (["501", "504", "--slots", "CT"], "leaves domain 'brats_mets'"),
        (["501", "--slots", "T1", "XYZ"], "unknown modality slots"),
        (["504", "--holdout", "3"], "would leave domain 'lits' without training cases"),
    ]
    for args, phrase in cases:
        rc, err = run(capsys, "merge", "-d", 630, "-n", "Bad", *args)
        assert rc == 2 and phrase in err, (args, err)
    assert not (raw / "Dataset630_Bad" / "dataset.json").exists()


def test_merge_rejects_bad_label_values_and_skip_bad_reports(raw, capsys):
    src = raw / "Dataset521_UCSFCopy"
    shutil.copytree(_dataset(raw, 502), src)
    try:
        lab = sorted((src / "labelsTr").iterdir())[0]
        img = sitk.ReadImage(str(lab))
        arr = sitk.GetArrayFromImage(img)
        arr.flat[0] = 7
        bad = sitk.GetImageFromArray(arr)
        bad.CopyInformation(img)
        sitk.WriteImage(bad, str(lab))
        (sorted((src / "imagesTr").glob("*_0000.nii.gz"))[-1]).unlink()  # a second bad case: missing image
        before = tree_digest(src)
        rc, err = run(capsys, "merge", "-d", 640, "-n", "Skip", 521, "-j", 1)
        assert rc == 2 and "ucsf_bmsr_" in err and "What to do" in err and "--skip-bad" in err
        rc, err = run(capsys, "merge", "-d", 640, "-n", "Skip", 521, "-j", 1, "--skip-bad")
        assert rc == 0, err
        report = json.loads((raw / "Dataset640_Skip" / "conversion_report.json").read_text())
        problems = " ".join(s["problem"] for s in report["skipped"])
        assert len(report["skipped"]) == 2 and "label values [7]" in problems and "missing file" in problems
        meta = load_universal(raw / "Dataset640_Skip" / "dataset.json")
        assert len(meta.cases) == len(load_universal(src / "dataset.json").cases) - 2
        assert tree_digest(src) == before
    finally:
        shutil.rmtree(src)


# ---- unit tests of the rules ---------------------------------------------------------------------------

def _meta(domains: dict[str, dict[str, int]]) -> UniversalMeta:
    return UniversalMeta(slots=["T1"], domains={d: DomainInfo(source=d, slots=["T1"], labels=lab)
                                                for d, lab in domains.items()})


def test_label_union_ids_and_identical_chains():
    metas = [_meta({"a": {"x": 1, "y": 2}}), _meta({"b": {"y": 1}}), _meta({"c": {"z": 1, "y": 2}})]
    u = build_label_union(metas, ["c.y=a.y", "b.y=c.y"])
    assert u.dataset_labels() == {"background": 0, "a.x": 1, "c.y": 2, "c.z": 3}
    assert u.luts == {"a": {0: 0, 1: 1, 2: 2}, "b": {0: 0, 1: 2}, "c": {0: 0, 1: 3, 2: 2}}
    assert build_label_union(metas, None).dataset_labels()["c.y"] == 5


def test_holdout_and_splits_keep_groups_and_domains():
    cases = {f"u_{p}{e}": ("u", f"p{p}") for p in range(4) for e in "AB"}
    cases |= {f"l_{i}": ("l", f"l{i}") for i in range(7)}
    held = choose_holdout(cases, 1)
    assert held == choose_holdout(dict(reversed(list(cases.items()))), 1)  # order-independent
    assert sum(c.startswith("l_") for c in held) == 1 and sum(c.startswith("u_") for c in held) == 2
    train = {c: v for c, v in cases.items() if c not in held}
    splits = make_splits(train)
    assert len(splits) == 5  # nnU-Net's five folds although u has only 3 training groups left
    u_folds = [f for f, fold in enumerate(splits) if any(train[c][0] == "u" for c in fold["val"])]
    assert len(u_folds) == 3  # u is validated in 3 folds, each fold still trains on u
    for fold in splits:
        assert {train[c][0] for c in fold["train"]} == {"u", "l"} and fold["val"]
        for p in range(4):
            in_val = {c for c in fold["val"] if c.startswith(f"u_{p}")}
            assert len(in_val) in (0, 2) or f"u_{p}A" in held
    notes = fold_notes(train, splits)
    assert len(notes) == 1 and "validate no case of a domain" in notes[0]
    assert all(f"fold {f}: u" in notes[0] for f in set(range(5)) - set(u_folds))
    assert make_splits({"a": ("d", "g")}) is None
    with pytest.raises(ConversionError, match="without training cases"):
        choose_holdout({"a": ("d", "g1"), "b": ("d", "g2")}, 2)


@pytest.mark.parametrize("n_domains", [1, 2, 3, 5, 8])
@pytest.mark.parametrize("groups", [1, 2, 3, 6])
def test_folds_five_whenever_possible_and_every_domain_trains_in_every_fold(n_domains, groups):
    """Every domain with >= 2 groups keeps a training group in every fold; k = min(5, groups to validate)."""
    cases = {f"d{d}_g{g}_{e}": (f"d{d}", f"g{g}") for d in range(n_domains) for g in range(groups + d % 2)
             for e in range(1 + g % 2)}
    splits = make_splits(cases)
    validatable = sum(groups + d % 2 for d in range(n_domains) if groups + d % 2 >= 2)
    if validatable == 0:
        assert splits is None and "fold 'all'" in fold_notes(cases, splits)[0]
        return
    assert len(splits) == min(5, validatable)
    for fold in splits:
        assert fold["val"] and {cases[c][0] for c in fold["train"]} == {f"d{d}" for d in range(n_domains)}
        assert sorted(fold["train"] + fold["val"]) == sorted(cases)
    assert sorted(c for fold in splits for c in fold["val"]) == sorted(
        c for c, (d, _) in cases.items() if sum(1 for g in {v[1] for v in cases.values() if v[0] == d}) >= 2)
    assert any(n.startswith(f"{len(splits)} folds, not nnU-Net's 5") for n in fold_notes(cases, splits)) == (
        len(splits) < 5)


def _merge_cli(raw: Path, *args) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).parent / "nnunet-universal"
    env = {**os.environ, "nnUNet_raw": str(raw)}
    return subprocess.run([str(exe), "merge", *map(str, args)], capture_output=True, text=True, env=env, timeout=300)


def test_cli_merge_writes_five_folds_and_says_which_fold_validates_what(raw):
    """The real command: 4 domains x 2 training cases -> nnU-Net's 5 folds, each training every domain, and the
    output names the folds that validate no case of a domain; 2 domains x 2 cases -> 4 folds, and it says why."""
    proc = _merge_cli(raw, "-d", 650, "-n", "FiveFolds", 501, 503, 504, 505, "--holdout", 1, "-j", 1)
    assert proc.returncode == 0, proc.stderr
    folder = raw / "Dataset650_FiveFolds"
    meta = load_universal(json.loads((folder / "dataset.json").read_text()))
    splits = json.loads((folder / "splits_final.json").read_text())
    assert len(splits) == 5
    for fold in splits:
        assert {meta.cases[c].domain for c in fold["train"]} == set(meta.domains) and fold["val"]
    out = proc.stdout + proc.stderr
    assert "validate no case of a domain" in out
    for f, fold in enumerate(splits):
        unvalidated = set(meta.domains) - {meta.cases[c].domain for c in fold["val"]}
        assert (f"fold {f}: " in out) == bool(unvalidated)

    proc = _merge_cli(raw, "-d", 651, "-n", "FourFolds", 501, 504, "--holdout", 1, "-j", 1)
    assert proc.returncode == 0, proc.stderr
    splits = json.loads((raw / "Dataset651_FourFolds" / "splits_final.json").read_text())
    assert len(splits) == 4
    assert "4 folds, not nnU-Net's 5: only 4 patient groups can be validated" in proc.stdout + proc.stderr
    assert "brats_mets 2, lits 2" in proc.stderr


def test_merge_checks_images_changed_since_conversion(tmp_path_factory, tmp_path, monkeypatch, capsys):
    """An image still as its converter wrote it is copied unread; one changed since (even with its mtime put back:
    the ctime moves) is read, fails its recorded checksum and is then integrity-checked: refused, naming the file."""
    trees = make_synth_trees(tmp_path_factory.getbasetemp() / "synth_native")
    monkeypatch.setenv("nnUNet_raw", str(tmp_path))
    assert main(["convert", "brats-mets", str(trees["brats-mets"]), "-d", "591", "-j", "1"]) == 0
    img = sorted((_dataset(tmp_path, 591) / "imagesTr").glob("*.nii.gz"))[0]
    rc, err = run(capsys, "merge", "-d", 592, "-n", "Ok", 591, "-j", 1)
    assert rc == 0, err
    assert (tmp_path / "Dataset592_Ok" / "imagesTr" / f"brats_mets_{img.name}").read_bytes() == img.read_bytes()

    data, st = bytearray(img.read_bytes()), img.stat()
    middle = len(data) // 2
    data[middle:middle + 16] = bytes(b ^ 0xFF for b in data[middle:middle + 16])  # same size, bytes flipped
    img.write_bytes(bytes(data))
    os.utime(img, ns=(st.st_atime_ns, st.st_mtime_ns))
    rc, err = run(capsys, "merge", "-d", 593, "-n", "Flipped", 591, "-j", 1)
    assert rc == 2 and str(img) in err and "truncated or corrupt" in err, err

    img.write_bytes(bytes(data[:middle]))  # cut off
    rc, err = run(capsys, "merge", "-d", 594, "-n", "Cut", 591, "-j", 1)
    assert rc == 2 and str(img) in err and "truncated or corrupt" in err, err
