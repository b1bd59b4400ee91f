"""Calling the universal network through nnU-Net's wrappers (DDP, torch.compile), and DDP with domain heads.

DDP expects a gradient for every parameter in every step. Two things break that here:

* outputs that the step's loss ignores: the lowest deep-supervision output (nnU-Net weights it 0), the gate
  logits with ``gate_loss_weight = 0``, heads or prompts a variant leaves out of the objective. DDP, also with
  ``find_unused_parameters=True``, counts every parameter that reaches a returned tensor as used and then
  waits for its gradient forever ("Expected to have finished reduction in the prior iteration").
  :func:`with_all_outputs` therefore adds ``0 * sum(output)`` for every returned tensor (nnU-Net itself
  works around its zero-weighted output by weighting it 1e-6 under DDP);
* parameters that produce no output in a step (a module a variant or a batch skips): nnU-Net wraps the
  network without ``find_unused_parameters``; :func:`wrap_ddp` re-wraps it with ``find_unused_parameters=True``
  (MultiTalent's choice for its per-dataset heads).

The training forward must run through DDP's ``__call__`` (its forward prepares the gradient reduction for
this iteration); calling ``module.forward_train`` directly would silently skip the synchronisation.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import fields, is_dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel as DDP

from nnunet_universal.nn.wrappers import unwrap


def wrap_ddp(network: nn.Module) -> DDP:
    """Wrap (or re-wrap) ``network`` in DDP with ``find_unused_parameters=True`` (see module docstring)."""
    device_ids = None
    if isinstance(network, DDP):
        device_ids = network.device_ids
        network = network.module
    elif next(network.parameters()).device.type == "cuda":
        device_ids = [next(network.parameters()).device.index]
    return DDP(network, device_ids=device_ids, find_unused_parameters=True)


@contextlib.contextmanager
def _forward_is_forward_train(core: nn.Module) -> Iterator[None]:
    """Temporarily make ``core.forward`` its ``forward_train`` so that wrappers' ``__call__`` runs it."""
    core.forward = core.forward_train  # instance attribute shadows the class method
    try:
        yield
    finally:
        del core.forward


def forward_train(network: nn.Module, x: Tensor, domain: Tensor, availability: Tensor) -> Any:
    """``forward_train`` of the universal network, through DDP / torch.compile wrappers when present.

    Args:
        network: ``UniversalUNet``, possibly wrapped in ``torch.compile`` and/or DDP.
        x: ``(B, C, *patch)`` input with missing channels zeroed.
        domain: ``(B,)`` long domain indices.
        availability: ``(B, C)`` bool.

    Returns:
        the network's ``TrainOutput``.
    """
    core = unwrap(network)
    if network is core:
        return core.forward_train(x, domain, availability)
    with _forward_is_forward_train(core):
        return network(x, domain, availability)


def _tensors(obj: Any) -> Iterator[Tensor]:
    """Every tensor inside a (nested) dataclass / list / tuple / dict, like DDP's own output traversal."""
    if isinstance(obj, Tensor):
        yield obj
    elif is_dataclass(obj) and not isinstance(obj, type):
        for f in fields(obj):
            yield from _tensors(getattr(obj, f.name))
    elif isinstance(obj, (list, tuple)):
        for o in obj:
            yield from _tensors(o)
    elif isinstance(obj, dict):
        for o in obj.values():
            yield from _tensors(o)


def with_all_outputs(loss: Tensor, output: Any) -> Tensor:
    """``loss + 0 * sum(every differentiable tensor in output)``: same value, every output in the graph (DDP)."""
    zero = [t.sum() for t in _tensors(output) if t.requires_grad and t.is_floating_point()]
    return loss + 0.0 * torch.stack(zero).sum().to(loss.dtype) if zero else loss
