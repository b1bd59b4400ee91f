"""Put HarmonyNorm into a planned dynamic-network-architectures U-Net without rebuilding or copying it.

The planned networks (PlainConvUNet, ResidualEncoderUNet, 2D or 3D) keep each norm module twice
(``ConvDropoutNormReLU.norm`` and inside ``all_modules``) and the decoder holds the encoder too, so a
replacement must swap every reference to the same module object; it copies the (possibly
zero-initialized) affine parameters so that the injected network computes what the planned one did.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from torch import nn
from torch.nn.modules.instancenorm import _InstanceNorm

from nnunet_universal.nn.harmony import HarmonyNorm

logger = logging.getLogger(__name__)


def replace_modules(root: nn.Module, make: Callable[[nn.Module], nn.Module | None],
                    within: list[nn.Module] | None = None) -> dict[int, nn.Module]:
    """Replace every module ``m`` under ``within`` (default: ``root``) for which ``make(m)`` returns a module.

    All parents of ``m`` anywhere under ``root`` are updated (shared references stay shared).
    Returns ``{id(old): new}``.
    """
    scopes = within if within is not None else [root]
    mapping: dict[int, nn.Module] = {}
    for scope in scopes:
        for m in scope.modules():
            if id(m) not in mapping:
                new = make(m)
                if new is not None:
                    mapping[id(m)] = new
    if not mapping:
        return mapping
    for parent in root.modules():
        for name, child in list(parent._modules.items()):
            if child is not None and id(child) in mapping:
                parent._modules[name] = mapping[id(child)]
    return mapping


def harmony_from_instance_norm(norm: nn.Module, order: int, polynomial: bool, **kwargs: Any) -> HarmonyNorm | None:
    """A HarmonyNorm equal to ``norm`` (an affine InstanceNorm), or None for any other module.

    ``kwargs`` go to HarmonyNorm (``basis``, ``poly_limit``)."""
    if not isinstance(norm, _InstanceNorm):
        return None
    if not norm.affine:
        raise ValueError(f"cannot harmonize {norm}: nnU-Net plans use affine InstanceNorm (norm_op_kwargs "
                         "{'eps': 1e-05, 'affine': True}); this network's norm is not affine")
    new = HarmonyNorm(norm.num_features, eps=norm.eps, order=order, polynomial=polynomial, **kwargs)
    new.weight.data.copy_(norm.weight.data)
    new.bias.data.copy_(norm.bias.data)
    return new.to(device=norm.weight.device, dtype=norm.weight.dtype)


def encoder_stage_scopes(encoder: nn.Module) -> list[nn.Module]:
    """Encoder stages in order, the ResEnc stem folded into stage 0 (it runs at that resolution)."""
    stages: list[nn.Module] = list(encoder.stages)
    stem = getattr(encoder, "stem", None)
    if stem is not None and stages:
        return [nn.ModuleList([stem, stages[0]]), *stages[1:]]
    return stages


def last_norm_of_stage(stage: nn.Module) -> HarmonyNorm | None:
    """The HarmonyNorm that runs last in an encoder stage (its statistics feed HarmonyRestore).

    That is the last one in registration order outside residual shortcut paths: in a PlainConv stage the
    norm of the last conv, in a residual stage ``conv2.norm`` (BasicBlockD) or ``conv3.norm`` (BottleneckD)
    of the last block; a block's ``skip`` projection runs before its main path.
    """
    last = None
    for name, m in stage.named_modules():
        if isinstance(m, HarmonyNorm) and "skip" not in name.split("."):
            last = m
    return last


def inject_harmony(encoder: nn.Module, decoder: nn.Module, stages: str, order: int, polynomial: bool,
                   **norm_kwargs: Any) -> list[HarmonyNorm | None]:
    """Replace the InstanceNorms of a planned U-Net by HarmonyNorm; return each encoder stage's last norm.

    ``stages="all"``: every norm of encoder and decoder; ``"first"``: only those of encoder stage 0 (and the
    ResEnc stem). The returned list has one entry per encoder stage (None where not harmonized); those
    norms are switched to ``keep_stats``.
    """
    if stages not in ("all", "first"):
        raise ValueError(f"harmony_stages must be 'all' or 'first', got {stages!r}")
    scopes = encoder_stage_scopes(encoder)
    within = scopes[:1] if stages == "first" else [encoder, decoder]
    mapping = replace_modules(decoder, lambda m: harmony_from_instance_norm(m, order, polynomial, **norm_kwargs),
                              within=within)
    # the decoder holds the encoder, so one pass over the decoder reaches every parent; but a caller may
    # pass a decoder that does not: fix up the encoder's own parents as well
    replace_modules(encoder, lambda m: mapping.get(id(m)), within=[encoder])
    if not mapping:
        raise ValueError("no InstanceNorm found in the planned network: HarmonyNorm replaces nnU-Net's "
                         "InstanceNorm layers; set harmony=False for networks planned with another norm")
    logger.debug("HarmonyNorm injected into %d norm layers (%s)", len(mapping), stages)
    kept: list[HarmonyNorm | None] = []
    for i, scope in enumerate(scopes):
        norm = last_norm_of_stage(scope) if (stages == "all" or i == 0) else None
        if norm is not None:
            norm.keep_stats = True
        kept.append(norm)
    return kept
