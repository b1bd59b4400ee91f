"""Trainers for a model grown by ``nnunet-universal extend`` (new domains, classes or slots on a trained model).

They read the plans' ``universal.extension`` block that ``extend`` writes, and differ from ``UniversalTrainer`` in:

* **start**: the initial checkpoint ``extend`` wrote (the block's ``init``, a file in the preprocessed dataset
  folder), loaded in ``initialize``; nnU-Net's ``-pretrained_weights`` and ``--c`` still override it;
* **schedule**: ``extension_epoch_fraction`` (0.25) of nnU-Net's epochs, i.e. 250 x 250 iterations instead of
  1000 x 250 (the extension starts from a trained model); ``NNUNET_UNIVERSAL_SCHEDULE`` still wins when set;
* **what is trained** (``trainable``, ``extension/freeze.py``): everything, only what the extension added, or that
  plus U-Harmony's parameters;
* **gate** (``extension/gate_calibration.py``): a new domain's gate row, which ``extend`` starts far below the old
  ones, is calibrated once on the new domain's first training samples (its bias set so that the gate routes them
  to it and the old domains' samples and prototypes not), then trained by the gate loss as before (with the
  new-slot prior, whose margins are hundreds of nats, its gradients on the row vanish).
  Before that the row gets hundreds of nats (``gate_new_slot_margin`` plus the calibration thresholds' range and
  the similarity bound) on the availability of the new domain's new slots, if it has any: the one feature that is
  exact for every old-domain scan (0, since the old model had no such slot), so the new slot decides the routing;
* **loss** (``extension/losses.py``): old cases of a domain that gained classes are scored on the marginal of the
  domain's head; in no-old-data mode the old domains' prototypes are replayed in the gate loss and, when the old
  heads train (``UniversalTrainer_ExtendNoOldDataAll``), the old model's head outputs on the new scans are
  distillation targets for them.

Trainers (what they train; ``nnunet-universal extend`` prints which to use):

* ``UniversalTrainer_Extend``: everything; the old data are replayed through the domain sampler;
* ``UniversalTrainer_ExtendNewParts``: only the new slots' input weights, the new heads and classes, the new gate
  rows and prototypes; cheap, old domains' predictions exactly unchanged;
* ``UniversalTrainer_ExtendNewPartsHarmony``: the same plus U-Harmony's parameters (the paper's modality
  adaptation); these are shared, so old domains drift;
* ``UniversalTrainer_ExtendNoOldData``: on the new data only (``extend --no-old-data``): the new parts, as
  ``UniversalTrainer_ExtendNewParts`` (old domains' outputs exactly unchanged), with prototype replay; the best
  measured without the old data (``scripts/benchmark_extension.py``);
* ``UniversalTrainer_ExtendNoOldDataAll``: the same data, everything trained, with distillation from the old model
  (old domains drift: measured).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, ClassVar

import torch

from nnunet_universal.metadata import MetadataError, UniversalMeta, read_plans_universal
from nnunet_universal.nn.wrappers import unwrap
from nnunet_universal.trainers.schedule import schedule_from_env
from nnunet_universal.trainers.universal_trainer import UniversalTrainer

#: fraction of nnU-Net's epochs an extension trains by default (the issue's goal: <= 30 % of from-scratch)
EXTENSION_EPOCH_FRACTION = 0.25


def extension_block(plans: dict, where: str = "plans") -> dict[str, Any]:
    """The plans' ``universal.extension`` block, or a MetadataError saying how to make one."""
    block = plans.get("universal", {}).get("extension")
    if not block or "old_universal" not in block:
        raise MetadataError(f"{where} has no 'universal.extension' block: the extension trainers train a model grown "
                            "by 'nnunet-universal extend' (train it with the extended dataset's id); for a dataset "
                            "merged and planned from scratch use UniversalTrainer")
    return block


class UniversalTrainer_Extend(UniversalTrainer):
    """Extension of a trained model (``nnunet-universal extend``): starts from ``extend``'s initial checkpoint,
    trains a quarter of nnU-Net's epochs, everything trained, old data replayed by the domain sampler."""

    #: fraction of nnU-Net's ``num_epochs`` (ignored when ``NNUNET_UNIVERSAL_SCHEDULE`` is set)
    extension_epoch_fraction: ClassVar[float] = EXTENSION_EPOCH_FRACTION
    #: "all", "new" or "new+harmony" (``extension/freeze.py``)
    trainable: ClassVar[str] = "all"
    #: old model's head outputs as soft targets for the old heads (no-old-data mode) and their weight
    distill_weight: ClassVar[float] = 0.0
    distill_temperature: ClassVar[float] = 2.0
    #: old domains' prototypes in the gate loss (no-old-data mode)
    prototype_replay: ClassVar[bool] = False
    #: floor of the nats on a new domain's new slots' availability in its gate row before its bias is set (None: no
    #: prior); the calibration adds the thresholds' range and the similarity bound (extension/gate_calibration.py)
    gate_new_slot_margin: ClassVar[float | None] = 100.0

    # ---- start, schedule, freezing --------------------------------------------------------------------
    def initialize(self) -> None:
        """Shorter schedule, nnU-Net's initialization, then the extension's initial weights and the freezing."""
        block = extension_block(self.plans_manager.plans)
        if schedule_from_env() is None:
            stock = self.num_epochs
            self.num_epochs = max(1, math.ceil(stock * self.extension_epoch_fraction))
            self.print_to_log_file(f"extension schedule: {self.num_epochs} epochs ({self.extension_epoch_fraction:.0%} "
                                   f"of nnU-Net's {stock}) x {self.num_iterations_per_epoch} iterations")
        self._old_meta, _ = read_plans_universal({"universal": block["old_universal"]}, where="extension.old_universal")
        self._freeze = None  # set by configure_optimizers, which nnU-Net calls inside initialize()
        super().initialize()
        self._load_initial_weights(block)

    def _plans_meta(self) -> UniversalMeta:
        return read_plans_universal(self.plans_manager.plans)[0]

    def _load_initial_weights(self, block: dict) -> None:
        from nnunet_universal.inference.checkpoints import load_checkpoint

        init = Path(self.preprocessed_dataset_folder_base) / block["init"]
        if not init.is_file():
            raise FileNotFoundError(f"{init} (the initial checkpoint 'nnunet-universal extend' wrote) is missing: "
                                    "re-run 'nnunet-universal extend' for this dataset")
        unwrap(self.network).load_state_dict(load_checkpoint(init)["network_weights"])
        self._init_file = init
        self.print_to_log_file(f"extension of {block.get('from_dataset')} ({block.get('mode', 'with old data')}): "
                               f"initial weights {init.name} (-pretrained_weights or --c override them)")

    def configure_optimizers(self):
        """Freezing (``extension/freeze.py``), then nnU-Net's SGD and poly schedule over the trained weights only
        (partly trained tensors without weight decay); ``UniversalTrainer``'s when everything is trained."""
        if self.trainable == "all":
            return super().configure_optimizers()
        from nnunet_universal.extension.freeze import apply_plan, optimizer_groups, trainable_plan
        from nnunet_universal.trainers.optim import ScaledPolyLRScheduler

        net = unwrap(self.network)
        self._freeze = trainable_plan(net, self._old_meta, self._plans_meta(), self.trainable)
        apply_plan(self._freeze)
        total = sum(p.numel() for p in net.parameters())
        self.print_to_log_file(f"trainable={self.trainable}: {self._freeze.num_trained()} of {total} weights trained "
                               f"({'; '.join(self._freeze.description)}); everything else frozen")
        optimizer = torch.optim.SGD(optimizer_groups(self._freeze, self.weight_decay, self.harmony_lr_scale),
                                    self.initial_lr, weight_decay=self.weight_decay, momentum=0.99, nesterov=True)
        return optimizer, ScaledPolyLRScheduler(optimizer, self.initial_lr, self.num_epochs)

    def on_train_start(self) -> None:
        super().on_train_start()
        net = unwrap(self.network)
        self._start_gate_calibration(net)
        self._prototype_snapshot = None
        if self._freeze is not None and self._freeze.frozen_prototype_rows is not None:
            rows = self._freeze.frozen_prototype_rows.to(net.router.prototypes.device)
            self._prototype_snapshot = (rows, net.router.prototypes[rows].clone(),
                                        net.router.prototype_initialized[rows].clone())

    def train_step(self, batch: dict) -> dict:
        out = super().train_step(batch)
        if self._prototype_snapshot is not None:  # old domains' prototypes stay the old model's
            rows, protos, init = self._prototype_snapshot
            router = unwrap(self.network).router
            router.prototypes[rows] = protos
            router.prototype_initialized[rows] = init
        self._collect_gate_samples()
        return out

    # ---- gate calibration (extension/gate_calibration.py) ------------------------------------------------
    #: calibrate a new domain's gate row once this many of its training samples were seen (else at epoch end)
    gate_calibration_samples: ClassVar[int] = 8
    #: after the bias, also fit the row to the routing loss with this L2 weight (None: bias only; see
    #: extension/gate_calibration.py for why it is off)
    gate_row_fit_l2: ClassVar[float | None] = None

    def _start_gate_calibration(self, net: torch.nn.Module) -> None:
        """Collect the gate's inputs of the first training steps for the new domains' rows (fresh runs only: a run
        continued with ``--c`` from epoch >= 1 was calibrated in its first epoch)."""
        old = set(self._old_meta.domain_names)
        self._calibrate = [d for d, n in enumerate(self.domain_names) if n not in old] \
            if net.router is not None and self.current_epoch == 0 else []
        self._gate_phi: list[torch.Tensor] = []
        self._gate_domain: list[torch.Tensor] = []
        self._step_phi = None
        self._slot_prior = self._new_slot_columns(net) if self._calibrate and self.gate_new_slot_margin else {}
        if self._calibrate:
            def keep_phi(module, args, output):  # the step's batch: the first gate call of the training forward
                if module.training and self._step_phi is None:
                    self._step_phi = args[0].detach().float()
            self._gate_hook = net.router.gate.register_forward_hook(keep_phi)

    def _new_slots(self) -> dict[int, list[int]]:
        """New domain -> indices (in the extended dataset's slot order) of its slots the old model did not have;
        only domains that have some."""
        from nnunet_universal.extension.weights import new_domain_slots

        meta = self._plans_meta()
        return {self.domain_names.index(d): [meta.slots.index(s) for s in slots]
                for d, slots in new_domain_slots(self._old_meta, meta).items() if slots}

    def _new_slot_columns(self, net: torch.nn.Module) -> dict[int, list[int]]:
        """New domain -> the phi columns of its new slots (phi ends in the slot-availability vector)."""
        prefix = net.router.gate.in_features - len(self._plans_meta().slots)
        slots = self._new_slots()
        out = {}
        for d in self._calibrate:
            if d in slots:
                out[d] = [prefix + i for i in slots[d]]
            else:
                self.print_to_log_file(f"new domain {self.domain_names[d]} brings no new slot: no new-slot prior; its "
                                       "gate bias is set from the old samples seen and the old prototypes (the "
                                       "prototypes alone without the old data: not reliable)")
        return out

    def _collect_gate_samples(self) -> None:
        """After a training step: keep its batch's gate inputs and domains; calibrate once every new domain has
        ``gate_calibration_samples`` samples (under DDP only at the epoch's end, on all ranks together)."""
        phi, self._step_phi = self._step_phi, None
        if not self._calibrate or phi is None:
            return
        self._gate_phi.append(phi)
        self._gate_domain.append(self._step_domain.detach().to(phi.device))
        domain = torch.cat(self._gate_domain)
        if not self.is_ddp and all(int((domain == d).sum()) >= self.gate_calibration_samples
                                   for d in self._calibrate):
            self._calibrate_gate()

    def on_train_epoch_end(self, train_outputs: list[dict]) -> None:
        if self._calibrate and (self._gate_phi or self.is_ddp):
            self._calibrate_gate()
        super().on_train_epoch_end(train_outputs)

    def _calibrate_gate(self) -> None:
        """Set the bias of the new domains' gate rows from the samples collected so far (under DDP: rank 0's
        values on every rank, after the first epoch, once)."""
        import torch.distributed as dist

        from nnunet_universal.extension.gate_calibration import calibrate_new_rows
        from nnunet_universal.nn.universal_unet import smallest_present_slot_value

        router = unwrap(self.network).router
        old = [d for d in range(len(self.domain_names)) if d not in self._calibrate]
        done = []
        if self._gate_phi:
            done = calibrate_new_rows(router, torch.cat(self._gate_phi), torch.cat(self._gate_domain),
                                      self._calibrate, old, fit_l2=self.gate_row_fit_l2, slot_prior=self._slot_prior,
                                      margin=self.gate_new_slot_margin or 0.0,
                                      present_value=smallest_present_slot_value(len(self._plans_meta().slots)))
        for c in done:
            self.print_to_log_file(c.describe(self.domain_names))
        if self.is_ddp:
            dist.broadcast(router.gate.bias.data, src=0)
            dist.broadcast(router.gate.weight.data, src=0)
            self._calibrate = []
        else:
            self._calibrate = [d for d in self._calibrate if d not in {c.domain for c in done}]
        for d in self._calibrate:
            self.print_to_log_file(f"gate row of new domain {self.domain_names[d]}: not calibrated yet (no training "
                                   "sample of it, or its prototype not set, in the steps so far)")
        self._gate_phi, self._gate_domain = [], []
        if not self._calibrate:
            self._gate_hook.remove()

    # ---- loss -------------------------------------------------------------------------------------------
    def _build_loss(self):
        from nnunet_universal.extension.losses import ExtensionLoss, register_partial_luts

        base = super()._build_loss()
        partial = self._partial_cases()
        if partial is not None:
            register_partial_luts(base, partial, self.label_manager.num_segmentation_heads,
                                  self.label_manager.ignore_label)
        extra = self._extra_term if (self.distill_weight > 0 or self.prototype_replay) else None
        # the new-slot prior: a new domain's samples whose new slots were hidden do not teach the gate
        self._gate_ignored = self._new_slots() if self.gate_new_slot_margin else {}
        gate_target = self._gate_targets if self._gate_ignored else None
        return ExtensionLoss(base, partial, extra, gate_target).to(self.device)

    def _gate_targets(self, domain: torch.Tensor) -> torch.Tensor:
        """(B,) the gate loss's targets of the current step: ``IGNORE_GATE`` for a new domain's samples whose new
        slots were hidden by modality dropout (with the new-slot prior such a scan is not routed to that domain;
        these samples would teach the gate the opposite), else the domain."""
        from nnunet_universal.trainers.losses import IGNORE_GATE

        availability = self._step_availability.to(domain.device)
        target = domain
        for d, slots in self._gate_ignored.items():
            hidden = (domain == d) & ~availability[:, slots].all(dim=1)
            target = torch.where(hidden, torch.full_like(target, IGNORE_GATE), target)
        return target

    def _partial_cases(self):
        """Old cases of domains that gained classes (dataset.json ``universal.provenance.partial_annotation``)."""
        from nnunet_universal.extension.losses import PartialCases

        info = (self.universal_meta.provenance or {}).get("partial_annotation") or {}
        if not info:
            return None
        names = self.domain_names
        old_ids, cases = {}, {}
        for dom, v in info.items():
            d = names.index(dom)
            labels = self.universal_meta.domains[dom].labels
            old_ids[d] = [labels[c] for c in v["classes"]]
            cases[d] = set(v["cases"])
        ids = {d: self.universal_meta.domain_label_ids(n) for d, n in enumerate(names)}
        self.print_to_log_file("old cases scored on their old classes only (new classes marginalized): "
                               + ", ".join(f"{names[d]} {len(c)} cases" for d, c in cases.items()))
        return PartialCases(len(names), ids, old_ids, cases)

    def _old_domain_indices(self) -> list[int]:
        return [self.domain_names.index(d) for d in self._old_meta.domain_names]

    def _extra_term(self, out: Any, domain: torch.Tensor) -> torch.Tensor:
        """Distillation on the old heads and prototype replay (no-old-data mode)."""
        from nnunet_universal.extension.losses import distillation_term, prototype_replay_term

        net = unwrap(self.network)
        total = torch.zeros((), device=self.device)
        if self.distill_weight > 0 and self._student_logits is not None and self._teacher_input is not None:
            x, availability = self._teacher_input
            with torch.no_grad():
                self._teacher(x, domain=torch.zeros(x.shape[0], dtype=torch.long, device=x.device),
                              availability=availability)
            total = total + self.distill_weight * distillation_term(
                self._student_logits, self._teacher_logits, domain, self._old_domain_indices(), net.heads.sizes,
                self.distill_temperature)
        if self.prototype_replay and net.router is not None:
            total = total + self.gate_loss_weight * prototype_replay_term(net.router, self._old_domain_indices())
        self._student_logits = self._teacher_input = None
        return total

    def _batch_to_device(self, batch: dict, hide_slots: bool):
        """Also keeps the step's input for the teacher (distillation)."""
        data, target, domain, availability, keys = super()._batch_to_device(batch, hide_slots)
        self._step_domain, self._step_availability = domain, availability
        if self.distill_weight > 0:
            self._ensure_teacher()
            self._teacher_input = (data, availability)
        return data, target, domain, availability, keys

    def _ensure_teacher(self) -> None:
        """The old model (the extension's initial weights: on old slots, exactly the old network), frozen, and
        hooks that keep the full-resolution head logits of the student's and the teacher's forward."""
        if getattr(self, "_teacher", None) is not None:
            return
        from nnunet_universal.inference.checkpoints import load_checkpoint

        teacher = self.build_network_architecture(self.plans_manager, self.configuration_manager,
                                                  self.num_input_channels, self.label_manager.num_segmentation_heads,
                                                  False)
        teacher.load_state_dict(load_checkpoint(self._init_file)["network_weights"])
        teacher.to(self.device).eval().requires_grad_(False)
        self._teacher = teacher
        self._student_logits = self._teacher_input = self._teacher_logits = None

        def keep_student(module, args, output):
            self._student_logits = output

        def keep_teacher(module, args, output):
            self._teacher_logits = output

        unwrap(self.network).heads.heads[0].register_forward_hook(keep_student)
        teacher.heads.heads[0].register_forward_hook(keep_teacher)
        self.print_to_log_file(f"no-old-data mode: the old model's head outputs on the new scans are soft targets "
                               f"for the old domains' heads (weight {self.distill_weight}, T "
                               f"{self.distill_temperature}); old prototypes replayed in the gate loss")


class UniversalTrainer_ExtendNewParts(UniversalTrainer_Extend):
    """Extension training only what the extension added: the new slots' input weights, the heads of new domains
    and new classes, the gate rows and prototypes of new domains. Old domains' predictions stay exactly the old
    model's (unless the domain gained a class)."""

    trainable: ClassVar[str] = "new"


class UniversalTrainer_ExtendNewPartsHarmony(UniversalTrainer_Extend):
    """Extension training what the extension added plus U-Harmony's parameters (polynomial coefficients,
    HarmonyRestore), the paper's modality adaptation; these are shared, so old domains drift (measured:
    ``scripts/benchmark_extension.py --variants new_parts_harmony``)."""

    trainable: ClassVar[str] = "new+harmony"


class UniversalTrainer_ExtendNoOldData(UniversalTrainer_Extend):
    """Extension without the old training data (``extend --no-old-data``; the default there): only what the extension
    added is trained, on the new data (old domains' outputs exactly the old model's once routed to them); the old
    domains' prototypes are replayed in the gate loss."""

    trainable: ClassVar[str] = "new"
    prototype_replay: ClassVar[bool] = True


class UniversalTrainer_ExtendNoOldDataAll(UniversalTrainer_ExtendNoOldData):
    """No-old-data extension training everything on the new data: the old model's head outputs on the new scans are
    soft targets for the old heads (distillation); prototype replay as the default. The old domains drift
    (measured)."""

    trainable: ClassVar[str] = "all"
    distill_weight: ClassVar[float] = 1.0


#: every extension trainer (registry for the shim, the docs and the tests)
EXTENSION_TRAINERS: tuple[type[UniversalTrainer_Extend], ...] = (
    UniversalTrainer_Extend,
    UniversalTrainer_ExtendNewParts,
    UniversalTrainer_ExtendNewPartsHarmony,
    UniversalTrainer_ExtendNoOldData,
    UniversalTrainer_ExtendNoOldDataAll,
)
