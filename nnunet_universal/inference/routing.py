"""Case-level routing: infer a case's domain once, from features aggregated over the whole case.

nnU-Net's sliding window calls ``network(x)`` tile by tile; left alone, the domain gate would route every
tile on its own and one case could mix domains (a tile of a brain MR voted "CT" paints CT labels into it).
Here the gate sees the *case*: the bottleneck embedding ``phi`` of every sliding-window tile (the same tiles,
from nnU-Net's own step computation, that the prediction will visit) is averaged, and the averaged ``phi``
is routed once. The predictor then fixes that routing for every tile of the case.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from acvl_utils.cropping_and_padding.padding import pad_nd_image
from nnunetv2.inference.sliding_window_prediction import compute_steps_for_sliding_window
from torch import nn

from nnunet_universal.nn.availability import derive_availability
from nnunet_universal.nn.wrappers import unwrap

#: Tiles embedded per forward pass while aggregating ``phi`` (instance norms make this batch-size invariant).
TILE_BATCH = 4


def case_availability(data: torch.Tensor) -> torch.Tensor:
    """Channels holding real data in a preprocessed case: data (C, *spatial) -> (C,) bool.

    The training rule (:func:`~nnunet_universal.nn.availability.derive_availability`, same tolerance) applied to
    the WHOLE case instead of one patch.
    """
    return derive_availability(data, start_dim=1)


def sliding_window_slicers(image_size: Sequence[int], patch_size: Sequence[int],
                           tile_step_size: float) -> list[tuple[slice, ...]]:
    """Slicers of nnU-Net's sliding window over an image of ``image_size`` (spatial, already padded).

    Same tiles as ``nnUNetPredictor._internal_get_sliding_window_slicers``: steps from nnU-Net's
    ``compute_steps_for_sliding_window``; a 2D patch on a 3D image walks slice by slice along axis 0.
    Each slicer indexes a (C, *spatial) tensor.
    """
    image_size, patch_size = tuple(image_size), tuple(patch_size)
    if len(patch_size) == len(image_size) - 1:
        steps = compute_steps_for_sliding_window(image_size[1:], patch_size, tile_step_size)
        return [(slice(None), d, *(slice(s, s + p) for s, p in zip(start, patch_size, strict=True)))
                for d in range(image_size[0]) for start in itertools.product(*steps)]
    if len(patch_size) != len(image_size):
        raise ValueError(f"patch size {patch_size} does not fit an image of spatial size {image_size}")
    steps = compute_steps_for_sliding_window(image_size, patch_size, tile_step_size)
    return [(slice(None), *(slice(s, s + p) for s, p in zip(start, patch_size, strict=True)))
            for start in itertools.product(*steps)]


def case_tiles(data_shape: Sequence[int], patch_size: Sequence[int], tile_step_size: float) -> int:
    """Number of nnU-Net's sliding-window tiles of a (C, *spatial) case (padded to the patch as nnU-Net pads)."""
    padded = [max(s, p) for s, p in zip(data_shape[-len(patch_size):], patch_size, strict=True)]
    return len(sliding_window_slicers([*data_shape[1:-len(patch_size)], *padded], patch_size, tile_step_size))


def _batches(items: list, n: int) -> Iterator[list]:
    for i in range(0, len(items), n):
        yield items[i:i + n]


@torch.inference_mode()
def case_routing(network: nn.Module, data: torch.Tensor, patch_size: Sequence[int], tile_step_size: float = 0.5,
                 availability: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Routing weights of a whole case, from ``phi`` averaged over its sliding-window tiles.

    Args:
        network: a ``UniversalUNet`` (``embed(x, availability) -> (B, F)``, ``route(phi) -> (B, D)``), possibly
            wrapped by DDP or ``torch.compile``. It is put in eval mode for the call and restored afterwards.
        data: (C, *spatial) preprocessed case (as given to ``predict_sliding_window_return_logits``).
        patch_size: the configuration's patch size (3D, or 2D for a 2D configuration on a 3D case).
        tile_step_size: nnU-Net's sliding-window step (fraction of the patch), so that the tiles seen here are
            exactly the tiles the prediction visits.
        availability: (C,) bool channels to treat as present; default :func:`case_availability` of ``data``.

    Returns:
        (routing weights (D,) float on the CPU, before any decision rule (:func:`decide_routing`), availability
        (C,) bool on the CPU).
    """
    net = unwrap(network)
    device = next(net.parameters()).device
    if availability is None:
        availability = case_availability(data)
    availability = availability.to(dtype=torch.bool, device="cpu")
    padded, _ = pad_nd_image(data, tuple(patch_size), "constant", {"value": 0}, True, None)
    slicers = sliding_window_slicers(padded.shape[1:], patch_size, tile_step_size)

    was_training = net.training
    net.eval()
    try:
        phi_sum, n = None, 0
        # one tile per pass while the network caches encodings: the prediction pass sends single tiles too
        batch = 1 if getattr(net, "_encoding_cache", None) is not None else TILE_BATCH
        # a host-to-device copy per tile makes the host wait for the device at every tile: the availability goes
        # once, and the case is best already on the device (UniversalPredictor puts it there when it predicts
        # everything on the device; otherwise tiles are copied one by one, as nnU-Net does)
        avail_device = availability.to(device)[None]
        with torch.autocast(device.type) if device.type == "cuda" else contextlib.nullcontext():
            for chunk in _batches(slicers, batch):
                x = torch.stack([padded[s] for s in chunk]).to(device=device, dtype=torch.float32)  # (B, C, *patch)
                avail = avail_device.expand(len(chunk), -1)  # (B, C)
                phi = net.embed(x, availability=avail).float()  # (B, F)
                phi_sum = phi.sum(0) if phi_sum is None else phi_sum + phi.sum(0)
                n += phi.shape[0]
            routing = net.routing_weights((phi_sum / n)[None]).float()[0]  # (D,)
    finally:
        net.train(was_training)
    return routing.cpu(), availability


@dataclass(frozen=True)
class RoutingDecision:
    """What a case's routing weights were turned into (recorded in ``{case}.routing.json``).

    applied: (D,) head weights used for the case (one-hot under the hard rule); inferred: index of the most
    likely domain; runner_up: the second most likely (None with one domain); confidence: the top weight;
    uncertain: confidence below the threshold; conflicting: uncertain and the runner-up domain annotates other
    union labels than the inferred one (so the choice changes which labels can be painted).
    """

    rule: str
    applied: torch.Tensor
    inferred: int
    runner_up: int | None
    confidence: float
    uncertain: bool
    conflicting: bool


def decide_routing(weights: torch.Tensor, rule: str, confidence_threshold: float,
                   domain_labels: Sequence[Sequence[int]]) -> RoutingDecision:
    """Apply the routing rule to a case's weights (D,).

    ``"hard"`` (default): only the most likely domain's head, whatever the confidence, so that a case is never
    painted with the labels of a domain it was not routed to; an unsure case is flagged (``uncertain``) instead of
    mixed. ``"soft"``: the heads mixed by the weights (U-Harmony's rule). ``domain_labels[d]``: union label ids of
    domain ``d``; two domains whose label sets are equal (all classes declared ``--identical``) do not conflict.
    """
    if rule not in ("hard", "soft"):
        raise ValueError(f"routing rule must be 'hard' or 'soft', got {rule!r}")
    w = weights.detach().float().cpu()
    order = torch.argsort(w, descending=True).tolist()
    top, runner = order[0], (order[1] if len(order) > 1 else None)
    conf = float(w[top])
    uncertain = conf < confidence_threshold
    conflicting = bool(uncertain and runner is not None
                       and sorted(domain_labels[runner]) != sorted(domain_labels[top]))
    applied = torch.nn.functional.one_hot(torch.tensor(top), len(w)).float() if rule == "hard" else w.clone()
    return RoutingDecision(rule, applied, top, runner, conf, uncertain, conflicting)
