"""``UniversalTrainer``: nnU-Net's training loop for one model on many partially labelled datasets.

Configuration lives in class attributes (variants override exactly one, see ``variants.py``), in the plans'
``universal`` block (network options, read by the classmethod ``build_network_architecture`` so that nnU-Net's
predictor can rebuild the network from the model folder alone) and in dataset.json's ``universal`` block
(per-case domain and slots). The ``__init__`` signature is nnU-Net's, unchanged (NNUNET_NOTES §1.4).

What changes against ``nnUNetTrainer`` (one hook each):

* ``build_network_architecture``: nnU-Net's planned U-Net with U-Harmony, prompts and the domain-gated head;
* ``get_dataloaders``: domain-balanced case sampling (``sampling.py``), nnU-Net's foreground oversampling inside;
* ``train_step`` / ``validation_step``: per-case domain and slots from ``batch['keys']``, missing slots zeroed
  after augmentation, modality dropout (``batch.py``), partial-label loss (``losses.py``), per-domain pseudo-Dice
  and gate accuracy (``online_eval.py``, logged and plotted by ``progress.py``);
* ``perform_actual_validation``: per-domain metrics in oracle and dataset-free mode (``final_validation.py``);
* ``initialize``: DDP with unused domain heads (``ddp.py``).
* ``save_checkpoint`` / ``load_checkpoint``: saves renamed into place, loads checked (truncated or damaged files
  named with what to do) and weights-only (``checkpoint_io.py``).

Short schedules: ``NNUNET_UNIVERSAL_SCHEDULE=EPOCHS:ITERS:VAL_ITERS`` (``schedule.py``).
"""

import dataclasses
import os
from typing import Any, ClassVar

import numpy as np
import torch
import torch.distributed as dist
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.collate_outputs import collate_outputs
from nnunetv2.utilities.helpers import dummy_context
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager
from torch import nn

from nnunet_universal.metadata import MetadataError, NetworkOptions, UniversalMeta, load_universal, read_plans_universal
from nnunet_universal.trainers.batch import batch_context, modality_dropout, zero_missing_channels
from nnunet_universal.trainers.checkpoint_io import read_training_checkpoint, restore_training_state, save_atomically
from nnunet_universal.trainers.ddp import forward_train, with_all_outputs, wrap_ddp
from nnunet_universal.trainers.losses import OBJECTIVES, PartialLabelLoss, deep_supervision_weights, to_local_target
from nnunet_universal.trainers.online_eval import (
    DomainLayout,
    dice_from_counts,
    domain_confusion,
    nan_mean,
    per_domain_mean,
)
from nnunet_universal.trainers.progress import UniversalLocalLogger
from nnunet_universal.trainers.sampling import DEFAULT_DOMAIN_ALPHA, domain_probabilities, domain_sampling_probabilities
from nnunet_universal.trainers.schedule import apply_schedule, apply_seed

#: Network options implied by each objective: the joint baselines have one union head and nothing that is
#: conditioned on the domain (a naive joint model has no notion of domain).
OBJECTIVE_OPTIONS: dict[str, dict[str, Any]] = {
    "domain_heads": {},
    "naive": {"head": "union", "gate": False, "task_prompt": False},
    "marginal": {"head": "union", "gate": False, "task_prompt": False},
}


def dataset_universal_meta(dataset_json: dict, where: str = "dataset.json") -> UniversalMeta:
    """The dataset's universal block, or a MetadataError telling the user how to create it."""
    try:
        return load_universal(dataset_json, where=where)
    except MetadataError as e:
        raise MetadataError(
            f"{e}\nUniversalTrainer needs a dataset written by nnunet-universal: run 'nnunet-universal convert' "
            "(or 'nnunet-universal merge') to create it and 'nnunet-universal plan -d ID' to plan it, then train "
            "with '-p nnUNetUniversalPlans'."
        ) from None


class UniversalTrainer(nnUNetTrainer):
    """nnU-Net trainer for a merged, partially labelled, mixed-modality dataset (domain-gated U-Harmony U-Net).

    Class attributes (variants change one of them):
        network_overrides: fields of :class:`~nnunet_universal.metadata.NetworkOptions` replacing the plans' values.
        objective: ``"domain_heads"`` (own domain's head per sample + gate loss), ``"naive"`` (one union head,
            nnU-Net's loss, unknown = background) or ``"marginal"`` (union head, marginal loss).
        domain_alpha: α of p(domain) ∝ n_domain^α for the training batches (0.5: MultiTalent's square-root balancing,
            see ``sampling.py``).
        val_domain_alpha: α for the validation iterations; 0 draws every domain equally often, so that the
            per-domain pseudo-Dice of small domains rests on as many patches as that of large ones.
        modality_dropout_p: per-sample probability of hiding a random subset of its available slots (never all).
            0.2 keeps most batches complete (the full-modality case stays the common one) while every sample with
            several slots is trained without some of them every few epochs.
        gate_loss_weight: weight of the gate's cross-entropy. Domain identity is easy to learn from the slots and
            intensities, so the gate converges long before the segmentation; 0.1 keeps its gradient on the shared
            encoder small next to the Dice + CE of the heads.
    """

    network_overrides: ClassVar[dict[str, Any]] = {}
    objective: ClassVar[str] = "domain_heads"
    domain_alpha: ClassVar[float] = DEFAULT_DOMAIN_ALPHA
    val_domain_alpha: ClassVar[float] = 0.0
    modality_dropout_p: ClassVar[float] = 0.2
    gate_loss_weight: ClassVar[float] = 0.1
    #: learning rate of the parameters U-Harmony adds, relative to nnU-Net's (``trainers/optim.py``): at 1.0 they
    #: grew large and the full model lost 30 Dice points in the accuracy suite (README, Benchmarks)
    harmony_lr_scale: ClassVar[float] = 0.1

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device('cuda')):  # noqa: B008 (nnU-Net's exact signature)
        meta = dataset_universal_meta(dataset_json)
        if "universal" not in plans:  # plain nnUNetPlans: derive the block; on_train_start saves it as plans.json
            from nnunet_universal.planners.plans_block import ensure_universal_plans

            plans = ensure_universal_plans(plans, dataset_json)
        super().__init__(plans, configuration, fold, dataset_json, device)
        if self.objective not in OBJECTIVES:
            raise ValueError(f"{type(self).__name__}.objective={self.objective!r}; choose one of {OBJECTIVES}")
        if self.label_manager.has_regions:
            raise ValueError("UniversalTrainer trains on labels, not regions; remove 'regions_class_order' and "
                             "region labels from dataset.json (per-domain regions live in the universal block)")
        plans_meta, _ = read_plans_universal(self.plans_manager.plans)
        _check_same_domains(plans_meta, meta)
        self.universal_meta = meta
        self.domain_names = list(plans_meta.domain_names)
        self.layout = DomainLayout(tuple(self.domain_names),
                                   tuple(len(meta.domain_label_ids(d)) for d in self.domain_names))
        self.logger.local_logger = UniversalLocalLogger(self.domain_names)
        apply_schedule(self)
        apply_seed(self)  # before initialize() builds the network

    # ---- network ---------------------------------------------------------------------------------
    @classmethod
    def network_options(cls, plans: dict) -> NetworkOptions:
        """The plans' network options with this class's overrides and objective applied."""
        _, options = read_plans_universal(plans)
        overrides = {**OBJECTIVE_OPTIONS[cls.objective], **cls.network_overrides}
        try:
            return dataclasses.replace(options, **overrides)
        except TypeError as e:
            raise ValueError(f"{cls.__name__}.network_overrides {overrides} names an unknown option: {e}") from None

    @classmethod
    def build_network_architecture(cls, plans_manager: PlansManager, configuration_manager: ConfigurationManager,
                                   num_input_channels: int, num_output_channels: int,
                                   enable_deep_supervision: bool = True) -> nn.Module:
        """nnU-Net's planned U-Net with the universal modules; from plans + class attributes only (predictor-safe)."""
        from nnunet_universal.nn.universal_unet import build_universal_network

        return build_universal_network(plans_manager, configuration_manager, num_input_channels, num_output_channels,
                                       enable_deep_supervision, options=cls.network_options(plans_manager.plans))

    def _do_i_compile(self) -> bool:
        """torch.compile only on request (``nnUNet_compile=1``), not by default as in nnU-Net.

        The training forward groups samples by domain (``torch.unique``, boolean indexing): data-dependent
        shapes on which dynamo breaks the graph and recompiles for every new combination of domains in a batch.
        """
        return os.environ.get("nnUNet_compile", "").lower() in ("true", "1", "t") and super()._do_i_compile()

    def initialize(self) -> None:
        """Stock initialization; under DDP re-wrap with ``find_unused_parameters=True`` (see ``ddp.py``)."""
        super().initialize()
        if self.is_ddp:
            self.network = wrap_ddp(self.network)

    def _build_loss(self) -> nn.Module:
        if self.enable_deep_supervision:
            weights = deep_supervision_weights(len(self._get_deep_supervision_scales()))
        else:
            weights = [1.0]
        return PartialLabelLoss(
            [self.universal_meta.domain_label_ids(d) for d in self.domain_names],
            num_union=self.label_manager.num_segmentation_heads, ds_weights=weights, objective=self.objective,
            batch_dice=self.configuration_manager.batch_dice, gate_weight=self.gate_loss_weight,
            ignore_label=self.label_manager.ignore_label, domain_names=self.domain_names,
        ).to(self.device)

    def configure_optimizers(self):
        """nnU-Net's SGD and poly schedule; U-Harmony's parameters in their own group when ``harmony_lr_scale``
        is not 1."""
        if self.harmony_lr_scale == 1.0:
            return super().configure_optimizers()
        from nnunet_universal.trainers.optim import sgd_with_harmony_scale

        return sgd_with_harmony_scale(self.network, self.initial_lr, self.weight_decay, self.num_epochs,
                                      self.harmony_lr_scale)

    # ---- data ------------------------------------------------------------------------------------
    def get_dataloaders(self):
        """Stock loaders and augmenters, then domain-balanced sampling probabilities on both loaders.

        nnU-Net builds its ``nnUNetDataLoader`` without a hook for ``sampling_probabilities`` and starts the
        background workers (forked copies of the loader) before returning, so we set the probabilities on the
        loader and restart the workers; with ``nnUNet_n_proc_DA=0`` the in-process loader just picks them up.
        """
        augmenters = super().get_dataloaders()
        for augmenter, alpha, what in zip(augmenters, (self.domain_alpha, self.val_domain_alpha),
                                          ("training", "validation"), strict=True):
            loader = augmenter.generator if hasattr(augmenter, "generator") else augmenter.data_loader
            loader.sampling_probabilities = domain_sampling_probabilities(loader.indices, self.universal_meta, alpha)
            if hasattr(augmenter, "restart"):
                augmenter.restart()
            shares = domain_probabilities(loader.indices, self.universal_meta, alpha)
            self.print_to_log_file(f"{what} domain sampling (alpha={alpha}): "
                                   + ", ".join(f"{d} {p:.3f}" for d, p in shares.items()))
        return augmenters

    def _batch_to_device(self, batch: dict, hide_slots: bool):
        ctx = batch_context(batch["keys"], self.universal_meta, self.domain_names)
        availability = modality_dropout(ctx.availability, self.modality_dropout_p) if hide_slots else ctx.availability
        data = zero_missing_channels(batch["data"].to(self.device, non_blocking=True), availability)
        target = batch["target"] if isinstance(batch["target"], list) else [batch["target"]]
        target = [t.to(self.device, non_blocking=True) for t in target]
        return data, target, ctx.domain.to(self.device), availability.to(self.device), ctx.keys

    def _autocast(self):
        return torch.autocast(self.device.type, enabled=True) if self.device.type == "cuda" else dummy_context()

    # ---- steps -----------------------------------------------------------------------------------
    def train_step(self, batch: dict) -> dict:
        """One step: own-domain heads (or union head), deep supervision, gate loss; as nnU-Net otherwise."""
        data, target, domain, availability, keys = self._batch_to_device(batch, hide_slots=True)
        self.optimizer.zero_grad(set_to_none=True)
        with self._autocast():
            out = forward_train(self.network, data, domain, availability)
            loss = self.loss(out, target, domain, keys)
            if self.is_ddp:
                loss = with_all_outputs(loss, out)
        if self.grad_scaler is not None:
            self.grad_scaler.scale(loss).backward()
            self.grad_scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.network.parameters(), 12)
            self.grad_scaler.step(self.optimizer)
            self.grad_scaler.update()
        else:
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.network.parameters(), 12)
            self.optimizer.step()
        return {"loss": loss.detach().cpu().numpy()}

    def validation_step(self, batch: dict) -> dict:
        """Loss, per-(domain, class) hard tp/fp/fn of each sample's own head (oracle) and gate hits."""
        data, target, domain, availability, keys = self._batch_to_device(batch, hide_slots=False)
        with self._autocast():
            out = forward_train(self.network, data, domain, availability)
            loss = self.loss(out, target, domain, keys)
        tp, fp, fn = (np.zeros(self.layout.size) for _ in range(3))
        for d, (idx, logits) in self.loss.domain_logits(out, 0, domain).items():
            idx = idx.to(target[0].device)
            local = to_local_target(target[0][idx], self.loss.lut(d), [keys[i] for i in idx.tolist()],
                                    self.domain_names[d])
            counts = domain_confusion(logits, local)
            for acc, c in zip((tp, fp, fn), counts, strict=True):
                acc[self.layout.slice(d)] += c
        gate = getattr(out, "gate_logits", None)
        correct = int((gate.argmax(1) == domain).sum()) if gate is not None else 0
        return {"loss": loss.detach().cpu().numpy(), "tp_hard": tp, "fp_hard": fp, "fn_hard": fn,
                "gate_correct": correct, "gate_total": int(domain.numel()) if gate is not None else 0}

    def on_validation_epoch_end(self, val_outputs: list[dict]) -> None:
        """Log per-domain pseudo-Dice, gate accuracy and ``mean_fg_dice`` (mean over domains; picks checkpoint_best)."""
        out = collate_outputs(val_outputs)
        tp, fp, fn = (out[k].sum(0) for k in ("tp_hard", "fp_hard", "fn_hard"))
        gate = np.array([sum(out["gate_correct"]), sum(out["gate_total"])], dtype=np.float64)
        losses = np.asarray(out["loss"], dtype=np.float64).reshape(-1)
        if self.is_ddp:
            gathered = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, (tp, fp, fn, gate, losses))
            tp, fp, fn, gate = (np.sum([g[i] for g in gathered], axis=0) for i in range(4))
            losses = np.concatenate([g[4] for g in gathered])
        dice = dice_from_counts(tp, fp, fn)
        per_domain = per_domain_mean(dice, self.layout)
        gate_accuracy = float(gate[0] / gate[1]) if gate[1] > 0 else float("nan")
        epoch = self.current_epoch
        self.logger.log("mean_fg_dice", nan_mean(per_domain), epoch)
        self.logger.log("dice_per_class_or_region", [float(x) for x in dice], epoch)
        self.logger.log("val_losses", float(np.mean(losses)), epoch)
        self.logger.log("dice_per_domain", per_domain, epoch)
        self.logger.log("gate_accuracy", gate_accuracy, epoch)
        self.print_to_log_file("Pseudo dice per domain: " + ", ".join(
            f"{d} {np.round(v, 4)}" for d, v in zip(self.domain_names, per_domain, strict=True))
            + f"; gate accuracy {np.round(gate_accuracy, 4)} ({int(gate[0])}/{int(gate[1])} validation patches)")

    # ---- checkpoints -----------------------------------------------------------------------------
    def save_checkpoint(self, filename: str) -> None:
        """nnU-Net's save to a temp name, renamed: a kill or full disk mid-save keeps the previous checkpoint."""
        save_atomically(super().save_checkpoint, filename)

    def load_checkpoint(self, filename_or_checkpoint: dict | str | os.PathLike) -> None:
        """nnU-Net's restore (``--c``, ``--val``) from a checked file loaded as weights only; a truncated or damaged
        file is a :class:`~nnunet_universal.trainers.checkpoint_io.DamagedCheckpointError` that names it and says
        which checkpoint to resume from instead."""
        checkpoint = (filename_or_checkpoint if isinstance(filename_or_checkpoint, dict)
                      else read_training_checkpoint(filename_or_checkpoint))
        restore_training_state(self, checkpoint)

    # ---- final validation ------------------------------------------------------------------------
    def perform_actual_validation(self, save_probabilities: bool = False) -> None:
        """Per-domain metrics of the validation cases in oracle and dataset-free mode (JSON + Markdown)."""
        from nnunet_universal.trainers.final_validation import run_final_validation

        run_final_validation(self, save_probabilities=save_probabilities)


def _check_same_domains(plans_meta: UniversalMeta, meta: UniversalMeta) -> None:
    """The network (plans) and the data (dataset.json) must agree on domains, their order and label ids."""
    mismatch = plans_meta.domain_names != meta.domain_names or any(
        plans_meta.domain_label_ids(d) != meta.domain_label_ids(d) for d in meta.domain_names)
    if mismatch:
        raise MetadataError(
            f"the plans' universal block describes domains {plans_meta.domain_names} with other labels or in another "
            f"order than dataset.json ({meta.domain_names}); re-run 'nnunet-universal plan' after changing the data"
        )
