"""Deterministic hold-out selection and cross-validation folds that keep patient groups together.

Both rank a domain's patient groups by ``sha256("domain/group")``: the rank of a group does not depend on
which other cases exist, on file order or on the run, so adding a case never reshuffles the others.

* Hold-out (``--holdout N``): per domain, whole groups in rank order until at least N cases are held out;
  at least one group stays for training.
* Folds (``splits_final.json``, nnU-Net's format: a list of ``{"train": [...], "val": [...]}``): k = 5, or fewer
  when a domain has fewer than 5 training groups (k = the smallest group count among domains with >= 2 groups),
  so every fold's training part contains every domain. A domain with a single group is in every fold's training
  part and never validated. Groups are dealt round-robin in rank order (stratified by domain), each domain
  starting at the fold with the fewest cases so far.
"""

from __future__ import annotations

import hashlib
import logging

from nnunet_universal.dataset_conversion.common import ConversionError

logger = logging.getLogger(__name__)
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
    """Folds over the training cases ``{case: (domain, group)}``; None when no domain has two groups."""
    groups = _groups(cases)
    counts = [len(g) for g in groups.values() if len(g) >= 2]
    if not counts:
        logger.warning("no domain has two patient groups: no splits_final.json written (train with fold 'all')")
        return None
    k = min(MAX_FOLDS, min(counts))
    fold_of: dict[str, int] = {}
    sizes = [0] * k
    for dom, g in groups.items():
        if len(g) < 2:
            logger.warning("domain %r has a single patient group: it is in every fold's training part", dom)
            continue
        start = min(range(k), key=lambda f: (sizes[f], f))
        for j, members in enumerate(g.values()):
            f = (start + j) % k
            sizes[f] += len(members)
            for c in members:
                fold_of[c] = f
    return [{"train": sorted(c for c in cases if fold_of.get(c) != f),
             "val": sorted(c for c in cases if fold_of.get(c) == f)} for f in range(k)]
