"""The extended merged raw dataset: the old merged dataset's cases plus new converted datasets.

Made with merge's machinery (:func:`merge.merge_case`: checked, hard-linked images, zero-filled missing slots,
labels remapped, per-case markers, dataset.json written last), but the old model fixes what merge would choose:

* channels: the old slots in the old order, then the new slots (canonical order among themselves);
* union labels: the old ids and names unchanged, each new domain's classes appended after them;
* domains: the old ones in the old order, then the new ones (gate rows and heads are appended in that order);
* new data of an **old domain** (converted with that domain's name): classes it shares with the old domain keep
  their ids, new classes get ids appended; the old cases of that domain annotate the old classes only, which
  dataset.json records (``universal.provenance.partial_annotation``: the extension trainers marginalize the new
  classes on them); its cases are named ``{domain}_ext_{case}``;
* old cases keep their ids, groups and split (the old model never saw its held-out cases, and must not now);
* no-old-data mode (``old_raw`` None): only the new data, the old domains and slots kept without cases;
* folds: the old ``splits_final.json`` for the old cases (fold k validates what the old fold k validated); the new
  training cases are split by merge's rule (:func:`splits.make_splits`); fold j < k of theirs joins old fold j
  (the cases of new folds j >= k train in every fold).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from nnunet_universal.atomic_io import atomic_write_json
from nnunet_universal.dataset_conversion.common import (
    ConversionError,
    Layout,
    dataset_folder,
    digest,
    stat_fingerprint,
)
from nnunet_universal.dataset_conversion.inputs import case_files, load_inputs
from nnunet_universal.dataset_conversion.merge import MERGE_VERSION, MergeJob, merge_case
from nnunet_universal.dataset_conversion.runner import is_complete, remove_orphans, run_jobs, write_report
from nnunet_universal.dataset_conversion.splits import choose_holdout, make_splits
from nnunet_universal.dataset_conversion.union import build_label_union
from nnunet_universal.metadata import CaseInfo, DomainInfo, UniversalMeta, load_universal
from nnunet_universal.registry import order_slots

logger = logging.getLogger(__name__)


def extended_meta(old: UniversalMeta, new_metas: list[UniversalMeta]
                  ) -> tuple[UniversalMeta, dict[str, dict[int, int]], dict[str, list[str]]]:
    """Slots, domains and union ids of the extension (no cases yet); per new dataset domain its local -> union ids;
    per old domain that gains classes, its old class names."""
    fresh = [UniversalMeta(slots=m.slots, domains={d: v for d, v in m.domains.items() if d not in old.domains})
             for m in new_metas]
    union = build_label_union([m for m in fresh if m.domains], None)
    base = max((i for d in old.domains.values() for i in d.labels.values()), default=0)
    new_slots = order_slots({s for m in new_metas for d in m.domains.values() for s in d.slots} - set(old.slots))
    slots = [*old.slots, *new_slots]
    domains = dict(old.domains)
    luts: dict[str, dict[int, int]] = {}
    for m in fresh:
        for name, dom in m.domains.items():
            if name in luts:
                raise ConversionError(f"domain {name!r} is in two of the new datasets",
                                      fix="convert each new source with its own --domain name")
            labels = {c: base + uid for c, uid in union.domain_labels[name].items()}
            domains[name] = DomainInfo(source=dom.source, slots=[s for s in slots if s in dom.slots], labels=labels,
                                       regions=dict(dom.regions), lesion_wise=dom.lesion_wise, modality=dom.modality)
            luts[name] = {loc: (0 if uid == 0 else base + uid) for loc, uid in union.luts[name].items()}
    next_id = max((i for d in domains.values() for i in d.labels.values()), default=0) + 1
    gained: dict[str, list[str]] = {}
    for m in new_metas:  # new data of old domains: shared classes keep their ids, new classes are appended
        for name, dom in m.domains.items():
            if name not in old.domains:
                continue
            if name in luts:
                raise ConversionError(f"two new datasets bring data of the old domain {name!r}",
                                      fix="convert them into one dataset")
            cur = domains[name]
            if dom.modality != cur.modality:
                raise ConversionError(f"the new data of domain {name!r} is {dom.modality}, the old domain "
                                      f"{cur.modality}", fix="convert the new data with another --domain name")
            labels = dict(cur.labels)
            for c in sorted(dom.labels, key=dom.labels.get):
                if c not in labels:
                    labels[c] = next_id
                    next_id += 1
            if len(labels) > len(cur.labels):
                gained[name] = list(cur.labels)
            domains[name] = DomainInfo(source=cur.source, slots=[s for s in slots if s in cur.slots or s in dom.slots],
                                       labels=labels, regions=dict(cur.regions), lesion_wise=cur.lesion_wise,
                                       modality=cur.modality)
            luts[name] = {0: 0, **{loc: labels[c] for c, loc in dom.labels.items()}}
    return UniversalMeta(slots=slots, domains=domains), luts, gained


def _fold_union(old_splits: list[dict[str, list[str]]] | None, new_train: dict[str, tuple[str, str]]
                ) -> list[dict[str, list[str]]] | None:
    new_splits = make_splits(new_train)
    if not old_splits:
        return new_splits
    k = len(old_splits)
    out = [{"train": list(f["train"]), "val": list(f["val"])} for f in old_splits]
    val_of: dict[str, int] = {}
    for j, f in enumerate((new_splits or [])[:k]):  # new folds beyond the old ones: their cases only train
        for c in f["val"]:
            val_of[c] = j
    for c in sorted(new_train):
        for f in range(k):
            out[f]["val" if val_of.get(c) == f else "train"].append(c)
    return [{"train": sorted(f["train"]), "val": sorted(f["val"])} for f in out]


def build_extended_dataset(old_raw: Path | None, new_datasets: list[str], dataset_id: int, name: str,
                           holdout: int = 0, workers: int = 1, old_dataset_json: dict | None = None) -> Path:
    """Write ``$nnUNet_raw/Dataset{dataset_id:03d}_{name}`` = the old merged dataset + ``new_datasets``; return it.

    ``old_raw`` None: no-old-data mode, only the new data; the old model's dataset.json (``old_dataset_json``) gives
    the old slots, domains and labels.
    """
    no_old_data = old_raw is None
    if no_old_data:
        if old_dataset_json is None:
            raise ValueError("no-old-data mode needs the old model's dataset.json")
        old_dj = old_dataset_json
        old = load_universal(old_dj, where="the old model's dataset.json")
        old.cases = {}
    else:
        old_dj = json.loads((old_raw / "dataset.json").read_text())
        old = load_universal(old_dj, where=str(old_raw / "dataset.json"))
    inputs = load_inputs(new_datasets)
    root = dataset_folder(dataset_id, name)
    if (old_raw is not None and root.resolve() == old_raw.resolve()) or any(
            f.resolve() == root.resolve() for f, _, _ in inputs):
        raise ConversionError(f"{root.name} is one of the inputs", fix="give the extended dataset a new id/name")
    meta, luts, gained = extended_meta(old, [m for _, _, m in inputs])
    names = {**{k: v for k, v in old_dj["labels"].items()}}
    for d, dom in meta.domains.items():
        old_labels = old.domains[d].labels if d in old.domains else {}
        names.update({f"{d}.{c}": uid for c, uid in dom.labels.items() if c not in old_labels})
    union_names = [n for n, i in sorted(names.items(), key=lambda kv: kv[1]) if i != 0]
    chans = meta.slots

    cases: dict[str, CaseInfo] = {}
    jobs_in: list[tuple[str, str, dict[str, str], str, dict[int, int], dict[str, str]]] = []
    for cid, info in sorted(old.cases.items()):  # old cases: same id, group and split; new slots zero-filled
        img_dir, lab_dir = ("imagesTr", "labelsTr") if info.split == "train" else ("imagesTs", "labelsTs")
        images = {s: str(old_raw / img_dir / f"{cid}_{i:04d}{old_dj['file_ending']}") for i, s in enumerate(old.slots)
                  if s in info.slots}
        label = str(old_raw / lab_dir / f"{cid}{old_dj['file_ending']}")
        ids = {0: 0, **{u: u for u in old.domains[info.domain].labels.values()}}
        cases[cid] = CaseInfo(domain=info.domain, slots=[s for s in chans if s in info.slots],
                              source_id=info.source_id, group=info.group or cid, split=info.split)
        jobs_in.append((cid, info.split, images, label, ids, {"dataset": old_raw.name, "case": cid,
                                                               "domain": info.domain}))
    new_cases: dict[str, tuple[str, str]] = {}
    rank_keys: dict[str, tuple[str, str]] = {}  # merge's hold-out key (domain, source group): the same test cases
    staged = []
    for folder, dj, m in inputs:
        for case, info in sorted(m.cases.items()):
            mid = f"{info.domain}_ext_{case}" if info.domain in old.domains else f"{info.domain}_{case}"
            if mid in cases or mid in new_cases:
                raise ConversionError(f"two cases map to id {mid!r}", case=case, file=folder,
                                      fix="rename one of the cases and reconvert")
            new_cases[mid] = (info.domain, mid.removesuffix(case) + (info.group or case))
            rank_keys[mid] = (info.domain, info.group or case)
            staged.append((mid, folder, dj, m, case, info))
    held = choose_holdout(rank_keys, holdout)
    for mid, folder, dj, m, case, info in staged:
        images, label = case_files(folder, dj, m, case)
        split = "test" if mid in held else "train"
        cases[mid] = CaseInfo(domain=info.domain, slots=[s for s in chans if s in info.slots],
                              source_id=info.source_id or case, group=new_cases[mid][1], split=split)
        jobs_in.append((mid, split, {s: images[s] for s in cases[mid].slots}, label, luts[info.domain],
                        {"dataset": folder.name, "case": case, "domain": info.domain}))

    layout = Layout(root)
    layout.prepare()
    (root / "dataset.json").unlink(missing_ok=True)
    jobs, done = [], {}
    for cid, split, images, label, lut, origin in jobs_in:
        key = digest([MERGE_VERSION, "extend", chans, list(images), sorted(lut.items()), union_names, split,
                      [[p, *stat_fingerprint(p)] for p in [*images.values(), label]]])
        marker = is_complete(layout, cid, key)
        if marker is not None:
            done[cid] = marker
            continue
        layout.marker(cid).unlink(missing_ok=True)
        jobs.append(MergeJob(case_id=cid, split=split, root=str(root), slots=chans, case_slots=list(images),
                             images=images, label=label, lut=lut, union_names=union_names, key=key, origin=origin))
    for o in run_jobs(merge_case, jobs, workers, f"extend {root.name}", False):
        done[o.case_id] = o.marker
    remove_orphans(layout, set(done), {x for c in done for x in done[c]["outputs"]})
    write_report(root, [], f"extend into {root.name}")

    old_splits = None
    if old_raw is not None and (old_raw / "splits_final.json").is_file():
        old_splits = json.loads((old_raw / "splits_final.json").read_text())
    new_train = {c: v for c, v in new_cases.items() if cases[c].split == "train"}
    splits = _fold_union(old_splits, new_train)
    if splits is not None:
        atomic_write_json(splits, root / "splits_final.json")
    options = {"old_dataset": old_raw.name if old_raw is not None else None, "no_old_data": no_old_data,
               "datasets": [f.name for f, _, _ in inputs], "holdout": int(holdout)}
    atomic_write_json({"tool": "nnunet-universal extend", "merge_version": MERGE_VERSION, "options": options,
                       "cases": {c: done[c]["provenance"] for c in sorted(done)}}, root / "provenance.json")
    meta.cases = cases
    meta.provenance = {"tool": "nnunet-universal extend", "merge_version": MERGE_VERSION, "options": options,
                       "channel_order": "the old model's slots in its order, then the new slots",
                       "manifest": "provenance.json"}
    if no_old_data:
        meta.provenance["mode"] = ("no-old-data: only the new data; the old domains keep the old model's weights "
                                   "and have no case here (train with UniversalTrainer_ExtendNoOldData)")
    if gained:  # old cases of a domain that gained classes annotate its old classes only
        meta.provenance["partial_annotation"] = {
            d: {"classes": old_classes, "cases": sorted(c for c, i in cases.items()
                                                        if i.domain == d and c not in new_cases)}
            for d, old_classes in gained.items()}
    dataset_json: dict[str, Any] = {
        "name": name, "description": (f"nnunet-universal extend of {old_raw.name}" if old_raw is not None else
                                      "nnunet-universal extend, no old data (new data only)") + " with "
        + ", ".join(options["datasets"]),
        "channel_names": {str(i): s for i, s in enumerate(chans)},
        "labels": dict(sorted(names.items(), key=lambda kv: kv[1])),
        "numTraining": sum(1 for c in cases.values() if c.split == "train"),
        "file_ending": old_dj["file_ending"],
        "universal": meta.to_dict(),
    }
    meta.validate(str(root / "dataset.json"), label_names=dataset_json["labels"])
    atomic_write_json(dataset_json, root / "dataset.json")
    return root
