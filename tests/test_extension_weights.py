"""``extend``'s weight growth: a new domain's head starts from the old domain with the most classes of the same
name (``extension/weights.py``)."""

from __future__ import annotations

from nnunet_universal.extension.weights import GrowthMap
from nnunet_universal.metadata import DomainInfo, UniversalMeta

SLOTS = ["T1", "T1c", "FLAIR"]


def _meta(domains: dict[str, dict[str, int]]) -> UniversalMeta:
    return UniversalMeta(slots=SLOTS, domains={d: DomainInfo(source=d, slots=SLOTS, labels=lab)
                                               for d, lab in domains.items()}, cases={})


def test_new_domain_borrows_the_head_of_the_closest_old_domain():
    old = {"brats": {"NETC": 1, "SNFH": 2, "ET": 3}, "ucsf": {"ET": 4}}
    new = {**old, "mets": {"ET": 5}, "liver": {"liver": 6, "tumor": 7}}
    g = GrowthMap.between(_meta(old), _meta(new))
    # head layout (background first per domain): brats 0-3, ucsf 4-5, mets 6-7, liver 8-10
    assert g.borrowed_channels == {6: 4, 7: 5}  # mets <- ucsf (Jaccard 1 vs 1/3 for brats); liver: no class in common
    assert g.head_channels == [0, 1, 2, 3, 4, 5]


def test_partial_overlap_borrows_only_matching_classes():
    old = {"brats": {"NETC": 1, "SNFH": 2, "ET": 3}}
    new = {**old, "gli": {"SNFH": 4, "cavity": 5}}
    g = GrowthMap.between(_meta(old), _meta(new))
    assert g.borrowed_channels == {4: 0, 5: 2}  # background and SNFH; cavity keeps its fresh init


def test_new_domain_slots_are_the_sequences_no_old_domain_scan_has():
    """What the new-slot prior keys on, and what 'extend --no-old-data' warns about when it is empty."""
    from nnunet_universal.extension.weights import new_domain_slots

    old = UniversalMeta(slots=SLOTS, domains={"ucsf": DomainInfo(source="u", slots=["T1", "T1c"], labels={"ET": 1})},
                        cases={})
    new = UniversalMeta(slots=[*SLOTS, "GRE"], cases={}, domains={
        **old.domains,
        "mets": DomainInfo(source="m", slots=["T1c", "GRE"], labels={"ET": 2}),
        "same": DomainInfo(source="s", slots=["T1", "FLAIR"], labels={"ET": 3})})  # FLAIR: an old slot
    assert new_domain_slots(old, new) == {"mets": ["GRE"], "same": []}
