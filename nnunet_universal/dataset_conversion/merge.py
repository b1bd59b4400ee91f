"""``nnunet-universal merge``: converted datasets -> one partial-label, mixed-modality nnU-Net raw dataset.

Layout: standard ``imagesTr``/``labelsTr`` (+ ``imagesTs``/``labelsTs`` with ``--holdout``), channels in the
canonical slot order (:func:`registry.order_slots`, ``channel_names`` = slot names, so ``CT`` gets nnU-Net's CT
normalization and MR slots z-score), union labels ``domain.class`` (:mod:`.union`), merged case ids
``{domain}_{case}``, ``splits_final.json`` (:mod:`.splits`), ``provenance.json`` (per case: source files, sha256,
what was done) and dataset.json with the ``universal`` block (written last).

Images are **copies** of the converted datasets' files (real files, not references through nnU-Net's ``dataset``
key, and no longer hard links): only real files give a self-contained standard folder (``nnUNetv2_predict -i
imagesTs``, the evaluation of ``labelsTs`` and every tool that lists ``imagesTr`` work unchanged) that survives the
source datasets being moved, reconverted or deleted, and a copy, unlike a hard link, cannot be changed by a later
write to the converted dataset's file or change it. Copying costs little: placing the 67 images of
``scripts/benchmark_conversion.py``'s set (133 MB) took 0.10 s by copying vs 0.8 ms by linking, against the
decompression every validating step needs. An image that is still the very file its converter wrote (size,
mtime, ctime and inode as recorded in the converter's case marker: any write or copy changes them) was validated
by the converter and has the sha256 it recorded: it is copied kernel-side without being read or decompressed.
Any other image is read once (its bytes give the sha256 and the copy), and unless that sha256 is the recorded one,
integrity-checked (gzip CRC, header data size) and its geometry compared with the label's. Labels are always
decompressed and checked, and rewritten in union ids (copied when the ids do not change); missing slots are
zero-filled NIfTI files with the label's header (the case's grid exactly).
Resume and atomicity work as in conversion (:mod:`.writer`): markers per case, dataset.json written last.
Re-merging into an existing merged dataset is a no-op or a resume when inputs and options are unchanged; a merge
that would renumber its classes/channels, or change a dataset that was already planned or trained, needs
``force`` (:func:`_guard_overwrite`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import SimpleITK as sitk

from nnunet_universal.atomic_io import atomic_write_json
from nnunet_universal.dataset_conversion.common import (
    FILE_ENDING,
    SKIP_HINT,
    ConversionError,
    Layout,
    check_case_id,
    dataset_folder,
    digest,
    sha256_file,
    stat_fingerprint,
)
from nnunet_universal.dataset_conversion.inputs import case_files, load_inputs, resolve_dataset
from nnunet_universal.dataset_conversion.runner import (
    Outcome,
    finish_case,
    is_complete,
    remove_orphans,
    run_jobs,
    write_report,
)
from nnunet_universal.dataset_conversion.spec import LabelTable
from nnunet_universal.dataset_conversion.splits import choose_holdout, fold_notes, make_splits
from nnunet_universal.dataset_conversion.union import build_label_union, merged_slots
from nnunet_universal.dataset_conversion.validation import check_geometry, normalize_label
from nnunet_universal.dataset_conversion.volume_read import read_bytes, read_file
from nnunet_universal.dataset_conversion.volume_write import (
    copy_if_unchanged,
    write_bytes,
    write_image,
    write_zeros,
)
from nnunet_universal.metadata import CaseInfo, DomainInfo, UniversalMeta
from nnunet_universal.nifti_integrity import CorruptImageError, is_nifti, verify_nifti_bytes

logger = logging.getLogger(__name__)
MERGE_VERSION = 2  # 2: images copied (were hard links), files integrity-checked
CHANNEL_ORDER_DOC = "canonical order of nnunet_universal.registry.SLOTS restricted to the merged slots"


@dataclass
class MergeJob:
    """One merged case (picklable): where its files come from and how labels map to union ids."""

    case_id: str
    split: str
    root: str
    slots: list[str]  # merged channels
    case_slots: list[str]  # channels holding real data in this case
    images: dict[str, str]  # slot -> source file
    label: str
    lut: dict[int, int]
    union_names: list[str]
    key: str
    origin: dict[str, str] = field(default_factory=dict)  # source dataset and case id (provenance)
    expected: dict[str, str] = field(default_factory=dict)  # input file -> sha256 its converter recorded
    state: dict[str, list[int]] = field(default_factory=dict)  # input file -> its state when written (file_state)

    def sources(self) -> dict[str, str]:
        """The input files this case is made of, keyed as in provenance.json (``image:SLOT``, ``label``)."""
        return {f"image:{s}": self.images[s] for s in self.case_slots} | {"label": self.label}

    def same_content_as_before(self, layout: Layout) -> bool:
        """Whether the case's previous marker records the same split, label map and source bytes (sha256):
        re-merging it then only re-links identical files (e.g. after a reconversion of unchanged inputs)."""
        try:
            prov = json.loads(layout.marker(self.case_id).read_text())["provenance"]
            old = {k: v["sha256"] for k, v in prov["sources"].items()}
            same = prov["split"] == self.split and prov["label_map"] == {str(k): v for k, v in self.lut.items()}
        except (OSError, ValueError, KeyError, TypeError):
            return False
        return same and old.keys() == self.sources().keys() and all(
            sha256_file(f) == old[k] for k, f in self.sources().items())


def _reader(path: str, case: str) -> sitk.ImageFileReader:
    r = sitk.ImageFileReader()
    r.SetFileName(path)
    try:
        r.ReadImageInformation()
    except RuntimeError:
        raise ConversionError("cannot be read as an image", case=case, file=path,
                              fix="reconvert the source dataset with 'nnunet-universal convert'") from None
    return r


def _reconvert(e: ConversionError, folder_hint: str) -> ConversionError:
    return ConversionError(e.problem, case=e.case, file=e.file, fix=f"reconvert the source dataset with "
                                                                    f"'nnunet-universal convert' ({folder_hint})")


def _read_checked(path: str, case: str, expected: str | None) -> tuple[bytes, str, bool]:
    """An input file's bytes and sha256, read once, and whether they are exactly the bytes its converter recorded
    (``expected``: the sha256 of the file it wrote after validating it). Others are integrity-checked here."""
    data = read_bytes(path, case)
    sha = hashlib.sha256(data).hexdigest()
    recorded = sha == expected
    if not recorded and is_nifti(path):
        try:
            verify_nifti_bytes(path, data, keep=False)
        except CorruptImageError as e:
            raise _reconvert(ConversionError(f"cannot be read: it is truncated or corrupt ({e.problem})", case=case,
                                             file=path), "or restore the file") from None
    return data, sha, recorded


def merge_case(job: MergeJob) -> Outcome:
    """Check one case's files (integrity, geometry, label ids), then copy/write its files and its marker.

    The label is always decoded and checked (integrity, ids). An image still in the state its converter recorded
    (``job.state``) is copied without being read; any other is read once and, unless its sha256 is the one its
    converter recorded (``job.expected``), integrity-checked. Images as recorded with a label as recorded lie on the
    case's reference grid by construction; otherwise their geometry is compared with the label's. Outputs are
    copies (never hard links: a later write to one dataset cannot change the other).
    """
    layout, cid = Layout(Path(job.root)), job.case_id
    lab_bytes = read_bytes(job.label, cid)
    lab_sha = hashlib.sha256(lab_bytes).hexdigest()
    lab_recorded = lab_sha == job.expected.get(job.label)
    try:  # labels are always decoded (they are small): integrity and ids checked whatever the record says
        label = read_file(job.label, cid, layout.tmp, lab_bytes, lab_sha)
    except ConversionError as e:
        raise _reconvert(e, "or restore the file") from None
    if len(label.volumes) != 1:
        raise ConversionError(f"is 4D with {len(label.volumes)} volumes, expected one 3D label map", case=cid,
                              file=job.label, fix="reconvert the source dataset with 'nnunet-universal convert'")
    seg = label.volumes[0]
    arr, unchanged = normalize_label(seg, LabelTable(classes=job.union_names, values=job.lut), cid, job.label,
                                     fix="the label file holds ids its dataset.json does not declare: reconvert "
                                         "that dataset with 'nnunet-universal convert'")
    img_dir, lab_dir = ("imagesTr", "labelsTr") if job.split == "train" else ("imagesTs", "labelsTs")
    outputs: dict[str, str] = {}
    out_sha: dict[str, str] = {}
    src_sha: dict[str, str] = {"label": lab_sha}
    for i, slot in enumerate(job.slots):
        rel = f"{img_dir}/{cid}_{i:04d}{FILE_ENDING}"
        final = layout.root / rel
        if slot not in job.case_slots:
            outputs[rel], out_sha[rel] = "zeros", write_zeros(seg, final, layout, like=label)
            continue
        path = job.images[slot]
        if path.endswith(FILE_ENDING):
            if path in job.expected and copy_if_unchanged(path, job.state.get(path), final, layout.tmp):
                sha, recorded = job.expected[path], True  # the very file its converter wrote and recorded
            else:
                data, sha, recorded = _read_checked(path, cid, job.expected.get(path))
                write_bytes(data, final, layout.tmp, sha)
            if not (recorded and lab_recorded):  # same converted case, both as validated: one grid by construction
                check_geometry(seg, job.label, _reader(path, cid), path, cid)
            outputs[rel], out_sha[rel] = "copy", sha
        else:  # another file format: re-encode as .nii.gz
            src = read_file(path, cid)
            check_geometry(seg, job.label, src.volumes[0], path, cid)
            sha = src.sha256
            outputs[rel], out_sha[rel] = "written", write_image(src.volumes[0].array, src.volumes[0], final,
                                                                 layout.tmp)
        src_sha[f"image:{slot}"] = sha
    rel = f"{lab_dir}/{cid}{FILE_ENDING}"
    if unchanged and job.label.endswith(FILE_ENDING):
        outputs[rel], out_sha[rel] = "copy", write_bytes(lab_bytes, layout.root / rel, layout.tmp, lab_sha)
    else:
        outputs[rel], out_sha[rel] = "remapped", write_image(arr, seg, layout.root / rel, layout.tmp, label=True,
                                                              header=label.header_for(arr))
    sources = job.sources()
    marker = {"key": job.key, "case": cid, "outputs": list(outputs),
              "provenance": {**job.origin, "split": job.split,
                             "sources": {k: {"file": v, "sha256": src_sha[k]} for k, v in sources.items()},
                             "outputs": outputs, "sha256": out_sha,
                             "label_map": {str(k): v for k, v in sorted(job.lut.items())}}}
    return finish_case(layout, cid, marker)


def recorded_outputs(folder: Path) -> tuple[dict[str, str], dict[str, list[int]]]:
    """What the converter that wrote ``folder`` recorded of each output file: its sha256, and its state right
    after it was written (:func:`volume_write.file_state`), from the case markers (else sha256 from provenance.json,
    else nothing)."""
    sha: dict[str, str] = {}
    state: dict[str, list[int]] = {}
    try:
        markers = [json.loads(m.read_text()) for m in sorted(Layout(folder).markers.glob("*.json"))]
        cases = [(m["provenance"], m.get("state") or {}) for m in markers]
        if not cases:
            cases = [(c, {}) for c in json.loads((folder / "provenance.json").read_text())["cases"].values()]
        for prov, st in cases:
            for rel, h in (prov.get("sha256") or {}).items():
                sha[str(folder / rel)] = h
                if rel in st:
                    state[str(folder / rel)] = st[rel]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}, {}
    return sha, state


def merge_datasets(dataset_id: int, name: str, datasets: list[str], identical: list[str] | None = None,
                   slots: list[str] | None = None, workers: int = 2, skip_bad: bool = False,
                   holdout: int = 0, force: bool = False) -> Path:
    """Merge converted datasets into ``$nnUNet_raw/Dataset{dataset_id:03d}_{name}``; return that folder.

    Args:
        datasets: ids (``"501"``) or names of converted datasets in $nnUNet_raw, in union-id order.
        identical: ``"a.cls=b.cls"`` declarations: those classes share one union id.
        slots: merged channel set (restricts or extends the union of the domains' slots; canonical order kept).
        workers: parallel worker processes (1 = in-process).
        skip_bad: skip invalid cases and write ``conversion_report.json``/``.md`` instead of stopping.
        holdout: cases per domain moved to imagesTs/labelsTs (see :mod:`.splits` for the rule).
        force: overwrite an existing merged dataset even if the merge renumbers its classes or channels, or changes
            a dataset that was already planned ($nnUNet_preprocessed) or trained ($nnUNet_results).
    """
    if not datasets:
        raise ConversionError("no dataset to merge", fix="pass converted dataset ids, e.g. 501 502")
    if int(holdout) < 0:
        raise ConversionError(f"--holdout must be 0 or more (cases per domain held out), got {holdout}",
                              fix="pass --holdout 0 (no test set) or a positive number")
    for ref in datasets:
        _check_input_json(resolve_dataset(str(ref)) / "dataset.json")
    inputs = load_inputs(datasets)
    root = dataset_folder(dataset_id, name)
    if any(folder.resolve() == root.resolve() for folder, _, _ in inputs):
        raise ConversionError(f"{root.name} is one of the inputs", fix="give the merged dataset another id/name")
    metas = [m for _, _, m in inputs]
    union = build_label_union(metas, identical)
    names = [union.names[i] for i in sorted(union.names)]
    chans = merged_slots(metas, slots)
    domains: dict[str, DomainInfo] = {}
    for meta in metas:
        for d, dom in meta.domains.items():
            dslots = [s for s in chans if s in dom.slots]
            if not dslots:
                raise ConversionError(f"--slots {chans} leaves domain {d!r} (slots {dom.slots}) without input",
                                      fix="keep at least one of its slots")
            domains[d] = DomainInfo(source=dom.source, slots=dslots, labels=dict(union.domain_labels.get(d, {})),
                                    regions=dict(dom.regions), lesion_wise=dom.lesion_wise, modality=dom.modality)

    layout = Layout(root)
    skipped: list[dict[str, str]] = []
    planned: dict[str, tuple[Path, dict[str, Any], UniversalMeta, str]] = {}
    for folder, dj, meta in inputs:
        for case, info in sorted(meta.cases.items()):
            mid = f"{info.domain}_{case}"
            try:
                check_case_id(mid, folder / "dataset.json")
                if mid in planned:
                    raise ConversionError(f"two input cases map to merged id {mid!r}", case=case, file=folder,
                                          fix="rename one of the cases and reconvert")
            except ConversionError as e:
                if not skip_bad:
                    raise ConversionError(e.problem, e.case, e.file, f"{e.fix}; {SKIP_HINT}") from None
                skipped.append(e.as_dict())
                continue
            planned[mid] = (folder, dj, meta, case)
    held = choose_holdout({m: (meta.cases[c].domain, meta.cases[c].group or c)
                           for m, (_, _, meta, c) in planned.items()}, holdout)
    options = {"datasets": [f.name for f, _, _ in inputs], "identical": list(identical or []),
               "slots": list(slots) if slots else None, "holdout": int(holdout), "skip_bad": bool(skip_bad)}

    jobs, done = [], {}
    recorded = {folder: recorded_outputs(folder) for folder, _, _ in inputs}
    for mid, (folder, dj, meta, case) in planned.items():
        info = meta.cases[case]
        images, label = case_files(folder, dj, meta, case)
        case_slots = [s for s in chans if s in info.slots]
        missing = [p for p in [*(images[s] for s in case_slots), label] if not Path(p).is_file()]
        if missing:
            e = ConversionError(f"missing file(s) {missing}", case=mid, file=missing[0],
                                fix=f"reconvert {folder.name} with 'nnunet-universal convert'")
            if not skip_bad:
                raise ConversionError(e.problem, e.case, e.file, f"{e.fix}; {SKIP_HINT}")
            skipped.append(e.as_dict())
            continue
        split = "test" if mid in held else "train"
        lut = union.luts[info.domain]
        used = {s: images[s] for s in case_slots}
        key = digest([MERGE_VERSION, chans, case_slots, sorted(lut.items()), names, split,
                      [[p, *stat_fingerprint(p)] for p in [*used.values(), label]]])
        marker = is_complete(layout, mid, key)
        if marker is not None:
            done[mid] = marker
            continue
        jobs.append(MergeJob(case_id=mid, split=split, root=str(root), slots=chans, case_slots=case_slots,
                             images=used, label=label, lut=lut, union_names=names, key=key,
                             origin={"dataset": folder.name, "case": case, "domain": info.domain},
                             expected={p: recorded[folder][0][p] for p in [*used.values(), label]
                                       if p in recorded[folder][0]},
                             state={p: recorded[folder][1][p] for p in used.values() if p in recorded[folder][1]}))
    _guard_overwrite(root, dataset_id, options, union.dataset_labels(), chans, layout, jobs,
                     set(done) | {j.case_id for j in jobs}, force)
    layout.prepare()  # nothing was written before this line
    for job in jobs:
        layout.marker(job.case_id).unlink(missing_ok=True)
    logger.info("%s: %d case(s) up to date, %d to merge", root.name, len(done), len(jobs))
    if jobs:
        (root / "dataset.json").unlink(missing_ok=True)
    for o in run_jobs(merge_case, jobs, workers, f"merge {root.name}", skip_bad):
        if o.error:
            skipped.append(o.error)
        else:
            done[o.case_id] = o.marker
    if not done:
        raise ConversionError("no valid case left to merge", fix=f"see {root}/conversion_report.md")
    return _finish(root, layout, inputs, planned, done, skipped, domains, chans, union, options)


def _check_input_json(path: Path) -> None:
    """Fail with the file's name (and the key, the case) on an input dataset.json merge cannot read."""
    fix = f"repair {path} or reconvert that dataset with 'nnunet-universal convert'"
    try:
        dj = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConversionError("no dataset.json: this is not a converted dataset", file=path,
                              fix="convert it first with 'nnunet-universal convert'") from None
    except json.JSONDecodeError as e:
        raise ConversionError(f"is not valid JSON ({e.msg}: line {e.lineno}, column {e.colno})",
                              file=path, fix=fix) from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConversionError(f"cannot be read ({e})", file=path, fix="check the file and its permissions") from None
    if not isinstance(dj, dict):
        raise ConversionError(f"holds a JSON {type(dj).__name__}, not an object", file=path, fix=fix)
    for key, kind in (("channel_names", dict), ("file_ending", str)):
        if key not in dj:
            raise ConversionError(f"has no {key!r} key", file=path, fix=fix)
        if not isinstance(dj[key], kind):
            raise ConversionError(f"{key!r} must be a JSON {'object' if kind is dict else 'string'}", file=path,
                                  fix=fix)
    if not all(str(k).isdigit() for k in dj["channel_names"]):
        raise ConversionError(f"'channel_names' keys must be channel numbers, got {list(dj['channel_names'])}",
                              file=path, fix=fix)
    entries = dj.get("dataset")
    if not isinstance(entries, dict):
        return
    for case, entry in entries.items():
        where = f"its 'dataset' entry of case {case!r}"
        if not isinstance(entry, dict):
            raise ConversionError(f"{where} is not an object", case=case, file=path, fix=fix)
        for key in ("images", "label"):
            if key not in entry:
                raise ConversionError(f"{where} has no {key!r} key", case=case, file=path,
                                      fix="add it ('images': one file per channel, 'label': the label file) or "
                                          "reconvert that dataset with 'nnunet-universal convert'")
        images = entry["images"]
        if not isinstance(images, list) or not all(isinstance(p, str) for p in images):
            raise ConversionError(f"{where}: 'images' must be a list of file paths", case=case, file=path, fix=fix)
        if len(images) != len(dj["channel_names"]):
            raise ConversionError(f"{where} lists {len(images)} image(s) for {len(dj['channel_names'])} channel(s)",
                                  case=case, file=path, fix=fix)
        if not isinstance(entry["label"], str):
            raise ConversionError(f"{where}: 'label' must be a file path", case=case, file=path, fix=fix)


def _planned_state(dataset_id: int) -> tuple[list[str], list[Path]]:
    """What nnU-Net already made of this dataset id: descriptions, and the folders that hold it."""
    found: list[str] = []
    folders: list[Path] = []
    tag = f"Dataset{int(dataset_id):03d}_*"
    for var in ("nnUNet_preprocessed", "nnUNet_results"):
        base = os.environ.get(var)
        if not base or not Path(base).is_dir():
            continue
        for folder in sorted(p for p in Path(base).glob(tag) if p.is_dir()):
            if var == "nnUNet_preprocessed":  # plans files, data folders, nnU-Net's copy of the split
                items = sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir() if p.is_dir() or (
                    p.suffix == ".json" and p.name not in ("dataset.json", "dataset_fingerprint.json")))
                what = "preprocessed data"
            else:
                items = sorted(str(p.relative_to(folder)) for p in folder.glob("*/fold_*") if p.is_dir())
                what = "trained models"
            if items:
                shown = ", ".join(items[:4]) + (f" and {len(items) - 4} more" if len(items) > 4 else "")
                found.append(f"{folder} holds {what} ({shown})")
                folders.append(folder)
    return found, folders


def _dict_diff(what: str, old: dict[str, Any], new: dict[str, Any]) -> str | None:
    parts = [f"{k} {old[k]}->{new[k]}" for k in new if k in old and old[k] != new[k]]
    parts += [f"new {k}" for k in new if k not in old] + [f"no more {k}" for k in old if k not in new]
    if not parts:
        return None
    return f"{what} change: " + ", ".join(parts[:6]) + (f" and {len(parts) - 6} more" if len(parts) > 6 else "")


def _guard_overwrite(root: Path, dataset_id: int, options: dict[str, Any], labels: dict[str, int],
                     chans: list[str], layout: Layout, jobs: list[MergeJob], cases: set[str], force: bool) -> None:
    """Refuse (unless ``force``) a merge that renumbers an existing merged dataset or changes a planned one.

    A rerun with the same inputs and options is a no-op (or a resume) and always allowed.
    """
    prev = None
    try:
        prev = json.loads((root / "dataset.json").read_text())
    except (OSError, ValueError):
        pass
    renumber: list[str] = []  # differences that change what an id means
    changes: list[str] = []  # anything the merge would change
    if isinstance(prev, dict):
        uni = prev.get("universal") if isinstance(prev.get("universal"), dict) else {}
        prov = uni.get("provenance") if isinstance(uni.get("provenance"), dict) else {}
        old = prov.get("options") if isinstance(prov.get("options"), dict) else {}
        if prov.get("tool") != "nnunet-universal merge":
            renumber.append(f"it is not a merged dataset (written by {prov.get('tool') or 'another tool'})")
        elif old.get("datasets") != options["datasets"]:
            renumber.append(f"inputs {old.get('datasets')} -> {options['datasets']}")
        if isinstance(prev.get("labels"), dict):
            renumber.append(_dict_diff("label id", prev["labels"], labels) or "")
        if isinstance(prev.get("channel_names"), dict):
            old_ch = {v: int(k) for k, v in prev["channel_names"].items() if str(k).isdigit()}
            renumber.append(_dict_diff("channel", old_ch, {s: i for i, s in enumerate(chans)}) or "")
        renumber = [r for r in renumber if r]
        changes += renumber
        changes += [f"option {k}: {old.get(k)!r} -> {v!r}" for k, v in options.items()
                    if k != "datasets" and old.get(k) != v]
        prev_cases = set(uni.get("cases") or {}) if isinstance(uni.get("cases"), dict) else set()
        if prev_cases != cases:
            changes.append(f"{len(cases - prev_cases)} case(s) added, {len(prev_cases - cases)} removed")
    elif root.exists():
        changes.append(f"{root.name} has no complete dataset.json (an interrupted merge?)")
    else:
        changes.append(f"{root.name} does not exist in $nnUNet_raw")
    found, folders = _planned_state(dataset_id)
    if found and not changes:  # stale cases (e.g. inputs reconverted): do their bytes change?
        changed = [j.case_id for j in jobs if not j.same_content_as_before(layout)]
        if changed:
            changes.append(f"{len(changed)} case(s) with new content, e.g. {changed[0]}")
    if found and changes:
        problem = (f"{root.name} was already planned or trained: {'; '.join(found)}. This merge would change the raw "
                   f"dataset ({'; '.join(changes)}), which invalidates them: held-out cases may have been trained on, "
                   f"and the old split and preprocessed data no longer match")
        todo = (f"delete {' and '.join(map(str, folders))} (or move them away), then re-run 'nnunet-universal plan -d "
                f"{int(dataset_id)}' and retrain")
        if not force:
            raise ConversionError(problem, fix=f"merge into a new id (-d), or re-merge with --force and then {todo}")
        logger.warning("--force: %s. Now %s.", problem, todo)
    elif renumber:
        problem = (f"{root} already holds a different dataset: {'; '.join(renumber)}; merging into it would silently "
                   f"renumber its classes/channels")
        if not force:
            raise ConversionError(problem, fix="merge into a new id (-d/-n), or pass --force to replace it")
        logger.warning("--force: %s", problem)


def _finish(root: Path, layout: Layout, inputs: list, planned: dict, done: dict[str, dict], skipped: list,
            domains: dict[str, DomainInfo], chans: list[str], union: Any, options: dict[str, Any]) -> Path:
    """Remove stale outputs; write reports, provenance.json, splits_final.json and (last) dataset.json."""
    cases = sorted(done)
    remove_orphans(layout, set(cases), {o for c in cases for o in done[c]["outputs"]})
    write_report(root, skipped, f"merge into {root.name}")
    cinfo: dict[str, CaseInfo] = {}
    for mid in cases:
        _, _, meta, case = planned[mid]
        src = meta.cases[case]
        cinfo[mid] = CaseInfo(domain=src.domain, slots=[s for s in chans if s in src.slots],
                              source_id=src.source_id or case, group=f"{src.domain}_{src.group or case}",
                              split=done[mid]["provenance"]["split"])
    train = {c: (i.domain, i.group) for c, i in cinfo.items() if i.split == "train"}
    atomic_write_json({"tool": "nnunet-universal merge", "merge_version": MERGE_VERSION, "options": options,
                       "cases": {c: done[c]["provenance"] for c in cases}}, root / "provenance.json")
    splits = make_splits(train)
    if splits is not None:
        atomic_write_json(splits, root / "splits_final.json")
    else:
        (root / "splits_final.json").unlink(missing_ok=True)
    for note in fold_notes(train, splits):
        logger.warning("%s splits_final.json: %s", root.name, note)
    meta = UniversalMeta(slots=chans, domains=domains, cases=cinfo, provenance={
        "tool": "nnunet-universal merge", "merge_version": MERGE_VERSION, "options": options,
        "channel_order": CHANNEL_ORDER_DOC, "manifest": "provenance.json",
        "images": "copies of the source datasets' files; labels in union ids; missing slots zero-filled",
        "holdout_rule": "per domain, whole patient groups in order of sha256('domain/group') until >= holdout cases",
        "skipped_cases": [s["case"] for s in skipped]})
    dataset_json = {
        "name": root.name.split("_", 1)[1],
        "description": "nnunet-universal merge of " + ", ".join(options["datasets"]),
        "channel_names": {str(i): s for i, s in enumerate(chans)},
        "labels": union.dataset_labels(),
        "numTraining": len(train),
        "file_ending": FILE_ENDING,
        "universal": meta.to_dict(),
    }
    meta.validate(str(root / "dataset.json"), label_names=dataset_json["labels"])
    atomic_write_json(dataset_json, root / "dataset.json")
    return root
