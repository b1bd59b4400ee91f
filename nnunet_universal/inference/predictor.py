"""``UniversalPredictor``: nnU-Net's predictor with case-level routing and oracle mode.

nnU-Net's sliding window calls ``network(x)`` on one tile at a time, so it cannot tell the network which
domain a case belongs to. This subclass overrides one method, ``predict_sliding_window_return_logits``
(called once per case and per fold's weights, by the stock ``predict_logits_from_preprocessed_data`` and by
nnU-Net's own prediction loops): before the stock sliding window runs, it fixes the network's context for
the whole case - the routing computed from ``phi`` aggregated over the case (dataset-free) or the given domain
(oracle) - and clears it afterwards. A case therefore never mixes domains across tiles.

Folds: the routing is computed with each fold's own weights (each fold's gate matches its heads); the
routing reported for the case (:attr:`UniversalPredictor.last_routing`) is the mean over folds.

Decision rule (the plans' ``routing`` option, ``set_routing`` overrides it): ``hard`` (default) uses only the most
likely domain's head, so a case is never painted with labels of a domain it was not routed to; a case whose top
weight is below ``routing_confidence`` is flagged as uncertain in the routing record, together with the runner-up
domain and whether the two annotate different labels (:func:`~nnunet_universal.inference.routing.decide_routing`).
``soft`` mixes the heads by the weights (U-Harmony's rule).

Networks without a gate (ablation ``gate=False``) mix their heads uniformly in dataset-free mode; union-head
baselines have no domain heads, so oracle mode restricts their union prediction to the domain's labels
(unannotated classes merged into background), as the trainer's final validation does.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import os
from pathlib import Path

import torch
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
from torch import nn

from nnunet_universal.discovery import trainer_class
from nnunet_universal.inference.routing import (
    case_availability,
    case_routing,
    case_tiles,
    decide_routing,
)
from nnunet_universal.metadata import MetadataError, NetworkOptions, UniversalMeta, read_plans_universal
from nnunet_universal.nn.encoding_cache import DEFAULT_CACHE_MB
from nnunet_universal.nn.heads import restrict_to_domain
from nnunet_universal.nn.wrappers import unwrap

logger = logging.getLogger(__name__)


def _on_device(net: torch.nn.Module, device: torch.device) -> bool:
    """Whether every parameter and buffer is already on ``device`` (then ``.to(device)`` would only cost host time:
    two dispatched operations per tensor)."""
    device = torch.device(device)
    return all(t.device == device for t in itertools.chain(net.parameters(), net.buffers()))


class _ChannelsOverride:
    """nnU-Net's label manager with another ``num_segmentation_heads`` (the channels of the sliding window's results
    buffer); everything else forwarded."""

    def __init__(self, label_manager, channels: int) -> None:
        self._label_manager = label_manager
        self.num_segmentation_heads = channels

    def __getattr__(self, name: str):
        return getattr(self._label_manager, name)


@contextlib.contextmanager
def _results_channels(predictor: nnUNetPredictor, channels: int):
    """For the duration: nnU-Net's sliding window (which sizes its results buffer by the label manager's
    ``num_segmentation_heads``) aggregates ``channels`` channels."""
    original = predictor.label_manager
    predictor.label_manager = _ChannelsOverride(original, channels)
    try:
        yield
    finally:
        predictor.label_manager = original


class UniversalPredictor(nnUNetPredictor):
    """nnU-Net predictor for universal models: case-level routing (dataset-free) or a given domain (oracle).

    Set :attr:`oracle_domain` to a domain name for oracle mode, leave it ``None`` for dataset-free mode.
    After each case, :attr:`last_routing` holds the routing used, (D,) in the order of :attr:`meta` domains.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.meta: UniversalMeta | None = None
        self.network_options: NetworkOptions | None = None
        self.oracle_domain: str | None = None
        self._fold_routings: list[torch.Tensor] = []
        self._fold_applied: list[torch.Tensor] = []
        self.last_availability: torch.Tensor | None = None
        self._tile_cache = None  # the case's encoding cache while its sliding window runs
        self._tile_pass = None  # the case's embedding while its one-pass sliding window runs
        #: dataset-free prediction with hard routing in one sliding window (nn/case_embedding.py); False (or
        #: NNUNET_UNIVERSAL_ONE_PASS=0): a routing pass first, then the sliding window with the chosen head
        self.one_pass = os.environ.get("NNUNET_UNIVERSAL_ONE_PASS", "1") != "0"
        #: memory for encoder outputs shared by the routing and prediction passes (dataset-free mode);
        #: 0 turns the sharing off (every tile is then encoded twice)
        self.encoding_cache_mb = int(os.environ.get("NNUNET_UNIVERSAL_ENCODING_CACHE_MB", DEFAULT_CACHE_MB))

    @property
    def gated(self) -> bool:
        """Whether the network has a domain gate (dataset-free routing is then inferred, else uniform)."""
        return getattr(unwrap(self.network), "router", None) is not None

    @property
    def union_head(self) -> bool:
        """Whether the network has one union head instead of per-domain heads (joint baselines)."""
        return bool(getattr(unwrap(self.network), "union_head", False))

    # ---- initialization ------------------------------------------------------------------------
    def initialize_from_trained_model_folder(self, model_training_output_dir: str, use_folds,
                                             checkpoint_name: str = "checkpoint_final.pth") -> None:
        """nnU-Net 2.8.1's loading without its unsafe ``torch.load(weights_only=False)``, then the universal checks.

        Every fold's checkpoint goes through :func:`~nnunet_universal.inference.checkpoints.load_checkpoint`
        (weights only, an explicit allow-list; anything else is refused before it is unpickled). The rest is the
        stock method: dataset.json, plans.json, the trainer class by the checkpoint's name (ours first, then
        nnU-Net's lookup with ``nnUNet_extTrainer``), the network from the plans, the first fold's weights.
        """
        from batchgenerators.utilities.file_and_folder_operations import load_json
        from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
        from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

        from nnunet_universal.inference.checkpoints import load_checkpoint

        folder = Path(model_training_output_dir)
        if use_folds is None:
            use_folds = nnUNetPredictor.auto_detect_available_folds(str(folder), checkpoint_name)
        if isinstance(use_folds, str):
            use_folds = [use_folds]
        dataset_json = load_json(str(folder / "dataset.json"))
        plans_manager = PlansManager(load_json(str(folder / "plans.json")))
        parameters = []
        for i, f in enumerate(use_folds):
            f = int(f) if f != "all" else f
            checkpoint = load_checkpoint(folder / f"fold_{f}" / checkpoint_name)
            if i == 0:
                trainer_name = checkpoint["trainer_name"]
                configuration_name = checkpoint["init_args"]["configuration"]
                mirroring_axes = checkpoint.get("inference_allowed_mirroring_axes")
            parameters.append(checkpoint["network_weights"])

        configuration_manager = plans_manager.get_configuration(configuration_name)
        num_input_channels = determine_num_input_channels(plans_manager, configuration_manager, dataset_json)
        num_output_channels = plans_manager.get_label_manager(dataset_json).num_segmentation_heads
        network = trainer_class(trainer_name).build_network_architecture(
            plans_manager, configuration_manager, num_input_channels, num_output_channels,
            enable_deep_supervision=False)
        network.load_state_dict(parameters[0])  # stock: the first fold's weights (nnU-Net issue #2520)
        super().manual_initialization(network, plans_manager, configuration_manager, parameters, dataset_json,
                                      trainer_name, mirroring_axes)  # stock bookkeeping and torch.compile
        self._read_universal(folder / "plans.json")

    def manual_initialization(self, network: nn.Module, plans_manager, configuration_manager, parameters,
                              dataset_json: dict, trainer_name: str, inference_allowed_mirroring_axes) -> None:
        """Stock manual initialization (used by trainers' final validation), then the universal checks."""
        super().manual_initialization(network, plans_manager, configuration_manager, parameters, dataset_json,
                                      trainer_name, inference_allowed_mirroring_axes)
        self._read_universal("plans")

    def _read_universal(self, where: str | os.PathLike) -> None:
        try:
            self.meta, self.network_options = read_plans_universal(self.plans_manager.plans, where=str(where))
        except MetadataError as e:
            raise MetadataError(f"not a universal model: {e}") from None
        net = unwrap(self.network)
        missing = [m for m in ("set_context", "clear_context", "embed", "route", "routing_weights")
                   if not hasattr(net, m)]
        if missing:
            raise MetadataError(
                f"not a universal model: trainer {self.trainer_name} built a {type(net).__name__}, which has no "
                f"domain routing ({', '.join(missing)} missing). Predict with nnUNetv2_predict instead, or train "
                "with -tr UniversalTrainer"
            )

    def set_routing(self, mode: str) -> None:
        """Override the model's dataset-free head mixing: ``"soft"`` (heads weighted by the case's routing, the
        default of the plans) or ``"hard"`` (only the inferred domain's head; the routing becomes one-hot)."""
        if mode not in ("soft", "hard"):
            raise ValueError(f"routing must be 'soft' or 'hard', got {mode!r}")
        if self.meta is None:
            raise RuntimeError("UniversalPredictor is not initialized; call initialize_from_trained_model_folder")
        net = unwrap(self.network)  # the network's options decide; network_options stays as planned
        net.options = dataclasses.replace(net.options, routing=mode)

    # ---- per-case context ----------------------------------------------------------------------
    @property
    def last_routing(self) -> torch.Tensor | None:
        """Routing weights of the last case, (D,), before the decision rule: mean over the folds' weights (one-hot
        in oracle mode, uniform without gate)."""
        if not self._fold_routings:
            return None
        return torch.stack(self._fold_routings).mean(0)

    @property
    def last_applied(self) -> torch.Tensor | None:
        """Head weights used for the last case, (D,): mean over folds of the rule's output."""
        if not self._fold_applied:
            return None
        return torch.stack(self._fold_applied).mean(0)

    def routing_record(self, case_id: str, slots: list[str] | None = None) -> dict:
        """The last case's ``{case}.routing.json`` content: mode, rule, given/inferred domain, raw and applied
        weights, confidence, runner-up, whether the case is uncertain/conflicting and what was done about it."""
        names = self.meta.domain_names
        raw, applied = self.last_routing, self.last_applied
        rec: dict = {"case": case_id}
        if self.oracle_domain is not None:
            rec.update(mode="oracle", rule="oracle", given_domain=self.oracle_domain, inferred_domain=None)
        elif not self.gated:  # no gate (ablation): the heads are mixed uniformly, no domain is inferred
            rec.update(mode="dataset-free", rule="uniform", given_domain=None, inferred_domain=None)
        else:
            opts = unwrap(self.network).options
            decision = decide_routing(raw, opts.routing, opts.routing_confidence,
                                      [self.meta.domain_label_ids(n) for n in names])
            runner = None if decision.runner_up is None else names[decision.runner_up]
            if not decision.uncertain:
                action = "confident"
            elif decision.rule == "hard":
                action = (f"uncertain: only {names[decision.inferred]}'s head was used (hard routing), "
                          f"{runner} was not mixed in; check the case or predict it with --domain NAME")
            else:
                action = (f"uncertain: heads mixed by weight (soft routing), labels of {runner} may be painted; "
                          "predict with --routing hard or --domain NAME to avoid that")
            rec.update(mode="dataset-free", rule=decision.rule, given_domain=None,
                       inferred_domain=names[decision.inferred], confidence=round(decision.confidence, 6),
                       confidence_threshold=opts.routing_confidence, runner_up=runner,
                       uncertain=decision.uncertain, conflicting=decision.conflicting, action=action)
        rec["routing"] = {n: round(float(w), 6) for n, w in zip(names, raw, strict=True)}
        rec["applied"] = {n: round(float(w), 6) for n, w in zip(names, applied, strict=True)}
        if slots is not None:
            rec["slots"] = list(slots)
        ext = self.plans_manager.plans.get("universal", {}).get("extension")
        if ext:  # a model grown by 'nnunet-universal extend': how (no-old-data mode is a weaker model of old domains)
            rec["extension"] = {"mode": ext.get("mode", "with-old-data"), "from_dataset": ext.get("from_dataset"),
                                "new_domains": ext.get("new_domains", [])}
        return rec

    def predict_logits_from_preprocessed_data(self, data: torch.Tensor) -> torch.Tensor:
        """Stock fold ensemble of one case; resets the per-case routing record first. data: (C, *spatial)."""
        self._fold_routings, self._fold_applied = [], []
        logits = super().predict_logits_from_preprocessed_data(data)
        if self.oracle_domain is not None and self.union_head:
            logits = restrict_to_domain(logits, self.meta.domain_label_ids(self.oracle_domain))
        return logits

    def predict_logits_for_domain(self, data: torch.Tensor, domain: str) -> torch.Tensor:
        """Oracle logits of one case for ``domain`` regardless of the current mode (per-domain label maps)."""
        previous, self.oracle_domain = self.oracle_domain, domain
        try:
            return self.predict_logits_from_preprocessed_data(data)
        finally:
            self.oracle_domain = previous

    @torch.inference_mode()
    def predict_sliding_window_return_logits(self, input_image: torch.Tensor) -> torch.Tensor:
        """Fix the case's routing (or oracle domain) in the network, run the stock sliding window, clear it.

        input_image: (C, *spatial) preprocessed case; returns (n_union, *spatial) logits like the stock method.
        """
        if self.meta is None:
            raise RuntimeError("UniversalPredictor is not initialized; call initialize_from_trained_model_folder")
        net = unwrap(self.network)
        if not _on_device(net, self.device):  # the routing pass runs before nnU-Net's method moves it
            self.network = self.network.to(self.device)
            net = unwrap(self.network)
        if self.perform_everything_on_device and self.device.type == "cuda":
            # one copy of the case on the device serves the routing pass and nnU-Net's sliding window (which
            # would copy it there itself); slicing tiles on the host and copying each one cost more than the
            # network's extra work on a GPU
            input_image = input_image.to(self.device)
        availability = case_availability(input_image).cpu()
        self.last_availability = availability
        cache = None
        with contextlib.ExitStack() as stack:
            if self.oracle_domain is not None:
                d = self.meta.domain_index(self.oracle_domain)
                routing = torch.nn.functional.one_hot(torch.tensor(d), len(self.meta.domains)).float()
                context = {"domain": d}
            elif self.gated and self.one_pass and net.options.routing == "hard" \
                    and getattr(net, "supports_case_pass", False):
                return self._predict_one_pass(net, input_image, availability)
            elif self.gated:
                if hasattr(net, "encoding_cache"):  # the routing pass's encoder outputs serve the prediction pass
                    cache = stack.enter_context(net.encoding_cache(self.encoding_cache_mb * 2**20))
                routing, _ = case_routing(self.network, input_image, self.configuration_manager.patch_size,
                                          self.tile_step_size, availability=availability)
                decision = decide_routing(routing, net.options.routing, net.options.routing_confidence,
                                          [self.meta.domain_label_ids(n) for n in self.meta.domain_names])
                applied = decision.applied
                context = {"routing": applied.to(self.device)}
            else:
                n = len(self.meta.domains)
                routing = applied = torch.full((n,), 1.0 / n)
                context = {"routing": routing.to(self.device)}
            if self.oracle_domain is not None:
                applied = routing
            self._fold_routings.append(routing)
            self._fold_applied.append(applied)
            logger.debug("case routing %s, availability %s", routing.tolist(), availability.tolist())
            net.set_context(availability=availability.to(self.device), **context)
            stack.callback(net.clear_context)
            self._tile_cache = cache
            stack.callback(setattr, self, "_tile_cache", None)
            logits = super().predict_sliding_window_return_logits(input_image)
            if cache is not None and not cache.verify():
                logger.warning("the encodings of the routing pass did not match the sliding window's tiles; "
                               "predicting the case again without reusing them")
                cache.enabled = False
                logits = super().predict_sliding_window_return_logits(input_image)
            return logits

    def _predict_one_pass(self, net: nn.Module, input_image: torch.Tensor, availability: torch.Tensor) -> torch.Tensor:
        """Dataset-free prediction under hard routing in one sliding window (``nn/case_embedding.py``): nnU-Net's
        sliding window aggregates every head's log-probabilities (its results buffer sized for them for the
        call) while the network sums the tiles' ``phi``; then the case's routing is decided and the chosen head's
        union channels are taken from the aggregate. Equal to the two-pass prediction (tested), one encoder pass
        and no cached encoder output less. input_image: (C, *spatial) -> (U, *spatial) logits."""
        with contextlib.ExitStack() as stack:
            case = stack.enter_context(net.case_pass())
            net.set_context(availability=availability.to(self.device))
            stack.callback(net.clear_context)
            self._tile_pass = case
            stack.callback(setattr, self, "_tile_pass", None)
            stack.enter_context(_results_channels(self, net.heads.num_pass_channels))
            aggregated = super().predict_sliding_window_return_logits(input_image)
            patch, step = self.configuration_manager.patch_size, self.tile_step_size
            tiles = case_tiles(input_image.shape, patch, step)
            if case.count == tiles:
                routing = net.routing_weights(case.mean()[None]).float()[0].cpu()  # (D,)
        if case.count != tiles:
            # nnU-Net restarted the sliding window (its results buffer did not fit on the device): the embedding
            # holds tiles of both tries; the aggregate is the second try's, only the routing is computed again
            logger.warning("the one-pass sliding window saw %d tiles for %d: computing the case's routing in a "
                           "separate pass", case.count, tiles)
            routing, _ = case_routing(self.network, input_image, patch, step, availability=availability)
        decision = decide_routing(routing, "hard", net.options.routing_confidence,
                                  [self.meta.domain_label_ids(n) for n in self.meta.domain_names])
        self._fold_routings.append(routing)
        self._fold_applied.append(decision.applied)
        logger.debug("case routing %s (one pass), availability %s", routing.tolist(), availability.tolist())
        return net.heads.union_from_all(aggregated, decision.inferred)

    def _internal_maybe_mirror_and_predict(self, x: torch.Tensor) -> torch.Tensor:
        """Stock per-tile prediction; tells the encoding cache or the case's embedding that the next network call
        is the tile itself."""
        if self._tile_pass is not None:
            self._tile_pass.expect_tile()
        if self._tile_cache is not None:
            self._tile_cache.expect_tile()
        return super()._internal_maybe_mirror_and_predict(x)
