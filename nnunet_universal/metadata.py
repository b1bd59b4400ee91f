"""The ``universal`` metadata block of dataset.json: schema, JSON I/O and validation.

One source of truth for every part of the pipeline (converters, merge, planner, trainer, predictor,
evaluation). A per-source converted dataset carries a block with one domain; a merged dataset carries
one domain per source. Example (ids illustrative)::

    "universal": {
      "schema_version": 1,
      "slots": ["T1", "T1c", "T2", "FLAIR", "CT"],
      "domains": {
        "brats_mets": {"source": "BraTS-METS 2023", "slots": ["T1", "T1c", "T2", "FLAIR"],
                       "labels": {"NETC": 1, "SNFH": 2, "ET": 3},
                       "regions": {"TC": ["NETC", "ET"], "WT": ["NETC", "SNFH", "ET"]},
                       "lesion_wise": true},
        "lits": {"source": "LiTS", "slots": ["CT"], "labels": {"liver": 4, "tumor": 5}}
      },
      "cases": {"brats_mets_0001": {"domain": "brats_mets", "slots": ["T1", "T1c", "T2", "FLAIR"],
                                    "source_id": "BraTS-MET-00001-000", "group": "BraTS-MET-00001"}}
    }

``labels`` map a domain's class names to **union label ids** (the ids of the dataset's ``labels``);
classes declared identical across domains share an id. ``slots`` of a case are the channels that hold
real data; every other channel of the dataset is zero-filled in the raw images.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, field
from typing import Any

from nnunet_universal.atomic_io import atomic_write_json  # noqa: F401 (re-exported: older imports read it here)
from nnunet_universal.registry import SLOTS

SCHEMA_VERSION = 1
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_\-]*$")


class MetadataError(ValueError):
    """The ``universal`` block is missing or inconsistent; the message says where and what to do."""


@dataclass
class DomainInfo:
    """One source dataset inside a (merged) dataset."""

    source: str
    slots: list[str]
    labels: dict[str, int]  # class name -> union label id (never 0)
    regions: dict[str, list[str]] = field(default_factory=dict)  # region name -> class names
    lesion_wise: bool = False  # lesion-wise metrics apply (brain metastases)
    modality: str = "MR"  # "MR" or "CT"


@dataclass
class CaseInfo:
    """Per-case metadata: domain, available slots, where it came from."""

    domain: str
    slots: list[str]
    source_id: str = ""
    group: str = ""  # cases of one patient share a group and stay in one fold
    split: str = "train"  # "train" (imagesTr/labelsTr) or "test" (held out: imagesTs/labelsTs)


@dataclass
class UniversalMeta:
    """The whole ``universal`` block."""

    slots: list[str]
    domains: dict[str, DomainInfo]
    cases: dict[str, CaseInfo] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION
    provenance: dict[str, Any] = field(default_factory=dict)

    # ---- derived views -------------------------------------------------------------------------
    @property
    def domain_names(self) -> list[str]:
        """Domains in their stable order (the order of the gate's outputs and of the heads)."""
        return list(self.domains)

    def domain_index(self, name: str) -> int:
        try:
            return self.domain_names.index(name)
        except ValueError:
            raise MetadataError(f"unknown domain {name!r}; this dataset has {self.domain_names}") from None

    def annotated_labels(self, case: str) -> list[int]:
        """Union ids annotated in ``case`` (background 0 included). Other ids are *unknown* there."""
        return [0] + sorted(set(self.domains[self.case(case).domain].labels.values()))

    def domain_label_ids(self, domain: str) -> list[int]:
        """Union ids of ``domain``'s classes, in the domain's class order (head channel k+1 -> id)."""
        return list(self.domains[domain].labels.values())

    def slot_mask(self, slots: list[str]) -> list[bool]:
        """Availability mask over the dataset's channels for a list of present slots."""
        return [s in slots for s in self.slots]

    def case(self, case: str) -> CaseInfo:
        try:
            return self.cases[case]
        except KeyError:
            raise MetadataError(
                f"case {case!r} is not listed in dataset.json's universal.cases; re-run "
                "'nnunet-universal merge' (or convert) so that every case has metadata"
            ) from None

    def num_union_labels(self) -> int:
        """Number of union labels including background."""
        ids = {i for d in self.domains.values() for i in d.labels.values()}
        return max(ids, default=0) + 1

    # ---- I/O -----------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        out = {"schema_version": d.pop("schema_version"), "slots": d["slots"], "domains": d["domains"],
               "cases": d["cases"]}
        if self.provenance:
            out["provenance"] = self.provenance
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "dataset.json") -> UniversalMeta:
        if not isinstance(d, dict):
            raise MetadataError(f"{where}: 'universal' must be an object")
        version = d.get("schema_version", None)
        if version != SCHEMA_VERSION:
            raise MetadataError(
                f"{where}: universal.schema_version is {version!r}, this nnunet-universal reads version "
                f"{SCHEMA_VERSION}; re-run 'nnunet-universal convert/merge' with this version"
            )
        try:
            domains = {k: DomainInfo(**v) for k, v in d["domains"].items()}
            cases = {k: CaseInfo(**v) for k, v in d.get("cases", {}).items()}
            meta = cls(slots=list(d["slots"]), domains=domains, cases=cases,
                       provenance=dict(d.get("provenance", {})))
        except (KeyError, TypeError) as e:
            raise MetadataError(f"{where}: malformed universal block ({e!r})") from e
        meta.validate(where)
        return meta

    def validate(self, where: str = "dataset.json", label_names: dict[str, Any] | None = None) -> None:
        """Check internal consistency (and against dataset.json ``labels`` when given)."""
        bad = [s for s in self.slots if s not in SLOTS]
        if bad:
            raise MetadataError(f"{where}: unknown slots {bad}; valid slots are {list(SLOTS)}")
        if len(set(self.slots)) != len(self.slots):
            raise MetadataError(f"{where}: duplicate slots in {self.slots}")
        if not self.domains:
            raise MetadataError(f"{where}: universal.domains is empty")
        for name, dom in self.domains.items():
            if not _NAME_RE.match(name):
                raise MetadataError(f"{where}: domain name {name!r} must be alphanumeric/underscore")
            missing = [s for s in dom.slots if s not in self.slots]
            if missing:
                raise MetadataError(f"{where}: domain {name!r} uses slots {missing} not in universal.slots")
            if any(i <= 0 for i in dom.labels.values()):
                raise MetadataError(f"{where}: domain {name!r} maps a class to id <= 0 ({dom.labels})")
            for region, members in dom.regions.items():
                unknown = [m for m in members if m not in dom.labels]
                if unknown:
                    raise MetadataError(f"{where}: region {name}.{region} names unknown classes {unknown}")
        for cid, c in self.cases.items():
            if c.domain not in self.domains:
                raise MetadataError(f"{where}: case {cid!r} has unknown domain {c.domain!r}")
            extra = [s for s in c.slots if s not in self.domains[c.domain].slots]
            if extra:
                raise MetadataError(f"{where}: case {cid!r} lists slots {extra} its domain does not have")
            if not c.slots:
                raise MetadataError(f"{where}: case {cid!r} has no available slot")
        if label_names is not None:
            ids = {int(v) for v in label_names.values() if isinstance(v, int)}
            used = {i for dom in self.domains.values() for i in dom.labels.values()}
            if not used <= ids:
                raise MetadataError(f"{where}: union ids {sorted(used - ids)} are not in dataset.json 'labels'")


def load_universal(dataset_json: dict[str, Any] | str | os.PathLike, where: str | None = None) -> UniversalMeta:
    """Read and validate the ``universal`` block from a dataset.json dict or path."""
    if not isinstance(dataset_json, dict):
        where = where or str(dataset_json)
        with open(dataset_json) as f:
            dataset_json = json.load(f)
    where = where or "dataset.json"
    if "universal" not in dataset_json:
        raise MetadataError(
            f"{where} has no 'universal' block: it is not a dataset written by 'nnunet-universal convert' or "
            "'nnunet-universal merge'. Convert/merge your data with nnunet-universal first."
        )
    meta = UniversalMeta.from_dict(dataset_json["universal"], where)
    labels = dataset_json.get("labels")
    if isinstance(labels, dict):
        meta.validate(where, label_names=labels)
    return meta


# ---- the plans' ``universal`` block ---------------------------------------------------------------

#: Dotted path of the network class named in the plans' universal block.
NETWORK_CLASS = "nnunet_universal.nn.universal_unet.UniversalUNet"
PLANS_NAME = "nnUNetUniversalPlans"


#: Version of the network design the plans' ``modules`` describe. 2: bounded FiLM prompts (off by default), gate on
#: appearance statistics of every encoder stage with a learned temperature, confidence-flagged hard routing.
#: Plans without a version (1) describe the spatial-prompt network, whose checkpoints do not load into this one.
MODULES_VERSION = 2


@dataclass
class NetworkOptions:
    """Switches and sizes of the modules injected into nnU-Net's planned U-Net.

    Defaults live here and are written into the plans; trainer variants override single fields through
    class attributes (ablations of the U-Harmony paper, Table 3, and the joint baselines). The defaults are the
    best configuration measured by ``scripts/benchmark_accuracy.py`` (README, Benchmarks).
    """

    harmony: bool = True  # HarmonyNorm replaces every InstanceNorm (False: plain InstanceNorm)
    harmony_stages: str = "all"  # "all" or "first" (only the first encoder stage is harmonized)
    harmony_order: int = 3  # J, order of the polynomial affine (paper Eq. 2)
    polynomial: bool = True  # polynomial terms on (False: only the linear affine)
    restore: bool = True  # HarmonyRestore after each decoder stage (paper Eq. 3)
    head: str = "domain"  # "domain": one head per domain + gate; "union": one plain head on the union labels
    gate: bool = True  # domain gate + prototypes (False: oracle heads only; dataset-free mode then mixes uniformly)
    routing: str = "hard"  # "hard": only the most likely domain's head; "soft": heads mixed by the routing weights
    routing_confidence: float = 0.8  # a case whose top routing weight is below this is reported as uncertain
    routing_temperature: float = 0.1  # initial tau in r ~ G * exp(cos(phi, p)/tau) (1/tau is learned)
    prototype_momentum: float = 0.99  # running-mean momentum of the domain prototypes
    modality_prompt: bool = False  # per-slot FiLM from the slot-availability vector at the input (nn/prompts.py)
    task_prompt: bool = False  # FiLM of the bottleneck from the domain weights (nn/prompts.py)
    prompt_hidden: int = 32  # hidden width of the prompts' conditioning MLPs
    version: int = MODULES_VERSION  # network design (see MODULES_VERSION)

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None, where: str = "plans") -> NetworkOptions:
        d = dict(d or {})
        if d and int(d.get("version", 1)) != MODULES_VERSION:
            raise MetadataError(
                f"{where}: universal.modules describe network design version {d.get('version', 1)} (written by an "
                f"older nnunet-universal, with spatial prompts); this version builds design {MODULES_VERSION}, whose "
                "weights are laid out differently. Re-run 'nnunet-universal plan -d ID' to rewrite the plans and "
                "train again; models trained with the old design need the nnunet-universal version that trained them."
            )
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(d) - known
        if unknown:
            raise MetadataError(f"{where}: plans universal.modules has unknown options {sorted(unknown)}")
        return cls(**d)


def plans_universal_block(meta: UniversalMeta, slot_normalization: dict[str, str],
                          options: NetworkOptions | None = None) -> dict[str, Any]:
    """Build the plans' ``universal`` block: everything the network needs at inference, from the plans alone."""
    return {
        "schema_version": SCHEMA_VERSION,
        "network_class": NETWORK_CLASS,
        "slots": list(meta.slots),
        "slot_normalization": dict(slot_normalization),
        "domains": {n: asdict(d) for n, d in meta.domains.items()},
        "num_union_labels": meta.num_union_labels(),
        "modules": asdict(options or NetworkOptions()),
    }


def read_plans_universal(plans: dict[str, Any], where: str = "plans") -> tuple[UniversalMeta, NetworkOptions]:
    """Read the plans' ``universal`` block as (metadata without cases, network options)."""
    block = plans.get("universal")
    if block is None:
        raise MetadataError(
            f"{where} has no 'universal' block. Plan the dataset with 'nnunet-universal plan -d ID' "
            f"(plans name {PLANS_NAME}) and train with '-p {PLANS_NAME}'."
        )
    meta = UniversalMeta.from_dict(
        {"schema_version": block.get("schema_version"), "slots": block["slots"], "domains": block["domains"]}, where
    )
    return meta, NetworkOptions.from_dict(block.get("modules"), where)
