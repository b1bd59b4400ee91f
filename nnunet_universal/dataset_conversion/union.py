"""The merged dataset's union label space and slot set.

Union labels are named ``domain.class``. Ids are assigned in the order of the given datasets, then each dataset's
domains, then each domain's classes (by their id in that dataset). ``--identical a.X=b.Y`` makes classes share
one id, placed where the first of them appears, and named after the first one written in ``--identical``.
Slots: the canonical order of :data:`registry.SLOTS` over the union of the domains' slots (or ``--slots``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from nnunet_universal.dataset_conversion.common import ConversionError
from nnunet_universal.metadata import UniversalMeta
from nnunet_universal.registry import order_slots


@dataclass
class LabelUnion:
    """Union label space: names by id, and per domain class -> union id and local id -> union id."""

    names: dict[int, str] = field(default_factory=dict)  # union id -> name ("domain.class")
    domain_labels: dict[str, dict[str, int]] = field(default_factory=dict)  # domain -> class -> union id
    luts: dict[str, dict[int, int]] = field(default_factory=dict)  # domain -> local id -> union id (0 -> 0)

    def dataset_labels(self) -> dict[str, int]:
        return {"background": 0, **{self.names[i]: i for i in sorted(self.names)}}


def _parse_identical(identical: list[str], known: list[str]) -> list[list[str]]:
    pairs = []
    for item in identical:
        if "=" not in item:
            raise ConversionError(f"--identical expects a.cls=b.cls, got {item!r}",
                                  fix="e.g. ucsf_bmsr.ET=brainmetshare.ET")
        a, b = (x.strip() for x in item.split("=", 1))
        for x in (a, b):
            if x not in known:
                raise ConversionError(f"--identical names unknown class {x!r}",
                                      fix=f"use domain.class names from the inputs: {', '.join(known)}")
        if a.split(".", 1)[0] == b.split(".", 1)[0]:
            raise ConversionError(f"--identical {item!r} joins two classes of one domain",
                                  fix="only classes of different domains can be identical")
        pairs.append([a, b])
    return pairs


def _refuse_collapsed_domains(known: list[str], find: Callable[[str], str], pairs: list[list[str]]) -> None:
    """Raise if a chain of ``--identical`` declarations joins two classes of one domain (they would share an id)."""
    first: dict[tuple[str, str], str] = {}  # (group root, domain) -> first class of that domain in the group
    for name in known:
        key = (find(name), name.split(".", 1)[0])
        if key not in first:
            first[key] = name
            continue
        a, b = first[key], name
        steps = _chain(a, b, pairs)
        path = " = ".join([a, *(nxt for nxt, _ in steps)])
        used = " ".join(f"{x}={y}" for _, (x, y) in steps)
        raise ConversionError(
            f"--identical chain {path} gives two classes of domain {key[1]!r} ({a.split('.', 1)[1]} and "
            f"{b.split('.', 1)[1]}) one union id (declarations: {used})",
            fix="drop or correct one of these --identical declarations; classes of one domain must stay distinct")


def _chain(a: str, b: str, pairs: list[list[str]]) -> list[tuple[str, tuple[str, str]]]:
    """Shortest path a -> b over the declarations: [(next class, declaration used), ...]."""
    edges: dict[str, list[tuple[str, tuple[str, str]]]] = {}
    for x, y in pairs:
        edges.setdefault(x, []).append((y, (x, y)))
        edges.setdefault(y, []).append((x, (x, y)))
    prev: dict[str, tuple[str, tuple[str, str]] | None] = {a: None}
    todo = [a]
    while todo and b not in prev:
        nxt = []
        for node in todo:
            for other, decl in edges.get(node, []):
                if other not in prev:
                    prev[other] = (node, decl)
                    nxt.append(other)
        todo = nxt
    steps, node = [], b
    while prev.get(node) is not None:
        parent, decl = prev[node]
        steps.append((node, decl))
        node = parent
    return steps[::-1]


def build_label_union(metas: list[UniversalMeta], identical: list[str] | None) -> LabelUnion:
    """Assign union ids over the domains of ``metas`` (in order), honouring ``identical`` declarations."""
    entries: list[tuple[str, str, int]] = []  # (domain, class, local id)
    for meta in metas:
        for dname, dom in meta.domains.items():
            for cls, local in sorted(dom.labels.items(), key=lambda kv: kv[1]):
                entries.append((dname, cls, local))
    known = [f"{d}.{c}" for d, c, _ in entries]
    parent = {k: k for k in known}

    def find(x: str) -> str:
        while parent[x] != x:
            x = parent[x]
        return x

    order = []  # first-written name of each group wins the name
    pairs = _parse_identical(identical or [], known)
    for a, b in pairs:
        order += [a, b]
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[rb] = ra
    _refuse_collapsed_domains(known, find, pairs)
    rank = {n: i for i, n in reversed(list(enumerate(order)))}
    group_name: dict[str, str] = {}
    for n in sorted(rank, key=rank.get):
        group_name.setdefault(find(n), n)

    union = LabelUnion()
    group_id: dict[str, int] = {}
    for d, c, local in entries:
        root = find(f"{d}.{c}")
        if root not in group_id:
            group_id[root] = len(group_id) + 1
            union.names[group_id[root]] = group_name.get(root, f"{d}.{c}")
        uid = group_id[root]
        union.domain_labels.setdefault(d, {})[c] = uid
        union.luts.setdefault(d, {0: 0})[local] = uid
    return union


def merged_slots(metas: list[UniversalMeta], slots: list[str] | None) -> list[str]:
    """The merged channels: ``--slots`` if given, else the union of the domains' slots; canonical order."""
    chosen = set(slots) if slots else {s for m in metas for d in m.domains.values() for s in d.slots}
    try:
        return order_slots(chosen)
    except KeyError as e:
        raise ConversionError(str(e.args[0]), fix="pass valid slot names to --slots") from None
