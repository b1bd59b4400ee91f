"""Deterministic hold-out selection and cross-validation folds that keep patient groups together.

Both rank a domain's patient groups by ``sha256("domain/group")``: the rank of a group does not depend on
which other cases exist, on file order or on the run, so adding a case never reshuffles the others.

* Hold-out (``--holdout N``): per domain, whole groups in rank order until at least N cases are held out;
  at least one group stays for training.
* Folds (``splits_final.json``, nnU-Net's format: a list of ``{"train": [...], "val": [...]}``): nnU-Net's
  k = 5 whenever there are at least 5 patient groups to validate, so that ``nnUNetv2_train ... FOLD`` for
  FOLD in 0..4 finds every fold in the split (a fold missing from it is trained on nnU-Net's random fallback
  split, without patient grouping). Only domains with >= 2 groups are validated; a domain with a single group
  is in every fold's training part and never validated. Groups are dealt round-robin in rank order (stratified
  by domain), each domain starting at the fold with the fewest cases so far, so a fold holds at most
  ceil(g / k) of a domain's g groups and every domain keeps training cases in every fold. A domain with fewer
  than k groups is validated in only some folds (the other folds validate none of its cases: :func:`fold_notes`
  says which). Fewer than 5 groups to validate give k = that number (every fold needs a validation case).
"""

from __future__ import annotations

import hashlib

from nnunet_universal.dataset_conversion.common import ConversionError

MAX_FOLDS = 5


def _rank(domain: str, group: str) -> str:
    return hashlib.sha256(f"{domain}/{group}".encode()).hexdigest()


def _groups(cases: dict[str, tuple[str, str]]) -> dict[str, dict[str, list[str]]]:
    """domain -> group -> sorted case ids, groups in rank order."""
    out: dict[str, dict[str, list[str]]] = {}
    for cid, (dom, grp) in sorted(cases.items()):
        out.setdefault(dom, {}).setdefault(grp, []).append(cid)
    return {d: dict(sorted(g.items(), key=lambda kv: _rank(d, kv[0]))) for d, g in sorted(out.items())}


def choose_holdout(cases: dict[str, tuple[str, str]], n: int) -> set[str]:
    """Case ids held out as the test set: >= ``n`` cases per domain, whole groups (see module doc)."""
    if n <= 0:
        return set()
    held: set[str] = set()
    for dom, groups in _groups(cases).items():
        taken = 0
        for i, members in enumerate(groups.values()):
            if taken >= n:
                break
            if i == len(groups) - 1:
                raise ConversionError(
                    f"--holdout {n} would leave domain {dom!r} without training cases ({len(groups)} patient "
                    f"group(s), {sum(map(len, groups.values()))} case(s))", fix="lower --holdout")
            held.update(members)
            taken += len(members)
    return held


def make_splits(cases: dict[str, tuple[str, str]]) -> list[dict[str, list[str]]] | None:
    """Folds over the training cases ``{case: (domain, group)}`` (module docstring); None when no domain has two
    groups. :func:`fold_notes` says what is unusual about them."""
    groups = _groups(cases)
    k = num_folds(cases)
    if k == 0:
        return None
    fold_of: dict[str, int] = {}
    sizes = [0] * k
    for g in groups.values():
        if len(g) < 2:
            continue
        start = min(range(k), key=lambda f: (sizes[f], f))
        for j, members in enumerate(g.values()):
            f = (start + j) % k
            sizes[f] += len(members)
            for c in members:
                fold_of[c] = f
    return [{"train": sorted(c for c in cases if fold_of.get(c) != f),
             "val": sorted(c for c in cases if fold_of.get(c) == f)} for f in range(k)]


def num_folds(cases: dict[str, tuple[str, str]]) -> int:
    """nnU-Net's 5, or the number of patient groups that can be validated when that is smaller (0: none)."""
    return min(MAX_FOLDS, sum(len(g) for g in _groups(cases).values() if len(g) >= 2))


def fold_notes(cases: dict[str, tuple[str, str]], splits: list[dict[str, list[str]]] | None) -> list[str]:
    """What a user of these folds should know, one sentence each (empty for 5 folds validating every domain):
    fewer folds than nnU-Net's 5 and why, domains never validated, folds that validate no case of a domain."""
    groups = _groups(cases)
    per_domain = ", ".join(f"{d} {len(g)}" for d, g in groups.items())
    single = [d for d, g in groups.items() if len(g) < 2]
    notes = []
    if splits is None:
        return [f"no cross-validation folds: no domain has two patient groups ({per_domain}); "
                "train with fold 'all'"]
    k = len(splits)
    if k < MAX_FOLDS:
        rest = f"fold {k}" if k == MAX_FOLDS - 1 else f"folds {k}-{MAX_FOLDS - 1}"
        notes.append(f"{k} folds, not nnU-Net's {MAX_FOLDS}: only {k} patient groups can be validated (groups per "
                     f"domain: {per_domain}; a domain with one group is never validated); train folds 0-{k - 1} "
                     f"(nnU-Net would train {rest} on its own random split, which ignores patient groups)")
    if single:
        notes.append(f"{', '.join(single)}: a single patient group, in every fold's training part and never "
                     "validated")
    missing = {f: [d for d, g in groups.items() if len(g) >= 2 and not set(fold["val"]) & {c for m in g.values()
                                                                                          for c in m}]
               for f, fold in enumerate(splits)}
    missing = {f: ds for f, ds in missing.items() if ds}
    if missing:
        notes.append("folds that validate no case of a domain (fewer patient groups than folds; the domain is "
                     "still trained in every fold): " + "; ".join(f"fold {f}: {', '.join(ds)}"
                                                                  for f, ds in missing.items()))
    return notes
